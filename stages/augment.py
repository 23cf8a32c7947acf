"""augment: add randomly rotated, shifted and zoomed copies of the training images.

Reads ``train.npz`` (from prepare; arrays ``x``: uint8 n×28×28, ``y``: uint8 n) and params ``base.seed``,
``augment.*``. Writes ``train.npz`` holding the originals followed by ``copies`` augmented copies of each
image (copy ``k`` of image ``i`` at row ``(k + 1)·n + i``; labels repeated to match), and a preview PNG of a
few originals beside their copies. ``copies = 0`` passes the originals through.

All random transform parameters are drawn up front with NumPy from ``base.seed`` and composed into one
affine matrix per image; TensorFlow's ``ImageProjectiveTransformV3`` then applies a whole batch of them in
one call (bilinear, zero fill). So the output depends only on the seed and the params, not on the batch
size or on how the work is split.
"""

from __future__ import annotations

import argparse
import functools
import logging
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from stages.lib import files, runtime

log = logging.getLogger(__name__)

STAGE = "augment"
SIZE = 28
PREVIEW_ROWS = 8  # originals shown in the preview
PREVIEW_COPIES = 5  # augmented copies shown beside each


@dataclass(frozen=True)
class Ranges:
    """The random transforms' ranges: the ``augment`` params of the same names (all 0: the identity)."""

    rotation_deg: float = 0.0
    width_shift: float = 0.0
    height_shift: float = 0.0
    zoom: float = 0.0
    horizontal_flip: bool = False

    @classmethod
    def from_params(cls, section: Any) -> Ranges:
        """The ranges of the ``augment`` params section (every field read by its own name)."""
        return cls(**{f.name: getattr(section, f.name) for f in fields(cls)})


def affine_matrices(n: int, ranges: Ranges, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """Draw ``n`` random affine transforms; return float32 rows ``(n, 8)`` for ``ImageProjectiveTransformV3``.

    Each row ``[a0, a1, a2, b0, b1, b2, 0, 0]`` maps an OUTPUT pixel ``(x, y)`` (column, row) to the INPUT
    point ``(a0 x + a1 y + a2, b0 x + b1 y + b2)`` it samples. Per image, about the centre of a
    ``size``×``size`` image, with the ``ranges``:

    - rotation: uniform in ``[-rotation_deg, rotation_deg]`` degrees, positive = counter-clockwise on screen;
    - shift: uniform in ``[-width_shift, width_shift]·size`` pixels (positive = right) and likewise
      ``height_shift`` (positive = down);
    - zoom: uniform in ``[1 - zoom, 1 + zoom]``, the input/output scale as in Keras' ``ImageDataGenerator``
      (above 1 the digit looks smaller);
    - with ``horizontal_flip``, a left-right mirror with probability 0.5.

    Draws come from ``rng`` in a fixed order (angles, x shifts, y shifts, zooms, flips), all ``n`` at a
    time, so the same generator state gives the same transforms however they are later batched. With all
    ranges 0 every row is exactly the identity.
    """
    r = ranges
    theta = np.deg2rad(rng.uniform(-r.rotation_deg, r.rotation_deg, n))
    tx = rng.uniform(-r.width_shift, r.width_shift, n) * size
    ty = rng.uniform(-r.height_shift, r.height_shift, n) * size
    z = rng.uniform(1.0 - r.zoom, 1.0 + r.zoom, n)
    flip = np.where(rng.random(n) < 0.5, -1.0, 1.0) if r.horizontal_flip else np.ones(n)
    cos, sin = np.cos(theta), np.sin(theta)
    # Forward (input → output): p_out = c + t + R(θ)·F·(p_in − c)/z. Inverted (output → input):
    # p_in = c + A·(p_out − c − t) with A = z·F·R(−θ); in y-down pixel coordinates R(−θ) = [[cos, −sin], [sin, cos]].
    a00, a01 = z * flip * cos, -z * flip * sin
    a10, a11 = z * sin, z * cos
    c = (size - 1) / 2.0  # pixel centres sit on integer coordinates
    ox, oy = c + tx, c + ty
    rows = np.zeros((n, 8), dtype=np.float64)
    rows[:, 0], rows[:, 1], rows[:, 2] = a00, a01, c - a00 * ox - a01 * oy
    rows[:, 3], rows[:, 4], rows[:, 5] = a10, a11, c - a10 * ox - a11 * oy
    return rows.astype(np.float32)


@functools.cache
def _transform_fn():  # type: ignore[no-untyped-def]
    """The compiled batch transform, built once per process: uint8 ``(b, 28, 28)``, rows ``(b, 8)`` → uint8."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, SIZE, SIZE], tf.uint8), tf.TensorSpec([None, 8], tf.float32)])
    def transform(images, transforms):  # type: ignore[no-untyped-def]
        # Interpolate in float32: on uint8 input the op truncates, darkening every interpolated pixel
        out = tf.raw_ops.ImageProjectiveTransformV3(
            images=tf.cast(images, tf.float32)[..., tf.newaxis],
            transforms=transforms,
            output_shape=[SIZE, SIZE],
            fill_value=0.0,
            interpolation="BILINEAR",
            fill_mode="CONSTANT",
        )
        # Bilinear weights keep values inside [0, 255], so rounding is the only step back to pixels
        return tf.cast(tf.round(out[..., 0]), tf.uint8)

    return transform


def transform_images(x: np.ndarray, transforms: np.ndarray, batch_size: int) -> np.ndarray:
    """Apply row ``j`` of ``transforms`` ``(m, 8)`` to image ``x[j % n]``; return uint8 ``(m, 28, 28)``.

    ``x`` is uint8 ``(n, 28, 28)``; rows are as :func:`affine_matrices` returns them (output → input),
    sampled bilinearly with zero fill and rounded to uint8. Work goes to TensorFlow ``batch_size`` images
    per call, on the GPU when one is visible; the result does not depend on ``batch_size``.
    """
    if x.ndim != 3 or x.shape[1:] != (SIZE, SIZE) or x.dtype != np.uint8:
        raise ValueError(f"expected uint8 images of shape (n, {SIZE}, {SIZE}), got {x.dtype} {x.shape}")
    if transforms.ndim != 2 or transforms.shape[1] != 8:
        raise ValueError(f"expected transforms of shape (m, 8), got {transforms.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    total = len(transforms)
    out = np.empty((total, SIZE, SIZE), dtype=np.uint8)
    if total == 0:
        return out
    if len(x) == 0:
        raise ValueError("no images to transform")
    transform = _transform_fn()
    rows = transforms.astype(np.float32, copy=False)
    for start in range(0, total, batch_size):
        stop = min(start + batch_size, total)
        out[start:stop] = transform(x[np.arange(start, stop) % len(x)], rows[start:stop]).numpy()
    return out


def warm_up() -> None:
    """Build and run the compiled transform once, so a timing that follows measures throughput, not tracing."""
    transform_images(np.zeros((1, SIZE, SIZE), np.uint8), np.array([[1, 0, 0, 0, 1, 0, 0, 0]], np.float32), 1)


def augment(x: np.ndarray, copies: int, ranges: Ranges, batch_size: int, seed: int) -> np.ndarray:
    """Return ``copies`` randomly transformed copies of the uint8 images ``x`` ``(n, 28, 28)``, augmented only.

    The result is uint8 ``(copies·n, 28, 28)``, copy ``k`` of image ``i`` at row ``k·n + i``. Transforms are
    drawn by :func:`affine_matrices` (ranges as documented there) from ``np.random.default_rng(seed)`` and
    applied by :func:`transform_images`, ``batch_size`` images per TensorFlow call; the result depends on
    ``seed`` and the ranges only. ``copies = 0`` returns an empty array without touching TensorFlow.
    """
    if copies < 0:
        raise ValueError(f"copies must be >= 0, got {copies}")
    rng = np.random.default_rng(seed)
    transforms = affine_matrices(copies * len(x), ranges, rng)
    return transform_images(x, transforms, batch_size)


def with_originals(x: np.ndarray, y: np.ndarray, augmented: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The stage's output arrays: originals first, then the copy blocks of ``augmented``; labels repeated to match."""
    copies, rest = divmod(len(augmented), max(len(x), 1))
    if rest or len(y) != len(x):
        raise ValueError(f"{len(augmented)} augmented images do not make whole copies of {len(x)} originals")
    return np.concatenate([x, augmented]), np.tile(y, copies + 1)


def preview_png(x: np.ndarray, augmented: np.ndarray, rows: int = PREVIEW_ROWS, shown: int = PREVIEW_COPIES) -> bytes:
    """PNG bytes of a grid: the first ``rows`` originals of ``x``, each followed by up to ``shown`` of its copies.

    ``augmented`` is laid out as :func:`augment` returns it; when it is empty the grid shows the originals
    alone and its title says that nothing was augmented.
    """
    # A bare Figure renders with Agg and leaves pyplot's global state (and backend) alone
    from matplotlib.figure import Figure

    n = len(x)
    copies = len(augmented) // n
    rows, cols = min(rows, n), 1 + min(copies, shown)
    fig = Figure(figsize=(max(1.1 * cols + 0.4, 2.6), 1.1 * rows + 0.8))  # wide enough for the title
    axes = fig.subplots(rows, cols, squeeze=False)
    for i in range(rows):
        for j in range(cols):
            ax = axes[i][j]
            ax.imshow(x[i] if j == 0 else augmented[(j - 1) * n + i], cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title("original" if j == 0 else f"copy {j}", fontsize=8)
    title = (
        f"{copies} augmented cop{'y' if copies == 1 else 'ies'} per image"
        if copies
        else "no augmentation\n(augment.copies = 0)"
    )
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return files.png_bytes(fig)


def run(args: argparse.Namespace, ctx: runtime.StageContext) -> None:
    """Augment ``args.train`` as the ``augment`` params say; write ``args.out`` and the ``args.preview`` PNG."""
    p = ctx.params
    copies, ranges = p.augment.copies, Ranges.from_params(p.augment)
    x, y = files.load_split(args.train, stage="prepare")
    ctx.tracker.log_input(args.train, context="train")
    if copies:
        warm_up()
    start = time.perf_counter()
    augmented = augment(x, copies, ranges, p.augment.batch_size, p.base.seed)
    elapsed = time.perf_counter() - start
    metrics = {"n_out": len(y) * (copies + 1)}
    if copies:
        metrics["images_per_s"] = len(augmented) / elapsed
        log.info(
            "Augmented %d images, %d copies each, on %s: %.0f images/s",
            len(y),
            copies,
            ctx.device,
            metrics["images_per_s"],
        )
    else:
        log.info("augment.copies = 0: passing the %d originals through", len(y))
    x_out, y_out = with_originals(x, y, augmented)
    files.save_arrays(args.out, {"x": x_out, "y": y_out})
    files.write_bytes(args.preview, preview_png(x, augmented))
    log.info("Wrote %d images to %s and a preview to %s", metrics["n_out"], args.out, args.preview)
    ctx.tracker.log_metrics(metrics)
    ctx.tracker.log_artifact(args.preview)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, required=True, help="train.npz written by prepare")
    parser.add_argument("--out", type=Path, required=True, help="augmented train.npz to write")
    parser.add_argument("--preview", type=Path, required=True, help="preview PNG to write")
    args = parser.parse_args(argv)
    with runtime.stage(STAGE) as ctx:
        run(args, ctx)


if __name__ == "__main__":
    main()
