"""Failure modes: a dead MLflow server, a killed stage, a concurrent `dvc repro`, interrupted training.

The integration tests run the real `dvc repro` in a temporary copy of the repository (tiny profile, the
helpers of tests/test_pipeline.py); nothing here mocks DVC or MLflow, and nothing uses the network.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from stages import prepare
from stages.lib import files
from stages.lib.tracking import redact_uri
from tests.support.mnist import make_mnist
from tests.support.repo import REPO, command_env, run, set_params, tiny_repo
from tests.support.servers import free_port

CNN_OUTS = ("models/cnn.keras", "models/cnn.json", "plots/train_cnn/history.csv")


def test_dead_mlflow_server_stops_stage_before_any_work(
    stage_dir: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    root = stage_dir({"prepare.val_size": 50})
    raw = root / "raw.npz"
    files.save_arrays(raw, make_mnist(300, 50))
    uri = f"http://127.0.0.1:{free_port()}"
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
    files.save_arrays(raw, make_mnist(300, 50))
    port = free_port()
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


# --- the real `dvc repro`, killed or run twice at once, in a temporary copy of the repository -------------


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny-profile copy of the repository, committed, with fetch..train_cnn already reproduced."""
    root = tiny_repo(tmp_path_factory.mktemp("failures") / "repo")
    run(root, "dvc", "repro", "train_cnn")
    return root


def start(root: Path, log: Path, *args: str) -> subprocess.Popen[str]:
    """Start ``args`` in ``root`` in a new process group (so the whole tree can be killed), output to ``log``."""
    with open(log, "w") as fh:
        return subprocess.Popen(
            args,
            cwd=root,
            env={**command_env(), "PYTHONUNBUFFERED": "1"},  # Keras' per-epoch lines reach the log as they happen
            stdout=fh,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )


def wait_for(log: Path, text: str, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert proc.poll() is None, f"exited {proc.returncode} before {text!r}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no {text!r} within {timeout} s:\n{log.read_text()}"
        time.sleep(0.2)


def _md5s(root: Path) -> dict[str, str | None]:
    return {out: files.file_md5(root / out) if (root / out).exists() else None for out in CNN_OUTS}


def _status(root: Path, *targets: str) -> dict:
    return json.loads(run(root, "dvc", "status", "--json", *targets).stdout)


@pytest.mark.slow
def test_second_repro_fails_fast_while_one_runs(repo: Path, tmp_path: Path) -> None:
    set_params(repo / "params.yaml", {"train_cnn.epochs": 10})
    first = start(repo, tmp_path / "first.log", "dvc", "repro", "train_cnn")
    try:
        wait_for(tmp_path / "first.log", "Running stage 'train_cnn'", first)
        begin = time.monotonic()
        second = subprocess.run(
            ["dvc", "repro"], cwd=repo, env=command_env(), capture_output=True, text=True, timeout=60
        )
        took = time.monotonic() - begin
        assert first.poll() is None, "the first repro ended before the second one tried"
        assert first.wait(timeout=180) == 0, (tmp_path / "first.log").read_text()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert second.returncode != 0
    assert "lock" in (second.stdout + second.stderr).lower()
    assert took < 30
    assert _status(repo, "train_cnn") == {}
    history = (repo / "plots" / "train_cnn" / "history.csv").read_text().splitlines()
    assert len(history) == 1 + 10


@pytest.mark.slow
def test_sigkill_mid_stage_leaves_no_finished_looking_output(repo: Path, tmp_path: Path) -> None:
    before = _md5s(repo)
    set_params(repo / "params.yaml", {"train_cnn.epochs": 30})
    proc = start(repo, tmp_path / "killed.log", "dvc", "repro", "train_cnn")
    try:
        wait_for(tmp_path / "killed.log", "Epoch 3/30", proc)  # two epochs done, the stage is mid-training
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # dvc, the shell and the stage: no `finally` runs anywhere
        proc.wait()
    after = _md5s(repo)
    for out in CNN_OUTS:
        assert after[out] is None or after[out] == before[out], out
    assert "train_cnn" in _status(repo, "train_cnn")  # DVC does not take what is there as the stage's result
    leftovers = [p for d in ("models", "plots/train_cnn") for p in (repo / d).iterdir() if p.name.endswith(".tmp")]
    assert all(p.name.startswith(".") for p in leftovers), leftovers  # atomic temp files are hidden, never outs

    set_params(repo / "params.yaml", {"train_cnn.epochs": 2})
    run(repo, "dvc", "repro", "train_cnn")  # DVC's stale lock state from the killed run does not block it
    assert _status(repo, "train_cnn") == {}
    assert len((repo / "plots" / "train_cnn" / "history.csv").read_text().splitlines()) == 1 + 2


# --- interrupted training resumes from its backup -------------------------------------------------------


@pytest.mark.slow
def test_killed_training_resumes_from_backup_to_identical_weights(stage_dir: Callable[..., Path]) -> None:
    import numpy as np

    from stages.lib.models import load_cnn

    epochs = 8
    # dropout on: the resumed epochs must also draw the masks of the uninterrupted run
    root = stage_dir({"train_cnn.epochs": epochs, "train_cnn.device": "cpu", "train_cnn.dropout": 0.25})
    data = make_mnist(2000, 200, seed=3)
    files.save_arrays(root / "train.npz", {"x": data["x_train"], "y": data["y_train"]})
    files.save_arrays(root / "val.npz", {"x": data["x_test"], "y": data["y_test"]})
    env = {k: v for k, v in os.environ.items() if k != "DVC_ROOT"}
    env |= {"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}  # this checkout's stages package

    def command(name: str) -> list[str]:
        return [
            sys.executable, "-m", "stages.train_cnn", "--train", "train.npz", "--val", "val.npz",
            "--model", f"{name}.keras", "--card", f"{name}.json", "--run", f"{name}.run.json",
            "--history", f"{name}.csv",
        ]  # fmt: skip

    def finish(name: str) -> str:
        result = subprocess.run(command(name), cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout + result.stderr

    assert "Resuming" not in finish("straight")
    backups = root / ".dvc" / "tmp" / "train_cnn-backup"
    assert not any(backups.iterdir())  # removed on success

    with open(root / "killed.log", "w") as log:
        proc = subprocess.Popen(command("resumed"), cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            metadata = list(backups.glob("*/training_metadata.json"))
            with contextlib.suppress(OSError, ValueError):
                if metadata and json.loads(metadata[0].read_text())["epoch"] >= 2:
                    break
            assert proc.poll() is None, "training finished before it could be killed"
            assert time.monotonic() < deadline, (root / "killed.log").read_text()
            time.sleep(0.05)
    finally:
        proc.kill()  # SIGKILL
        proc.wait()
    assert not (root / "resumed.keras").exists()
    backup = metadata[0].parent
    out = finish("resumed")
    assert f"Resuming from backup in {backup}" in out
    assert not backup.exists()

    straight, resumed = load_cnn(root / "straight.keras"), load_cnn(root / "resumed.keras")
    # Bit-identical: the backup restores weights, optimizer state and epoch exactly, and each epoch's
    # example order and dropout seeds depend only on the seed and the epoch number
    for a, b in zip(straight.get_weights(), resumed.get_weights(), strict=True):
        assert np.array_equal(a, b)
    rows = (root / "resumed.csv").read_text().splitlines()
    assert len(rows) == 1 + epochs
    assert rows == (root / "straight.csv").read_text().splitlines()  # backed-up and resumed epochs alike
