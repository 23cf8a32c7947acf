"""Queued experiments (`dvc exp run --queue`, run by `dvc queue start -j 2` in workspaces under
.dvc/tmp/exps/) log to the repository's own store, concurrently, without losing a run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.repo import ALL_STAGES, children, command_env, default_store, mlflow_runs, parents, run, tiny_repo

pytestmark = pytest.mark.slow

EXPERIMENTS = {"q-ridge-2": "baselines.ridge.alpha=2.0", "q-ridge-3": "baselines.ridge.alpha=3.0"}


def wait_for_queue(root: Path, timeout_s: float = 900) -> str:
    """Poll `dvc queue status` until nothing is queued or running; return its last output."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = run(root, "dvc", "queue", "status").stdout
        if not any(word in status for word in ("Queued", "Running")):
            return status
        assert time.monotonic() < deadline, f"queue still busy:\n{status}"
        time.sleep(3)


def start_workers(root: Path, jobs: int) -> None:
    """`dvc queue start -j <jobs>`, without reading its output: the workers it leaves running in the background
    inherit its stdout and stderr, so reading them would wait for the last worker to exit. With two workers
    one sometimes never does: its monitor shuts it down ("empty queue") while its task still runs, and the
    worker idles on after the task (seen with DVC 3.67)."""
    started = subprocess.run(
        ["dvc", "queue", "start", "-j", str(jobs)],
        cwd=root,
        env=command_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=120,
    )
    assert started.returncode == 0


def stop_workers(root: Path) -> None:
    """`dvc queue stop`, then end any worker that is still alive (see :func:`start_workers`)."""
    subprocess.run(["dvc", "queue", "stop"], cwd=root, env=command_env(), capture_output=True, timeout=120)
    for pid_file in (root / ".dvc" / "tmp" / "exps" / "celery").glob("*.pid"):
        with contextlib.suppress(ValueError, OSError):
            pid = int(pid_file.read_text().strip())
            if b"queue-worker" in Path(f"/proc/{pid}/cmdline").read_bytes():  # not a process that reused the pid
                os.kill(pid, signal.SIGTERM)


def test_two_queued_experiments_land_in_the_repository_store(tmp_path: Path) -> None:
    root = tiny_repo(tmp_path / "repo")
    for name, change in EXPERIMENTS.items():
        run(root, "dvc", "exp", "run", "--queue", "-n", name, "-S", change)
    start_workers(root, jobs=2)
    try:
        status = wait_for_queue(root)
    finally:
        stop_workers(root)
    logs = "".join(
        subprocess.run(
            ["dvc", "queue", "logs", name], cwd=root, env=command_env(), capture_output=True, text=True
        ).stdout
        for name in EXPERIMENTS
    )
    assert "Failed" not in status, f"{status}\n{logs[-5000:]}"
    assert "database is locked" not in logs

    runs = mlflow_runs(default_store(root))  # the repository's mlflow.db, not the workspaces'
    assert not list((root / ".dvc" / "tmp" / "exps").rglob("mlflow.db"))
    by_name = {p.data.tags.get("dvc.exp_name"): p for p in parents(runs)}
    assert set(by_name) == set(EXPERIMENTS)
    for name, parent in by_name.items():
        assert parent.info.run_name == name and parent.info.status == "FINISHED"
        kids = children(runs, parent)
        assert kids, name
        assert set(kids) <= ALL_STAGES and {"train_baseline@ridge", "evaluate"} <= set(kids)
        assert all(r.info.status == "FINISHED" and r.data.tags["dvc.exp_name"] == name for r in kids.values())
        alpha = EXPERIMENTS[name].split("=")[1]
        assert parent.data.params["baselines.ridge.alpha"] == alpha
    shown = json.loads(run(root, "dvc", "exp", "show", "--json").stdout)
    assert set(EXPERIMENTS) <= {e.get("name") for b in shown for e in (b.get("experiments") or [])}
