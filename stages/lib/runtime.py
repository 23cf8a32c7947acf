"""Process set-up shared by the stages: logging, device placement, seeding, and the stage entry point.

Device semantics (``<section>.device`` in params.yaml):

- ``cpu``: the GPU is hidden from the process before TensorFlow is imported.
- ``gpu``: the stage stops with one clear error, before writing anything, when no GPU is visible.
- ``auto``: the GPU when one is visible, else the CPU; the choice is logged.

The resolved device (``cpu`` or the GPU's name) is returned so the stage records it.
"""

from __future__ import annotations

import logging
import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from stages.lib import params as params_lib
from stages.lib.errors import UserError

if TYPE_CHECKING:
    from stages.lib.tracking import StageTracker

log = logging.getLogger(__name__)


def configure_logging(level: str = "INFO") -> None:
    """One line per record on stderr (time, level, logger, message), unless the host already set up logging."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(level)


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


def cpu_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and ``taskset`` narrow)."""
    return len(os.sched_getaffinity(0))


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
    """What a stage's ``main`` gets: its name, its params view, the resolved device, its tracker."""

    stage: str
    params: params_lib.StageParams
    device: str
    tracker: StageTracker


def run_stage(
    stage: str,
    section: str,
    body: Callable[[StageContext], None],
    *,
    uses_tensorflow: bool,
    system_metrics: bool = False,
) -> None:
    """Run one stage: load params, apply the device, open its tracking run, call ``body``.

    ``section`` is the params section holding the stage's ``device`` (``augment``, ``baselines.ridge``).
    ``system_metrics``: sample CPU, memory and GPU use into the run (the training stages).
    An error the user can fix (:class:`UserError`) ends the process with one log line and exit code 1.
    """
    configure_logging()
    # TensorFlow's C++ INFO/WARNING lines (oneDNN, CPU features) drown the stage's log; errors still show
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        params = params_lib.load(stage)
        configure_logging(params.settings.log_level)
        view = params
        for part in section.split("."):
            view = getattr(view, part)
        device = resolve_device(stage, f"{section}.device", view.device, uses_tensorflow)

        from stages.lib import tracking

        with tracking.stage_run(stage, params, device, system_metrics=system_metrics) as tracker:
            body(StageContext(stage, params, device, tracker))
            unread = sorted(set(params.flat()) - params.reads)
            if unread:
                # A declared key the stage never reads re-runs it for nothing
                log.warning(
                    "%s declares params it never read: %s; remove them from its params: in dvc.yaml", stage, unread
                )
                tracker.set_tags({"params.unread": ",".join(unread)})
    except UserError as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None
