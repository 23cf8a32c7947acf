"""How the CNN is trained: the settings, the input pipeline, seeding per epoch, micro-batches, the
distribution strategy, and backup and resume. The train_cnn stage reads like the source article (build,
fit, save); the mechanics live here.

- **Settings.** :class:`TrainConfig` holds the ``train_cnn`` params, one field per key;
  :meth:`TrainConfig.from_params` is the one mapping from the params section, and it checks the
  combinations that cannot work.
- **Input.** :func:`batches` keeps the images uint8 in one TensorFlow constant and converts each batch
  with the same ``to_model_input`` evaluation uses, a few batches ahead of training.
- **Seeding.** Epoch ``e`` visits the examples in the order :func:`epoch_order` and draws its dropout masks
  from :func:`epoch_seed`, both functions of the seed and the epoch only, so a resumed run repeats them.
- **Micro-batches** (CPU, one replica): :func:`micro_batch_step` splits each batch into parts trained at
  once, one per core, and sums their gradients into one update.
- **Strategy.** :func:`distribution_strategy`: the default strategy, or ``MirroredStrategy`` over the
  visible GPUs (or logical CPUs).
- **Backup.** With a backup directory, Keras' ``BackupAndRestore`` saves the state after every epoch and a
  restarted run resumes from it, ending with the weights of an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stages.lib import environment, files, models, runtime
from stages.lib.errors import UserError
from stages.lib.preprocess import one_hot, to_model_input

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

log = logging.getLogger(__name__)

HISTORY_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")
BACKUP_HISTORY = "history.json"  # beside BackupAndRestore's files: the history of the epochs it holds
STRATEGIES = ("auto", "single", "mirrored")
PRECISIONS = ("auto", "float32", "mixed_bfloat16")
# CPU features with native bfloat16 arithmetic: without them oneDNN emulates it, several times slower
BF16_CPU_FEATURES = ("avx512_bf16", "amx_bf16")
# build_cnn's arguments among the settings (the others drive the fit)
MODEL_KEYS = (
    "filters",
    "kernel_size",
    "dense_units",
    "dropout",
    "l2",
    "optimizer",
    "learning_rate",
    "precision",
    "steps_per_execution",
    "convs_per_block",
    "batch_norm",
    "lr_decay",
)


@dataclass(frozen=True)
class TrainConfig:
    """The ``train_cnn`` params, one field per key (``device`` aside, which the runtime applies). The
    defaults are the source article's CNN: Conv32-Pool-Conv64-Pool-Conv64-Dense64-Dense10, Adam, 5 epochs
    of batch 64, in float32."""

    filters: Sequence[int] = (32, 64, 64)
    kernel_size: int = 3
    dense_units: int = 64
    dropout: float = 0.0
    l2: float = 0.0
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    batch_size: int = 64
    epochs: int = 5
    early_stopping_patience: int = 0
    precision: str = "float32"
    steps_per_execution: int = 1
    strategy: str = "auto"
    micro_batches: int = 1
    convs_per_block: int = 1
    batch_norm: bool = False
    lr_decay: float = 1.0

    def __post_init__(self) -> None:
        """Refuse the combinations that cannot work (``ValueError``, naming the fields)."""
        if self.micro_batches > self.batch_size:
            raise ValueError(
                f"micro_batches = {self.micro_batches} is more than batch_size = {self.batch_size}: "
                "each micro-batch needs at least one image; lower micro_batches"
            )
        if self.micro_batches > 1 and self.batch_norm:
            raise ValueError(
                f"micro_batches = {self.micro_batches} with batch_norm = true: batch normalisation would "
                "normalise each micro-batch on its own, which is another model; set micro_batches to 1"
            )
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy = {self.strategy!r}: expected one of {', '.join(STRATEGIES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision = {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        models.feature_map_sizes(self.filters, self.kernel_size, convs_per_block=self.convs_per_block)

    @classmethod
    def from_params(cls, section: Any) -> TrainConfig:
        """The settings of the ``train_cnn`` params section, every field read by its own key; a combination
        that cannot work is a :class:`UserError` naming the keys."""
        values = {f.name: getattr(section, f.name) for f in fields(cls)}
        try:
            return cls(**values)
        except ValueError as exc:
            raise UserError(f"params.yaml: train_cnn: {exc}") from None

    def model_kwargs(self) -> dict[str, Any]:
        """The arguments of :func:`stages.lib.models.build_cnn` among the settings."""
        return {key: getattr(self, key) for key in MODEL_KEYS}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- strategy


def resolve_strategy(requested: str, n_gpus: int) -> str:
    """What ``train_cnn.strategy`` = ``requested`` means with ``n_gpus`` visible GPUs: ``auto`` is ``mirrored``
    with more than one GPU, else ``single``; ``single`` and ``mirrored`` mean themselves."""
    if requested not in STRATEGIES:
        raise ValueError(f"strategy = {requested!r}: expected one of {', '.join(STRATEGIES)}")
    if requested == "auto":
        return "mirrored" if n_gpus > 1 else "single"
    return requested


def distribution_strategy(requested: str) -> tf.distribute.Strategy:
    """The ``tf.distribute`` strategy for ``train_cnn.strategy`` = ``requested`` on this machine.

    ``single``: TensorFlow's default strategy, one device (the GPU when one is visible, else the CPU).
    ``mirrored``: ``MirroredStrategy``, one replica per visible GPU, or per logical CPU device when no GPU
    is visible; each replica takes its share of every batch and the gradients are summed across replicas.
    """
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    if resolve_strategy(requested, len(gpus)) == "single":
        return tf.distribute.get_strategy()
    devices = gpus or tf.config.list_logical_devices("CPU")
    return tf.distribute.MirroredStrategy([device.name for device in devices])


def micro_batches_used(requested: int, strategy: str) -> int:
    """How many micro-batches ``train_cnn.micro_batches`` = ``requested`` gives on this machine: ``requested``
    on the CPU with the single strategy, else 1 (a GPU fills itself with one batch; replicas split it already).
    Runs no TensorFlow op."""
    import tensorflow as tf

    gpus = tf.config.get_visible_devices("GPU")
    return requested if not gpus and resolve_strategy(strategy, len(gpus)) == "single" else 1


def thread_pools() -> dict[str, int]:
    """TensorFlow's thread pools in this process: threads per op and ops at once (0: TensorFlow's default,
    one per core)."""
    import tensorflow as tf

    threading = tf.config.threading
    return {
        "intra_op": threading.get_intra_op_parallelism_threads(),
        "inter_op": threading.get_inter_op_parallelism_threads(),
    }


def strategy_name(strategy: tf.distribute.Strategy) -> str:
    """``mirrored`` for a ``MirroredStrategy``, else ``single`` (the names of ``train_cnn.strategy``)."""
    import tensorflow as tf

    return "mirrored" if isinstance(strategy, tf.distribute.MirroredStrategy) else "single"


def resolve_precision(requested: str) -> str:
    """What ``train_cnn.precision`` = ``requested`` means here: ``auto`` is ``mixed_bfloat16`` where bfloat16 is
    native (a GPU of compute capability 8.0 or newer; a CPU with AVX512-BF16 or AMX), else ``float32``;
    the others mean themselves. Runs no TensorFlow op."""
    if requested != "auto":
        return requested
    import tensorflow as tf

    gpus = tf.config.get_visible_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        native = tuple(details.get("compute_capability") or (0, 0)) >= (8, 0)
    else:
        native = any(feature in environment.cpu_features() for feature in BF16_CPU_FEATURES)
    return "mixed_bfloat16" if native else "float32"


# ---------------------------------------------------------------------------------------------- input and seeds


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which training epoch ``epoch`` (from 0) visits ``n`` examples: a permutation that depends
    on ``seed`` and ``epoch`` only, so an epoch run after a resume is the epoch of an uninterrupted run."""
    return np.random.default_rng([seed, epoch, 0]).permutation(n)


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """Seed of random stream ``stream`` (one per dropout layer) in epoch ``epoch``: a function of the three only."""
    # below 2**31 - 1: Keras reduces seeds modulo that for TensorFlow's stateless random ops
    return int(np.random.default_rng([seed, epoch, 1 + stream]).integers(2**31 - 1))


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, order: tf.Variable | None = None) -> tf.data.Dataset:
    """``(to_model_input(x[i]), one_hot(y[i]))`` in batches of ``batch_size``, ``i`` running over ``order``
    (a variable holding a permutation of ``range(len(y))``, read as each batch is made) or ``range(len(y))``.

    The images stay uint8: TensorFlow holds one copy of ``x``, and each batch is gathered and converted
    to float32 when the pipeline makes it, a few batches ahead of training.
    """
    import tensorflow as tf

    with tf.device("/CPU:0"):  # tf.data runs on the host
        images, labels = tf.constant(x), tf.constant(one_hot(y))

    def make(index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        if order is not None:
            index = tf.gather(order, index)
        return to_model_input(tf.gather(images, index)), tf.gather(labels, index)

    # No autotuning: its background thread made destroying each epoch's iterator wait for seconds, with the
    # CPU idle, at the start of every epoch (measured in BENCHMARKS.md); two batches ahead keep training fed
    options = tf.data.Options()
    options.autotune.enabled = False
    return tf.data.Dataset.range(len(y)).batch(batch_size).map(make).prefetch(2).with_options(options)


def epoch_seeding(model: keras.Model, n: int, seed: int) -> tuple[tf.Variable, keras.callbacks.Callback]:
    """The variable holding each epoch's example order (for :func:`batches`) and the callback that sets it and
    every dropout layer's seed when an epoch starts (pure functions of ``seed`` and the epoch)."""
    import keras
    import tensorflow as tf

    with tf.device("/CPU:0"):
        order = tf.Variable(np.arange(n, dtype=np.int64), trainable=False)
    seed_states = [v for v in model.variables if v.name == "seed_generator_state"]

    def start_epoch(epoch: int, logs: dict[str, float] | None) -> None:
        order.assign(epoch_order(n, seed, epoch))
        for stream, state in enumerate(seed_states):
            state.assign(np.array([epoch_seed(seed, epoch, stream), 0], dtype=np.int64))

    return order, keras.callbacks.LambdaCallback(on_epoch_begin=start_epoch)


# ---------------------------------------------------------------------------------------------- micro-batches


def micro_batch_step(model: keras.Model, parts: int) -> Callable[[Any], dict[str, Any]]:
    """A Keras ``train_step`` for ``model`` that splits each batch into ``parts`` micro-batches.

    Each micro-batch's loss (its mean loss plus the regularisation terms, weighted by its share of the
    batch) is differentiated on its own, and the sum of the gradients makes one optimizer update: the
    update of the whole batch, up to float rounding. The micro-batches share no ops until that sum, so
    TensorFlow runs them at once, one per inter-op thread: on a CPU with single-threaded ops this keeps
    every core busy on large kernels instead of splitting each small op across cores. Install it with
    ``model.train_step = micro_batch_step(model, parts)`` before the first ``fit``; the model and its
    saved file are unchanged. Not for batch normalisation, which would normalise each micro-batch apart.
    """
    import tensorflow as tf

    loss_tracker = next(m for m in model.metrics if m.name == "loss")

    def train_step(data: Any) -> dict[str, Any]:
        x, y = data[0], data[1]
        n = tf.shape(x)[0]
        bounds = [n * i // parts for i in range(parts + 1)]
        weights = model.trainable_weights
        total_loss, gradients, predictions = None, None, []
        for start, stop in itertools.pairwise(bounds):
            x_part, y_part = x[start:stop], y[start:stop]
            with tf.GradientTape() as tape:
                y_pred = model(x_part, training=True)
                loss = model.compute_loss(x=x_part, y=y_part, y_pred=y_pred, training=True)
                loss = loss * tf.cast(stop - start, loss.dtype) / tf.cast(n, loss.dtype)
                scaled = model.optimizer.scale_loss(loss)
            part = tape.gradient(scaled, weights)
            gradients = part if gradients is None else [g + p for g, p in zip(gradients, part, strict=True)]
            total_loss = loss if total_loss is None else total_loss + loss
            predictions.append(y_pred)
        loss_tracker.update_state(total_loss, sample_weight=n)
        model.optimizer.apply_gradients(zip(gradients, weights, strict=True))
        return model.compute_metrics(x, y, tf.concat(predictions, axis=0))

    return train_step


# ---------------------------------------------------------------------------------------------- backup


def backup_dir_for(root: Path, params: dict[str, Any], inputs: dict[str, str]) -> Path:
    """Where train_cnn keeps its resumable state: ``<root>/.dvc/tmp/train_cnn-backup/<key>``, outside
    every DVC output, keyed by the sha256 of the stage's params and input hashes (a change starts over).
    ``root`` is the workspace: queued experiments training the same CNN side by side keep a backup each."""
    blob = json.dumps({"params": params, "inputs": sorted(inputs.values())}, sort_keys=True)
    return root / ".dvc" / "tmp" / "train_cnn-backup" / hashlib.sha256(blob.encode()).hexdigest()


def resume_history(backup_dir: Path, epochs: int) -> dict[str, list[float]]:
    """The history of the epochs a backup in ``backup_dir`` holds (empty lists without a usable backup).

    A backup without a matching history (a kill mid-write) is discarded and training starts over.
    """
    empty: dict[str, list[float]] = {key: [] for key in HISTORY_KEYS}
    if not backup_dir.is_dir():
        return empty
    try:
        epoch = int(json.loads((backup_dir / "training_metadata.json").read_text())["epoch"])
        saved = json.loads((backup_dir / BACKUP_HISTORY).read_text())
        history = {key: [float(v) for v in saved[key][:epoch]] for key in HISTORY_KEYS}
    except (OSError, ValueError, KeyError, TypeError):
        epoch, history = -1, empty
    if epoch < 0 or any(len(v) != epoch for v in history.values()) or epoch > epochs:
        log.warning("Discarding an unusable training backup in %s; training from the start", backup_dir)
        shutil.rmtree(backup_dir, ignore_errors=True)
        return empty
    log.info("Resuming from backup in %s (%d of %d epochs done)", backup_dir, epoch, epochs)
    return history


def backup_callbacks(backup_dir: Path, done: dict[str, list[float]]) -> list[keras.callbacks.Callback]:
    """Save the weights, optimizer state, epoch and history to ``backup_dir`` after every epoch, ``done``
    being the history of the epochs the backup already holds."""
    import keras

    recorded = {key: list(values) for key, values in done.items()}

    def record(epoch: int, logs: dict[str, float] | None) -> None:
        for key in HISTORY_KEYS:
            recorded[key].append(float((logs or {})[key]))
        files.write_json(backup_dir / BACKUP_HISTORY, recorded)

    # history first: a kill between the two writes leaves one epoch too many in it, never too few
    return [
        keras.callbacks.LambdaCallback(on_epoch_end=record),
        keras.callbacks.BackupAndRestore(str(backup_dir), delete_checkpoint=False),
    ]


# ---------------------------------------------------------------------------------------------- training


def build(config: TrainConfig, steps_per_epoch: int) -> keras.Model:
    """The compiled CNN of ``config``, placed by its strategy, with its micro-batch step installed.

    Call after :func:`stages.lib.runtime.seed_everything` (the weights start from the seed) and after the
    thread pools are set. On several replicas ``steps_per_execution`` is 1 (Keras' multi-step training call
    fails there); XLA compiles the step on a GPU only (it measured slower than TensorFlow's own kernels for
    this model on the CPU).
    """
    import tensorflow as tf

    on_gpu = bool(tf.config.get_visible_devices("GPU"))
    distribution = distribution_strategy(config.strategy)
    kwargs = config.model_kwargs()
    kwargs["precision"] = resolve_precision(config.precision)
    if distribution.num_replicas_in_sync > 1 and kwargs["steps_per_execution"] > 1:
        # "You must feed a value for placeholder tensor" from Keras' multi-step function on several replicas
        log.warning(
            "train_cnn.steps_per_execution = %d: Keras runs one step per call on several replicas; using 1",
            kwargs["steps_per_execution"],
        )
        kwargs["steps_per_execution"] = 1
    with distribution.scope():
        model = models.build_cnn(jit_compile=on_gpu, steps_per_epoch=steps_per_epoch, **kwargs)
    parts = micro_batches_used(config.micro_batches, config.strategy)
    if parts > 1:
        model.train_step = micro_batch_step(model, parts)
    log.info(
        "Training with the %s strategy on %d replica(s), %d micro-batch(es) per batch, %s, XLA %s",
        strategy_name(distribution),
        distribution.num_replicas_in_sync,
        parts,
        kwargs["precision"] + (" (precision auto)" if config.precision == "auto" else ""),
        "on" if on_gpu else "off",
    )
    return model


def train(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    config: TrainConfig,
    *,
    seed: int,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    verbose: int = 2,
    backup_dir: Path | None = None,
) -> tuple[keras.Model, dict[str, list[float]]]:
    """Build the CNN of ``config`` and fit it on uint8 images ``(n, 28, 28)`` and digit labels ``(n,)``,
    validating on ``x_val``, ``y_val`` after every epoch; return the model and its history (``loss``,
    ``accuracy``, ``val_loss``, ``val_accuracy``: one float per epoch).

    Seeded with ``seed``, with deterministic ops, so equal inputs give equal weights on the same machine.
    With ``early_stopping_patience`` > 0, training stops after that many epochs without a lower validation
    loss and the best epoch's weights are restored. ``callbacks`` are added to Keras' (e.g. a tracker);
    ``verbose`` is Keras' (1 progress bar, 2 one line per epoch, 0 silent). With ``backup_dir``, training
    resumes from a backup there and leaves one after every epoch (the caller removes it when done); early
    stopping's counters are not part of it.
    """
    import keras

    parts = micro_batches_used(config.micro_batches, config.strategy)
    if parts > 1:  # before TensorFlow's first op, which fixes its thread pools
        runtime.set_cpu_threads(intra_op=max(1, environment.cpu_cores() // parts), inter_op=parts)
    runtime.seed_everything(seed, tensorflow=True)
    steps_per_epoch = (len(y_train) + config.batch_size - 1) // config.batch_size  # the last batch may be short
    model = build(config, steps_per_epoch)

    order, seeding = epoch_seeding(model, len(y_train), seed)
    train_ds = batches(x_train, y_train, config.batch_size, order)
    val_ds = batches(x_val, y_val, config.batch_size)
    all_callbacks = [seeding, *callbacks]
    done: dict[str, list[float]] = {key: [] for key in HISTORY_KEYS}
    if backup_dir is not None:
        done = resume_history(backup_dir, config.epochs)
        all_callbacks += backup_callbacks(backup_dir, done)
    if config.early_stopping_patience > 0:
        all_callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=config.early_stopping_patience, restore_best_weights=True
            )
        )
    # shuffle=False: the dataset already visits each epoch in its own order
    fit = model.fit(
        train_ds, validation_data=val_ds, epochs=config.epochs, shuffle=False, callbacks=all_callbacks, verbose=verbose
    )
    history = {key: done[key] + [float(v) for v in fit.history.get(key, [])] for key in HISTORY_KEYS}
    return model, history


def best_epoch(history: dict[str, list[float]], early_stopping_patience: int) -> int:
    """Index of the epoch whose weights the trained model holds: the last one, or with early stopping
    the first with the lowest validation loss (the one EarlyStopping restores)."""
    if early_stopping_patience > 0:
        return int(np.argmin(history["val_loss"]))
    return len(history["val_loss"]) - 1
