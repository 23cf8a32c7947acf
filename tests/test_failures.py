"""Failure modes: a dead MLflow server, a killed stage, a concurrent `dvc repro`, interrupted training.

The integration tests run the real `dvc repro` in a temporary copy of the repository (tiny profile, the
helpers of tests/test_pipeline.py); nothing here mocks DVC or MLflow, and nothing uses the network.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from stages import prepare
from stages.lib import io
from stages.lib.tracking import redact_uri
from tests.mnist_fixture import make_mnist


def _free_port() -> int:
    """A loopback port with nothing listening on it (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_dead_mlflow_server_stops_stage_before_any_work(
    stage_dir: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    root = stage_dir({"prepare.val_size": 50})
    raw = root / "raw.npz"
    io.save_arrays(raw, make_mnist(300, 50))
    uri = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.monotonic()
    with pytest.raises(SystemExit) as info:
        prepare.main(["--raw", str(raw), "--out-dir", "out"])
    assert time.monotonic() - start < 5
    assert info.value.code == 1
    assert f"MLflow tracking server at {uri} is not reachable" in caplog.text
    assert "unset MLFLOW_TRACKING_URI" in caplog.text
    assert not (root / "out").exists()


def test_dead_mlflow_server_message_hides_credentials(
    stage_dir: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    root = stage_dir()
    raw = root / "raw.npz"
    io.save_arrays(raw, make_mnist(300, 50))
    port = _free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:s3cret@127.0.0.1:{port}/mlflow")
    with pytest.raises(SystemExit):
        prepare.main(["--raw", str(raw), "--out-dir", "out"])
    assert f"http://***@127.0.0.1:{port}/mlflow is not reachable" in caplog.text
    assert "s3cret" not in caplog.text and "alice" not in caplog.text


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("https://user:pa:ss@host:5000/x?y=1", "https://***@host:5000/x?y=1"),
        ("http://token@host", "http://***@host"),
        ("http://host:5000", "http://host:5000"),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
        ("databricks", "databricks"),
    ],
)
def test_redact_uri(uri: str, shown: str) -> None:
    assert redact_uri(uri) == shown
