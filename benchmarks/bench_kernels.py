"""Where a CNN training step's time goes on this CPU: oneDNN's time per primitive, float32 against bfloat16.

TensorFlow runs the CNN's convolutions, pooling, dense layers and softmax as oneDNN primitives on x86 CPUs.
With ``ONEDNN_VERBOSE=1`` oneDNN prints one line per primitive it runs: its kind, the kernel it chose (whose
name says the instruction set: ``avx512_core_bf16`` for AVX512-BF16, ``avx512_core_amx`` for AMX), the
problem shape and the time it took. For each precision a worker process builds the default CNN
(``models.build_cnn`` with ``steps_per_execution`` 50), feeds it through train_cnn's own ``batches`` and
times ``--steps`` training steps after as many warm-up steps; this module sums the lines by layer and
direction, per training step, and prints the two precisions side by side with their ratio.

The instruction-set line tells whether bfloat16 runs on AMX tiles or on AVX-512 vectors: the size of
mixed precision's gain depends on it. Verbose logging slows each primitive a little, so the step time
printed is that of the logged run; the split between primitives is what this benchmark is for.

With ``--threads 1`` each worker runs TensorFlow on one thread (one op at a time, one thread per op): the
primitives' own cost, without the waits for the other core that small primitives show on two threads
(a 18 432-weight reorder measured 0.5 ms on two threads and 0.01 ms on one).

Run with ``python -m benchmarks kernels [--threads 1]`` (needs ``data/prepared/train.npz``).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "data" / "prepared" / "train.npz"
PRECISIONS = ("float32", "mixed_bfloat16")
SPE, BATCH = 50, 64
START, END = "== bench_kernels start", "== bench_kernels end"


def worker(precision: str, steps: int) -> None:
    """Train ``steps`` warm-up steps, then ``steps`` timed steps, marking the timed span on stdout."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from stages.lib import files, models, runtime, training

    x, y = files.load_split(TRAIN, stage="prepare")
    n = 2 * steps * BATCH
    if len(y) < n:
        raise SystemExit(f"{TRAIN} holds {len(y)} images; --steps {steps} needs {n}")
    runtime.seed_everything(42, tensorflow=True)
    model = models.build_cnn(precision=precision, steps_per_execution=SPE)
    data = training.batches(x[:n], y[:n], BATCH)
    model.fit(data.take(steps), epochs=1, verbose=0)  # tracing, kernel selection, thread start-up
    timed = data.skip(steps)
    libc = ctypes.CDLL(None)
    libc.fflush(None)  # oneDNN writes through C stdio: flush it before and after each marker
    os.write(1, f"{START}\n".encode())
    start = time.perf_counter()
    model.fit(timed, epochs=1, verbose=0)
    wall = time.perf_counter() - start
    libc.fflush(None)
    os.write(1, f"{END} {wall:.6f}\n".encode())


def parse(output: str, steps: int) -> tuple[str, float, dict[tuple[str, str], float]]:
    """The instruction set oneDNN reports, the wall ms per step and ms per step per (primitive, problem)."""
    isa, wall, per_step = "?", float("nan"), defaultdict(float)
    timed = False
    for line in output.splitlines():
        if line.startswith("onednn_verbose") and ",info,cpu,isa:" in line:
            isa = line.split("isa:", 1)[1].strip()
        elif line.startswith(START):
            timed = True
        elif line.startswith(END):
            timed, wall = False, 1e3 * float(line.split()[-1]) / steps
        elif timed and line.startswith("onednn_verbose") and ",exec,cpu," in line:
            fields = line.split(",")
            kind, direction, problem, ms = fields[5], fields[7], fields[-2], float(fields[-1])
            what = kind if direction in ("undef", "") else f"{kind} {direction.replace('_training', '')}"
            per_step[(what, problem)] += ms / steps
    return isa, wall, dict(per_step)


def run(precision: str, steps: int, threads: int | None) -> tuple[str, float, dict[tuple[str, str], float]]:
    env = {**os.environ, "ONEDNN_VERBOSE": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    if threads:
        env |= {"TF_NUM_INTRAOP_THREADS": str(threads), "TF_NUM_INTEROP_THREADS": "1"}
    cmd = [sys.executable, "-m", "benchmarks.bench_kernels", "--worker", precision, "--steps", str(steps)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or END not in proc.stdout:
        raise SystemExit(f"{precision} worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return parse(proc.stdout, steps)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="timed training steps per precision (default 200)")
    parser.add_argument("--threads", type=int, help="TensorFlow threads per op, one op at a time (default: its own)")
    parser.add_argument("--worker", choices=PRECISIONS, help=argparse.SUPPRESS)
    args = parser.parse_args([] if argv is None else argv)
    if args.worker:
        worker(args.worker, args.steps)
        return
    if not TRAIN.is_file():
        raise SystemExit(f"{TRAIN} not found: run `dvc repro prepare` first")
    results = {precision: run(precision, args.steps, args.threads) for precision in PRECISIONS}
    isa = results["mixed_bfloat16"][0]
    threads = f"{args.threads} thread(s) per op, one op at a time" if args.threads else "TensorFlow's default threads"
    print(f"oneDNN instruction set: {isa}")
    print(f"default CNN, batch {BATCH}, steps_per_execution {SPE}, {threads}; ms per training step over {args.steps}")
    rows = sorted({key for _, _, times in results.values() for key in times}, key=lambda k: (k[0], k[1]))
    print(f"{'primitive':<30}{'problem':<46}{'float32':>9}{'bfloat16':>10}{'fp32/bf16':>11}")
    totals = dict.fromkeys(PRECISIONS, 0.0)
    conv = dict.fromkeys(PRECISIONS, 0.0)
    for what, problem in rows:
        ms = {p: results[p][2].get((what, problem), 0.0) for p in PRECISIONS}
        for p in PRECISIONS:
            totals[p] += ms[p]
            conv[p] += ms[p] if what.startswith("convolution") else 0.0
        if max(ms.values()) < 0.005:
            continue  # weight reorders and the like: noise next to the rest
        ratio = f"{ms['float32'] / ms['mixed_bfloat16']:.2f}×" if ms["mixed_bfloat16"] else "—"
        print(f"{what[:29]:<30}{problem[:45]:<46}{ms['float32']:>9.3f}{ms['mixed_bfloat16']:>10.3f}{ratio:>11}")
    walls = {p: results[p][1] for p in PRECISIONS}
    for label, figures in (
        ("all oneDNN primitives", totals),
        ("  of which convolutions", conv),
        ("training step (wall, logged run)", walls),
    ):
        fp32, bf16 = (figures[p] for p in PRECISIONS)
        print(f"{label:<76}{fp32:>9.3f}{bf16:>10.3f}{fp32 / bf16:>10.2f}×")
    for p in PRECISIONS:
        share = f"{conv[p] / walls[p]:.0%} of the step, all primitives {totals[p] / walls[p]:.0%}"
        print(f"  {p}: convolutions are {share}")


if __name__ == "__main__":
    main(sys.argv[1:])
