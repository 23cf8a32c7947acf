"""File I/O shared by the stages: atomic writes, deterministic ``.npz`` archives, content hashes.

Every output goes through :func:`atomic_path`: it is written beside its target under a temporary name
and moved into place with ``os.replace`` only when complete, so an interrupted stage never leaves a
file that looks finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import yaml

from stages.lib.errors import UserError

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip member can carry


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; move it onto ``target`` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    tmp_path.chmod(0o666 & ~_umask())  # mkstemp makes 0600; give outputs the usual permissions
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_bytes(target: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text(target: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 ``text`` to ``target`` atomically."""
    write_bytes(target, text.encode("utf-8"))


def write_json(target: str | os.PathLike[str], obj: object) -> None:
    """Write ``obj`` as indented, key-sorted JSON (stable bytes for equal content), atomically."""
    write_text(target, json.dumps(obj, indent=2, sort_keys=True) + "\n")


# libyaml's parser where PyYAML has it (its wheels do): the same documents as yaml.safe_load, parsed 8x faster
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` of ``text``, with libyaml's parser when PyYAML has it."""
    return yaml.load(text, Loader=_YAML_LOADER)


def read_yaml(path: str | os.PathLike[str], what: str, *, missing_ok: bool = False) -> Any:
    """Parse the YAML file ``path`` (a ``what``: "params file"); raise :class:`UserError` naming the file, and the
    line and column of a syntax error. With ``missing_ok``, a missing file reads as None."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if missing_ok:
            return None
        raise UserError(f"{path}: {what} not found; run the stage from the repository root") from None
    try:
        return parse_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise UserError(f"{path}{where}: not valid YAML ({problem}); fix the syntax") from None


class ZipMembers:
    """The members of a zip archive being written by :func:`deterministic_zip`: fixed time, mode and order."""

    def __init__(self, archive: zipfile.ZipFile):
        self._archive = archive

    @staticmethod
    def _info(name: str, compress_type: int) -> zipfile.ZipInfo:
        info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
        info.external_attr = 0o644 << 16
        info.compress_type = compress_type
        return info

    def write(self, name: str, data: bytes, compress_type: int = zipfile.ZIP_STORED) -> None:
        """Add member ``name`` holding ``data``."""
        self._archive.writestr(self._info(name, compress_type), data)

    def open(self, name: str) -> IO[bytes]:
        """Add member ``name`` (stored, zip64) and return it open for writing: for contents streamed in parts."""
        return self._archive.open(self._info(name, zipfile.ZIP_STORED), "w", force_zip64=True)


@contextlib.contextmanager
def deterministic_zip(target: str | os.PathLike[str]) -> Iterator[ZipMembers]:
    """Write a zip archive to ``target`` atomically, its bytes a function of the members added, in order.

    Every member gets the same timestamp and permissions (zip tools stamp the current time, which would
    make equal content differ in bytes and re-run every downstream DVC stage).
    """
    with atomic_path(target) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        yield ZipMembers(archive)


def save_arrays(target: str | os.PathLike[str], arrays: Mapping[str, np.ndarray]) -> None:
    """Save named arrays as an uncompressed ``.npz`` whose bytes depend only on the arrays, atomically."""
    with deterministic_zip(target) as members:
        for name, array in arrays.items():
            with members.open(f"{name}.npy") as member:
                np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)


def load_arrays(
    path: str | os.PathLike[str],
    spec: Mapping[str, tuple[tuple[int | None, ...], str]],
    stage: str,
) -> dict[str, np.ndarray]:
    """Load and check the arrays of an ``.npz`` written by an upstream stage.

    ``spec`` maps each required array name to ``(shape, dtype)``; ``None`` in a shape matches any size.
    Arrays named ``x_*``/``y_*`` that share a suffix must have the same length. A missing, truncated or
    malformed file raises :class:`UserError` naming the file and the stage to re-run.
    """
    path = Path(path)
    fix = f"Re-create it with `dvc repro --force {stage}`."
    if not path.is_file():
        raise UserError(f"{path}: file not found. {fix}")
    try:
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in spec if name in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise UserError(f"{path}: cannot read it as a .npz archive ({exc}). {fix}") from exc
    for name, (shape, dtype) in spec.items():
        if name not in arrays:
            raise UserError(f"{path}: array '{name}' is missing. {fix}")
        arr = arrays[name]
        shape_ok = arr.ndim == len(shape) and all(s is None or s == a for s, a in zip(shape, arr.shape, strict=True))
        if not shape_ok or arr.dtype != np.dtype(dtype):
            want = "×".join("n" if s is None else str(s) for s in shape)
            raise UserError(
                f"{path}: array '{name}' has shape {arr.shape} and dtype {arr.dtype}, expected {want} {dtype}. {fix}"
            )
    for name, arr in arrays.items():
        if name.startswith("x") and (y := arrays.get("y" + name[1:])) is not None and len(y) != len(arr):
            raise UserError(f"{path}: '{name}' has {len(arr)} rows but 'y{name[1:]}' has {len(y)}. {fix}")
    return arrays


SPLIT_SPEC = {"x": ((None, 28, 28), "uint8"), "y": ((None,), "uint8")}


def load_split(path: str | os.PathLike[str], stage: str) -> tuple[np.ndarray, np.ndarray]:
    """Load a split file (``x`` uint8 n×28×28, ``y`` uint8 digits) written by ``stage``; refuse an empty one."""
    arrays = load_arrays(path, SPLIT_SPEC, stage=stage)
    x, y = arrays["x"], arrays["y"]
    fix = f"Re-create it with `dvc repro --force {stage}`."
    if len(y) == 0:
        raise UserError(f"{path}: holds no images. {fix}")
    if int(y.max()) > 9:
        raise UserError(f"{path}: label {int(y.max())} is not a digit 0-9. {fix}")
    return x, y


def file_digest(path: str | os.PathLike[str], algorithm: str) -> str:
    """Hex digest of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_md5(path: str | os.PathLike[str]) -> str:
    """MD5 of a file's bytes: the hash DVC records for it in dvc.lock."""
    return file_digest(path, "md5")


def png_bytes(fig: object) -> bytes:
    """Render a matplotlib figure to PNG bytes (no timestamp metadata, so equal plots are equal files)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})  # type: ignore[attr-defined]
    return buf.getvalue()
