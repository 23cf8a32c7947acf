"""Shared fixtures: an isolated MLflow store, and stage working directories with the real dvc.yaml and a
shrunk params.yaml. Helpers that are not fixtures live in tests/support/."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from stages.lib import runtime, tracking
from tests.support.engines import missing
from tests.support.repo import REPO, TINY, set_params
from tests.support.servers import (
    TEAM_DATABASE,
    MlflowServer,
    PgServer,
    postgres_missing_reason,
    postgres_server,
    team_server,
)


@pytest.fixture(scope="session", autouse=True)
def _isolated_tracking(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every test logs to a throw-away SQLite store, never to the repository's mlflow.db; its artifacts (the
    default experiment's too) go beside it, never to ./mlruns."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    SqlAlchemyStore(uri, (store / "artifacts").as_uri())  # creates the database and its default experiment
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    # Subprocesses (dvc, stages/run) find this interpreter first.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    os.environ.pop("DVC_STAGE", None)
    yield
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture
def stage_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Path]:
    """Return a function that makes ``tmp_path`` a stage working directory and chdirs into it.

    It holds the repository's dvc.yaml, versions.yaml and params.yaml, the latter shrunk (``TINY``) and then updated
    with the given overrides; stage ``main()`` functions can run there in-process.
    """

    def make(overrides: dict[str, Any] | None = None) -> Path:
        for name in ("dvc.yaml", "params.yaml", "versions.yaml"):
            shutil.copy(REPO / name, tmp_path / name)
        set_params(tmp_path / "params.yaml", {**TINY, **(overrides or {})})
        monkeypatch.chdir(tmp_path)
        return tmp_path

    return make


@pytest.fixture
def stage_context(stage_dir: Callable[..., Path]) -> Callable[..., runtime.StageContext]:
    """Return a function that makes a stage working directory (:func:`stage_dir`) and the context a stage's
    ``run`` takes there: that directory's params (loaded, and the device applied, as the stage's ``main``
    does) and a tracker that records nothing. No MLflow is involved."""

    def make(stage: str, overrides: dict[str, Any] | None = None) -> runtime.StageContext:
        stage_dir(overrides)
        params, device = runtime.load_stage(stage)
        return runtime.StageContext(stage, params, device, tracking.Tracker())

    return make


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgServer]:
    """A real PostgreSQL server on loopback, shared by the session."""
    if reason := postgres_missing_reason():
        missing(reason)
    with postgres_server(tmp_path_factory.mktemp("postgres")) as server:
        yield server


@pytest.fixture(scope="session")
def team(postgres: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """The team's tracking server (``make team-server``: PostgreSQL backend, basic auth), shared by the session."""
    with team_server(postgres.create_database(TEAM_DATABASE), tmp_path_factory.mktemp("team-server")) as server:
        yield server
