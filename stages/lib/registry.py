"""The MLflow model registry and the promotion gate for the CNN.

Each new CNN (one training run) becomes a version of the registered model (``settings.registered_model``,
``mnist-cnn`` by default), tagged with its test accuracy and the git commit it was trained at. The alias
``champion`` moves to it only when its test accuracy beats the current champion's by more than zero and
by at least ``evaluate.promotion_margin``; the first version is promoted. Otherwise it gets the alias
``challenger``. A model that is already registered (evaluate re-ran for another reason) is left as it is.
Serving code loads ``models:/mnist-cnn@champion``.
"""

from __future__ import annotations

import logging
from typing import Any

from stages.lib import tracking

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
PROMOTED, NOT_PROMOTED, UNCHANGED = "promoted", "not_promoted", "unchanged"


def _by_alias(client: Any, name: str, alias: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def gate(accuracy: float, champion_accuracy: float | None, margin: float) -> tuple[bool, str]:
    """Whether a model with test ``accuracy`` replaces a champion with ``champion_accuracy`` (None: there is
    none), and why, in one sentence."""
    if champion_accuracy is None:
        return True, "first registered model: no champion yet"
    diff = accuracy - champion_accuracy
    if diff > 0 and diff >= margin:
        return True, (
            f"test accuracy {accuracy:.4f} beats the champion's {champion_accuracy:.4f} "
            f"by {diff:+.4f}, at least the margin {margin:.4f}"
        )
    return False, (
        f"test accuracy {accuracy:.4f} does not beat the champion's {champion_accuracy:.4f} "
        f"by more than zero and at least the margin {margin:.4f} ({diff:+.4f})"
    )


def promote(name: str, model_uri: str, run_id: str, accuracy: float, margin: float) -> dict[str, Any]:
    """Register the model at ``model_uri`` (logged by training run ``run_id``) as a version of ``name``,
    apply the gate, move the aliases, and return the decision (see the module docstring)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    commit = client.get_run(run_id).data.tags.get("git.commit", "unknown")
    # Reading the champion and moving the aliases is one step: a second evaluate on the same SQLite store
    # (a parallel queued experiment) waits, then judges its model against the champion this one leaves.
    # A tracking server offers no such lock; there, simultaneous evaluates can read the same champion.
    with tracking.store_lock(mlflow.get_tracking_uri()):
        champion, version, decision, reason = _register(client, name, model_uri, run_id, commit, accuracy, margin)
    champion_accuracy = float(champion.tags["test_accuracy"]) if champion else None
    result = {
        "model": name,
        "decision": decision,
        "version": str(version.version),
        "challenger_accuracy": accuracy,
        "champion_version": str(champion.version) if champion else None,
        "champion_accuracy": champion_accuracy,
        "margin": margin,
        "reason": reason,
        "run_id": run_id,
        "git_commit": commit,
    }
    log.info("%s version %s: %s (%s)", name, version.version, decision.replace("_", " "), reason)
    return result


def _register(
    client: Any, name: str, model_uri: str, run_id: str, commit: str, accuracy: float, margin: float
) -> tuple[Any, Any, str, str]:
    """:func:`promote`'s registry work: return the champion before it, the model's version, the decision
    and why."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="The pipeline's CNN; alias champion = the model to serve")
    champion = _by_alias(client, name, CHAMPION)
    champion_accuracy = float(champion.tags["test_accuracy"]) if champion else None
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if existing:
        version = existing[0]
        role = CHAMPION if champion and str(champion.version) == str(version.version) else "not the champion"
        decision, reason = UNCHANGED, f"this model is already version {version.version} ({role}); aliases unchanged"
    else:
        version = mlflow.register_model(
            model_uri, name, tags={"test_accuracy": repr(accuracy), "git.commit": commit, "run_id": run_id}
        )
        promoted, reason = gate(accuracy, champion_accuracy, margin)
        decision = PROMOTED if promoted else NOT_PROMOTED
        client.set_registered_model_alias(name, CHAMPION if promoted else CHALLENGER, version.version)
    return champion, version, decision, reason
