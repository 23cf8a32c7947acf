"""prepare: split MNIST's 60000 training images into train and a held-out validation set.

Reads ``data/raw/mnist.npz`` (from fetch) and params ``base.seed``, ``prepare.*``. Writes
``train.npz``, ``val.npz`` and ``test.npz`` (arrays ``x``: uint8 n×28×28, ``y``: uint8 n) to the output
directory. The split is stratified and seeded; ``train_limit`` keeps a stratified subset of the
training split for quick runs; the test set passes through untouched.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from stages.lib import files, runtime
from stages.lib.errors import UserError

log = logging.getLogger(__name__)

STAGE = "prepare"
RAW_SPEC = {
    "x_train": ((None, 28, 28), "uint8"),
    "y_train": ((None,), "uint8"),
    "x_test": ((None, 28, 28), "uint8"),
    "y_test": ((None,), "uint8"),
}


def stratified_indices(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Pick ``size`` indices of ``labels`` with each class in proportion (largest remainders), sorted.

    Raises ``ValueError`` when ``size`` is not in [1, len(labels) - 1].
    """
    n = len(labels)
    if not 0 < size < n:
        raise ValueError(f"size must be between 1 and {n - 1}, got {size}")
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * size / n
    take = np.floor(quota).astype(int)
    # Hand out the remaining picks to the classes with the largest fractional parts (ties: by class)
    order = np.lexsort((classes, -(quota - take)))
    take[order[: size - take.sum()]] += 1
    picked = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take, strict=True)]
    return np.sort(np.concatenate(picked))


def split(
    x: np.ndarray, y: np.ndarray, val_size: int, train_limit: int, seed: int
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Stratified, seeded split into ``(x_train, y_train), (x_val, y_val)``; images keep their original order.

    ``train_limit`` > 0 keeps a stratified subset of that many training images. Raises ``ValueError``
    when the sizes do not fit the data.
    """
    rng = np.random.default_rng(seed)
    if val_size >= len(y):
        raise ValueError(f"val_size ({val_size}) must be smaller than the {len(y)} training images")
    val = stratified_indices(y, val_size, rng)
    train = np.setdiff1d(np.arange(len(y)), val, assume_unique=True)
    if train_limit:
        if train_limit > len(train):
            raise ValueError(f"train_limit ({train_limit}) exceeds the {len(train)} images left after validation")
        if train_limit < len(train):
            train = train[stratified_indices(y[train], train_limit, rng)]
    return (x[train], y[train]), (x[val], y[val])


def run(args: argparse.Namespace, ctx: runtime.StageContext) -> None:
    """Split ``args.raw`` into ``args.out_dir``/{train,val,test}.npz with the stage's params."""
    p = ctx.params
    raw = files.load_arrays(args.raw, RAW_SPEC, stage="fetch")
    ctx.tracker.log_input(args.raw, context="raw")
    try:
        (x_train, y_train), (x_val, y_val) = split(
            raw["x_train"], raw["y_train"], p.prepare.val_size, p.prepare.train_limit, p.base.seed
        )
    except ValueError as exc:
        raise UserError(f"params.yaml: prepare: {exc}; lower prepare.val_size or prepare.train_limit") from None
    log.info("Split %d training images into %d train / %d validation", len(raw["y_train"]), len(y_train), len(y_val))
    outputs = {"train": (x_train, y_train), "val": (x_val, y_val), "test": (raw["x_test"], raw["y_test"])}
    for name, (x, y) in outputs.items():
        files.save_arrays(args.out_dir / f"{name}.npz", {"x": x, "y": y})
    ctx.tracker.log_metrics({f"{name}_size": len(y) for name, (_, y) in outputs.items()})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, required=True, help="mnist.npz written by fetch")
    parser.add_argument("--out-dir", type=Path, required=True, help="directory for train/val/test.npz")
    args = parser.parse_args(argv)
    with runtime.stage(STAGE) as ctx:
        run(args, ctx)


if __name__ == "__main__":
    main()
