"""Pipeline overhead: a no-op ``dvc repro`` of the full pipeline, and each stage's start-up time.

(a) In a clone of HEAD with the working copy's data and models (``dvc commit`` first records them, so
nothing is stale), ``dvc repro`` has nothing to do; it is timed ``--repeats`` times, alternating with the
same no-op without ruamel.yaml's C parser (``ruamel.yaml.clib``, a dependency of this project: DVC reads
dvc.yaml, dvc.lock and params with it; hidden here by a ``_ruamel_yaml`` module that fails to import, as
when only ruamel.yaml >= 0.19 is installed) and with a no-op ``dvc repro`` of a one-stage pipeline
(``echo``) in another fresh repository: the floor that DVC's own start-up sets. Medians are printed.

(b) Start-up of each stage: the time from starting its Python process to the first line of its body,
i.e. interpreter start, importing ``stages.<module>``, then what entering ``runtime.stage`` does before
the stage's ``run`` (params validation, device set-up, opening the MLflow run). Each worker enters the
real ``runtime.stage`` and only records the time and which heavy libraries are loaded by then.
Medians of ``--repeats`` runs per stage, after one warm-up run that creates the clone's MLflow store.
Also timed: ``import mlflow`` and ``import tensorflow`` alone, each in a fresh process.

Run with ``python -m benchmarks overhead``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
if str(HERE.parents[1]) not in sys.path:
    sys.path.insert(0, str(HERE.parents[1]))

from benchmarks import clone as clones  # noqa: E402
from stages.lib import pipeline  # noqa: E402

# One stage of each module (the baselines share theirs); which use TensorFlow: the stage table
STAGES = ("fetch", "prepare", "augment", "train_cnn", "train_baseline@ridge", "evaluate")
NEEDS_TF = {stage for stage in STAGES if pipeline.settings(stage).uses_tensorflow}
# Libraries worth knowing about at the start of a body: each costs a second or more to import here
HEAVY = ("tensorflow", "keras", "mlflow", "sklearn", "scipy", "pandas", "pyarrow", "sqlalchemy", "alembic", "fastapi")
FLOOR_PIPELINE = "stages:\n  one:\n    cmd: echo one > out.txt\n    outs:\n      - out.txt\n"
NOOP_TARGET_S = 1.0


def worker(stage: str) -> None:
    """Enter ``stage``'s real ``runtime.stage`` and leave it at once; print checkpoint times (epoch seconds)
    as JSON."""
    marks = {"interpreter": time.time()}
    sys.path.insert(0, str(Path.cwd()))  # the clone's stages package
    importlib.import_module(f"stages.{stage.partition('@')[0]}")
    marks["imported"] = time.time()
    from stages.lib import runtime

    with runtime.stage(stage):
        marks["body"] = time.time()
        loaded = [name for name in HEAVY if name in sys.modules]
    print(json.dumps({"marks": marks, "loaded": loaded}))


def _startup(repo: Path, stage: str) -> dict[str, object]:
    start = time.time()
    out = clones.run([sys.executable, str(HERE), "--worker", stage], repo).stdout
    result = json.loads(out.strip().splitlines()[-1])
    marks = result["marks"]
    return {
        "interpreter": marks["interpreter"] - start,
        "import": marks["imported"] - marks["interpreter"],
        "run_stage": marks["body"] - marks["imported"],
        "total": marks["body"] - start,
        "loaded": result["loaded"],
    }


def _import_time(repo: Path, module: str) -> float:
    start = time.perf_counter()
    clones.run([sys.executable, "-c", f"import {module}"], repo)
    return time.perf_counter() - start


def _noop_repro(repo: Path, extra_env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    out = clones.run([str(clones.BIN / "dvc"), "repro"], repo, extra_env).stdout
    seconds = time.perf_counter() - start
    if "Data and pipelines are up to date" not in out:
        raise SystemExit(f"dvc repro in {repo} was not a no-op:\n{out}")
    return seconds


def _pure_yaml_env(repo: Path) -> dict[str, str]:
    """The environment of a DVC without ruamel.yaml's C parser: a ``_ruamel_yaml`` that fails to import."""
    hide = repo.parent / "pure-yaml"
    hide.mkdir(exist_ok=True)
    (hide / "_ruamel_yaml.py").write_text("raise ImportError('ruamel.yaml.clib hidden by the benchmark')\n")
    return {"PYTHONPATH": str(hide)}


def _floor_repo() -> Path:
    repo = Path(tempfile.mkdtemp(prefix="bench-overhead-floor-"))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    clones.run([str(clones.BIN / "dvc"), "init", "-q"], repo)
    (repo / "dvc.yaml").write_text(FLOOR_PIPELINE)
    clones.run([str(clones.BIN / "dvc"), "repro", "-q"], repo)
    return repo


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="no-op repros per pipeline (default 5)")
    parser.add_argument("--startup-repeats", type=int, default=3, help="start-ups per stage (default 3)")
    parser.add_argument("--worker", choices=list(STAGES), help=argparse.SUPPRESS)
    args = parser.parse_args([] if argv is None else argv)
    if args.worker:
        worker(args.worker)
        return {}

    repo = clones.make_clone("bench-overhead-")
    floor = _floor_repo()
    try:
        # Record the copied outputs (and code committed after the last reference run) in the clone's dvc.lock
        clones.run([str(clones.BIN / "dvc"), "commit", "-f", "-q"], repo)
        pure = _pure_yaml_env(repo)
        _noop_repro(repo), _noop_repro(repo, pure), _noop_repro(floor)  # warm-up: file caches, DVC's state db
        full, full_pure, one = [], [], []
        for _ in range(args.repeats):
            full.append(_noop_repro(repo))
            full_pure.append(_noop_repro(repo, pure))
            one.append(_noop_repro(floor))
        med_full, med_pure, med_one = (statistics.median(x) for x in (full, full_pure, one))
        print(f"(a) no-op `dvc repro`, median of {args.repeats}, alternating")
        rows = (("full pipeline (7 stages)", full), ("  without YAML's C parser", full_pure), ("one-stage floor", one))
        for label, runs in rows:
            print(f"  {label:<26} {statistics.median(runs):5.2f} s  [{', '.join(f'{s:.2f}' for s in runs)}]")
        verdict = "meets" if med_full <= NOOP_TARGET_S else "ABOVE"
        print(
            f"  C parser saves {med_pure - med_full:.2f} s; full / floor {med_full / med_one:.2f}×; "
            f"full pipeline {verdict} the {NOOP_TARGET_S} s target"
        )

        warm = time.perf_counter()
        _startup(repo, "prepare")  # creates the clone's MLflow store (tables, migrations): a one-time cost
        first_store = time.perf_counter() - warm
        runs: dict[str, list[dict[str, object]]] = {stage: [] for stage in STAGES}
        for _ in range(args.startup_repeats):
            for stage in STAGES:
                runs[stage].append(_startup(repo, stage))
        imports = {m: statistics.median(_import_time(repo, m) for _ in range(args.startup_repeats)) for m in HEAVY[:3]}
        imports["numpy"] = statistics.median(_import_time(repo, "numpy") for _ in range(args.startup_repeats))

        print(f"\n(b) stage start-up: process start to the first line of the body, median of {args.startup_repeats}")
        print(f"{'stage':<22}{'python':>8}{'import':>8}{'run_stage':>11}{'total s':>9}  heavy modules loaded by then")
        summary: dict[str, object] = {
            "noop_full_s": med_full,
            "noop_pure_yaml_s": med_pure,
            "noop_floor_s": med_one,
            "startup": {},
        }
        for stage, rs in runs.items():
            med = {
                k: statistics.median(float(r[k]) for r in rs) for k in ("interpreter", "import", "run_stage", "total")
            }
            loaded = list(rs[-1]["loaded"])
            flag = " (TensorFlow NOT needed here)" if "tensorflow" in loaded and stage not in NEEDS_TF else ""
            print(
                f"{stage:<22}{med['interpreter']:>8.2f}{med['import']:>8.2f}{med['run_stage']:>11.2f}"
                f"{med['total']:>9.2f}  {', '.join(loaded) or '-'}{flag}"
            )
            summary["startup"][stage] = med | {"loaded": loaded}  # type: ignore[index]
        print("python: interpreter start; import: `import stages.<module>`; run_stage: params, device, MLflow run")
        print(f"first stage on a new MLflow store (creates its tables): {first_store:.2f} s")
        print("fresh-process import alone: " + ", ".join(f"{m} {s:.2f} s" for m, s in imports.items()))
        summary["imports"] = imports
        return summary
    finally:
        clones.remove(repo)
        shutil.rmtree(floor, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
