"""retrain: re-run the pipeline only when something changed, and report whether the new CNN was promoted.

A command (``make retrain``, ``python -m stages.commands.retrain``), not a DVC stage: it drives ``dvc repro``
and is run at the repository root, by hand or by the scheduled workflow ``.github/workflows/retrain.yml``.

1. ``dvc status --json`` lists the stages whose code, params, data deps or installed library versions
   (versions.yaml, rewritten by ``make setup``) differ from dvc.lock, or whose outputs are missing or
   modified (for example after a ``dvc pull`` that found only part of them). When there are none it
   prints one line saying so and exits 0 without running anything.

   The data needs no download to be checked: fetch has no data dependency, and it accepts only bytes
   whose content digest equals ``fetch.content_sha256`` in params.yaml. Other MNIST bytes cannot reach the
   pipeline without a params change, which ``dvc status`` sees; and dvc.lock records the md5 of
   ``data/raw/mnist.npz``, which ``dvc status`` compares with the file in the workspace.
2. Otherwise it runs ``dvc repro`` (its output goes to the terminal). The evaluate stage registers a new
   CNN as a version of the registered model and moves the alias ``champion`` to it only when it beats the
   current champion; it writes the decision to ``promotion.json`` (``--decision``). When evaluate did not
   run (no model and no test data changed), there is no new decision.
3. It writes a Markdown summary (``--summary``, default ``$RETRAIN_SUMMARY`` or ``retrain-summary.md``):
   the decision with both test accuracies and the reason, the library versions that changed, then
   ``dvc metrics diff --md`` and ``dvc params diff --md`` against the commit holding the results of the
   champion the new model was compared with: the first commit that changed dvc.lock after the commit the
   champion was trained at (its git commit in the registry), else that commit itself; HEAD when there was
   no champion, or when that commit is not in this clone's history.
   It prints the decision and the summary's path.

Under GitHub Actions (``GITHUB_OUTPUT`` set) it also sets the step outputs ``decision`` (``skipped``,
``not_evaluated``, ``promoted``, ``not_promoted`` or ``unchanged``), ``model``, ``version`` and ``summary``.

Exit status: 0 when it skipped or trained, whatever the decision; 1 on an error, with one line saying what
failed and how to fix it (the summary is still written when training finished).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.lib import files
from stages.lib.errors import UserError
from stages.lib.lineage import LOCK_FILE
from stages.lib.pipeline import PARAMS_FILE, VERSIONS_FILE
from stages.lib.registry import CHAMPION

log = logging.getLogger(__name__)

DATA_STAGE = "fetch"  # the stage that brings the data in: its outputs are named in the "nothing changed" line
DEFAULT_SUMMARY = "retrain-summary.md"
DEFAULT_DECISION = "promotion.json"
DEFAULT_MODEL = "mnist-cnn"  # when params.yaml has no settings.registered_model
DECISIONS = ("promoted", "not_promoted", "unchanged")
DECISION_KEYS = ("model", "decision", "version", "challenger_accuracy", "champion_version", "champion_accuracy")
MAX_ITEMS = 4  # changes listed per stage
PER_CLASS = ".per_class."  # metrics rows left out of the summary (20 per model)


# ---------------------------------------------------------------------------------------------- pure parts


def describe_changes(status: Mapping[str, Any]) -> list[str]:
    """One line per stale stage of ``dvc status --json`` output: the stage and what changed, e.g.
    ``train_cnn: params.yaml (train_cnn modified)``, ``prepare: data/prepared/val.npz deleted``."""
    lines = []
    for stage, entries in status.items():
        items: list[str] = []
        for entry in entries:
            if isinstance(entry, str):  # "always changed", "changed command"
                items.append(entry)
                continue
            for group in entry.values():
                for path, state in (group or {}).items():
                    if isinstance(state, Mapping):  # params.yaml: {key: modified | new | deleted}
                        keys = ", ".join(f"{key} {how}" for key, how in state.items())
                        items.append(f"{path} ({keys})")
                    else:
                        items.append(f"{path} {state}")
        more = f", and {len(items) - MAX_ITEMS} more" if len(items) > MAX_ITEMS else ""
        lines.append(f"{stage}: {', '.join(items[:MAX_ITEMS])}{more}")
    return lines


def version_changes(lock: Mapping[str, Any], versions: Mapping[str, str]) -> list[str]:
    """``name old → new`` for each entry of versions.yaml that differs from what dvc.lock recorded for the
    stages that declare it (a dependency update since the last run)."""
    before: dict[str, str] = {}
    for entry in ((lock or {}).get("stages") or {}).values():
        before.update(((entry.get("params") or {}).get(VERSIONS_FILE) or {}).items())
    return [f"{name} {before[name]} → {versions.get(name)}" for name in before if before[name] != versions.get(name)]


def skip_message(lock: Mapping[str, Any]) -> str:
    """The one line saying that nothing changed, naming the data files the pipeline starts from."""
    outs = (lock.get("stages") or {}).get(DATA_STAGE, {}).get("outs") or []
    data = ", ".join(f"{out['path']} (md5 {out.get('md5', '?')})" for out in outs) or "the data"
    return f"nothing changed since the last run: params, code and {data} match {LOCK_FILE}; not retraining"


def read_decision(path: Path) -> dict[str, Any]:
    """The promotion decision written by the evaluate stage, checked against its contract."""
    fix = "it is written by the evaluate stage; re-create it with `dvc repro --force evaluate`"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: file not found; {fix}") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read it as JSON ({exc}); {fix}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}; {fix}")
    missing = [key for key in DECISION_KEYS if key not in data]
    if missing:
        raise UserError(f"{path}: missing {', '.join(missing)}; {fix}")
    if data["decision"] not in DECISIONS:
        raise UserError(f"{path}: decision is {data['decision']!r}, expected one of {', '.join(DECISIONS)}; {fix}")
    return data


def _accuracy(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.4f}"


def decision_line(decision: Mapping[str, Any] | None) -> str:
    """One sentence: what happened to the new model, with both test accuracies."""
    if decision is None:
        return "no new promotion decision: evaluate did not run (no model and no test data changed), champion unchanged"
    name, version = decision["model"], decision["version"]
    new = _accuracy(decision["challenger_accuracy"])
    if decision["champion_version"] is None:
        against = "no champion before it"
    else:
        against = f"champion version {decision['champion_version']}: {_accuracy(decision['champion_accuracy'])}"
    what = {
        "promoted": "promoted to champion",
        "not_promoted": "not promoted (alias challenger)",
        "unchanged": "already registered, aliases unchanged",
    }[decision["decision"]]
    return f"{name} version {version} {what}: test accuracy {new} ({against})"


def drop_rows(table: str, marker: str) -> tuple[str, int]:
    """``table`` (Markdown) without the rows containing ``marker``, and how many were dropped."""
    lines = table.splitlines()
    kept = [line for line in lines if marker not in line]
    return "\n".join(kept), len(lines) - len(kept)


@dataclass
class Reference:
    """The git revision the diffs compare against, and why that one."""

    rev: str
    why: str


def render_summary(
    decision: Mapping[str, Any] | None,
    changes: Sequence[str],
    reference: Reference,
    metrics_diff: str,
    params_diff: str,
    versions: Sequence[str] = (),
) -> str:
    """The Markdown summary of one retraining run (``versions``: the library versions that changed)."""
    title = "no new decision" if decision is None else f"{decision['decision'].replace('_', ' ')}"
    out = [f"# Retraining: {title}", "", f"**{decision_line(decision)}.**", ""]
    if decision is not None:
        if decision.get("reason"):
            out += [f"Reason: {decision['reason']}", ""]
        champion = decision["champion_version"]
        out += [
            "| model | version | test accuracy |",
            "|---|---:|---:|",
            f"| new ({decision['decision'].replace('_', ' ')}) | {decision['version']} "
            f"| {_accuracy(decision['challenger_accuracy'])} |",
            f"| champion it was compared with | {champion or 'none'} | {_accuracy(decision['champion_accuracy'])} |",
            "",
        ]
        facts = []
        if decision.get("margin") is not None:
            facts.append(f"promotion margin {float(decision['margin']):.4f}")
        if decision.get("run_id"):
            facts.append(f"training run `{decision['run_id']}`")
        if decision.get("git_commit"):
            facts.append(f"trained at commit `{decision['git_commit']}`")
        if facts:
            out += ["; ".join(facts).capitalize() + ".", ""]
    out += ["## What changed", ""] + [f"- {line}" for line in changes] + [""]
    if versions:
        out += ["Library versions changed (versions.yaml): " + ", ".join(versions) + ".", ""]
    out += [f"## Metrics against `{reference.rev}`", "", f"`dvc metrics diff {reference.rev}` ({reference.why}):", ""]
    metrics_diff, dropped = drop_rows(metrics_diff.strip(), PER_CLASS)
    out += [metrics_diff or "No metric changed.", ""]
    if dropped:
        out += [
            f"({dropped} per-class precision and recall rows left out: `dvc metrics diff {reference.rev}` shows them.)",
            "",
        ]
    out += [f"## Params against `{reference.rev}`", "", f"`dvc params diff {reference.rev}`:", ""]
    out += [params_diff.strip() or "No param changed.", ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- the edge


def _tool(name: str) -> str:
    """``name`` from this interpreter's environment (the project's .venv), else from PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else (shutil.which(name) or name)


def _run(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run([_tool(args[0]), *args[1:]], cwd=root, capture_output=True, text=True)
    except OSError as exc:
        raise UserError(f"cannot run {args[0]} ({exc}); install the project with `make setup`") from None


def _last_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
    return lines[-1].strip() if lines else f"exit code {result.returncode}"


def dvc_status(root: Path) -> dict[str, Any]:
    result = _run(root, "dvc", "status", "--json")
    if result.returncode != 0:
        raise UserError(f"`dvc status` failed in {root}: {_last_line(result)}; fix dvc.yaml or the workspace")
    try:
        return json.loads(result.stdout or "{}")
    except ValueError:
        raise UserError(f"`dvc status --json` printed no JSON in {root}: {result.stdout[:200]!r}") from None


def _read_mapping(path: Path) -> dict[str, Any]:
    """A YAML file's top-level mapping; {} when the file is missing (no dvc.lock before the first run)."""
    data = files.read_yaml(path, path.name, missing_ok=True)
    return data if isinstance(data, dict) else {}


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """Identity of a file's current version: a rewrite (atomic replace) changes it."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _has_commit(root: Path, rev: str) -> bool:
    return _run(root, "git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}").returncode == 0


def champion_commit(root: Path, model: str, version: str | None) -> str | None:
    """The git commit (without ``-dirty``) that ``version`` of ``model`` was trained at, or, with no version,
    that of the current champion; None when there is no such version or it names no commit.

    Reads the version's tag ``git.commit``, else its training run's tag of that name.
    """
    from stages.lib import tracking

    uri = tracking.tracking_uri()
    tracking.check_reachable(uri)
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    try:
        if version is None:
            mv = client.get_model_version_by_alias(model, CHAMPION)
        else:
            mv = client.get_model_version(model, version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None  # no such model, version or alias
        raise UserError(
            f"cannot read {model} from the MLflow registry at {tracking.redact_uri(uri)} "
            f"({exc.message.splitlines()[0]}); check MLFLOW_TRACKING_URI and its credentials"
        ) from None
    commit = mv.tags.get("git.commit")
    if not commit and mv.run_id:
        try:
            commit = client.get_run(mv.run_id).data.tags.get("git.commit")
        except MlflowException:
            commit = None
    if not commit or commit == "unknown":
        return None
    return commit.removesuffix("-dirty")


def _short(root: Path, rev: str) -> str:
    result = _run(root, "git", "rev-parse", "--short=12", rev)
    return result.stdout.strip() if result.returncode == 0 else rev


def choose_reference(root: Path, decision: Mapping[str, Any] | None, model: str) -> Reference:
    """The commit that holds the results of the champion the new model was compared with.

    Training at commit C (often with uncommitted changes) writes a dvc.lock and metrics that a later commit
    records: the first commit after C on the way to HEAD that changed dvc.lock (the retrain pull request,
    for one). Without such a commit, C itself; HEAD when there is no champion or C is not in this clone.
    """
    if decision is not None and decision["champion_version"] is None:
        return Reference("HEAD", "there was no champion before this run")
    version = None if decision is None else str(decision["champion_version"])
    commit = champion_commit(root, model, version)
    if commit is None:
        return Reference("HEAD", f"the registry names no commit for the {model} champion")
    if not _has_commit(root, commit):
        return Reference("HEAD", f"the champion's commit {commit} is not in this clone's history")
    later = _run(root, "git", "log", "--reverse", "--ancestry-path", "--format=%H", f"{commit}..HEAD", "--", LOCK_FILE)
    recorded = later.stdout.split() if later.returncode == 0 else []
    trained_at = _short(root, commit)
    if recorded:
        return Reference(
            _short(root, recorded[0]),
            f"the first commit of {LOCK_FILE} after {trained_at}, where the {model} champion was trained: "
            "it holds the champion's results",
        )
    return Reference(trained_at, f"the commit the {model} champion was trained at; no later commit changed {LOCK_FILE}")


def dvc_diff(root: Path, kind: str, rev: str) -> str:
    result = _run(root, "dvc", kind, "diff", "--md", rev)
    if result.returncode != 0:
        raise UserError(f"`dvc {kind} diff --md {rev}` failed: {_last_line(result)}")
    return result.stdout


def set_github_outputs(outputs: Mapping[str, str]) -> None:
    """Append ``key=value`` lines to ``$GITHUB_OUTPUT`` when running under GitHub Actions."""
    target = os.environ.get("GITHUB_OUTPUT")
    if target:
        with open(target, "a", encoding="utf-8") as fh:
            fh.writelines(f"{key}={value}\n" for key, value in outputs.items())


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def retrain(root: Path, summary: Path, decision_file: Path) -> None:
    """Skip, or run ``dvc repro`` and write ``summary``; raise :class:`UserError` on any failure."""
    if not (root / "dvc.yaml").is_file():
        raise UserError(f"{root}: no dvc.yaml here; run `make retrain` at the repository root")
    status = dvc_status(root)
    if not status:
        message = skip_message(_read_mapping(root / LOCK_FILE))
        files.write_text(summary, f"# Retraining: skipped\n\n{message}.\n")
        set_github_outputs({"decision": "skipped", "summary": str(summary)})
        _say(message)
        return

    changes = describe_changes(status) if (root / LOCK_FILE).exists() else [f"no {LOCK_FILE}: first run"]
    versions = version_changes(_read_mapping(root / LOCK_FILE), _read_mapping(root / VERSIONS_FILE))
    log.info("Changed since %s: %s", LOCK_FILE, "; ".join(changes))
    before = _stamp(decision_file)
    sys.stdout.flush()
    repro = subprocess.run([_tool("dvc"), "repro"], cwd=root)
    if repro.returncode != 0:
        raise UserError(
            f"`dvc repro` failed (exit code {repro.returncode}); its output above says which stage and why. "
            "Fix it and run `make retrain` again (stages that finished are not re-run)"
        )
    after = _stamp(decision_file)
    decision = read_decision(decision_file) if after is not None and after != before else None
    settings = _read_mapping(root / PARAMS_FILE).get("settings") or {}
    model = decision["model"] if decision else settings.get("registered_model", DEFAULT_MODEL)

    errors = []
    try:
        reference = choose_reference(root, decision, model)
    except UserError as exc:
        errors.append(str(exc))
        reference = Reference("HEAD", "the registry could not be read")
    diffs = []
    for kind in ("metrics", "params"):
        try:
            diffs.append(dvc_diff(root, kind, reference.rev))
        except UserError as exc:
            errors.append(str(exc))
            diffs.append(f"Not available: {exc}")
    files.write_text(summary, render_summary(decision, changes, reference, *diffs, versions=versions))
    set_github_outputs(
        {
            "decision": decision["decision"] if decision else "not_evaluated",
            "model": model,
            "version": str(decision["version"]) if decision else "",
            "summary": str(summary),
        }
    )
    _say(decision_line(decision))
    _say(f"summary: {summary}")
    if errors:
        raise UserError("; ".join(errors))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--summary",
        type=Path,
        default=Path(os.environ.get("RETRAIN_SUMMARY") or DEFAULT_SUMMARY),
        help=f"Markdown summary to write (default: $RETRAIN_SUMMARY or {DEFAULT_SUMMARY})",
    )
    parser.add_argument(
        "--decision",
        type=Path,
        default=Path(DEFAULT_DECISION),
        help=f"promotion decision written by the evaluate stage (default: {DEFAULT_DECISION})",
    )
    args = parser.parse_args(argv)
    from stages.lib.runtime import configure_logging

    configure_logging()
    root = Path.cwd()
    try:
        retrain(root, args.summary, args.decision)
    except UserError as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
