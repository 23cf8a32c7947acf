"""MLflow tracking of the pipeline: one parent run per ``dvc`` invocation, one child run per stage that runs.

Tracking URI: ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<repo root>/mlflow.db`` (the repository
of ``DVC_ROOT``, also for queued experiments running in a copy under ``.dvc/tmp/exps/``).

A stage's run (the child) holds its declared params (flat, with the dotted names of params.yaml), its
metrics, artifacts and data inputs (digest = DVC's md5), and the tags ``dvc.stage``, ``dvc.lock_hash``
(:mod:`stages.lib.lineage`), ``git.commit``, ``device`` and, under ``dvc exp run``, ``dvc.exp_name``.

The parent, named after the DVC experiment (``DVC_EXP_NAME``) or ``pipeline``, holds every param of
params.yaml and, after each stage, the state of the whole pipeline: for every stage of dvc.yaml the tags
``stage.<name>.status`` (``ran`` in this invocation, ``restored`` by DVC from its run-cache, or
``unchanged``), ``stage.<name>.run_id`` (the run that produced the current outputs) and
``stage.<name>.lock_hash``, and that run's final metrics as ``<stage>.<metric>``. So every parent has the
same keys and two pipeline runs compare field by field.

MLflow is imported here only, inside functions, so stage modules stay cheap to import.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from stages.lib import environment, lineage
from stages.lib.errors import UserError
from stages.lib.files import file_md5
from stages.lib.params import StageParams

log = logging.getLogger(__name__)

DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
MODEL_ARTIFACT = "model"  # artifact name of the MLflow model in a training run
PARENT_NAME = "pipeline"  # parent run name outside `dvc exp run`
SYSTEM_METRICS_INTERVAL_S = 2.0
# MLflow 3's tag for what an experiment holds: training runs, not GenAI traces
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


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


# Files DVC itself rewrites during a run (the lock file and the committed metrics and plots): changes to
# them do not make the code a run used "dirty".
PIPELINE_OUTPUTS = ("dvc.lock", "metrics", "plots")


def git_commit(root: Path) -> str:
    """HEAD's commit hash, with ``-dirty`` when tracked files other than the pipeline's own outputs
    (:data:`PIPELINE_OUTPUTS`) differ from it; ``unknown`` outside git."""
    excluded = [f":(exclude){path}" for path in PIPELINE_OUTPUTS]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "diff", "--quiet", "HEAD", "--", ".", *excluded], cwd=root, capture_output=True
        ).returncode
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def _param_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


class Tracker:
    """What a stage records about its run. This base class records nothing: a stage's ``run`` works with it
    outside MLflow (unit tests); :class:`MlflowTracker` records to MLflow."""

    run_id = ""
    enabled = False  # whether runs and models go to MLflow (and so whether there is a registry)
    seconds = 0.0  # time spent recording (the stage's own work is the rest of its run)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Add ``metrics`` to the stage's run (at ``step``, e.g. the epoch)."""

    def log_metrics_to_run(self, run_id: str, metrics: Mapping[str, float]) -> None:
        """Add ``metrics`` to another run (a model's training run)."""

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Attach the file ``path`` to the run."""

    def log_input(self, path: str | os.PathLike[str], context: str) -> str:
        """Record the data input ``path``; return its DVC hash (md5 of the file)."""
        return file_md5(path)

    def log_inputs(self, paths: Mapping[str, str | os.PathLike[str]]) -> dict[str, str]:
        """:meth:`log_input` of each ``{context: path}``; return ``{path: DVC hash}`` (a model card's inputs)."""
        return {str(path): self.log_input(path, context=context) for context, path in paths.items()}

    def log_model(self, flavor: str, model: Any, input_example: Any, packages: tuple[str, ...], **kwargs: Any) -> str:
        """Log ``model`` as the run's MLflow model; return its URI ("" when nothing is tracked)."""
        return ""

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Tag the run."""

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """Attach a matplotlib figure to the run as the image ``artifact_file`` (a PNG path in its artifacts)."""


def _timed(method: Callable[..., Any]) -> Callable[..., Any]:
    """Add the time a tracker method takes to its tracker's ``seconds``."""

    @functools.wraps(method)
    def timed(self: Tracker, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    return timed


class MlflowTracker(Tracker):
    """A stage's MLflow run (the active run of this process). ``seconds``: the time its calls took."""

    enabled = True

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.seconds = 0.0

    @_timed
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import mlflow

        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    @_timed
    def log_metrics_to_run(self, run_id: str, metrics: Mapping[str, float]) -> None:
        """Add ``metrics`` to another run of the store; warn if it is not there."""
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

    @_timed
    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifact(str(path), artifact_path=artifact_path)

    @_timed
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

    @_timed
    def log_model(self, flavor: str, model: Any, input_example: Any, packages: tuple[str, ...], **kwargs: Any) -> str:
        """Log ``model`` as this run's MLflow model (artifact ``model``) with the ``flavor`` module
        (``tensorflow``, ``sklearn``), a signature inferred from ``input_example`` and the model's output on it,
        and ``packages`` pinned to their installed versions as requirements (MLflow would otherwise infer
        them in a subprocess). Returns the model's URI."""
        import importlib
        from importlib.metadata import version

        from mlflow.models import infer_signature

        module = importlib.import_module(f"mlflow.{flavor}")
        # one batch, no tf.data: Keras' predict() builds a pipeline whose graph TensorFlow 2.21 logs an error about
        output = (
            model.predict_on_batch(input_example) if flavor in ("keras", "tensorflow") else model.predict(input_example)
        )
        info = module.log_model(
            model,
            name=MODEL_ARTIFACT,
            # The signature only, no input example: with one, MLflow reloads the model from its artifacts to
            # predict it again (seconds per stage); the tests check that the logged models predict as the files do
            signature=infer_signature(input_example, output),
            pip_requirements=[f"{name}=={version(name)}" for name in packages],
            **kwargs,
        )
        return info.model_uri

    @_timed
    def set_tags(self, tags: Mapping[str, str]) -> None:
        import mlflow

        mlflow.set_tags(dict(tags))

    @_timed
    def log_figure(self, figure: Any, artifact_file: str) -> None:
        import mlflow

        mlflow.log_figure(figure, artifact_file)


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """For a SQLite store, hold an exclusive lock on ``<db>.lock`` (other stores: no lock). Held while a
    stage opens the store: MLflow creates and migrates a new database on first use, and two stages doing
    that at once (parallel queued experiments) would both run the migrations. Held too while evaluate reads
    the champion and moves the aliases (:func:`stages.lib.registry.promote`), so two queued experiments
    cannot both be judged against the same champion."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    lock_path = Path(uri[len("sqlite:///") :].split("?", 1)[0] + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _experiment_id(name: str, uri: str, root: Path) -> str:
    """The id of experiment ``name``, created (artifacts under ``<root>/mlartifacts`` for SQLite) if needed, and
    marked as a model-training experiment (:data:`EXPERIMENT_KIND`)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            artifacts = (root / ARTIFACTS_DIR).as_uri() if uri.startswith("sqlite:") else None
            # another stage process (a parallel queued experiment) may create it first
            with contextlib.suppress(MlflowException):
                mlflow.create_experiment(name, artifact_location=artifacts, tags=dict([EXPERIMENT_KIND]))
            experiment = mlflow.get_experiment_by_name(name)
            if experiment is None:
                raise MlflowException(f"experiment {name!r} could not be created")
        if experiment.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
            mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
        return experiment.experiment_id
    except MlflowException as exc:
        raise UserError(
            f"MLflow tracking at {redact_uri(uri)} is not usable ({exc.message.splitlines()[0]}); "
            "fix or unset MLFLOW_TRACKING_URI (default: the repository's mlflow.db)"
        ) from None


def _chunks(items: list[Any], size: int = 100) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _key(stage: str) -> str:
    """``stage`` as MLflow allows in a tag or metric name: ``train_baseline@ridge`` → ``train_baseline:ridge``."""
    return stage.replace("@", ":")


def _stage_tags(tags: Mapping[str, str], suffix: str) -> dict[str, str]:
    """``{stage: value}`` from tags ``stage.<key>.<suffix>`` (see :func:`_key`)."""
    head, tail = "stage.", f".{suffix}"
    return {
        k[len(head) : -len(tail)].replace(":", "@"): v
        for k, v in tags.items()
        if k.startswith(head) and k.endswith(tail)
    }


class ParentRun:
    """The parent run of one ``dvc`` invocation in the workspace ``workspace`` (found or created)."""

    def __init__(self, experiment_id: str, invocation: lineage.Invocation, workspace: Path, params: StageParams):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        self.experiment_id = experiment_id
        self.workspace = workspace
        found = self.client.search_runs(
            [experiment_id],
            filter_string=f"tags.`dvc.invocation` = '{invocation.key}' and tags.`pipeline.role` = 'parent'",
            max_results=1,
        )
        if found:
            self.run_id = found[0].info.run_id
            self.start = _stage_tags(found[0].data.tags, "lock_at_start")
            return
        tags = {
            "pipeline.role": "parent",
            "dvc.invocation": invocation.key,
            "dvc.command": invocation.command,
            "dvc.workspace": str(workspace),
            "git.commit": git_commit(workspace),
        }
        if exp_name := os.environ.get("DVC_EXP_NAME"):
            tags["dvc.exp_name"] = exp_name
        self.start = self._previous_state()
        tags.update({f"stage.{_key(stage)}.lock_at_start": h for stage, h in self.start.items()})
        run = self.client.create_run(experiment_id, run_name=exp_name or PARENT_NAME, tags=tags)
        self.run_id = run.info.run_id
        everything = [Param(k, _param_value(v)) for k, v in params.flat_all().items()]
        for batch in _chunks(everything):
            self.client.log_batch(self.run_id, params=batch)
        log.info("MLflow parent run %s for '%s'", self.run_id, invocation.command)

    def _previous_state(self) -> dict[str, str]:
        """Each stage's lock hash when this invocation began: as the workspace's previous parent run left it,
        else as committed in git (HEAD's dvc.lock), else as dvc.lock is now."""
        previous = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`pipeline.role` = 'parent' and tags.`dvc.workspace` = '{self.workspace}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if previous:
            return _stage_tags(previous[0].data.tags, "lock_hash")
        committed = subprocess.run(
            ["git", "show", f"HEAD:{lineage.LOCK_FILE}"], cwd=self.workspace, capture_output=True, text=True
        )
        if committed.returncode == 0:
            return lineage.lock_hashes_from_text(committed.stdout)
        return lineage.lock_hashes(self.workspace)

    def set_status(self, status: str) -> None:
        self.client.update_run(self.run_id, status=status)

    def record(self, stage: str, stage_hash: str, status: str) -> None:
        """Record the pipeline's state after ``stage`` ended with ``status``: which run produced each stage's
        current outputs and its final metrics; mark the parent ``status`` (FINISHED or FAILED)."""
        from mlflow.entities import Metric, RunTag

        hashes = lineage.lock_hashes(self.workspace)
        hashes[stage] = stage_hash
        children = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{self.run_id}'"
        )
        ran = {}
        for child in sorted(children, key=lambda r: r.info.start_time):
            ran[child.data.tags.get("dvc.stage")] = child
        tags: list[RunTag] = []
        metrics: list[Metric] = []
        now = int(time.time() * 1000)
        for name in lineage.pipeline_stages(self.workspace):
            h = hashes.get(name)
            if h is None:
                continue
            if name in ran and ran[name].data.tags.get("dvc.lock_hash") == h:
                producer, state = ran[name], "ran"
            else:
                found = self.client.search_runs(
                    [self.experiment_id],
                    filter_string=f"tags.`dvc.stage` = '{name}' and tags.`dvc.lock_hash` = '{h}' "
                    "and attributes.status = 'FINISHED'",
                    order_by=["attributes.start_time DESC"],
                    max_results=1,
                )
                producer = found[0] if found else None
                state = "unchanged" if self.start.get(name) == h else "restored"
            key = _key(name)
            tags += [RunTag(f"stage.{key}.lock_hash", h), RunTag(f"stage.{key}.status", state)]
            tags.append(RunTag(f"stage.{key}.run_id", producer.info.run_id if producer else "unknown"))
            if producer is not None:
                metrics += [
                    Metric(f"{key}.{k}", v, now, 0)
                    for k, v in producer.data.metrics.items()
                    if not k.startswith("system/")
                ]
        for batch in _chunks(tags):
            self.client.log_batch(self.run_id, tags=batch)
        for batch in _chunks(metrics, 1000):
            self.client.log_batch(self.run_id, metrics=batch)
        self.client.set_terminated(self.run_id, status=status)


@contextlib.contextmanager
def stage_run(stage: str, params: StageParams, device: str, *, system_metrics: bool = False) -> Iterator[MlflowTracker]:
    """Open the MLflow run of one stage (a child of its invocation's parent when DVC runs it), log its
    declared params and tags, and yield its tracker; on exit, record the pipeline's state in the parent.

    With ``system_metrics``, MLflow samples CPU, memory (and GPU, with ``nvidia-ml-py`` installed) every
    few seconds into ``system/*`` metrics of the run.
    """
    uri = tracking_uri()
    check_reachable(uri)  # before importing MLflow: a dead server fails the stage in well under a second

    import mlflow
    from mlflow.exceptions import MlflowException

    root = repo_root()
    workspace = Path.cwd().resolve()  # a queued experiment runs in a copy; DVC_ROOT names the repository
    mlflow.set_tracking_uri(uri)
    name = params.settings.mlflow_experiment
    with store_lock(uri):
        experiment_id = _experiment_id(name, uri, root)
    stage_hash = lineage.stage_hash(stage, workspace) if os.environ.get("DVC_STAGE") else None
    invocation = lineage.dvc_invocation() if stage_hash else None
    pipeline = ParentRun(experiment_id, invocation, workspace, params) if invocation else None

    tags = {"dvc.stage": stage, "git.commit": git_commit(workspace), "device": device}
    tags.update({f"env.{key}": _param_value(value) for key, value in environment.describe().items()})
    if stage_hash:
        tags["dvc.lock_hash"] = stage_hash
    if exp_name := os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = exp_name
    if pipeline is not None:
        tags["mlflow.parentRunId"] = pipeline.run_id
        pipeline.set_status("RUNNING")
    if system_metrics:
        mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
    status = "FAILED"
    try:
        with mlflow.start_run(
            experiment_id=experiment_id, run_name=stage, tags=tags, log_system_metrics=system_metrics
        ) as run:
            mlflow.log_params({k: _param_value(v) for k, v in params.flat().items()})
            log.info("MLflow run %s (experiment '%s', %s)", run.info.run_id, name, redact_uri(uri))
            yield MlflowTracker(run.info.run_id)
        status = "FINISHED"
    finally:
        if pipeline is not None:
            try:
                pipeline.record(stage, stage_hash, status)
            except MlflowException as exc:  # the stage's own run is complete; only the summary is missing
                log.warning("could not update parent run %s: %s", pipeline.run_id, exc.message.splitlines()[0])
