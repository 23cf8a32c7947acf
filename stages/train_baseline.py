"""train_baseline: fit one linear baseline (Ridge or Lasso regression on one-hot targets) on the prepared split.

Run as ``train_baseline@ridge`` / ``train_baseline@lasso`` (``--name``). Reads ``train.npz`` and ``val.npz``
from prepare (the prepared training split, not the augmented one, so augmentation never re-runs it) and
params ``baselines.<name>.*`` only. Writes the model in skops format (``--model``), its card (``--card``:
file hash, params, device, validation metrics, input hashes, environment) and its run record (``--run``:
MLflow run id and model URI, training time).
Logs ``val_accuracy`` and ``val_macro_f1`` to MLflow. Runs on the CPU and never imports TensorFlow.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, f1_score

from stages.lib import baselines, cards, files, preprocess, runtime

log = logging.getLogger(__name__)

STAGE = "train_baseline"


def hyperparams(name: str, section: Any) -> dict[str, Any]:
    """The keyword arguments of :func:`baselines.build_baseline` from the params section ``baselines.<name>``."""
    if name == "ridge":
        return {"alpha": section.alpha}
    return {"alpha": section.alpha, "max_iter": section.max_iter, "tol": section.tol}


def train(
    name: str,
    hyper: dict[str, Any],
    train_split: tuple[np.ndarray, np.ndarray],
    val_split: tuple[np.ndarray, np.ndarray],
) -> tuple[baselines.LinearBaseline, dict[str, float], float]:
    """Fit baseline ``name`` with ``hyper`` on uint8 images and labels; score it on the validation split.

    Returns the fitted model, ``{"val_accuracy", "val_macro_f1"}`` and the fit's wall time in seconds.
    """
    (x_train, y_train), (x_val, y_val) = train_split, val_split
    model = baselines.build_baseline(name, **hyper)
    start = time.perf_counter()
    baselines.fit_baseline(model, preprocess.to_flat_input(x_train), preprocess.one_hot(y_train))
    fit_s = time.perf_counter() - start
    pred = baselines.predict_classes(model, preprocess.to_flat_input(x_val))
    metrics = {
        "val_accuracy": float(accuracy_score(y_val, pred)),
        "val_macro_f1": float(f1_score(y_val, pred, average="macro", labels=range(preprocess.NUM_CLASSES))),
    }
    return model, metrics, fit_s


def run(args: argparse.Namespace, ctx: runtime.StageContext) -> None:
    """Fit baseline ``args.name`` on ``args.train``; write the model ``args.model`` and its card ``args.card``."""
    hyper = hyperparams(args.name, getattr(ctx.params.baselines, args.name))
    train_split = files.load_split(args.train, stage="prepare")
    val_split = files.load_split(args.val, stage="prepare")
    inputs = ctx.tracker.log_inputs({"train": args.train, "validation": args.val})
    log.info("Fitting %s %s on %d images", args.name, hyper, len(train_split[1]))
    model, metrics, fit_s = train(args.name, hyper, train_split, val_split)
    log.info(
        "%s: fit in %.2f s, validation accuracy %.4f, macro F1 %.4f",
        args.name,
        fit_s,
        metrics["val_accuracy"],
        metrics["val_macro_f1"],
    )
    ctx.tracker.log_metrics({**metrics, "train_wall_time_s": fit_s})
    baselines.save_sklearn(model, args.model)
    model_uri = ctx.tracker.log_model(
        "sklearn",
        model,
        preprocess.to_flat_input(val_split[0][:5]),
        ("scikit-learn", "skops"),
        serialization_format="skops",
        skops_trusted_types=sorted(baselines.ALLOWED_TYPES),
    )
    cards.write_card(
        args.card,
        name=args.name,
        model_file=args.model,
        fmt="skops",
        input_kind="flat",
        params=ctx.params.flat(),
        device=ctx.device,
        metrics=metrics,
        inputs=inputs,
    )
    cards.write_run(args.run, run_id=ctx.tracker.run_id, model_uri=model_uri, wall_time_s=fit_s)
    ctx.tracker.log_artifact(args.card)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", choices=baselines.BASELINES, required=True, help="which baseline to train")
    parser.add_argument("--train", type=Path, required=True, help="prepared train.npz")
    parser.add_argument("--val", type=Path, required=True, help="prepared val.npz")
    parser.add_argument("--model", type=Path, required=True, help="output model (.skops)")
    parser.add_argument("--card", type=Path, required=True, help="output model card (.json)")
    parser.add_argument("--run", type=Path, required=True, help="output run record (.run.json)")
    args = parser.parse_args(argv)
    with runtime.stage(f"{STAGE}@{args.name}") as ctx:
        run(args, ctx)


if __name__ == "__main__":
    main()
