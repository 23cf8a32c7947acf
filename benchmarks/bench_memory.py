"""Peak memory and wall time of every stage of the full pipeline, each run for real.

In a clone of HEAD with the working copy's data and models (``dvc commit`` first records them), each
stage runs on its own, in pipeline order, with ``dvc repro --force --single-item <stage>`` and
params.yaml's defaults. Each ``dvc repro`` runs under a small Python wrapper process that reports its
children's peak resident set size (``getrusage(RUSAGE_CHILDREN).ru_maxrss``: the largest single
process among dvc and the stage it starts, not their sum) and the wall time. ``fetch`` re-fetches
MNIST from the first source that answers, so its time depends on the network.

Run with ``python -m benchmarks memory``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
if str(HERE.parents[1]) not in sys.path:
    sys.path.insert(0, str(HERE.parents[1]))

from benchmarks import clone as clones  # noqa: E402
from stages.lib import files, pipeline  # noqa: E402

TARGETS_MB = {"train_cnn": 1.5 * 1024}  # the performance targets: train_cnn at most 1.5 GB
# Runs the command given as arguments; prints its wall time, exit code and the children's peak RSS as JSON
WRAPPER = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"wall_s": time.perf_counter() - start, "rc": proc.returncode,
                  "peak_rss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                  "log": (proc.stdout + proc.stderr)[-2000:]}))
"""


def measure(repo: Path, stage: str) -> dict[str, Any]:
    """Run one stage for real in ``repo``; return wall seconds, exit code, peak RSS (MB) and the log's tail."""
    dvc = str(clones.BIN / "dvc")
    out = clones.run([sys.executable, "-c", WRAPPER, dvc, "repro", "--force", "--single-item", stage], repo).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mb"] = result.pop("peak_rss_kb") / 1024  # Linux reports kilobytes
    return result


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", help="comma-separated subset (default: every stage of dvc.yaml)")
    args = parser.parse_args([] if argv is None else argv)

    repo = clones.make_clone("bench-memory-")
    try:
        clones.run([str(clones.BIN / "dvc"), "commit", "-f", "-q"], repo)
        names = pipeline.stage_names(files.read_yaml(repo / pipeline.PIPELINE_FILE, "pipeline file"))
        if args.stages:
            wanted = [s.strip() for s in args.stages.split(",")]
            unknown = sorted(set(wanted) - set(names))
            if unknown:
                raise SystemExit(f"unknown stage(s) {unknown}; dvc.yaml has {names}")
            names = [n for n in names if n in wanted]
        results: dict[str, dict[str, Any]] = {}
        print(f"each stage alone: dvc repro --force --single-item <stage>, params.yaml defaults, HEAD of {clones.ROOT}")
        print(f"{'stage':<22}{'wall s':>8}{'peak RSS':>11}  target")
        for stage in names:
            r = results[stage] = measure(repo, stage)
            target = TARGETS_MB.get(stage)
            verdict = ""
            if target is not None:
                verdict = f"≤ {target / 1024:.1f} GB: {'meets' if r['peak_rss_mb'] <= target else 'ABOVE'}"
            status = "" if r["rc"] == 0 else f"  FAILED (exit {r['rc']}): {r['log'][-300:]}"
            print(f"{stage:<22}{r['wall_s']:>8.1f}{r['peak_rss_mb']:>8.0f} MB  {verdict}{status}", flush=True)
        total = sum(r["wall_s"] for r in results.values())
        print(f"{'sum':<22}{total:>8.1f}   (stages one after another, each with its own dvc start-up)")
        return results
    finally:
        clones.remove(repo)


if __name__ == "__main__":
    main(sys.argv[1:])
