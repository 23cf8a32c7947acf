"""Shared fixtures: a stage working directory with the real dvc.yaml and a shrunk params.yaml."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _isolated_tracking(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every test logs to a throw-away SQLite store, never to the repository's mlflow.db."""
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{db}"
    # Subprocesses (dvc, stages/run) find this interpreter first.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    os.environ.pop("DVC_STAGE", None)
    yield
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


def set_params(path: Path, overrides: dict[str, Any]) -> None:
    """Set dotted keys (``{"augment.copies": 0}``) in a params.yaml file."""
    params = yaml.safe_load(path.read_text())
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = params
        for part in parents:
            node = node[part]
        node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


TINY = {
    "prepare.val_size": 100,
    "train_cnn.epochs": 1,
    "train_cnn.batch_size": 32,
    "augment.batch_size": 128,
}


@pytest.fixture
def stage_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Path]:
    """Return a function that makes ``tmp_path`` a stage working directory and chdirs into it.

    It holds the repository's dvc.yaml and params.yaml, the latter shrunk (``TINY``) and then updated
    with the given overrides; stage ``main()`` functions can run there in-process.
    """

    def make(overrides: dict[str, Any] | None = None) -> Path:
        shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
        shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
        set_params(tmp_path / "params.yaml", {**TINY, **(overrides or {})})
        monkeypatch.chdir(tmp_path)
        return tmp_path

    return make
