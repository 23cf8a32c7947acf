"""train_cnn: train the Keras CNN on the (augmented) training split, validating on the held-out split.

Reads ``data/augmented/train.npz`` (from augment) and ``data/prepared/val.npz`` (from prepare), arrays
``x`` uint8 n×28×28 and ``y`` uint8 n, and params ``base.seed``, ``train_cnn.*``. Writes the model
(``models/cnn.keras``), its card (``models/cnn.json``) and the per-epoch history
(``plots/train_cnn/history.csv``: epoch, loss, accuracy, val_loss, val_accuracy). Per-epoch metrics go to
MLflow as well. The test split is never read here: evaluate owns it.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stages.lib import cards, io, models, runtime, tracking
from stages.lib.errors import UserError
from stages.lib.preprocess import one_hot, to_model_input

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

log = logging.getLogger(__name__)

STAGE = "train_cnn"
HISTORY_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")
BACKUP_HISTORY = "history.json"  # beside BackupAndRestore's files: the history of the epochs it holds


STRATEGIES = ("auto", "single", "mirrored")


def resolve_strategy(requested: str, n_gpus: int) -> str:
    """What ``train_cnn.strategy`` = ``requested`` means with ``n_gpus`` visible GPUs: ``auto`` is ``mirrored``
    with more than one GPU, else ``single``; ``single`` and ``mirrored`` mean themselves."""
    if requested not in STRATEGIES:
        raise UserError(f"train_cnn.strategy = {requested!r}: expected one of {', '.join(STRATEGIES)}")
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


def strategy_name(strategy: tf.distribute.Strategy) -> str:
    """``mirrored`` for a ``MirroredStrategy``, else ``single`` (the names of ``train_cnn.strategy``)."""
    import tensorflow as tf

    return "mirrored" if isinstance(strategy, tf.distribute.MirroredStrategy) else "single"


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


def train(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    seed: int,
    batch_size: int = 64,
    epochs: int = 5,
    early_stopping_patience: int = 0,
    strategy: str = "auto",
    micro_batches: int = 1,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    verbose: int = 2,
    backup_dir: Path | None = None,
    **model_kwargs: Any,
) -> tuple[keras.Model, dict[str, list[float]]]:
    """Build the CNN (:func:`stages.lib.models.build_cnn`) and fit it; return the model and its history.

    Inputs are uint8 images ``(n, 28, 28)`` and integer labels ``(n,)``; validation runs on ``x_val``,
    ``y_val`` after every epoch. Training is seeded with ``seed`` and uses deterministic ops, so equal
    inputs give equal weights on the same machine: the weights start from ``seed``, and epoch ``e`` visits
    the examples in the order :func:`epoch_order` ``(n, seed, e)`` and draws its dropout masks from
    :func:`epoch_seed` ``(seed, e, ·)``, both set when the epoch starts. With ``early_stopping_patience``
    > 0, training stops after that many epochs without a lower validation loss and the weights of the
    best epoch are restored. ``callbacks`` are added to Keras' (e.g. a tracker); ``verbose`` is Keras'
    (1 progress bar, 2 one line per epoch, 0 silent). ``model_kwargs`` go to ``build_cnn`` (filters,
    kernel_size, dense_units, dropout, l2, optimizer, learning_rate, precision, steps_per_execution, ...).
    The history maps ``loss``, ``accuracy``, ``val_loss``, ``val_accuracy`` to one float per epoch run.

    ``strategy`` (``auto``, ``single``, ``mirrored``; see :func:`distribution_strategy`) places the model
    and optimizer; ``batch_size`` stays the global batch, split across the replicas. The speed levers
    follow the device: on the CPU bfloat16 compute (``precision``) and ``steps_per_execution``; on a GPU
    also XLA (``jit_compile``), which measured slower than TensorFlow's own kernels for this model on the CPU.
    On several replicas ``steps_per_execution`` is 1 (Keras' multi-step training call fails there).
    ``micro_batches`` > 1 applies on the CPU with the single strategy only: each batch is split into that
    many parts trained at once (:func:`micro_batch_step`), TensorFlow running that many ops at once with
    ``cores // micro_batches`` threads each (set before TensorFlow's first op; a process that already ran
    one keeps its threads, with a warning).

    With ``backup_dir``, the weights, optimizer state, epoch and history are saved there after every
    epoch (Keras ``BackupAndRestore``), and a backup found there at the start is resumed from. As the
    order and dropout seeds of each epoch depend only on the seed and the epoch, a run resumed from its
    last finished epoch ends with the weights of an uninterrupted run (bit-identical on the CPU). Early
    stopping's counters are not part of the backup: they restart on resume. The caller removes the
    directory once the outputs are written.
    """
    import keras
    import tensorflow as tf

    if micro_batches > batch_size:
        raise UserError(
            f"train_cnn.micro_batches = {micro_batches} is more than train_cnn.batch_size = {batch_size}: "
            "each micro-batch needs at least one image; lower micro_batches"
        )
    if micro_batches > 1 and model_kwargs.get("batch_norm"):
        raise UserError(
            f"train_cnn.micro_batches = {micro_batches} with train_cnn.batch_norm = true: batch normalisation "
            "would normalise each micro-batch on its own, which is another model; set train_cnn.micro_batches to 1"
        )
    on_gpu = bool(tf.config.get_visible_devices("GPU"))
    parts = micro_batches_used(micro_batches, strategy)
    if parts > 1:  # before TensorFlow's first op, which fixes its thread pools
        runtime.set_cpu_threads(intra_op=max(1, runtime.cpu_cores() // parts), inter_op=parts)
    runtime.seed_everything(seed, tensorflow=True)
    distribution = distribution_strategy(strategy)
    if distribution.num_replicas_in_sync > 1 and model_kwargs.get("steps_per_execution", 1) > 1:
        # Keras' multi-step training function fails on several replicas ("You must feed a value for
        # placeholder tensor"), so each step is its own call there
        log.warning(
            "train_cnn.steps_per_execution = %d: Keras runs one step per call on several replicas; using 1",
            model_kwargs["steps_per_execution"],
        )
        model_kwargs = {**model_kwargs, "steps_per_execution": 1}
    with distribution.scope():
        model = models.build_cnn(jit_compile=on_gpu, **model_kwargs)
    if parts > 1:
        model.train_step = micro_batch_step(model, parts)
    log.info(
        "Training with the %s strategy on %d replica(s), %d micro-batch(es) per batch, XLA %s",
        strategy_name(distribution),
        distribution.num_replicas_in_sync,
        parts,
        "on" if on_gpu else "off",
    )

    # Every epoch starts by setting its example order and its dropout seeds (pure functions of seed and
    # epoch); the data pipeline reads the order as it makes each batch
    with tf.device("/CPU:0"):
        order = tf.Variable(np.arange(len(y_train), dtype=np.int64), trainable=False)
    seed_states = [v for v in model.variables if v.name == "seed_generator_state"]

    def start_epoch(epoch: int, logs: dict[str, float] | None) -> None:
        order.assign(epoch_order(len(y_train), seed, epoch))
        for stream, state in enumerate(seed_states):
            state.assign(np.array([epoch_seed(seed, epoch, stream), 0], dtype=np.int64))

    train_ds = batches(x_train, y_train, batch_size, order)
    val_ds = batches(x_val, y_val, batch_size)

    all_callbacks = [keras.callbacks.LambdaCallback(on_epoch_begin=start_epoch), *callbacks]
    done: dict[str, list[float]] = {key: [] for key in HISTORY_KEYS}
    if backup_dir is not None:
        done = _resume_history(backup_dir, epochs)
        recorded = {key: list(values) for key, values in done.items()}

        def record(epoch: int, logs: dict[str, float] | None) -> None:
            for key in HISTORY_KEYS:
                recorded[key].append(float((logs or {})[key]))
            io.write_json(backup_dir / BACKUP_HISTORY, recorded)

        # history first: a kill between the two writes leaves one epoch too many in it, never too few
        all_callbacks.append(keras.callbacks.LambdaCallback(on_epoch_end=record))
        all_callbacks.append(keras.callbacks.BackupAndRestore(str(backup_dir), delete_checkpoint=False))
    if early_stopping_patience > 0:
        all_callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=early_stopping_patience, restore_best_weights=True
            )
        )
    # shuffle=False: the dataset already visits each epoch in its own order
    fit = model.fit(
        train_ds, validation_data=val_ds, epochs=epochs, shuffle=False, callbacks=all_callbacks, verbose=verbose
    )
    history = {key: done[key] + [float(v) for v in fit.history.get(key, [])] for key in HISTORY_KEYS}
    return model, history


def _resume_history(backup_dir: Path, epochs: int) -> dict[str, list[float]]:
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


def backup_dir_for(root: Path, params: dict[str, Any], inputs: dict[str, str]) -> Path:
    """Where train_cnn keeps its resumable state: ``<root>/.dvc/tmp/train_cnn-backup/<key>``, outside
    every DVC output, keyed by the sha256 of the stage's params and input hashes (a change starts over)."""
    blob = json.dumps({"params": params, "inputs": sorted(inputs.values())}, sort_keys=True)
    return root / ".dvc" / "tmp" / f"{STAGE}-backup" / hashlib.sha256(blob.encode()).hexdigest()


def best_epoch(history: dict[str, list[float]], early_stopping_patience: int) -> int:
    """Index of the epoch whose weights the trained model holds: the last one, or with early stopping
    the first with the lowest validation loss (the one EarlyStopping restores)."""
    if early_stopping_patience > 0:
        return int(np.argmin(history["val_loss"]))
    return len(history["val_loss"]) - 1


def history_csv(history: dict[str, list[float]]) -> str:
    """The history as CSV for DVC plots: one row per epoch (numbered from 1), columns epoch + HISTORY_KEYS."""
    lines = [",".join(("epoch", *HISTORY_KEYS))]
    for i in range(len(history["loss"])):
        lines.append(",".join([str(i + 1), *(f"{history[k][i]:.6f}" for k in HISTORY_KEYS)]))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, required=True, help="training split (train.npz written by augment)")
    parser.add_argument("--val", type=Path, required=True, help="validation split (val.npz written by prepare)")
    parser.add_argument("--model", type=Path, required=True, help="output model file (.keras)")
    parser.add_argument("--card", type=Path, required=True, help="output model card (.json)")
    parser.add_argument("--history", type=Path, required=True, help="output per-epoch history (.csv)")
    args = parser.parse_args(argv)
    if args.model.suffix != ".keras":
        parser.error(f"--model must end with .keras, got {args.model}")

    def body(ctx: runtime.StageContext) -> None:
        import keras

        p = ctx.params
        cfg = p.train_cnn
        x_train, y_train = io.load_split(args.train, stage="augment")
        x_val, y_val = io.load_split(args.val, stage="prepare")
        inputs = {
            str(args.train): ctx.tracker.log_input(args.train, context="train"),
            str(args.val): ctx.tracker.log_input(args.val, context="validation"),
        }
        hparams: dict[str, Any] = {
            "filters": cfg.filters,
            "kernel_size": cfg.kernel_size,
            "dense_units": cfg.dense_units,
            "dropout": cfg.dropout,
            "l2": cfg.l2,
            "optimizer": cfg.optimizer,
            "learning_rate": cfg.learning_rate,
            "precision": cfg.precision,
            "steps_per_execution": cfg.steps_per_execution,
            "strategy": cfg.strategy,
            "micro_batches": cfg.micro_batches,
            "batch_size": cfg.batch_size,
            "epochs": cfg.epochs,
            "early_stopping_patience": cfg.early_stopping_patience,
            "convs_per_block": cfg.convs_per_block,
            "batch_norm": cfg.batch_norm,
            "lr_decay": cfg.lr_decay,
            # the schedule's unit: one epoch of training steps (the last batch may be short)
            "steps_per_epoch": (len(y_train) + cfg.batch_size - 1) // cfg.batch_size,
        }
        log.info(
            "Training on %d images, validating on %d (%d epochs, batch %d, %s)",
            len(y_train),
            len(y_val),
            cfg.epochs,
            cfg.batch_size,
            cfg.precision,
        )

        # Per-epoch metrics to MLflow, numbered from 1 like Keras' log lines and history.csv
        def log_epoch(epoch: int, logs: dict[str, float] | None) -> None:
            logs = logs or {}
            ctx.tracker.log_metrics({k: logs[k] for k in HISTORY_KEYS if k in logs}, step=epoch + 1)

        tracker_cb = keras.callbacks.LambdaCallback(on_epoch_end=log_epoch)
        backup = backup_dir_for(tracking.repo_root(), ctx.params.flat(), inputs)
        start = time.perf_counter()
        model, history = train(
            x_train,
            y_train,
            x_val,
            y_val,
            seed=p.base.seed,
            callbacks=[tracker_cb],
            verbose=1 if sys.stdout.isatty() else 2,
            backup_dir=backup,
            **hparams,
        )
        wall_time = time.perf_counter() - start
        best = best_epoch(history, cfg.early_stopping_patience)
        metrics = {"val_accuracy": history["val_accuracy"][best], "val_loss": history["val_loss"][best]}
        log.info(
            "Trained %d epochs in %.1f s; kept epoch %d: validation accuracy %.4f, loss %.4f",
            len(history["loss"]),
            wall_time,
            best + 1,
            metrics["val_accuracy"],
            metrics["val_loss"],
        )

        models.save_cnn(model, args.model)
        io.write_text(args.history, history_csv(history))
        model_uri = ctx.tracker.log_model(
            "tensorflow", model, to_model_input(x_val[:5]), ("tensorflow", "keras")
        )  # MLflow's TensorFlow flavor stores Keras 3 models as .keras files
        cards.write_card(
            args.card,
            name="cnn",
            model_file=args.model,
            fmt="keras",
            input_kind="image",
            params=ctx.params.flat(),
            device=ctx.device,
            metrics=metrics,
            inputs=inputs,
            mlflow_run_id=ctx.tracker.run_id,
            wall_time_s=wall_time,
            extra={
                "epochs_run": len(history["loss"]),
                "best_epoch": best + 1,
                "train_size": len(y_train),
                "strategy": strategy_name(model.distribute_strategy),
                "replicas": model.distribute_strategy.num_replicas_in_sync,
                "micro_batches": micro_batches_used(cfg.micro_batches, cfg.strategy),
                "jit_compile": bool(model.jit_compile),
                "mlflow_model_uri": model_uri,
            },
        )
        # val_loss/val_accuracy are already logged per epoch; the kept epoch says which of them the model has
        ctx.tracker.log_metrics(
            {"best_epoch": best + 1, "epochs_run": len(history["loss"]), "train_wall_time_s": wall_time}
        )
        ctx.tracker.log_artifact(args.card)
        ctx.tracker.log_artifact(args.history)
        shutil.rmtree(backup, ignore_errors=True)  # outputs written: nothing left to resume

    runtime.run_stage(STAGE, STAGE, body, uses_tensorflow=True, system_metrics=True)


if __name__ == "__main__":
    main()
