"""The MLflow model registry and the promotion rule for the CNN.

Each new CNN (one training run) becomes a version of the registered model (``settings.registered_model``,
``mnist-cnn`` by default), registered exactly once and tagged with its test accuracy, the promotion margin
its evaluate used and the git commit it was trained at. Serving code loads ``models:/mnist-cnn@champion``.

**The rule.** Which version is ``champion`` is a function of the registry's contents, not of the order in
which evaluates finish (:func:`walk`): take the versions in version order, leaving out those tagged
``promotion.rejected``; start at the last one tagged ``promotion.pinned`` (else the first); walking
forward, a version takes over when its test accuracy beats the current champion's by more than zero and by
at least its own margin. The champion is where the walk ends; ``challenger`` is the newest version after
it, when there is one (a model trained since that did not beat it).

**Writers converge.** The registry has no compare-and-set (``set_registered_model_alias`` replaces
unconditionally), so an evaluate registers its version, then reads the registry, moves the aliases to
where the rule says, reads back and repairs, until what it reads agrees with the rule (:func:`converge`).
A writer that computed from an older read may move an alias back for a moment; its own read-back repairs
it, and the last writer to read back has seen every version, so the aliases end where the rule says
whatever the order. Two writers creating the same alias at once collide on its unique key; the one refused
reads again. MLflow numbers a new version by reading the highest and adding one; registrations of
the same model queue on the registered model's row, and a registration that still fails is retried after
checking that the version is not already there, so each training run has exactly one version.

**Rolling back by hand** (:func:`pin`, ``python -m stages.commands.champion pin VERSION``) pins
that version and tags every later version ``promotion.rejected``: the rule itself then ends at it, so no
writer's repair undoes it. Moving the alias by hand without these tags is undone by the next evaluate.
"""

from __future__ import annotations

import contextlib
import io
import logging
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from stages.lib import tracking
from stages.lib.errors import UserError

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
PROMOTED, NOT_PROMOTED, UNCHANGED = "promoted", "not_promoted", "unchanged"
# Version tags
ACCURACY = "test_accuracy"
MARGIN = "promotion.margin"
PINNED = "promotion.pinned"
REJECTED = "promotion.rejected"
REGISTER_ATTEMPTS = 5
CONVERGE_ROUNDS = 20


# ---------------------------------------------------------------------------------------------- the rule


@dataclass(frozen=True)
class Version:
    """What the rule reads of a registered version."""

    number: int
    accuracy: float
    margin: float = 0.0
    pinned: bool = False
    rejected: bool = False


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


@dataclass(frozen=True)
class Verdict:
    """The rule's verdict on one version: crowned or not, against which champion, and why."""

    version: int
    promoted: bool
    against: Version | None
    reason: str


@dataclass(frozen=True)
class Outcome:
    """Where the rule ends: the champion, the challenger, and the verdict on every version it walked."""

    champion: Version | None
    challenger: Version | None
    verdicts: dict[int, Verdict]


def walk(versions: Iterable[Version]) -> Outcome:
    """Apply the rule (module docstring) to ``versions``."""
    eligible = sorted((v for v in versions if not v.rejected), key=lambda v: v.number)
    pins = [i for i, v in enumerate(eligible) if v.pinned]
    start = pins[-1] if pins else 0
    champion: Version | None = None
    verdicts: dict[int, Verdict] = {}
    for i, v in enumerate(eligible[start:]):
        if i == 0 and v.pinned:
            promoted, reason = True, "pinned by hand: the rule starts here"
        else:
            promoted, reason = gate(v.accuracy, champion.accuracy if champion else None, v.margin)
        verdicts[v.number] = Verdict(v.number, promoted, champion, reason)
        if promoted:
            champion = v
    after = [v for v in eligible if champion and v.number > champion.number]
    return Outcome(champion, after[-1] if after else None, verdicts)


def aliases_of(outcome: Outcome) -> dict[str, int]:
    """The aliases the rule sets: ``{champion: n, challenger: m}`` (each only when there is one)."""
    out = {}
    if outcome.champion is not None:
        out[CHAMPION] = outcome.champion.number
    if outcome.challenger is not None:
        out[CHALLENGER] = outcome.challenger.number
    return out


# ---------------------------------------------------------------------------------------------- the registry


def _version(mv: Any) -> Version | None:
    """A registered version as the rule reads it; None for one without a valid test accuracy."""
    tags = mv.tags or {}
    try:
        accuracy = float(tags[ACCURACY])
    except (KeyError, ValueError):
        return None
    try:
        margin = float(tags.get(MARGIN, 0.0))
    except ValueError:
        margin = 0.0
    return Version(int(mv.version), accuracy, margin, tags.get(PINNED) == "true", REJECTED in tags)


def read_versions(client: Any, name: str) -> list[Version]:
    """Every version of ``name`` the rule can judge (those with a test accuracy), in version order."""
    found = client.search_model_versions(f"name = '{name}'")
    return sorted(filter(None, (_version(mv) for mv in found)), key=lambda v: v.number)


def read_aliases(client: Any, name: str) -> dict[str, int]:
    """The rule's aliases (champion, challenger) as the registry holds them now."""
    aliases = client.get_registered_model(name).aliases or {}
    return {alias: int(version) for alias, version in aliases.items() if alias in (CHAMPION, CHALLENGER)}


def converge(client: Any, name: str) -> Outcome:
    """Move the aliases to where the rule says, read back, and repair until the registry agrees with the rule
    over what it holds; return the rule's outcome (see the module docstring)."""
    from mlflow.exceptions import MlflowException

    refused = ""
    for attempt in range(CONVERGE_ROUNDS):
        held = read_aliases(client, name)  # before the versions: every version an alias names is then read too
        outcome = walk(read_versions(client, name))
        wanted = aliases_of(outcome)
        if held == wanted:
            return outcome
        try:
            for alias in (CHAMPION, CHALLENGER):
                if alias in wanted and held.get(alias) != wanted[alias]:
                    client.set_registered_model_alias(name, alias, str(wanted[alias]))
                elif alias not in wanted and alias in held:
                    client.delete_registered_model_alias(name, alias)
        except MlflowException as exc:
            # MLflow's store sets an alias by reading, then inserting or updating: when two writers create the
            # same alias at once, the later insert breaks the alias's unique key (PostgreSQL, MySQL). The other
            # writer's alias is there now; the next round reads it and moves it if the rule says so.
            refused = exc.message.splitlines()[0]
            log.info("moving the aliases of %s collided with another writer (%s); reading again", name, refused)
            time.sleep(random.uniform(0.05, 0.25) * (attempt + 1))
    why = f" (last refusal: {refused})" if refused else "; another writer keeps moving them"
    raise UserError(
        f"model registry: the aliases of {name} did not settle after {CONVERGE_ROUNDS} rounds of read-back{why}: "
        "check the tracking server and run evaluate again (dvc repro --force evaluate)"
    )


def _versions_of_run(client: Any, name: str, run_id: str) -> list[Any]:
    return sorted(
        client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"), key=lambda m: int(m.version)
    )


def register(client: Any, name: str, model_uri: str, run_id: str, tags: Mapping[str, str]) -> tuple[Any, bool]:
    """The version of ``name`` for training run ``run_id``: registered now (True) or found (False). Exactly one
    per run: a failed registration is retried only after checking that it did not land, and a duplicate left
    by a retried request is deleted."""
    import mlflow
    from mlflow.exceptions import MlflowException

    for attempt in range(REGISTER_ATTEMPTS):
        existing = _versions_of_run(client, name, run_id)
        if existing:
            for duplicate in existing[1:]:
                log.warning(
                    "%s version %s duplicates version %s; deleting it", name, duplicate.version, existing[0].version
                )
                client.delete_model_version(name, duplicate.version)
            return existing[0], attempt > 0
        try:
            with contextlib.redirect_stderr(io.StringIO()) as said:  # MLflow prints what the decision line says
                mlflow.register_model(model_uri, name, tags=dict(tags))
            log.debug("%s", said.getvalue().strip())
        except MlflowException as exc:
            log.warning("registering %s failed (%s); checking and retrying", name, exc.message.splitlines()[0])
            time.sleep(0.5 * (attempt + 1))
    existing = _versions_of_run(client, name, run_id)
    if existing:
        return existing[0], True
    raise UserError(
        f"model registry: could not register run {run_id} as a version of {name} in {REGISTER_ATTEMPTS} attempts; "
        "check the tracking server and run evaluate again (dvc repro --force evaluate)"
    )


def promote(name: str, model_uri: str, run_id: str, accuracy: float, margin: float) -> dict[str, Any]:
    """Register the model at ``model_uri`` (logged by training run ``run_id``) as a version of ``name``, let the
    aliases converge to the rule, and return the decision on this version."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    commit = client.get_run(run_id).data.tags.get("git.commit", "unknown")
    tags = {ACCURACY: repr(accuracy), MARGIN: repr(margin), "git.commit": commit, "run_id": run_id}
    # A SQLite store takes one writer at a time anyway: queue on its lock rather than on SQLite's busy timeout
    with tracking.store_lock(mlflow.get_tracking_uri()):
        mv, new = register(client, name, model_uri, run_id, tags)
        outcome = converge(client, name)
    return decision(name, int(mv.version), new, outcome, accuracy, margin, run_id, commit)


def decision(
    name: str, number: int, new: bool, outcome: Outcome, accuracy: float, margin: float, run_id: str, commit: str
) -> dict[str, Any]:
    """The decision on version ``number`` as evaluate writes it (promotion.json)."""
    verdict = outcome.verdicts.get(number)
    against = verdict.against if verdict else outcome.champion
    if not new:
        now = f"version {outcome.champion.number}" if outcome.champion else "none"
        what, reason = UNCHANGED, f"this model is already version {number}; aliases as the rule says (champion: {now})"
    elif verdict is None:
        what, reason = NOT_PROMOTED, "a pinned rollback or a rejection keeps it out of the rule"
    else:
        what, reason = (PROMOTED if verdict.promoted else NOT_PROMOTED), verdict.reason
    result = {
        "model": name,
        "decision": what,
        "version": str(number),
        "challenger_accuracy": accuracy,
        "champion_version": str(against.number) if against else None,
        "champion_accuracy": against.accuracy if against else None,
        "current_champion": str(outcome.champion.number) if outcome.champion else None,
        "margin": margin,
        "reason": reason,
        "run_id": run_id,
        "git_commit": commit,
    }
    log.info("%s version %s: %s (%s)", name, number, what.replace("_", " "), reason)
    return result


def pin(client: Any, name: str, number: int, reason: str) -> Outcome:
    """Make version ``number`` the champion by hand, for good (a rollback, or back to a version rolled back
    from): tag it ``promotion.pinned`` (clearing a rejection), tag every later version ``promotion.rejected``
    with ``reason``, then converge. Versions registered later are judged against it."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name = '{name}'")
    except MlflowException as exc:
        raise UserError(f"model registry: cannot read {name} ({exc.message.splitlines()[0]})") from None
    numbers = sorted(int(mv.version) for mv in found if _version(mv) is not None)
    if number not in numbers:
        raise UserError(f"{name} has no version {number} with a test accuracy; its versions: {numbers or 'none'}")
    client.set_model_version_tag(name, str(number), PINNED, "true")
    if REJECTED in (client.get_model_version(name, str(number)).tags or {}):
        client.delete_model_version_tag(name, str(number), REJECTED)
    for mv in found:
        if int(mv.version) > number and REJECTED not in (mv.tags or {}):
            client.set_model_version_tag(name, mv.version, REJECTED, reason)
    return converge(client, name)
