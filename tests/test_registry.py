"""The promotion rule: the gate and the walk over the versions (pure), then against real registries: a SQLite
store of its own, and the team's PostgreSQL-backed server with 8 evaluates promoting at once."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import Ridge

from stages.lib import registry
from stages.lib.errors import UserError
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


V = registry.Version


@pytest.mark.parametrize(
    ("versions", "champion", "challenger", "crowned"),
    [
        ([], None, None, []),
        ([V(1, 0.90)], 1, None, [1]),
        ([V(1, 0.90, 0.01), V(2, 0.905, 0.01), V(3, 0.93, 0.01)], 3, None, [1, 3]),  # 2 is within the margin
        ([V(1, 0.95), V(2, 0.90), V(3, 0.92)], 1, 3, [1]),  # later ones never beat it
        ([V(3, 0.93), V(1, 0.90), V(2, 0.92)], 3, None, [1, 2, 3]),  # version order, not list order
        ([V(1, 0.90), V(2, 0.99, rejected=True), V(3, 0.91)], 3, None, [1, 3]),  # a rejected one is left out
        ([V(1, 0.90), V(2, 0.95), V(3, 0.93, pinned=True), V(4, 0.94)], 4, None, [3, 4]),  # from the pin on
        ([V(1, 0.95, pinned=True), V(2, 0.99, rejected=True), V(3, 0.96, pinned=True), V(4, 0.90)], 3, 4, [3]),
    ],
)
def test_the_rule_walks_the_versions_in_order(versions, champion, challenger, crowned) -> None:
    outcome = registry.walk(versions)
    assert (outcome.champion.number if outcome.champion else None) == champion
    assert (outcome.challenger.number if outcome.challenger else None) == challenger
    assert [n for n, verdict in sorted(outcome.verdicts.items()) if verdict.promoted] == crowned


def _new_experiment(artifacts_in: Path | None) -> None:
    """A fresh experiment, made active; with ``artifacts_in``, its artifacts go there (a SQLite store's
    default is ./mlruns in the working directory: the repository)."""
    import mlflow

    location = (artifacts_in / "mlartifacts").as_uri() if artifacts_in else None
    name = f"registry-{uuid.uuid4().hex}"
    mlflow.set_experiment(experiment_id=mlflow.create_experiment(name, artifact_location=location))


@pytest.fixture
def store(tmp_path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    _new_experiment(tmp_path)
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


def test_a_pin_rolls_back_and_later_evaluates_keep_it(store: str) -> None:
    """A person rolls the champion back to version 1; the next evaluates repair nothing back to version 3, and a
    new model is judged against version 1."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    for accuracy in (0.90, 0.92, 0.94):
        registry.promote(store, **_trained(), accuracy=accuracy, margin=0.01)
    assert str(client.get_model_version_by_alias(store, "champion").version) == "3"
    registry.pin(client, store, 1, "version 3 misbehaves in production")
    assert str(client.get_model_version_by_alias(store, "champion").version) == "1"
    assert client.get_model_version(store, "3").tags[registry.REJECTED] == "version 3 misbehaves in production"
    fourth = registry.promote(store, **_trained(), accuracy=0.905, margin=0.01)  # beats 1, but not by the margin
    assert (fourth["decision"], fourth["champion_version"]) == ("not_promoted", "1")
    assert str(client.get_model_version_by_alias(store, "champion").version) == "1"
    fifth = registry.promote(store, **_trained(), accuracy=0.93, margin=0.01)
    assert (fifth["decision"], fifth["champion_version"], fifth["current_champion"]) == ("promoted", "1", "5")
    with pytest.raises(UserError, match="has no version 9"):
        registry.pin(client, store, 9, "no such version")


PROMOTE_WHEN_TOLD = """
import json, sys, time
from pathlib import Path
import mlflow
from stages.lib import registry
from stages.lib.errors import UserError
store, model_uri, run_id, accuracy, ready, go, out = sys.argv[1:]
mlflow.set_tracking_uri(store.split("|")[0])
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.01)
result = registry.promote(store.split("|")[1], model_uri, run_id, float(accuracy), 0.0)
Path(out).write_text(json.dumps(result))
"""


@pytest.mark.slow
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


# ---------------------------------------------------------------------------------------------- at once

PROMOTE_WHEN_TOLD_ALL = """
import json, sys, time
from pathlib import Path
from stages.lib import registry
name, model_uri, run_id, accuracy, margin, go, out = sys.argv[1:]
while not Path(go).exists():
    time.sleep(0.01)
Path(out).write_text(json.dumps(registry.promote(name, model_uri, run_id, float(accuracy), float(margin))))
"""
# Known test accuracies, several within the margin of each other
ACCURACIES = (0.900, 0.905, 0.930, 0.935, 0.920, 0.950, 0.955, 0.940)
MARGIN = 0.01


def expected_champion(accuracy_of: dict[int, float]) -> int:
    """The rule, written out for this test: in version order, a version takes over when it beats the champion
    by more than zero and by at least the margin."""
    champion = None
    for number in sorted(accuracy_of):
        if champion is None or accuracy_of[number] - accuracy_of[champion] >= MARGIN:
            champion = number
    return champion


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The environment of a registry: a SQLite file, or the team's server (PostgreSQL, basic auth)."""
    import mlflow

    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    if request.param == "postgres":
        env = request.getfixturevalue("team").env()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    _new_experiment(tmp_path if request.param != "postgres" else None)
    yield env
    mlflow.set_tracking_uri(None)


@pytest.mark.slow
def test_eight_evaluates_at_once_converge_to_the_rule(backend: dict[str, str], tmp_path) -> None:
    """8 processes register and promote at the same moment: every one succeeds, every model is registered
    exactly once, and the champion is the version the rule picks from the versions' order, whatever order
    the processes finished in."""
    import json
    import os
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    name = f"cnn-{uuid.uuid4().hex[:8]}"
    trained = [_trained() for _ in ACCURACIES]
    env = {**os.environ, **backend}
    procs = []
    for i, (model, accuracy) in enumerate(zip(trained, ACCURACIES, strict=True)):
        args = [name, model["model_uri"], model["run_id"], str(accuracy), str(MARGIN), str(tmp_path / "go")]
        args.append(str(tmp_path / f"{i}.json"))
        procs.append(subprocess.Popen([sys.executable, "-c", PROMOTE_WHEN_TOLD_ALL, *args], env=env))
    (tmp_path / "go").touch()
    assert [p.wait(timeout=600) for p in procs] == [0] * len(procs)

    client = MlflowClient()
    versions = client.search_model_versions(f"name = '{name}'")
    accuracy_of_run = {model["run_id"]: accuracy for model, accuracy in zip(trained, ACCURACIES, strict=True)}
    assert sorted(v.run_id for v in versions) == sorted(accuracy_of_run)  # each model exactly once
    accuracy_of = {int(v.version): accuracy_of_run[v.run_id] for v in versions}
    champion = expected_champion(accuracy_of)
    assert str(client.get_model_version_by_alias(name, "champion").version) == str(champion)
    results = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(len(procs))]
    for result in results:  # each decision is the rule's verdict on that version, against its predecessors
        number = int(result["version"])
        before = {n: a for n, a in accuracy_of.items() if n <= number}
        assert (result["decision"] == "promoted") == (expected_champion(before) == number), result


def test_an_alias_created_by_two_writers_at_once_is_read_again(postgres, team, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's store sets an alias by reading and then inserting, so two evaluates creating ``champion`` at once
    collide on the alias's unique key in PostgreSQL. Here the other writer is a transaction that inserted the
    alias (to the wrong version) and commits only once this evaluate's insert waits on it: the evaluate's insert
    is refused, and converging reads again and moves the alias to where the rule says."""
    import threading
    import time

    import mlflow
    import sqlalchemy as sa
    from mlflow.tracking import MlflowClient
    from sqlalchemy.pool import NullPool

    from tests.support.servers import TEAM_DATABASE

    for key, value in team.env().items():
        monkeypatch.setenv(key, value)
    mlflow.set_tracking_uri(team.uri)
    _new_experiment(None)
    client, name = MlflowClient(), f"cnn-{uuid.uuid4().hex[:8]}"
    for accuracy in (0.90, 0.95):
        trained = _trained()
        registry.register(client, name, trained["model_uri"], trained["run_id"], {registry.ACCURACY: str(accuracy)})

    engine = sa.create_engine(postgres.url(TEAM_DATABASE, superuser=True), poolclass=NullPool)
    waiting = sa.text("SELECT count(*) FROM pg_stat_activity WHERE datname = :db AND wait_event_type = 'Lock'")
    outcome: dict[str, object] = {}

    def evaluate() -> None:
        try:
            outcome["champion"] = registry.converge(client, name).champion
        except Exception as exc:  # the test's thread reports it below
            outcome["error"] = exc

    try:
        with engine.connect() as other, engine.connect() as watcher:
            other.execute(
                sa.text(
                    "INSERT INTO registered_model_aliases (workspace, name, alias, version) "
                    "SELECT workspace, name, 'champion', 1 FROM registered_models WHERE name = :name"
                ),
                {"name": name},
            )  # not committed yet: the evaluate's insert of the same alias waits on it
            thread = threading.Thread(target=evaluate)
            thread.start()
            deadline = time.monotonic() + 60
            while watcher.execute(waiting, {"db": TEAM_DATABASE}).scalar() == 0:
                assert thread.is_alive() and time.monotonic() < deadline, outcome
                watcher.rollback()  # a fresh snapshot of pg_stat_activity
                time.sleep(0.05)
            other.commit()
            thread.join(60)
    finally:
        engine.dispose()
    assert "error" not in outcome, outcome.get("error")
    assert outcome["champion"].number == 2
    assert str(client.get_model_version_by_alias(name, registry.CHAMPION).version) == "2"
    mlflow.set_tracking_uri(None)
