"""prepare: stratified, seeded split; test set untouched; size errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from stages import prepare
from stages.lib import files
from tests.support.mnist import make_mnist


def test_stratified_indices_keep_class_proportions() -> None:
    labels = np.repeat(np.arange(10), np.arange(10, 110, 10))  # 10, 20, ..., 100 per class
    picked = prepare.stratified_indices(labels, 110, np.random.default_rng(0))
    assert len(picked) == 110 == len(np.unique(picked))
    np.testing.assert_array_equal(np.bincount(labels[picked]), np.arange(2, 22, 2))


def test_stratified_indices_sizes() -> None:
    labels = np.arange(20) % 3
    for size in (1, 7, 19):
        assert len(prepare.stratified_indices(labels, size, np.random.default_rng(1))) == size
    with pytest.raises(ValueError, match="between 1 and 19"):
        prepare.stratified_indices(labels, 20, np.random.default_rng(1))


def test_split_is_disjoint_complete_and_seeded() -> None:
    data = make_mnist(600, 10)
    x, y = data["x_train"], data["y_train"]
    (xt, yt), (xv, yv) = prepare.split(x, y, val_size=100, train_limit=0, seed=3)
    assert len(yt) == 500 and len(yv) == 100
    assert np.bincount(yv, minlength=10).tolist() == [10] * 10
    both = np.concatenate([xt, xv]).reshape(600, -1)
    assert len(np.unique(both, axis=0)) == len(np.unique(x.reshape(600, -1), axis=0))
    (_, _), (xv2, _) = prepare.split(x, y, val_size=100, train_limit=0, seed=3)
    np.testing.assert_array_equal(xv, xv2)
    (_, _), (xv3, _) = prepare.split(x, y, val_size=100, train_limit=0, seed=4)
    assert not np.array_equal(xv, xv3)


def test_train_limit_is_stratified() -> None:
    data = make_mnist(600, 10)
    (_, yt), (_, yv) = prepare.split(data["x_train"], data["y_train"], 100, 200, seed=0)
    assert len(yt) == 200 and len(yv) == 100
    assert np.bincount(yt, minlength=10).tolist() == [20] * 10


@pytest.mark.parametrize(("val_size", "limit", "message"), [(600, 0, "val_size"), (100, 501, "train_limit")])
def test_split_rejects_sizes_that_do_not_fit(val_size: int, limit: int, message: str) -> None:
    data = make_mnist(600, 10)
    with pytest.raises(ValueError, match=message):
        prepare.split(data["x_train"], data["y_train"], val_size, limit, seed=0)


def _raw(tmp: Path) -> Path:
    path = tmp / "data" / "raw" / "mnist.npz"
    files.save_arrays(path, make_mnist(300, 50))
    return path


def test_main_writes_splits_and_passes_test_through(stage_dir: Callable[..., Path]) -> None:
    root = stage_dir({"prepare.val_size": 50})
    raw = _raw(root)
    prepare.main(["--raw", str(raw), "--out-dir", "out"])
    data = make_mnist(300, 50)
    test = np.load(root / "out" / "test.npz")
    np.testing.assert_array_equal(test["x"], data["x_test"])
    np.testing.assert_array_equal(test["y"], data["y_test"])
    assert len(np.load(root / "out" / "val.npz")["y"]) == 50
    assert len(np.load(root / "out" / "train.npz")["y"]) == 250
    assert sorted(p.name for p in (root / "out").iterdir()) == ["test.npz", "train.npz", "val.npz"]


def test_main_val_size_too_large_exits_without_output(stage_dir: Callable[..., Path], caplog) -> None:
    root = stage_dir({"prepare.val_size": 300})
    raw = _raw(root)
    with pytest.raises(SystemExit) as info:
        prepare.main(["--raw", str(raw), "--out-dir", "out"])
    assert info.value.code == 1
    assert "prepare.val_size" in caplog.text
    assert not (root / "out").exists()


def test_main_bad_raw_file_names_file_and_fix(stage_dir: Callable[..., Path], caplog) -> None:
    root = stage_dir()
    (root / "mnist.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(SystemExit):
        prepare.main(["--raw", "mnist.npz", "--out-dir", "out"])
    assert "mnist.npz: cannot read it" in caplog.text
    assert "dvc repro --force fetch" in caplog.text
    assert not (root / "out").exists()
