"""evaluate: score every trained model on the held-out test set and compare them.

Reads the prepared ``test.npz`` (from prepare), each ``--model NAME=PATH`` with the card beside it (its
sha256 is checked before anything is loaded; ``cnn`` comes from train_cnn, any other name from
``train_baseline@NAME``) and params ``evaluate.*``. Each model gets the input its card names, built by the
same preprocessing function its training used. Writes:

- ``--metrics`` (JSON): per model ``test_accuracy``, ``test_macro_f1``, ``test_log_loss`` (only for models
  that output class probabilities) and ``per_class`` precision and recall;
- ``--report`` (Markdown): a comparison table, with each model's validation accuracy and training device
  taken from its card;
- ``<plots-dir>/confusion_<NAME>.csv`` (``actual,predicted``, one row per test image, for DVC's
  confusion template) and ``<plots-dir>/misclassified.png`` (misclassified test digits of the CNN).

MLflow: the evaluate run gets ``<NAME>.test_accuracy`` etc. and the outputs as artifacts; each model's
training run gets ``test_accuracy``, ``test_macro_f1``, ``test_log_loss``, so the compare view lines the
models up. That run, and the MLflow model to register, come from the model's run record
(``<NAME>.run.json``), which evaluate reads but does not depend on: it changes on every training run, and
none of this stage's outputs depend on it.

Promotion (:mod:`stages.lib.registry`): the CNN is registered as a version of ``settings.registered_model``;
which version is ``champion`` follows the registry's rule (a version takes over when it beats the
champion by ``evaluate.promotion_margin``). The
decision goes to ``--decision`` (JSON, default ``promotion.json``) and to the run's ``promotion.*`` tags.
That file is not a DVC output: it depends on the registry's state, not only on this stage's inputs.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from stages.lib import baselines, cards, files, preprocess, registry, runtime
from stages.lib.errors import UserError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

STAGE = "evaluate"
METRIC_NAMES = ("test_accuracy", "test_macro_f1", "test_log_loss")  # the same names for every model
CNN = "cnn"
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
PREPROCESS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "image": preprocess.to_model_input,
    "flat": preprocess.to_flat_input,
}
LABELS = list(range(preprocess.NUM_CLASSES))


def training_stage(name: str) -> str:
    """The DVC stage that produces model ``name``: train_cnn for ``cnn``, else ``train_baseline@<name>``."""
    return "train_cnn" if name == CNN else f"train_baseline@{name}"


def model_arg(text: str) -> tuple[str, Path]:
    """Parse ``NAME=PATH`` (argparse type)."""
    name, sep, path = text.partition("=")
    if not sep or not _NAME.match(name) or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH with NAME of letters, digits, _ or -, got {text!r}")
    return name, Path(path)


def predict_batched(
    predict: Callable[[np.ndarray], np.ndarray],
    to_input: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    batch_size: int,
) -> np.ndarray:
    """Model outputs ``(n, 10)`` for uint8 ``images``, preprocessed and predicted ``batch_size`` at a time."""
    outputs = [predict(to_input(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    return np.concatenate(outputs).astype(np.float64, copy=False)


def is_probabilities(outputs: np.ndarray, atol: float = 1e-3) -> bool:
    """Whether each row of ``outputs`` is a probability distribution (a softmax), up to float rounding."""
    return bool(
        np.isfinite(outputs).all()
        and (outputs >= 0).all()
        and (outputs <= 1 + atol).all()
        and np.allclose(outputs.sum(axis=1), 1.0, atol=atol)
    )


def log_loss(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (natural log), probabilities clipped away from 0."""
    p = probs[np.arange(len(y_true)), y_true]
    return float(-np.mean(np.log(np.clip(p, np.finfo(np.float64).eps, 1.0))))


def score(y_true: np.ndarray, outputs: np.ndarray, probabilistic: bool) -> dict[str, Any]:
    """Test metrics of one model from its outputs ``(n, 10)``; predicted class = argmax.

    Returns ``test_accuracy``, ``test_macro_f1``, ``test_log_loss`` (only when ``probabilistic``: log loss
    needs class probabilities) and ``per_class`` ``{"0": {"precision", "recall"}, ...}`` (0 for a class never
    predicted).
    """
    y_pred = outputs.argmax(axis=1)
    precision, recall, _, _ = precision_recall_fscore_support(y_true, y_pred, labels=LABELS, zero_division=0)
    metrics: dict[str, Any] = {
        "test_accuracy": float(accuracy_score(y_true, y_pred)),
        "test_macro_f1": float(f1_score(y_true, y_pred, labels=LABELS, average="macro", zero_division=0)),
    }
    if probabilistic:
        metrics["test_log_loss"] = log_loss(y_true, outputs)
    metrics["per_class"] = {
        str(c): {"precision": float(p), "recall": float(r)} for c, p, r in zip(LABELS, precision, recall, strict=True)
    }
    return metrics


def confusion_csv(y_true: np.ndarray, y_pred: np.ndarray) -> str:
    """``actual,predicted`` CSV with one row per test image (the input of DVC's confusion template)."""
    rows = "".join(f"{a},{p}\n" for a, p in zip(y_true.tolist(), y_pred.tolist(), strict=True))
    return "actual,predicted\n" + rows


def misclassified_figure(images: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray, limit: int, model: str) -> Figure:
    """A grid of the first ``limit`` misclassified test digits (in test-set order), each titled "true X / pred Y"."""
    from matplotlib.figure import Figure  # renders with Agg; no pyplot, so no global backend state

    wrong = np.flatnonzero(y_true != y_pred)
    shown = wrong[:limit]
    cols = max(1, math.ceil(math.sqrt(len(shown))))
    rows = max(1, math.ceil(len(shown) / cols))
    fig = Figure(figsize=(1.3 * cols + 0.4, 1.5 * rows + 0.6), layout="constrained")
    fig.suptitle(f"{model}: {len(shown)} of {len(wrong)} misclassified test digits (of {len(y_true)})")
    if not len(shown):
        fig.text(0.5, 0.5, "no misclassified digits", ha="center", va="center")
    for k, i in enumerate(shown):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.imshow(images[i], cmap="gray_r", vmin=0, vmax=255)
        ax.set_title(f"true {y_true[i]} / pred {y_pred[i]}", fontsize=8)
        ax.set_axis_off()
    return fig


def confusion_figure(y_true: np.ndarray, y_pred: np.ndarray, model: str) -> Figure:
    """The confusion matrix of one model as a picture: counts per (actual, predicted) digit, the diagonal the
    correct ones, each cell labelled."""
    from matplotlib.figure import Figure

    counts = np.zeros((len(LABELS), len(LABELS)), dtype=np.int64)
    np.add.at(counts, (y_true, y_pred), 1)
    fig = Figure(figsize=(5.6, 5.0), layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(counts, cmap="Blues")
    for (actual, predicted), n in np.ndenumerate(counts):
        if n:
            light = n > counts.max() / 2
            ax.text(
                predicted, actual, str(n), ha="center", va="center", fontsize=7, color="white" if light else "black"
            )
    ax.set(xticks=LABELS, yticks=LABELS, xlabel="predicted digit", ylabel="actual digit")
    accuracy = np.trace(counts) / max(len(y_true), 1)
    ax.set_title(f"{model}: confusion on {len(y_true)} test images (accuracy {accuracy:.4f})", fontsize=9)
    return fig


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def report_markdown(results: dict[str, dict[str, Any]], model_cards: dict[str, dict[str, Any]], n_test: int) -> str:
    """The comparison table: one row per model, test metrics plus what its card says about training."""
    lines = [
        "# Model comparison on the test set",
        "",
        f"{n_test} held-out test images; validation accuracy and training device come from each model's card "
        "(training times are in MLflow and each model's run record).",
        "",
        "| model | test accuracy | macro F1 | log loss | validation accuracy | train device |",
        "|---|---:|---:|---:|---:|---|",
    ]
    no_log_loss = []
    for name, metrics in results.items():
        card = model_cards[name]
        if "test_log_loss" not in metrics:
            no_log_loss.append(name)
        log_loss_cell = _fmt(metrics.get("test_log_loss")) + ("" if "test_log_loss" in metrics else " ¹")
        lines.append(
            f"| {name} | {_fmt(metrics['test_accuracy'])} | {_fmt(metrics['test_macro_f1'])} | {log_loss_cell} "
            f"| {_fmt(card['metrics'].get('val_accuracy'))} | {card['device']} |"
        )
    if no_log_loss:
        lines += [
            "",
            f"¹ Log loss needs class probabilities, so it is not defined for {_join(no_log_loss)}: "
            "the linear baselines regress one-hot targets and their ten outputs are scores (they can be negative "
            "or exceed 1), not a probability distribution. Their class is the argmax of the outputs.",
        ]
    return "\n".join(lines) + "\n"


def load_predictor(path: Path, card: dict[str, Any], stage: str) -> Callable[[np.ndarray], np.ndarray]:
    """Load the model at ``path`` with the loader its card's format names; return its batch predict function."""
    if card["format"] == "keras":
        from stages.lib.models import load_cnn  # imports Keras; only when a Keras model is evaluated

        cnn = load_cnn(path)
        return lambda x: np.asarray(cnn.predict_on_batch(x))
    if card["format"] == "skops":
        model = baselines.load_sklearn(path, stage=stage)
        return lambda x: baselines.predict_scores(model, x)
    raise UserError(f"{path}: its card names format {card['format']!r}, expected keras or skops")


def read_cards(models: list[tuple[str, Path]]) -> dict[str, dict[str, Any]]:
    """Each model's card, its file's sha256 checked against it, before anything is loaded or written."""
    model_cards = {name: cards.read_card(path, stage=training_stage(name)) for name, path in models}
    for name, card in model_cards.items():
        if card["input"] not in PREPROCESS:
            raise UserError(f"{name}: its card names input {card['input']!r}, expected one of image, flat")
    return model_cards


def score_model(
    path: Path, card: dict[str, Any], name: str, x_test: np.ndarray, y_test: np.ndarray, batch_size: int
) -> tuple[dict[str, Any], np.ndarray]:
    """Load model ``name`` from ``path`` and score it on the test split: its metrics and predicted classes."""
    predict = load_predictor(path, card, training_stage(name))
    outputs = predict_batched(predict, PREPROCESS[card["input"]], x_test, batch_size)
    if outputs.shape != (len(y_test), preprocess.NUM_CLASSES):
        raise UserError(f"{path}: outputs shape {outputs.shape}, expected ({len(y_test)}, 10)")
    probabilistic = card["format"] == "keras" and is_probabilities(outputs)
    if card["format"] == "keras" and not probabilistic:
        log.warning("%s: outputs are not softmax probabilities; log loss omitted", name)
    metrics = score(y_test, outputs, probabilistic)
    log.info(
        "%s: test accuracy %.4f, macro F1 %.4f, log loss %s",
        name,
        metrics["test_accuracy"],
        metrics["test_macro_f1"],
        _fmt(metrics.get("test_log_loss")),
    )
    return metrics, outputs.argmax(axis=1)


def write_plots(
    plots_dir: Path, x_test: np.ndarray, y_test: np.ndarray, predictions: dict[str, np.ndarray], grid: int
) -> list[Path]:
    """The confusion CSV of every model and the misclassified-digits image (of the CNN when there is one)."""
    written = []
    for name, y_pred in predictions.items():
        written.append(plots_dir / f"confusion_{name}.csv")
        files.write_text(written[-1], confusion_csv(y_test, y_pred))
    shown = CNN if CNN in predictions else next(iter(predictions))
    written.append(plots_dir / "misclassified.png")
    files.write_bytes(
        written[-1], files.png_bytes(misclassified_figure(x_test, y_test, predictions[shown], grid, shown))
    )
    return written


def track(
    ctx: runtime.StageContext, results: dict[str, dict[str, Any]], model_cards: dict[str, dict[str, Any]]
) -> None:
    """The test metrics on this run (``<model>.<metric>``) and on each model's training run (``<metric>``), so
    MLflow's compare view lines the models up."""
    ctx.tracker.log_metrics(
        {f"{name}.{key}": m[key] for name, m in results.items() for key in METRIC_NAMES if key in m}
    )
    for name, metrics in results.items():
        ctx.tracker.log_metrics_to_run(
            model_cards[name]["mlflow_run_id"], {k: metrics[k] for k in METRIC_NAMES if k in metrics}
        )


def promote(
    ctx: runtime.StageContext, run: dict[str, Any], accuracy: float, margin: float, decision_path: Path
) -> None:
    """Register the CNN of the training run ``run`` (its run record) and apply the promotion rule; write and
    log the decision (without MLflow, nothing)."""
    if not ctx.tracker.enabled:
        return
    if not run.get("mlflow_model_uri"):
        raise UserError(
            "models/cnn.run.json names no MLflow model (mlflow_model_uri), so it cannot be registered; "
            "re-train it with MLflow tracking: dvc repro --force train_cnn"
        )
    decision = registry.promote(
        ctx.params.settings.registered_model, run["mlflow_model_uri"], run["mlflow_run_id"], accuracy, margin
    )
    files.write_json(decision_path, decision)
    ctx.tracker.set_tags({f"promotion.{k}": str(v) for k, v in decision.items() if k != "run_id"})
    ctx.tracker.log_metrics({"promotion.promoted": float(decision["decision"] == registry.PROMOTED)})
    ctx.tracker.log_artifact(decision_path)


def run(args: argparse.Namespace, ctx: runtime.StageContext) -> None:
    """Score every ``args.model`` on ``args.test``; write metrics, report and plots; register the CNN."""
    p = ctx.params.evaluate
    model_cards = read_cards(args.model)
    x_test, y_test = files.load_split(args.test, stage="prepare")
    y_test = y_test.astype(np.int64)
    ctx.tracker.log_input(args.test, context="test")

    results: dict[str, dict[str, Any]] = {}
    predictions: dict[str, np.ndarray] = {}
    for name, path in args.model:
        results[name], predictions[name] = score_model(path, model_cards[name], name, x_test, y_test, p.batch_size)

    files.write_json(args.metrics, results)
    files.write_text(args.report, report_markdown(results, model_cards, len(y_test)))
    plots = write_plots(args.plots_dir, x_test, y_test, predictions, p.misclassified_grid)

    runs = {name: cards.read_run(path) for name, path in args.model}
    track(ctx, results, runs)
    for name, y_pred in predictions.items():
        ctx.tracker.log_figure(confusion_figure(y_test, y_pred, name), f"plots/confusion_{name}.png")
    for path in (args.metrics, args.report):
        ctx.tracker.log_artifact(path)
    for path in plots:
        ctx.tracker.log_artifact(path, artifact_path="plots")
    if CNN in results:
        promote(ctx, runs[CNN], results[CNN]["test_accuracy"], p.promotion_margin, args.decision)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test", type=Path, required=True, help="prepared test.npz")
    parser.add_argument(
        "--model", type=model_arg, action="append", required=True, metavar="NAME=PATH", help="a model (repeatable)"
    )
    parser.add_argument("--metrics", type=Path, required=True, help="output metrics JSON")
    parser.add_argument("--report", type=Path, required=True, help="output Markdown comparison")
    parser.add_argument("--plots-dir", type=Path, required=True, help="output directory of the plots")
    parser.add_argument(
        "--decision", type=Path, default=Path("promotion.json"), help="output promotion decision (JSON)"
    )
    args = parser.parse_args(argv)
    names = [name for name, _ in args.model]
    if len(set(names)) != len(names):
        parser.error(f"--model names must be unique, got {', '.join(names)}")
    with runtime.stage(STAGE) as ctx:
        run(args, ctx)


if __name__ == "__main__":
    main()
