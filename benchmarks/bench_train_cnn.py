"""CNN training speed and accuracy: the source script as written against this project's ``train()`` levers.

Every variant trains the default CNN (Conv32-Pool-Conv64-Pool-Conv64-Dense64-Dense10, Adam 1e-3,
batch 64, 5 epochs, seed 42) on ``data/prepared/train.npz`` (55000 images, no augmentation) and is scored
on ``data/prepared/test.npz``. Levers: float32 vs mixed_bfloat16, steps_per_execution 1 vs 25/50/100,
micro-batches 1 vs 2 (``micro2``: each batch in two halves trained at once, one per core), the tf.data
pipeline of ``train()`` vs ``model.fit`` on NumPy arrays; ``--variants`` picks them (``DEFAULT_VARIANTS``:
the source script and each lever added in turn), ``defaults`` is params.yaml's settings. ``source``
is the source document's script as written (float32, ``model.fit`` on NumPy, no validation); the other
variants validate on ``data/prepared/val.npz`` every epoch as the stage does. ``* aug110k`` trains on what
the augment stage makes of it with params.yaml's defaults (originals + one augmented copy: 110000 images),
to check the pipeline's time and accuracy budget.

Each variant runs in its own process (clean TensorFlow state, its own peak RSS); the variants run one
after another in one invocation, so machine load hits them alike; with ``--repeats`` they alternate.
Wall time ("fit s") is the fit (model build, data pipeline, training, validation), not the TensorFlow
import; "CPU s" is the process's CPU time over the same span, which other jobs on the machine disturb less.
With ``--epoch-time`` (``python -m benchmarks train_cnn --epoch-time``) it instead reports seconds per
epoch of the pipeline's ``train()`` with params.yaml's train_cnn settings on the augment stage's output
(``data/augmented/train.npz``, else the prepared split augmented as params.yaml says), validation
included, on whatever device TensorFlow sees (a GPU when one is visible; train() itself then picks the
strategy and XLA, as in the stage): the first epoch (tracing, warm-up) and the median of the others.

``make bench`` (no options) runs the source script against ``defaults`` in 5 alternating pairs, one seed
per pair (``--pairs N``): the speed-up per training image, its median and spread, and whether the
defaults' mean test accuracy is within 0.002 of the source's; then the seconds per epoch.

Run with ``python -m benchmarks train_cnn`` or ``python benchmarks/bench_train_cnn.py --variants ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from stages.lib import files  # noqa: E402

PREPARED = ROOT / "data" / "prepared"
AUGMENTED = ROOT / "data" / "augmented" / "train.npz"
SEED, EPOCHS, BATCH = 42, 5, 64
BF16 = "mixed_bfloat16"

# name: (how it trains, precision, steps_per_execution, training-set copies, micro-batches)
VARIANTS: dict[str, tuple[str, str, int, int, int]] = {
    "source": ("source", "float32", 1, 1, 1),
    "fp32 numpy": ("numpy", "float32", 1, 1, 1),
    "fp32": ("train", "float32", 1, 1, 1),
    "fp32 spe50": ("train", "float32", 50, 1, 1),
    "bf16": ("train", BF16, 1, 1, 1),
    "bf16 spe25": ("train", BF16, 25, 1, 1),
    "bf16 spe50": ("train", BF16, 50, 1, 1),
    "bf16 spe100": ("train", BF16, 100, 1, 1),
    "bf16 spe50 micro2": ("train", BF16, 50, 1, 2),
    "bf16 spe50 numpy": ("numpy", BF16, 50, 1, 1),
    "fp32 aug110k": ("augmented", "float32", 1, 2, 1),
    "bf16 spe50 aug110k": ("augmented", BF16, 50, 2, 1),
    "bf16 spe50 micro2 aug110k": ("augmented", BF16, 50, 2, 2),
    # params.yaml's train_cnn settings as the stage maps them (precision, steps_per_execution, micro-batches)
    "defaults": ("defaults", "params.yaml", 0, 1, 0),
}
PAIRS = 5  # source against defaults, alternating, one seed per pair
ACCURACY_SLACK = 0.002  # equal accuracy: the defaults' mean at most this much below the source's
# What `make bench` runs: the source script, the levers one at a time, and params.yaml's defaults
DEFAULT_VARIANTS = ["source", "fp32 spe50", "bf16 spe50", "bf16 spe50 micro2"]
HOW = {
    "source": "source script: fit(NumPy), no validation",
    "numpy": "build_cnn + fit(NumPy), validation",
    "train": "training.train(): tf.data, validation",
    "augmented": "train(), on augmented 110000 images",
    "defaults": "train() with params.yaml's train_cnn settings",
}


def _split(name: str) -> tuple[np.ndarray, np.ndarray]:
    path = PREPARED / f"{name}.npz"
    if not path.is_file():
        raise SystemExit(f"{path} not found: run `dvc repro prepare` first")
    return files.load_split(path, stage="prepare")


def _augmented(x: np.ndarray, y: np.ndarray, copies: int) -> tuple[np.ndarray, np.ndarray]:
    """The training set as the augment stage writes it with params.yaml's ranges: originals + ``copies`` copies."""
    from stages import augment
    from stages.lib import params

    a = params.read_all(ROOT).augment
    extra = augment.augment(x, copies, augment.Ranges.from_params(a), a.batch_size, seed=SEED)
    return augment.with_originals(x, y, extra)


def _source_script(x_train: np.ndarray, y_train: np.ndarray, seed: int) -> Any:
    """The source document's CNN script as written: the classic Keras convnet fitted on NumPy arrays."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    train_images = x_train.reshape((len(x_train), 28, 28, 1)).astype("float32") / 255
    train_labels = keras.utils.to_categorical(y_train)
    model = keras.Sequential(
        [
            keras.Input(shape=(28, 28, 1)),
            layers.Conv2D(32, (3, 3), activation="relu"),
            layers.MaxPooling2D((2, 2)),
            layers.Conv2D(64, (3, 3), activation="relu"),
            layers.MaxPooling2D((2, 2)),
            layers.Conv2D(64, (3, 3), activation="relu"),
            layers.Flatten(),
            layers.Dense(64, activation="relu"),
            layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    model.fit(train_images, train_labels, epochs=EPOCHS, batch_size=BATCH, verbose=2)
    return model


def _peak_rss_mb() -> float:
    """This process's peak resident set size since it started its program (``VmHWM``). Not ``ru_maxrss``:
    Linux carries into it the RSS of the parent the worker was forked from, which under ``make bench``
    had grown to 2 GB and showed as every variant's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker(name: str, seed: int = SEED) -> dict[str, Any]:
    """Train one variant in this process; return its fit wall time, test accuracy and peak RSS."""
    how, precision, spe, copies, micro = VARIANTS[name]
    x_train, y_train = _split("train")
    x_val, y_val = _split("val")
    x_test, y_test = _split("test")
    if copies > 1:
        x_train, y_train = _augmented(x_train, y_train, copies - 1)

    import keras  # noqa: F401  (imported before the clock starts, like the stage's own import)

    from stages.lib import models, runtime, training
    from stages.lib.preprocess import one_hot, to_model_input

    start, cpu_start = time.perf_counter(), _cpu_s()
    if how == "source":
        model = _source_script(x_train, y_train, seed)
    elif how == "numpy":
        runtime.seed_everything(seed, tensorflow=True)
        model = models.build_cnn(precision=precision, steps_per_execution=spe)
        model.fit(
            to_model_input(x_train),
            one_hot(y_train),
            batch_size=BATCH,
            epochs=EPOCHS,
            validation_data=(to_model_input(x_val), one_hot(y_val)),
            shuffle=True,
            verbose=2,
        )
    else:
        if how == "defaults":
            config = pipeline_settings(EPOCHS)[0]
        else:
            config = training.TrainConfig(
                precision=precision, steps_per_execution=spe, micro_batches=micro, batch_size=BATCH, epochs=EPOCHS
            )
        model, _ = training.train(x_train, y_train, x_val, y_val, config, seed=seed)
    fit_s, cpu_s = time.perf_counter() - start, _cpu_s() - cpu_start
    _, test_accuracy = model.evaluate(to_model_input(x_test), one_hot(y_test), batch_size=1024, verbose=0)
    return {
        "fit_s": fit_s,
        "cpu_s": cpu_s,
        "test_accuracy": float(test_accuracy),
        "train_size": len(y_train),
        "peak_rss_mb": _peak_rss_mb(),
    }


def pipeline_settings(epochs: int) -> tuple[Any, int]:
    """params.yaml's train_cnn settings (as the stage maps them) for ``epochs`` epochs, and its base seed."""
    import dataclasses

    from stages.lib import params, training

    p = params.read_all(ROOT)
    return dataclasses.replace(training.TrainConfig.from_params(p.train_cnn), epochs=epochs), p.base.seed


def epoch_worker(epochs: int) -> dict[str, Any]:
    """Time each epoch of ``train()`` with params.yaml's train_cnn settings on the pipeline's training set."""

    config, seed = pipeline_settings(epochs)
    x_val, y_val = _split("val")
    if AUGMENTED.is_file():
        x_train, y_train = files.load_split(AUGMENTED, stage="augment")
        source = str(AUGMENTED.relative_to(ROOT))
    else:
        from stages.lib import params

        x_train, y_train = _augmented(*_split("train"), params.read_all(ROOT).augment.copies)
        source = "data/prepared/train.npz augmented as params.yaml says"

    import keras
    import tensorflow as tf

    from stages.lib import training

    gpus = tf.config.list_physical_devices("GPU")
    device = tf.config.experimental.get_device_details(gpus[0]).get("device_name", gpus[0].name) if gpus else "CPU"

    times: list[float] = []

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            times.append(time.perf_counter() - self.start)

    _, history = training.train(x_train, y_train, x_val, y_val, config, seed=seed, callbacks=[EpochTimer()], verbose=0)
    return {
        "device": device,
        "source": source,
        "train_size": len(y_train),
        "epoch_s": times,
        "hparams": config.as_dict(),
        "val_accuracy": history["val_accuracy"][-1],
    }


def epoch_time(epochs: int = 3) -> dict[str, Any]:
    """Print and return seconds per epoch of the pipeline's train() on the device present (its own process)."""
    r = _run_worker("epoch-time", SEED, ["--epochs", str(epochs)])
    steady = statistics.median(r["epoch_s"][1:]) if len(r["epoch_s"]) > 1 else r["epoch_s"][0]
    shown = r["hparams"]
    print(f"train_cnn train(), params.yaml settings: {shown}")
    print(f"data: {r['train_size']} training images ({r['source']}), 5000 validation images per epoch")
    print(
        f"device {r['device']}: first epoch {r['epoch_s'][0]:.1f} s, then {steady:.1f} s/epoch "
        f"(median of {max(len(r['epoch_s']) - 1, 1)}; all: {', '.join(f'{t:.1f}' for t in r['epoch_s'])}); "
        f"{r['train_size'] / steady:,.0f} images/s"
    )
    if r["device"] != "CPU":
        print(f"  {'meets' if steady <= 1.0 else 'ABOVE'} the 1 s/epoch GPU target")
    return r | {"steady_epoch_s": steady}


def _run_worker(name: str, seed: int, extra: list[str] | None = None) -> dict[str, Any]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_train_cnn", "--worker", name, "--seed", str(seed), *(extra or [])],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not lines[-1].startswith("{"):
        raise SystemExit(f"variant {name!r} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(lines[-1])


def main() -> dict[str, Any]:
    """What ``make bench`` prints: the source script against the defaults (:func:`pairs`), then the seconds per
    epoch of the pipeline's settings on its own training set (:func:`epoch_time`)."""
    result = {"pairs": pairs()}
    print()
    result["epoch time"] = epoch_time()
    return result


def levers(variants: list[str] | None = None, repeats: int = 1, seed: int = SEED) -> dict[str, dict[str, Any]]:
    """Run the variants (``DEFAULT_VARIANTS`` unless named) ``repeats`` times, alternating; print a table of
    their fit times, speed-ups against the first (the source script) and accuracies; return the results."""
    names = variants or DEFAULT_VARIANTS
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names:
            result = _run_worker(name, seed)
            runs[name].append(result)
            print(
                f"  [{r + 1}/{repeats}] {name}: fit {result['fit_s']:.1f} s (CPU {result['cpu_s']:.1f} s), "
                f"test accuracy {result['test_accuracy']:.4f}",
                flush=True,
            )
    summary = {
        name: {
            "fit_s": statistics.median(x["fit_s"] for x in rs),
            "cpu_s": statistics.median(x["cpu_s"] for x in rs),
            "test_accuracy": statistics.median(x["test_accuracy"] for x in rs),
            "peak_rss_mb": max(x["peak_rss_mb"] for x in rs),
            "train_size": rs[0]["train_size"],
        }
        for name, rs in runs.items()
    }
    base = summary.get("source", next(iter(summary.values())))["fit_s"]
    print(
        f"CNN training, {EPOCHS} epochs, batch {BATCH}, seed {seed}, train data/prepared/train.npz; "
        f"median of {repeats} run(s); speed-up vs {'source' if 'source' in summary else names[0]}"
    )
    header = f"{'variant':<26}{'how':<43}{'precision':<16}{'spe':>4}{'micro':>6}{'train n':>9}"
    print(f"{header}{'fit s':>8}{'speed-up':>9}{'CPU s':>8}{'test acc':>10}{'peak RSS':>10}")
    for name, s in summary.items():
        how, precision, spe, _, micro = VARIANTS[name]
        print(
            f"{name:<26}{HOW[how]:<43}{precision:<16}{spe:>4}{micro:>6}{s['train_size']:>9}{s['fit_s']:>8.1f}"
            f"{base / s['fit_s']:>8.2f}×{s['cpu_s']:>8.1f}{s['test_accuracy']:>10.4f}{s['peak_rss_mb']:>8.0f}MB"
        )
    return summary


def pairs(n: int = PAIRS, first_seed: int = SEED) -> dict[str, Any]:
    """The source script against params.yaml's defaults, ``n`` alternating pairs, seed ``first_seed + i`` for
    pair ``i``, same data (55000 prepared images, 5 epochs): the speed-up per pair (per training image), its
    median and spread, and both mean test accuracies."""
    rows = []
    for i in range(n):
        seed = first_seed + i
        source, defaults = _run_worker("source", seed), _run_worker("defaults", seed)
        rows.append((seed, source, defaults, source["fit_s"] / defaults["fit_s"]))
        print(
            f"  pair {i + 1}/{n}, seed {seed}: source {source['fit_s']:.1f} s ({source['test_accuracy']:.4f}), "
            f"defaults {defaults['fit_s']:.1f} s ({defaults['test_accuracy']:.4f}): {rows[-1][3]:.2f}×",
            flush=True,
        )
    ratios = [r[3] for r in rows]
    acc = {k: statistics.mean(r[j]["test_accuracy"] for r in rows) for j, k in ((1, "source"), (2, "defaults"))}
    equal = acc["defaults"] >= acc["source"] - ACCURACY_SLACK
    print(
        f"CNN training, params.yaml's defaults against the source script: median {statistics.median(ratios):.2f}× "
        f"over {n} pairs (spread {min(ratios):.2f}–{max(ratios):.2f}×); mean test accuracy source "
        f"{acc['source']:.4f}, defaults {acc['defaults']:.4f} ({'equal' if equal else 'LOWER'}: "
        f"within {ACCURACY_SLACK})"
    )
    return {"ratios": ratios, "median": statistics.median(ratios), "accuracy": acc, "equal_accuracy": equal}


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", help=f"comma-separated subset of: {', '.join(VARIANTS)}")
    parser.add_argument("--repeats", type=int, default=1, help="runs per variant, alternating (default 1)")
    parser.add_argument("--seed", type=int, default=SEED, help=f"training seed (default {SEED})")
    parser.add_argument("--epoch-time", action="store_true", help="only seconds per epoch of the pipeline's train()")
    parser.add_argument("--pairs", type=int, help="only the source script against the defaults, in N pairs")
    parser.add_argument("--epochs", type=int, default=3, help="epochs timed with --epoch-time (default 3)")
    parser.add_argument("--worker", choices=[*VARIANTS, "epoch-time"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker == "epoch-time":
        print(json.dumps(epoch_worker(args.epochs)))
    elif args.worker:
        print(json.dumps(worker(args.worker, args.seed)))
    elif args.epoch_time:
        epoch_time(args.epochs)
    elif args.pairs:
        pairs(args.pairs, args.seed)
    else:
        chosen = [v.strip() for v in args.variants.split(",")] if args.variants else None
        unknown = [v for v in chosen or [] if v not in VARIANTS]
        if unknown:
            parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
        levers(chosen, args.repeats, args.seed)


if __name__ == "__main__":
    cli()
