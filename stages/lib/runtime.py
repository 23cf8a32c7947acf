"""Process set-up shared by the stages: logging, device placement, seeding, and the stage entry point.

Device semantics (``<section>.device`` in params.yaml):

- ``cpu``: the GPU is hidden from the process before TensorFlow is imported.
- ``gpu``: the stage stops with one clear error, before writing anything, when no GPU is visible.
- ``auto``: the GPU when one is visible, else the CPU; the choice is logged.

The resolved device (``cpu`` or the GPU's name) is returned so the stage records it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from stages.lib import params as params_lib
from stages.lib import pipeline, tflog
from stages.lib.errors import UserError

if TYPE_CHECKING:
    from stages.lib.tracking import Tracker

log = logging.getLogger(__name__)


def configure_logging(level: str = "INFO") -> None:
    """One line per record on stderr (time, level, logger, message), unless the host already set up logging.

    MLflow's own records go through the same handler (MLflow is told not to set up its own) and show from
    WARNING up, as do those of alembic (its database migrations): their INFO lines (system metrics started
    and stopped, tables created) say nothing a user acts on. ``settings.log_level: DEBUG`` shows everything.
    """
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(level)
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")  # read when MLflow is first imported
    for library in ("mlflow", "alembic"):  # alembic: MLflow's database migrations
        logging.getLogger(library).setLevel(level if level == "DEBUG" else max(logging.WARNING, root.level))


def hide_gpus() -> None:
    """Make no GPU visible to TensorFlow in this process (must run before TensorFlow initialises devices)."""
    os.environ["CUDA_VISIBLE_DEVICES"] = "-1"
    if "tensorflow" in sys.modules:
        import tensorflow as tf

        tf.config.set_visible_devices([], "GPU")


def visible_gpus() -> list[str]:
    """Names of the GPUs TensorFlow can use (imports TensorFlow)."""
    import tensorflow as tf

    names = []
    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)
        names.append(tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name))
    return names


def resolve_device(stage: str, key: str, requested: str, uses_tensorflow: bool) -> str:
    """Apply the ``device`` setting ``requested`` (read from params key ``key``) and return what is used.

    Stages that do not use TensorFlow always run on the CPU (params validation already refused ``gpu``).
    """
    if requested == "cpu" or not uses_tensorflow:
        hide_gpus()
        return "cpu"
    gpus = visible_gpus()
    if gpus:
        device = gpus[0] if len(gpus) == 1 else f"{len(gpus)}x {gpus[0]}"
        log.info("%s: running on GPU %s (%s = %s)", stage, device, key, requested)
        return device
    if requested == "gpu":
        raise UserError(
            f"stage '{stage}': {key} is 'gpu' but TensorFlow sees no GPU on this machine; "
            f"set it to auto or cpu (dvc exp run -S {key}=auto), or run on a machine with an NVIDIA GPU "
            "and the [gpu] extra installed"
        )
    log.info("%s: no GPU visible, running on the CPU (%s = auto)", stage, key)
    return "cpu"


def set_cpu_threads(intra_op: int, inter_op: int) -> bool:
    """Give TensorFlow ``intra_op`` threads per op and ``inter_op`` ops running at once (imports TensorFlow).

    TensorFlow fixes both when it runs its first op. Returns False, with a warning, when that has already
    happened in this process with other values; the run goes on with those (thread counts change the speed,
    and with oneDNN's multi-threaded sums possibly the float rounding, never what is computed).
    """
    import tensorflow as tf

    threading = tf.config.threading
    wanted = (intra_op, inter_op)
    if (threading.get_intra_op_parallelism_threads(), threading.get_inter_op_parallelism_threads()) == wanted:
        return True
    try:
        threading.set_intra_op_parallelism_threads(intra_op)
        threading.set_inter_op_parallelism_threads(inter_op)
    except RuntimeError:
        log.warning(
            "TensorFlow already runs in this process: keeping its thread pools (wanted %d per op, %d ops at once)",
            *wanted,
        )
        return False
    return True


def seed_everything(seed: int, tensorflow: bool = False) -> None:
    """Seed Python and NumPy, and with ``tensorflow`` Keras/TensorFlow too, with deterministic ops."""
    random.seed(seed)
    np.random.seed(seed)
    if tensorflow:
        import keras
        import tensorflow as tf

        keras.utils.set_random_seed(seed)
        tf.config.experimental.enable_op_determinism()


@dataclass
class StageContext:
    """What a stage's ``run`` gets: its name, its params view, the resolved device, its tracker.

    Tests build one directly, with a params view of a temporary params.yaml and the :class:`Tracker` base
    class, which records nothing.
    """

    stage: str
    params: params_lib.StageParams
    device: str
    tracker: Tracker


@contextlib.contextmanager
def stage(name: str) -> Iterator[StageContext]:
    """Enter stage ``name`` (``augment``, ``train_baseline@ridge``): load its params, apply its device, open
    its MLflow run; yield its :class:`StageContext`.

    An error the user can fix (:class:`UserError`), raised here or in the block, ends the process with one
    log line and exit code 1.
    """
    configure_logging()
    try:
        params, device = load_stage(name, quiet_tensorflow=True)
        from stages.lib import tracking

        settings = pipeline.settings(name)
        with tracking.stage_run(name, params, device, system_metrics=settings.system_metrics) as tracker:
            begun = time.perf_counter()
            yield StageContext(name, params, device, tracker)
            report_time(name, time.perf_counter() - begun, tracker.seconds)
            warn_unread(params, tracker)
    except UserError as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None


def load_stage(name: str, quiet_tensorflow: bool = False) -> tuple[params_lib.StageParams, str]:
    """Load stage ``name``'s params (from the working directory), set the log level they name and apply
    the stage's ``device`` setting; return the params view and the device used.

    ``quiet_tensorflow`` (a stage's own process, not a test's): filter TensorFlow's start-up lines out of
    stderr before it is imported (:mod:`stages.lib.tflog`), unless ``settings.log_level`` is DEBUG.
    """
    params = params_lib.load(name)
    configure_logging(params.settings.log_level)
    section: Any = params
    for part in params.device_section.split("."):
        section = getattr(section, part)
    uses_tensorflow = pipeline.settings(name).uses_tensorflow
    if quiet_tensorflow and uses_tensorflow and params.settings.log_level != "DEBUG":
        tflog.quiet()
    return params, resolve_device(name, f"{params.device_section}.device", section.device, uses_tensorflow)


TIMINGS = "PIPELINE_TIMINGS"  # a file to append each stage's timing to (JSON lines), for the benchmarks


def report_time(stage: str, seconds: float, tracking_seconds: float) -> None:
    """Log how long the stage's work took and how much of that was recording it; append both to the file
    ``$PIPELINE_TIMINGS`` when set (``python -m benchmarks overhead`` compares them with the process's time)."""
    compute = seconds - tracking_seconds
    log.info("%s: %.1f s of work, %.1f s of recording it in MLflow", stage, compute, tracking_seconds)
    if path := os.environ.get(TIMINGS):
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps({"stage": stage, "compute_s": compute, "tracking_s": tracking_seconds}) + "\n")


def warn_unread(params: params_lib.StageParams, tracker: Tracker) -> None:
    """Warn (and tag the run) when the stage never read a key it declares: a change to it re-runs the stage
    for nothing."""
    unread = sorted(set(params.flat()) - params.reads)
    if unread:
        log.warning(
            "%s declares params it never read: %s; remove them from its params: in dvc.yaml", params.stage, unread
        )
        tracker.set_tags({"params.unread": ",".join(unread)})
