"""Stage overhead: each stage's time outside its own work, before and after a change, side by side.

Two clones with the working copy's data and models: ``--before`` (a commit) and HEAD. For every stage,
``dvc repro --force --single-item <stage>`` is timed from outside (the whole command: DVC's start-up and
bookkeeping, the stage process's start-up and imports, its work, MLflow, shut-down), while the stage itself
reports the time of its work and of recording it in MLflow (``$PIPELINE_TIMINGS``, written by
``runtime.stage``). "outside" is the command's wall time minus the work; it includes the MLflow recording.
The two versions alternate, stage by stage, ``--repeats`` times (medians are printed), so machine load hits
both alike. Both clones train the CNN for ``--epochs`` epochs (1 by default: the work is not what is
measured here). Then, in HEAD's clone with params.yaml as it is, ``dvc repro --force --downstream prepare``
(every stage but fetch) is timed against the CNN's fit (its run record's wall time) plus 30 s.

Run with ``python -m benchmarks stages [--before REV] [--repeats N]``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
if str(HERE.parents[1]) not in sys.path:
    sys.path.insert(0, str(HERE.parents[1]))

from benchmarks import clone as clones  # noqa: E402
from stages.lib import files, pipeline  # noqa: E402

# The commit before the overhead cuts (its stages already report their timings)
BEFORE = "8694055"
TARGET_S = 30.0  # every stage but fetch within the CNN's fit plus this


def set_epochs(repo: Path, epochs: int) -> None:
    """Set train_cnn's ``epochs`` in ``repo``'s params.yaml (the only ``epochs:`` key at two spaces)."""
    params = repo / "params.yaml"
    text, found = re.subn(r"(?m)^(  epochs: )\d+", rf"\g<1>{epochs}", params.read_text(), count=1)
    if not found:
        raise SystemExit(f"{params}: no `  epochs:` line to set")
    params.write_text(text)


def run_stage(repo: Path, stage: str) -> dict[str, float]:
    """``dvc repro --force --single-item stage`` in ``repo``: its wall time and the stage's own timing."""
    with tempfile.NamedTemporaryFile("r", suffix=".jsonl") as timings:
        env = {"PIPELINE_TIMINGS": timings.name}
        start = time.perf_counter()
        clones.run([str(clones.BIN / "dvc"), "repro", "--force", "--single-item", stage], repo, extra_env=env)
        wall = time.perf_counter() - start
        reported = [json.loads(line) for line in timings.read().splitlines() if line.strip()]
    if not reported:
        raise SystemExit(f"{stage} in {repo} reported no timing: is its runtime.stage older than the timings?")
    work = reported[-1]
    return {"wall_s": wall, "compute_s": work["compute_s"], "tracking_s": work["tracking_s"]}


def table(results: dict[str, dict[str, list[dict[str, float]]]], stages: list[str]) -> str:
    """The side-by-side table of medians: wall, work, outside (and MLflow) per stage and version."""
    lines = [
        f"{'stage':<22}{'before: wall':>13}{'work':>7}{'outside':>9}{'(mlflow)':>9}"
        f"{'after: wall':>13}{'work':>7}{'outside':>9}{'(mlflow)':>9}"
    ]
    totals = {"before": 0.0, "after": 0.0}
    for stage in stages:
        cells = []
        for version in ("before", "after"):
            runs = results[version][stage]
            wall = statistics.median(r["wall_s"] for r in runs)
            work = statistics.median(r["compute_s"] for r in runs)
            mlflow = statistics.median(r["tracking_s"] for r in runs)
            totals[version] += wall - work
            cells.append(f"{wall:>13.1f}{work:>7.1f}{wall - work:>9.1f}{mlflow:>9.1f}")
        lines.append(f"{stage:<22}{cells[0]}{cells[1]}")
    lines.append(f"{'sum of outside':<22}{totals['before']:>29.1f}{'':>9}{totals['after']:>29.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=BEFORE, help=f"the commit to compare with (default {BEFORE})")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each stage per version (default 2)")
    parser.add_argument("--epochs", type=int, default=1, help="CNN epochs in the table's runs (default 1)")
    args = parser.parse_args([] if argv is None else argv)

    repos = {"before": clones.make_clone("bench-before-", rev=args.before), "after": clones.make_clone("bench-after-")}
    try:
        stages = pipeline.stage_names(files.read_yaml(repos["after"] / pipeline.PIPELINE_FILE, "pipeline file"))
        for repo in repos.values():
            set_epochs(repo, args.epochs)
            clones.run([str(clones.BIN / "dvc"), "repro", "--single-item", "fetch"], repo)  # warm: store, caches
        results: dict[str, dict[str, list[dict[str, float]]]] = {v: {s: [] for s in stages} for v in repos}
        for _ in range(args.repeats):
            for stage in stages:
                for version, repo in repos.items():
                    results[version][stage].append(run_stage(repo, stage))
        print(f"(a) each stage's `dvc repro --force --single-item`, median of {args.repeats}, versions alternating")
        print(f"    before = {args.before}, after = HEAD; train_cnn at {args.epochs} epoch(s); seconds")
        print(table(results, stages))

        after = repos["after"]
        clones.run(["git", "checkout", "-q", "params.yaml"], after)
        start = time.perf_counter()
        clones.run([str(clones.BIN / "dvc"), "repro", "--force", "--downstream", "prepare"], after)
        total = time.perf_counter() - start
        fit = json.loads((after / "models" / "cnn.run.json").read_text())["wall_time_s"]
        verdict = "meets" if total <= fit + TARGET_S else "ABOVE"
        print(f"\n(b) `dvc repro --force --downstream prepare` (params.yaml as committed): {total:.1f} s")
        print(f"    the CNN's fit {fit:.1f} s + {TARGET_S:.0f} s = {fit + TARGET_S:.1f} s: {verdict} the target")
        return {"stages": results, "downstream_s": total, "fit_s": fit}
    finally:
        for repo in repos.values():
            clones.remove(repo)


if __name__ == "__main__":
    main(sys.argv[1:])
