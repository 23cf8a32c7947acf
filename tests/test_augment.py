"""augment stage: the transform matrices, the batched TensorFlow transform, and the stage entry point."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from stages import augment as aug
from stages.lib import files
from tests.support.mnist import make_mnist

RANGES = aug.Ranges(rotation_deg=10.0, width_shift=0.1, height_shift=0.1, zoom=0.1)
NONE = aug.Ranges()


class EdgeRng:
    """Stands in for a Generator: every uniform draw is its upper bound, every ``random()`` draw is 0 (flip)."""

    def uniform(self, low: float, high: float, size: int) -> np.ndarray:
        return np.full(size, float(high))

    def random(self, size: int) -> np.ndarray:
        return np.zeros(size)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return make_mnist(n_train=40, n_test=1)["x_train"]


def interior(n: int = 3, seed: int = 0) -> np.ndarray:
    """Random images that are zero outside rows/columns 6..21, so nothing of them leaves the frame."""
    x = np.zeros((n, 28, 28), dtype=np.uint8)
    x[:, 6:22, 6:22] = np.random.default_rng(seed).integers(1, 256, (n, 16, 16))
    return x


def decompose(rows: np.ndarray) -> dict[str, np.ndarray]:
    """Recover angle (degrees), shifts (pixels), zoom and flip from rows built by ``affine_matrices``."""
    a00, a01, a02, a10, a11, a12 = (rows[:, i].astype(np.float64) for i in range(6))
    zoom = np.hypot(a10, a11)
    flip = np.sign(a00 * a11 - a01 * a10)  # determinant: negative for a mirror
    c = 13.5
    # p_in = A p_out + b with b = c - A (c + t)  =>  t = A^-1 (c - b) - c
    det = a00 * a11 - a01 * a10
    bx, by = c - a02, c - a12
    tx = (a11 * bx - a01 * by) / det - c
    ty = (-a10 * bx + a00 * by) / det - c
    return {"deg": np.degrees(np.arctan2(a10, a11)), "tx": tx, "ty": ty, "zoom": zoom, "flip": flip}


# ----------------------------------------------------------------------------------- matrices (NumPy only)


def test_zero_ranges_give_exact_identity() -> None:
    rows = aug.affine_matrices(5, NONE, rng=np.random.default_rng(0))
    assert rows.dtype == np.float32 and rows.shape == (5, 8)
    np.testing.assert_array_equal(rows, np.tile([1, 0, 0, 0, 1, 0, 0, 0], (5, 1)))


def test_draws_stay_inside_their_ranges_and_use_them() -> None:
    rows = aug.affine_matrices(4000, aug.Ranges(15.0, 0.1, 0.2, 0.3, True), rng=np.random.default_rng(1))
    got = decompose(rows)
    for name, bound in {"deg": 15.0, "tx": 2.8, "ty": 5.6}.items():
        assert np.abs(got[name]).max() <= bound + 1e-3, name
        assert np.abs(got[name]).max() > 0.95 * bound, name  # the whole range is used
        assert abs(got[name].mean()) < 0.1 * bound, name  # symmetric
    assert 0.7 - 1e-5 <= got["zoom"].min() < 0.72 and 1.28 < got["zoom"].max() <= 1.3 + 1e-5
    assert 0.45 < (got["flip"] < 0).mean() < 0.55


def test_no_flips_unless_enabled() -> None:
    rows = aug.affine_matrices(1000, aug.Ranges(10.0, 0.1, 0.1, 0.1, False), rng=np.random.default_rng(2))
    assert (decompose(rows)["flip"] > 0).all()


def test_same_generator_state_same_matrices() -> None:
    first = aug.affine_matrices(50, RANGES, rng=np.random.default_rng(7))
    again = aug.affine_matrices(50, RANGES, rng=np.random.default_rng(7))
    other = aug.affine_matrices(50, RANGES, rng=np.random.default_rng(8))
    assert first.tobytes() == again.tobytes()
    assert not np.array_equal(first, other)


# ----------------------------------------------------------------------------------- applying them (TensorFlow)


def test_identity_leaves_images_exactly_unchanged(images: np.ndarray) -> None:
    out = aug.augment(images, 2, NONE, batch_size=16, seed=0)
    np.testing.assert_array_equal(out, np.concatenate([images, images]))


def test_pure_shift_moves_a_pixel_by_the_drawn_amount() -> None:
    x = np.zeros((1, 28, 28), dtype=np.uint8)
    x[0, 10, 5] = 200
    # EdgeRng draws the upper bound: 3 pixels right and 2 down
    rows = aug.affine_matrices(1, aug.Ranges(0.0, 3 / 28, 2 / 28, 0.0, False), rng=EdgeRng())
    out = aug.transform_images(x, rows, batch_size=1)
    assert np.argwhere(out[0]).tolist() == [[12, 8]]
    assert out[0, 12, 8] == 200


def test_flip_mirrors_left_to_right() -> None:
    x = interior()
    rows = aug.affine_matrices(len(x), aug.Ranges(0.0, 0.0, 0.0, 0.0, True), rng=EdgeRng())
    np.testing.assert_array_equal(aug.transform_images(x, rows, batch_size=8), x[:, :, ::-1])


def test_positive_rotation_turns_counter_clockwise() -> None:
    x = interior()
    rows = aug.affine_matrices(len(x), aug.Ranges(90.0, 0.0, 0.0, 0.0, False), rng=EdgeRng())
    np.testing.assert_array_equal(aug.transform_images(x, rows, batch_size=8), np.rot90(x, axes=(1, 2)))


def test_zoom_above_one_shrinks_the_digit() -> None:
    x = interior(1)
    rows = aug.affine_matrices(1, aug.Ranges(0.0, 0.0, 0.0, 0.5, False), rng=EdgeRng())  # scale 1.5
    out = aug.transform_images(x, rows, batch_size=1)
    filled = np.argwhere(out[0])
    assert filled.min() >= 8 and filled.max() <= 19  # 16 pixels wide → about 11, still centred


def test_copies_zero_is_a_pass_through(images: np.ndarray) -> None:
    augmented = aug.augment(images, 0, RANGES, batch_size=16, seed=0)
    assert augmented.shape == (0, 28, 28) and augmented.dtype == np.uint8
    labels = np.arange(len(images), dtype=np.uint8)
    x_out, y_out = aug.with_originals(images, labels, augmented)
    np.testing.assert_array_equal(x_out, images)
    np.testing.assert_array_equal(y_out, labels)


def test_output_layout_originals_then_copy_blocks(images: np.ndarray) -> None:
    labels = (np.arange(len(images)) % 10).astype(np.uint8)
    augmented = aug.augment(images, 3, RANGES, batch_size=16, seed=0)
    assert augmented.shape == (3 * len(images), 28, 28) and augmented.dtype == np.uint8
    x_out, y_out = aug.with_originals(images, labels, augmented)
    n = len(images)
    np.testing.assert_array_equal(x_out[:n], images)
    np.testing.assert_array_equal(x_out[n:], augmented)
    np.testing.assert_array_equal(y_out, np.tile(labels, 4))
    # Copy k of image i is image i transformed by the k-th block of matrices
    rows = aug.affine_matrices(3 * n, RANGES, rng=np.random.default_rng(0))
    k, i = 2, 5
    one = aug.transform_images(images[i : i + 1], rows[k * n + i : k * n + i + 1], batch_size=1)
    np.testing.assert_array_equal(augmented[k * n + i], one[0])
    # ... and really transformed: with these ranges nearly every copy differs from its original
    assert (augmented.reshape(3, n, -1) != images.reshape(1, n, -1)).any(axis=2).mean() > 0.9


def test_with_originals_rejects_partial_copies(images: np.ndarray) -> None:
    with pytest.raises(ValueError, match="whole copies"):
        aug.with_originals(images, np.zeros(len(images), np.uint8), images[:3])


def test_same_seed_same_bytes_other_seed_other_images(images: np.ndarray) -> None:
    first = aug.augment(images, 2, RANGES, batch_size=16, seed=3)
    again = aug.augment(images, 2, RANGES, batch_size=16, seed=3)
    other = aug.augment(images, 2, RANGES, batch_size=16, seed=4)
    assert first.tobytes() == again.tobytes()
    assert not np.array_equal(first, other)


def test_result_does_not_depend_on_batch_size(images: np.ndarray) -> None:
    small = aug.augment(images, 2, RANGES, batch_size=7, seed=5)
    large = aug.augment(images, 2, RANGES, batch_size=1000, seed=5)
    assert small.tobytes() == large.tobytes()


def test_rejects_images_of_the_wrong_form(images: np.ndarray) -> None:
    with pytest.raises(ValueError, match="uint8 images"):
        aug.augment(images.astype(np.float32), 1, RANGES, batch_size=8, seed=0)
    with pytest.raises(ValueError, match="uint8 images"):
        aug.augment(images[:, :14], 1, RANGES, batch_size=8, seed=0)


# ----------------------------------------------------------------------------------- the stage entry point


ARGS = [
    "--train",
    "data/prepared/train.npz",
    "--out",
    "data/augmented/train.npz",
    "--preview",
    "plots/augment/preview.png",
]


def _args() -> argparse.Namespace:
    return argparse.Namespace(
        train=Path("data/prepared/train.npz"),
        out=Path("data/augmented/train.npz"),
        preview=Path("plots/augment/preview.png"),
    )


def test_run_writes_outputs_and_reads_what_it_declares(stage_context, images: np.ndarray) -> None:
    ctx = stage_context("augment", {"augment.copies": 2, "augment.device": "cpu", "augment.batch_size": 32})
    labels = (np.arange(len(images)) % 10).astype(np.uint8)
    files.save_arrays("data/prepared/train.npz", {"x": images, "y": labels})

    aug.run(_args(), ctx)

    out = np.load("data/augmented/train.npz")
    assert out["x"].dtype == np.uint8 and out["x"].shape == (3 * len(images), 28, 28)
    np.testing.assert_array_equal(out["x"][: len(images)], images)
    np.testing.assert_array_equal(out["y"], np.tile(labels, 3))
    # Same params, same seed (base.seed), same pixels as calling the core directly
    p = ctx.params
    expected = aug.augment(images, 2, aug.Ranges.from_params(p.augment), batch_size=7, seed=p.base.seed)
    np.testing.assert_array_equal(out["x"][len(images) :], expected)
    assert Path("plots/augment/preview.png").read_bytes().startswith(b"\x89PNG")
    assert set(p.reads) == set(p.flat())
    assert not [f for f in Path.cwd().rglob("*.tmp")]


def test_run_with_zero_copies_passes_originals_through(stage_context, images: np.ndarray) -> None:
    ctx = stage_context("augment", {"augment.copies": 0, "augment.device": "cpu"})
    labels = (np.arange(len(images)) % 10).astype(np.uint8)
    files.save_arrays("data/prepared/train.npz", {"x": images, "y": labels})

    aug.run(_args(), ctx)

    out = np.load("data/augmented/train.npz")
    np.testing.assert_array_equal(out["x"], images)
    np.testing.assert_array_equal(out["y"], labels)
    assert Path("plots/augment/preview.png").stat().st_size > 0


def test_main_without_its_input_stops_with_one_error(stage_dir, caplog: pytest.LogCaptureFixture) -> None:
    stage_dir({"augment.device": "cpu"})
    with pytest.raises(SystemExit) as exc:
        aug.main(ARGS)
    assert exc.value.code == 1
    assert "data/prepared/train.npz: file not found" in caplog.text
    assert not Path("data/augmented").exists() and not Path("plots/augment").exists()
