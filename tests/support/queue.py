"""DVC's experiment queue in a test repository: start its workers, wait for it, stop them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from tests.support.repo import command_env, run


def wait_for_queue(root: Path, timeout_s: float = 900) -> str:
    """Poll `dvc queue status` until nothing is queued or running; return its last output."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = run(root, "dvc", "queue", "status").stdout
        if not any(word in status for word in ("Queued", "Running")):
            return status
        assert time.monotonic() < deadline, f"queue still busy:\n{status}"
        time.sleep(3)


def start_workers(root: Path, jobs: int, env: dict[str, str] | None = None) -> None:
    """`dvc queue start -j <jobs>`, without reading its output: the workers it leaves running in the background
    inherit its stdout and stderr, so reading them would wait for the last worker to exit. With two workers
    one sometimes never does: its monitor shuts it down ("empty queue") while its task still runs, and the
    worker idles on after the task (seen with DVC 3.67)."""
    started = subprocess.run(
        ["dvc", "queue", "start", "-j", str(jobs)],
        cwd=root,
        env=env or command_env(),
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
