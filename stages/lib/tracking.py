"""MLflow tracking of the stages: one run per stage that runs, in one experiment.

Tracking URI: ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<repo root>/mlflow.db``. Params are
logged flat with the dotted names of params.yaml; runs carry the tags ``dvc.stage``, ``git.commit``,
``device`` and, under ``dvc exp run``, ``dvc.exp_name``. MLflow is imported here only, inside functions,
so stage modules stay cheap to import.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from stages.lib.errors import UserError
from stages.lib.io import file_md5
from stages.lib.params import StageParams

log = logging.getLogger(__name__)

DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"


def repo_root() -> Path:
    """The repository root: ``DVC_ROOT`` when DVC runs the stage, else the working directory.

    ``dvc exp run --queue`` runs stages in a copy under ``<repo>/.dvc/tmp/exps/``; runs from there belong
    to the repository's own store, so the copy's root maps back to the repository.
    """
    root = Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()
    parts = root.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the SQLite file at the repository root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / DB_FILE}"


def redact_uri(uri: str) -> str:
    """``uri`` with any ``user:password@`` (or ``token@``) credentials replaced by ``***``, for messages."""
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    host = parts.netloc.rsplit("@", 1)[1]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"***@{host}"))


PROBE_TIMEOUT_S = 5.0


def check_reachable(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """For an http(s) tracking URI, GET ``<uri>/health`` once with a short timeout; raise :class:`UserError`
    when no server answers, so a stage fails before doing any work (MLflow itself would retry for minutes).

    Any HTTP answer, even an error status, means a server is there. Credentials are never shown.
    """
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    host = parts.netloc.rsplit("@", 1)[-1]  # urllib does not take credentials in the URL; /health needs none
    url = urllib.parse.urlunsplit((parts.scheme, host, parts.path.rstrip("/") + "/health", "", ""))
    try:
        with urllib.request.urlopen(url, timeout=timeout):  # scheme checked above
            pass
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise UserError(
            f"MLflow tracking server at {redact_uri(uri)} is not reachable ({reason}); "
            "start it or unset MLFLOW_TRACKING_URI (default: the repository's mlflow.db)"
        ) from None


def git_commit(root: Path) -> str:
    """HEAD's commit hash, with ``-dirty`` when tracked files differ from it; ``unknown`` outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=root, capture_output=True).returncode
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def _param_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


class StageTracker:
    """Logging calls a stage makes on its MLflow run."""

    def __init__(self, run_id: str):
        self.run_id = run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import mlflow

        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_metrics_to_run(self, run_id: str, metrics: Mapping[str, float]) -> None:
        """Add ``metrics`` to another run of the store (a model's training run); warn if it is not there."""
        from mlflow.entities import Metric
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        now = int(time.time() * 1000)
        try:
            MlflowClient().log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
        except MlflowException as exc:
            log.warning(
                "cannot add metrics to run %s (%s); they are in run %s only",
                run_id,
                exc.message.splitlines()[0],
                self.run_id,
            )

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_input(self, path: str | os.PathLike[str], context: str) -> str:
        """Record a data input: its DVC hash (md5 of the file) as digest, its path as source. Returns the hash."""
        import mlflow
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        digest = file_md5(path)
        with warnings.catch_warnings():
            # MLflow registers two equivalent sources for file:// URIs and warns that it picked one
            warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways", category=UserWarning)
            source = resolve_dataset_source(Path(path).resolve().as_uri())
        mlflow.log_input(MetaDataset(source=source, name=str(path), digest=digest), context=context)
        return digest

    def set_tags(self, tags: Mapping[str, str]) -> None:
        import mlflow

        mlflow.set_tags(dict(tags))


@contextlib.contextmanager
def stage_run(stage: str, params: StageParams, device: str) -> Iterator[StageTracker]:
    """Open the MLflow run of one stage, log its declared params and tags, and yield its tracker."""
    uri = tracking_uri()
    check_reachable(uri)  # before importing MLflow: a dead server fails the stage in well under a second

    import mlflow
    from mlflow.exceptions import MlflowException

    root = repo_root()
    mlflow.set_tracking_uri(uri)
    name = params.settings.mlflow_experiment
    try:
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            artifacts = (root / ARTIFACTS_DIR).as_uri() if uri.startswith("sqlite:") else None
            experiment_id = mlflow.create_experiment(name, artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
    except MlflowException as exc:
        raise UserError(
            f"MLflow tracking at {redact_uri(uri)} is not usable ({exc.message.splitlines()[0]}); "
            "fix or unset MLFLOW_TRACKING_URI (default: the repository's mlflow.db)"
        ) from None
    tags = {"dvc.stage": stage, "git.commit": git_commit(root), "device": device}
    if exp_name := os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = exp_name
    with mlflow.start_run(experiment_id=experiment_id, run_name=stage, tags=tags) as run:
        mlflow.log_params({k: _param_value(v) for k, v in params.flat().items()})
        log.info("MLflow run %s (experiment '%s', %s)", run.info.run_id, name, redact_uri(uri))
        yield StageTracker(run.info.run_id)
