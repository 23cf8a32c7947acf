"""The promotion gate against a real MLflow registry (a SQLite store of its own)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import numpy as np
import pytest
from sklearn.linear_model import Ridge

from stages.lib import registry
from stages.lib.tracking import MlflowTracker


@pytest.mark.parametrize(
    ("accuracy", "champion", "margin", "promoted"),
    [
        (0.90, None, 0.01, True),  # first model
        (0.95, 0.94, 0.005, True),
        (0.95, 0.94, 0.01, True),  # exactly the margin
        (0.945, 0.94, 0.01, False),  # better, but not by the margin
        (0.94, 0.94, 0.0, False),  # equal never beats
        (0.93, 0.94, 0.0, False),
    ],
)
def test_gate(accuracy: float, champion: float | None, margin: float, promoted: bool) -> None:
    decided, reason = registry.gate(accuracy, champion, margin)
    assert decided is promoted
    assert f"{accuracy:.4f}" in reason or champion is None


@pytest.fixture
def store(tmp_path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment(experiment_name=f"registry-{uuid.uuid4().hex}")
    yield f"cnn-{uuid.uuid4().hex}"
    mlflow.set_tracking_uri(None)


def _trained(git_commit: str = "abc123") -> dict[str, str]:
    """A training run with a logged model: ``promote``'s ``run_id`` and ``model_uri`` arguments."""
    import mlflow

    x = np.random.default_rng(0).random((8, 4))
    with mlflow.start_run(tags={"git.commit": git_commit}) as run:
        uri = MlflowTracker(run.info.run_id).log_model("sklearn", Ridge().fit(x, x), x[:2], ("scikit-learn",))
    return {"run_id": run.info.run_id, "model_uri": uri}


def test_first_promoted_better_promoted_worse_not(store: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    first = registry.promote(store, **_trained("c1"), accuracy=0.90, margin=0.01)
    assert (first["decision"], first["version"], first["champion_version"]) == ("promoted", "1", None)
    assert first["git_commit"] == "c1"

    better = registry.promote(store, **_trained("c2"), accuracy=0.92, margin=0.01)
    assert (better["decision"], better["champion_version"], better["champion_accuracy"]) == ("promoted", "1", 0.90)
    assert str(client.get_model_version_by_alias(store, "champion").version) == "2"

    worse = registry.promote(store, **_trained("c3"), accuracy=0.925, margin=0.01)  # +0.005 < margin
    assert worse["decision"] == "not_promoted" and worse["champion_accuracy"] == 0.92
    assert "margin" in worse["reason"]
    assert str(client.get_model_version_by_alias(store, "champion").version) == "2"
    assert str(client.get_model_version_by_alias(store, "challenger").version) == "3"


def test_the_same_model_again_is_unchanged(store: str) -> None:
    trained = _trained()
    assert registry.promote(store, **trained, accuracy=0.9, margin=0.0)["decision"] == "promoted"
    again = registry.promote(store, **trained, accuracy=0.9, margin=0.0)
    assert (again["decision"], again["version"]) == ("unchanged", "1")
    assert "champion" in again["reason"]


PROMOTE_WHEN_TOLD = """
import json, sys, time
from pathlib import Path
import mlflow
from stages.lib import registry
store, model_uri, run_id, accuracy, ready, go, out = sys.argv[1:]
mlflow.set_tracking_uri(store.split("|")[0])
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.01)
result = registry.promote(store.split("|")[1], model_uri, run_id, float(accuracy), 0.0)
Path(out).write_text(json.dumps(result))
"""


def test_two_evaluates_at_once_are_judged_one_after_the_other(store: str, tmp_path) -> None:
    """Two processes promoting into one SQLite registry at the same moment (two queued experiments' evaluate):
    the second reads the champion the first leaves, so only one of them is the first model."""
    import json
    import os
    import subprocess
    import sys
    import time

    import mlflow

    uri = mlflow.get_tracking_uri()
    candidates = {"worse": (_trained("w"), 0.90), "better": (_trained("b"), 0.95)}
    procs = {}
    for label, (trained, accuracy) in candidates.items():
        args = [f"{uri}|{store}", trained["model_uri"], trained["run_id"], str(accuracy)]
        args += [str(tmp_path / f"{label}.ready"), str(tmp_path / "go"), str(tmp_path / f"{label}.json")]
        procs[label] = subprocess.Popen([sys.executable, "-c", PROMOTE_WHEN_TOLD, *args], env=os.environ.copy())
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"{label}.ready").exists() for label in procs):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs.values())
        time.sleep(0.05)
    (tmp_path / "go").touch()
    assert all(p.wait(timeout=120) == 0 for p in procs.values())

    results = {label: json.loads((tmp_path / f"{label}.json").read_text()) for label in procs}
    firsts = [label for label, r in results.items() if r["champion_version"] is None]
    assert len(firsts) == 1, results  # the other was judged against it
    from mlflow.tracking import MlflowClient

    champion = MlflowClient().get_model_version_by_alias(store, "champion")
    assert str(champion.version) == results["better"]["version"]
