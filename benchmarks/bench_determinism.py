"""Cost of deterministic TensorFlow ops on CNN training: the pipeline's train() with and without them.

``tf.config.experimental.enable_op_determinism`` is process-wide and cannot be switched off once on, so
each measurement runs in its own worker process, alternating the two modes. Uses the real prepared
training split (data/prepared/train.npz and val.npz) and the train_cnn defaults of params.yaml.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(mode: str, epochs: int) -> None:
    import numpy as np
    import tensorflow as tf

    from benchmarks.bench_train_cnn import pipeline_settings
    from stages.lib import training

    if mode == "off":
        # Measure the same code path with the determinism switch disabled
        tf.config.experimental.enable_op_determinism = lambda: None
    config, seed = pipeline_settings(epochs)
    train = np.load(REPO / "data" / "prepared" / "train.npz")
    val = np.load(REPO / "data" / "prepared" / "val.npz")
    start = time.perf_counter()
    _, history = training.train(train["x"], train["y"], val["x"], val["y"], config, seed=seed, verbose=0)
    print(json.dumps({"fit_s": time.perf_counter() - start, "val_accuracy": history["val_accuracy"][-1]}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worker", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args([] if argv is None else argv)
    if args.worker:
        worker(args.worker, args.epochs)
        return
    if not (REPO / "data" / "prepared" / "train.npz").is_file():
        print("needs data/prepared/*.npz: run `dvc repro prepare` first")
        return
    results: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
    for _ in range(args.repeats):
        for mode in ("on", "off"):
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.bench_determinism", "--worker", mode, "--epochs", str(args.epochs)],
                cwd=REPO,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            results[mode].append(json.loads(out.strip().splitlines()[-1]))
    best = {mode: min(r["fit_s"] for r in runs) for mode, runs in results.items()}
    print(f"train_cnn defaults, {args.epochs} epochs on 55000 images, best of {args.repeats} per mode")
    for mode, runs in results.items():
        fits = ", ".join(f"{r['fit_s']:.1f}" for r in runs)
        print(f"  op determinism {mode:>3}: best {best[mode]:6.1f} s  [{fits}]  val acc {runs[-1]['val_accuracy']:.4f}")
    print(f"  cost of determinism: {best['on'] / best['off']:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
