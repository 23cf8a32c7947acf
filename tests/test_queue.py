"""Queued experiments (`dvc exp run --queue`, run by `dvc queue start -j 2` in workspaces under
.dvc/tmp/exps/) log to the repository's own store, or to the team's server, concurrently, without losing
a run."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.support.queue import start_workers, stop_workers, wait_for_queue
from tests.support.repo import (
    ALL_STAGES,
    children,
    command_env,
    default_store,
    mlflow_runs,
    parents,
    run,
    set_params,
    tiny_repo,
)

pytestmark = pytest.mark.slow

EXPERIMENTS = {"q-ridge-2": "baselines.ridge.alpha=2.0", "q-ridge-3": "baselines.ridge.alpha=3.0"}


@pytest.fixture(params=["repository", "team"])
def store(request: pytest.FixtureRequest) -> dict[str, str]:
    """Where the stages track to: the repository's own mlflow.db (no MLFLOW_TRACKING_URI), or the team's
    server (PostgreSQL, basic auth)."""
    return {} if request.param == "repository" else request.getfixturevalue("team").env()


def test_two_queued_experiments_land_in_the_store(
    tmp_path: Path, store: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tiny_repo(tmp_path / "repo")
    if store:  # the team server is shared: an experiment of this test's own
        set_params(root / "params.yaml", {"settings.mlflow_experiment": f"queue-{tmp_path.name}"})
        run(root, "git", "commit", "-q", "-am", "Own experiment on the team server")
    for name, change in EXPERIMENTS.items():
        run(root, "dvc", "exp", "run", "--queue", "-n", name, "-S", change, **store)
    start_workers(root, jobs=2, env={**command_env(), **store})
    try:
        status = wait_for_queue(root)
    finally:
        stop_workers(root)
    logs = {
        name: subprocess.run(
            ["dvc", "queue", "logs", name], cwd=root, env=command_env(), capture_output=True, text=True
        ).stdout
        for name in EXPERIMENTS
    }
    failed = [name for name in EXPERIMENTS if any(name in line and "Failed" in line for line in status.splitlines())]
    assert "Failed" not in status, status + "".join(f"\n--- {name}:\n{logs[name][-8000:]}" for name in failed)
    assert not any("database is locked" in log for log in logs.values())

    for key, value in store.items():  # this process reads the server with the same credentials
        monkeypatch.setenv(key, value)
    runs = mlflow_runs(store.get("MLFLOW_TRACKING_URI") or default_store(root))  # not the workspaces' store
    assert not list((root / ".dvc" / "tmp" / "exps").rglob("mlflow.db"))
    assert bool(store) != (root / "mlflow.db").exists()
    if store:
        experiment = f"queue-{tmp_path.name}"
        runs = [r for r in runs if r.info.experiment_id == _experiment_id(store, experiment)]
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


def _experiment_id(store: dict[str, str], name: str) -> str:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=store["MLFLOW_TRACKING_URI"]).get_experiment_by_name(name).experiment_id
