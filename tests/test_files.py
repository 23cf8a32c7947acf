"""Atomic writes and the deterministic .npz format every stage uses."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from stages.lib import files
from stages.lib.errors import UserError

SPEC = {"x": ((None, 28, 28), "uint8"), "y": ((None,), "uint8")}


def _arrays(n: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), "y": rng.integers(0, 10, n, dtype=np.uint8)}


def test_save_arrays_round_trip_and_bytes_do_not_depend_on_time(tmp_path: Path) -> None:
    files.save_arrays(tmp_path / "a.npz", _arrays())
    time.sleep(2.1)  # zip timestamps have 2 s resolution
    files.save_arrays(tmp_path / "b.npz", _arrays())
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    loaded = files.load_arrays(tmp_path / "a.npz", SPEC, stage="prepare")
    np.testing.assert_array_equal(loaded["x"], _arrays()["x"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "b.npz"]


def test_atomic_path_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out" / "file.bin"
    with pytest.raises(RuntimeError), files.atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_atomic_write_replaces_existing(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    files.write_json(target, {"b": 1, "a": 2})
    files.write_json(target, {"a": 3})
    assert target.read_text() == '{\n  "a": 3\n}\n'
    assert list(tmp_path.iterdir()) == [target]
    assert target.stat().st_mode & 0o644 == 0o644


def test_load_arrays_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"not found\. Re-create it with `dvc repro --force prepare`"):
        files.load_arrays(tmp_path / "nope.npz", SPEC, stage="prepare")


def test_load_arrays_truncated(tmp_path: Path) -> None:
    files.save_arrays(tmp_path / "a.npz", _arrays())
    data = (tmp_path / "a.npz").read_bytes()
    (tmp_path / "a.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"a.npz: cannot read it.*dvc repro --force prepare"):
        files.load_arrays(tmp_path / "a.npz", SPEC, stage="prepare")


def test_load_arrays_not_an_archive(tmp_path: Path) -> None:
    (tmp_path / "a.npz").write_text("hello")
    with pytest.raises(UserError, match="cannot read it"):
        files.load_arrays(tmp_path / "a.npz", SPEC, stage="prepare")


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((3, 28, 28), np.float32), "y": np.zeros(3, np.uint8)}, "dtype float32, expected n×28×28 uint8"),
        ({"x": np.zeros((3, 28, 27), np.uint8), "y": np.zeros(3, np.uint8)}, r"shape \(3, 28, 27\)"),
        ({"x": np.zeros((3, 28, 28), np.uint8)}, "array 'y' is missing"),
        ({"x": np.zeros((3, 28, 28), np.uint8), "y": np.zeros(4, np.uint8)}, "'x' has 3 rows but 'y' has 4"),
    ],
)
def test_load_arrays_wrong_layout(tmp_path: Path, arrays: dict, message: str) -> None:
    files.save_arrays(tmp_path / "a.npz", arrays)
    with pytest.raises(UserError, match=message):
        files.load_arrays(tmp_path / "a.npz", SPEC, stage="augment")


def test_file_md5_matches_dvc(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"abc")
    assert files.file_md5(tmp_path / "f") == "900150983cd24fb0d6963f7d28e17f72"
