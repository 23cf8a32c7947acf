"""The promotion gate against a real MLflow registry (a SQLite store of its own)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import numpy as np
import pytest
from sklearn.linear_model import Ridge

from stages.lib import registry
from stages.lib.tracking import StageTracker


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
        uri = StageTracker(run.info.run_id).log_model("sklearn", Ridge().fit(x, x), x[:2], ("scikit-learn",))
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
