"""A throw-away copy of the repository for benchmarks that run DVC or whole stages.

``make_clone`` clones the committed state (``git clone`` of HEAD) into a temporary directory and copies
the DVC outputs the working copy holds (``data/``, ``models/``), so no stage has to download or train
before a benchmark starts. Nothing in the working copy is touched; the clone's MLflow store is its own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the project's virtualenv: dvc, python


def env(clone: Path) -> dict[str, str]:
    """Environment for commands in ``clone``: the project's interpreter first on PATH, the clone's MLflow store."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("DVC_")}
    out["PATH"] = f"{BIN}{os.pathsep}{out.get('PATH', '')}"
    out["MLFLOW_TRACKING_URI"] = f"sqlite:///{clone / 'mlflow.db'}"
    out["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return out


def run(
    cmd: list[str], cwd: Path, extra_env: dict[str, str] | None = None, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in ``cwd`` with :func:`env` (and ``extra_env``); raise with its output when it fails."""
    environment = {**env(cwd), **(extra_env or {})}
    proc = subprocess.run(cmd, cwd=cwd, env=environment, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd} (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def make_clone(prefix: str, outputs: tuple[str, ...] = ("data", "models"), rev: str | None = None) -> Path:
    """Clone HEAD (or commit ``rev``) into a new temporary directory and copy ``outputs`` from the working
    copy; return its root."""
    missing = [name for name in outputs if not (ROOT / name).is_dir()]
    if missing:
        raise SystemExit(f"{', '.join(missing)} not found in {ROOT}: run `make repro` first")
    clone = Path(tempfile.mkdtemp(prefix=prefix)) / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    if rev is not None:
        commit = subprocess.run(["git", "rev-parse", rev], cwd=ROOT, capture_output=True, text=True, check=True)
        subprocess.run(["git", "checkout", "-q", commit.stdout.strip()], cwd=clone, check=True)
    for name in outputs:
        shutil.copytree(ROOT / name, clone / name, dirs_exist_ok=True)
    return clone


def remove(clone: Path) -> None:
    shutil.rmtree(clone.parent, ignore_errors=True)
