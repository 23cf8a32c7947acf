"""train_cnn: train the Keras CNN on the (augmented) training split, validating on the held-out split.

Reads ``data/augmented/train.npz`` (from augment) and ``data/prepared/val.npz`` (from prepare), arrays
``x`` uint8 n×28×28 and ``y`` uint8 n, and params ``base.seed``, ``train_cnn.*``. Writes the model
(``models/cnn.keras``), its card (``models/cnn.json``), its run record (``models/cnn.run.json``) and the
per-epoch history (``plots/train_cnn/history.csv``: epoch, loss, accuracy, val_loss, val_accuracy).
Per-epoch metrics go to MLflow as well. The test split is never read here: evaluate owns it.

The model is :func:`stages.lib.models.build_cnn`; how it is fitted (input pipeline, per-epoch seeding,
micro-batches, strategy, backup and resume) is :mod:`stages.lib.training`.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.lib import cards, files, models, runtime, tracking, training
from stages.lib.preprocess import to_model_input

if TYPE_CHECKING:
    import keras
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

STAGE = "train_cnn"


def history_csv(history: dict[str, list[float]]) -> str:
    """The history as CSV for DVC plots: one row per epoch (numbered from 1), columns epoch + HISTORY_KEYS."""
    keys = training.HISTORY_KEYS
    lines = [",".join(("epoch", *keys))]
    for i in range(len(history["loss"])):
        lines.append(",".join([str(i + 1), *(f"{history[k][i]:.6f}" for k in keys)]))
    return "\n".join(lines) + "\n"


def learning_curves(history: dict[str, list[float]]) -> Figure:
    """Loss and accuracy per epoch, training beside validation, as a picture."""
    from matplotlib.figure import Figure

    epochs = range(1, len(history["loss"]) + 1)
    fig = Figure(figsize=(8.0, 3.2), layout="constrained")
    for ax, metric in zip(fig.subplots(1, 2), ("loss", "accuracy"), strict=True):
        ax.plot(epochs, history[metric], marker="o", label="training")
        ax.plot(epochs, history[f"val_{metric}"], marker="o", label="validation")
        ax.set(xlabel="epoch", ylabel=metric, xticks=list(epochs))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("train_cnn: learning curves", fontsize=10)
    return fig


def epoch_logger(tracker: tracking.Tracker) -> keras.callbacks.Callback:
    """A callback sending each epoch's metrics to the run, numbered from 1 like Keras' log and history.csv."""
    import keras

    def log_epoch(epoch: int, logs: dict[str, float] | None) -> None:
        logs = logs or {}
        tracker.log_metrics({k: logs[k] for k in training.HISTORY_KEYS if k in logs}, step=epoch + 1)

    return keras.callbacks.LambdaCallback(on_epoch_end=log_epoch)


def record(
    args: argparse.Namespace,
    ctx: runtime.StageContext,
    model: keras.Model,
    config: training.TrainConfig,
    outcome: dict[str, Any],
) -> None:
    """Log the MLflow model (its input example: ``outcome["example"]``), write the card (what was trained, on
    what, where, and how well) and the run record (the MLflow run and model, the wall time), and log the
    kept epoch and the training time."""
    # MLflow's TensorFlow flavor stores Keras 3 models as .keras files
    model_uri = ctx.tracker.log_model("tensorflow", model, outcome["example"], ("tensorflow", "keras"))
    cards.write_card(
        args.card,
        name="cnn",
        model_file=args.model,
        fmt="keras",
        input_kind="image",
        params=ctx.params.flat(),
        device=ctx.device,
        metrics=outcome["metrics"],
        inputs=outcome["inputs"],
        extra={
            "epochs_run": outcome["epochs_run"],
            "best_epoch": outcome["best_epoch"],
            "train_size": outcome["train_size"],
            "strategy": training.strategy_name(model.distribute_strategy),
            "replicas": model.distribute_strategy.num_replicas_in_sync,
            "micro_batches": training.micro_batches_used(config.micro_batches, config.strategy),
            "jit_compile": bool(model.jit_compile),
            "precision": model.layers[0].dtype_policy.name,
            "tf_threads": training.thread_pools(),
        },
    )
    cards.write_run(args.run, run_id=ctx.tracker.run_id, model_uri=model_uri, wall_time_s=outcome["wall_time_s"])
    ctx.tracker.log_artifact(args.card)
    # val_loss/val_accuracy are already logged per epoch; the kept epoch says which of them the model has
    kept = {"best_epoch": outcome["best_epoch"], "epochs_run": outcome["epochs_run"]}
    ctx.tracker.log_metrics({**kept, "train_wall_time_s": outcome["wall_time_s"]})


def run(args: argparse.Namespace, ctx: runtime.StageContext) -> None:
    """Train the CNN of the ``train_cnn`` params on ``args.train``; write the model, its card and history."""
    config = training.TrainConfig.from_params(ctx.params.train_cnn)
    x_train, y_train = files.load_split(args.train, stage="augment")
    x_val, y_val = files.load_split(args.val, stage="prepare")
    inputs = ctx.tracker.log_inputs({"train": args.train, "validation": args.val})
    log.info(
        "Training on %d images, validating on %d (%d epochs, batch %d, %s)",
        len(y_train),
        len(y_val),
        config.epochs,
        config.batch_size,
        config.precision,
    )

    # Build and fit, resuming from the backup an interrupted run left
    # In the workspace, not the repository: queued experiments with the same train_cnn run side by side
    backup = training.backup_dir_for(Path.cwd(), ctx.params.flat(), inputs)
    start = time.perf_counter()
    model, history = training.train(
        x_train,
        y_train,
        x_val,
        y_val,
        config,
        seed=ctx.params.base.seed,
        callbacks=[epoch_logger(ctx.tracker)],
        verbose=1 if sys.stdout.isatty() else 2,
        backup_dir=backup,
    )
    wall_time = time.perf_counter() - start
    best = training.best_epoch(history, config.early_stopping_patience)
    metrics = {"val_accuracy": history["val_accuracy"][best], "val_loss": history["val_loss"][best]}
    log.info(
        "Trained %d epochs in %.1f s; kept epoch %d: validation accuracy %.4f, loss %.4f",
        len(history["loss"]),
        wall_time,
        best + 1,
        metrics["val_accuracy"],
        metrics["val_loss"],
    )

    # Save, then record
    models.save_cnn(model, args.model)
    files.write_text(args.history, history_csv(history))
    outcome = {
        "metrics": metrics,
        "inputs": inputs,
        "wall_time_s": wall_time,
        "epochs_run": len(history["loss"]),
        "best_epoch": best + 1,
        "train_size": len(y_train),
        "example": to_model_input(x_val[:5]),
    }
    record(args, ctx, model, config, outcome)
    ctx.tracker.log_artifact(args.history)
    ctx.tracker.log_figure(learning_curves(history), "plots/learning_curves.png")
    shutil.rmtree(backup, ignore_errors=True)  # outputs written: nothing left to resume


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, required=True, help="training split (train.npz written by augment)")
    parser.add_argument("--val", type=Path, required=True, help="validation split (val.npz written by prepare)")
    parser.add_argument("--model", type=Path, required=True, help="output model file (.keras)")
    parser.add_argument("--card", type=Path, required=True, help="output model card (.json)")
    parser.add_argument("--run", type=Path, required=True, help="output run record (.run.json)")
    parser.add_argument("--history", type=Path, required=True, help="output per-epoch history (.csv)")
    args = parser.parse_args(argv)
    if args.model.suffix != ".keras":
        parser.error(f"--model must end with .keras, got {args.model}")
    with runtime.stage(STAGE) as ctx:
        run(args, ctx)


if __name__ == "__main__":
    main()
