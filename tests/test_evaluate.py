"""evaluate: metrics, report, plots and tracking from tiny models; refusal of a model whose card does not match."""

from __future__ import annotations

import argparse
import json
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from stages import evaluate
from stages.lib import baselines, cards, files, models
from stages.lib import params as params_lib
from stages.lib.preprocess import one_hot, to_flat_input, to_model_input
from tests.support.mnist import make_mnist

N_TEST = 60
GRID = 4
OUTPUTS = ["metrics/evaluate.json", "metrics/evaluate.md"]
PLOTS = ["confusion_cnn.csv", "confusion_lasso.csv", "confusion_ridge.csv", "misclassified.png"]


# ------------------------------------------------------------------------------------------- pure functions


def test_score_structure_and_values() -> None:
    y = np.array([0, 1, 2, 2])
    probs = np.full((4, 10), 0.0)
    probs[np.arange(4), [0, 1, 2, 1]] = 1.0  # last one wrong
    m = evaluate.score(y, probs, probabilistic=True)
    assert set(m) == {"test_accuracy", "test_macro_f1", "test_log_loss", "per_class"}
    assert m["test_accuracy"] == 0.75
    assert list(m["per_class"]) == [str(c) for c in range(10)]
    assert m["per_class"]["1"] == {"precision": 0.5, "recall": 1.0}
    assert m["per_class"]["2"] == {"precision": 1.0, "recall": 0.5}
    assert m["per_class"]["7"] == {"precision": 0.0, "recall": 0.0}  # never seen, never predicted
    assert m["test_log_loss"] == pytest.approx(-np.log(np.finfo(np.float64).eps) / 4)  # one certain mistake
    assert "test_log_loss" not in evaluate.score(y, probs, probabilistic=False)


def test_log_loss_of_uniform_probabilities_is_log_10() -> None:
    assert evaluate.log_loss(np.arange(10), np.full((10, 10), 0.1)) == pytest.approx(np.log(10))


def test_is_probabilities() -> None:
    softmax = np.exp(np.random.default_rng(0).normal(size=(5, 10)))
    softmax /= softmax.sum(axis=1, keepdims=True)
    assert evaluate.is_probabilities(softmax.astype(np.float32))
    assert not evaluate.is_probabilities(softmax * 1.1)
    assert not evaluate.is_probabilities(softmax - 0.05)  # regression-like scores below 0


def test_confusion_csv_has_one_row_per_image() -> None:
    text = evaluate.confusion_csv(np.array([3, 1]), np.array([3, 7]))
    assert text == "actual,predicted\n3,3\n1,7\n"


def test_model_arg() -> None:
    assert evaluate.model_arg("cnn=models/cnn.keras") == ("cnn", Path("models/cnn.keras"))
    for bad in ("models/cnn.keras", "=x", "cnn=", "a b=x", "../x=y"):
        with pytest.raises(argparse.ArgumentTypeError):
            evaluate.model_arg(bad)


def test_training_stage() -> None:
    assert evaluate.training_stage("cnn") == "train_cnn"
    assert evaluate.training_stage("lasso") == "train_baseline@lasso"


def test_predict_batched_covers_every_image_in_order() -> None:
    images = np.arange(7 * 28 * 28, dtype=np.uint8).reshape(7, 28, 28)
    calls = []

    def predict(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        return np.repeat(x[:, :1], 10, axis=1)

    out = evaluate.predict_batched(predict, to_flat_input, images, batch_size=3)
    assert calls == [3, 3, 1]
    np.testing.assert_allclose(out[:, 0], to_flat_input(images)[:, 0])


# ------------------------------------------------------------------------------------------- the stage


def _training_run(name: str, model_file: Path, fmt: str) -> tuple[str, str]:
    """A finished MLflow run standing in for the model's training run (the test store, see conftest), with
    the model logged as train_cnn / train_baseline log it. Returns the run id and the model's URI."""
    import mlflow

    from stages.lib.tracking import MlflowTracker

    exp = mlflow.get_experiment_by_name("evaluate-tests")
    exp_id = exp.experiment_id if exp else mlflow.create_experiment("evaluate-tests")
    with mlflow.start_run(experiment_id=exp_id, run_name=f"train {name}") as run:
        tracker = MlflowTracker(run.info.run_id)
        if fmt == "keras":
            example = to_model_input(np.zeros((2, 28, 28), np.uint8))
            uri = tracker.log_model("tensorflow", models.load_cnn(model_file), example, ("tensorflow", "keras"))
        else:
            model = baselines.load_sklearn(model_file, stage="train_baseline")
            uri = tracker.log_model("sklearn", model, to_flat_input(np.zeros((2, 28, 28), np.uint8)), ("scikit-learn",))
    return run.info.run_id, uri


def _card(root: Path, name: str, model: Path, fmt: str, kind: str) -> None:
    run_id, uri = _training_run(name, model, fmt)
    cards.write_card(
        model.with_suffix(".json"),
        name=name,
        model_file=model,
        fmt=fmt,  # type: ignore[arg-type]
        input_kind=kind,  # type: ignore[arg-type]
        params={},
        device="cpu",
        metrics={"val_accuracy": 0.5},
        inputs={},
    )
    cards.write_run(model.with_suffix(".run.json"), run_id=run_id, model_uri=uri, wall_time_s=1.25)


def _tiny_cnn(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    """A tiny CNN from the project's factory, trained briefly and saved as train_cnn saves it."""
    cnn = models.build_cnn(filters=(4,), dense_units=16, learning_rate=0.01)
    cnn.fit(to_model_input(x), one_hot(y), epochs=3, batch_size=32, verbose=0)
    models.save_cnn(cnn, path)


@pytest.fixture
def evaluate_dir(stage_dir: Callable[..., Path]) -> Callable[[], tuple[Path, list[str]]]:
    """A stage directory with a prepared test set and tiny cnn, ridge and lasso models with their cards."""

    def make() -> tuple[Path, list[str]]:
        root = stage_dir(
            {
                "evaluate.misclassified_grid": GRID,
                "evaluate.batch_size": 25,
                "evaluate.device": "cpu",
                "settings.registered_model": f"cnn-{uuid.uuid4().hex}",  # a registry of its own
            }
        )
        d = make_mnist(n_train=300, n_test=N_TEST, seed=3)
        files.save_arrays(root / "data/prepared/test.npz", {"x": d["x_test"], "y": d["y_test"]})
        (root / "models").mkdir()
        _tiny_cnn(root / "models/cnn.keras", d["x_train"], d["y_train"])
        _card(root, "cnn", root / "models/cnn.keras", "keras", "image")
        for name in baselines.BASELINES:
            model = baselines.build_baseline(name, 0.01)
            baselines.fit_baseline(model, to_flat_input(d["x_train"]), one_hot(d["y_train"]))
            baselines.save_sklearn(model, root / f"models/{name}.skops")
            _card(root, name, root / f"models/{name}.skops", "skops", "flat")
        argv = ["--test", "data/prepared/test.npz"]
        for name, ext in (("cnn", "keras"), ("ridge", "skops"), ("lasso", "skops")):
            argv += ["--model", f"{name}=models/{name}.{ext}"]
        argv += ["--metrics", OUTPUTS[0], "--report", OUTPUTS[1], "--plots-dir", "plots/evaluate"]
        return root, argv

    return make


def test_main_end_to_end(evaluate_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    root, argv = evaluate_dir()
    views: list[params_lib.StageParams] = []
    real_load = params_lib.load
    monkeypatch.setattr(params_lib, "load", lambda stage: views.append(real_load(stage)) or views[-1])
    evaluate.main(argv)

    (view,) = views
    assert view.reads == set(view.flat())  # every evaluate.* key read, nothing else
    for out in OUTPUTS:
        assert (root / out).is_file(), out
    assert sorted(p.name for p in (root / "plots/evaluate").iterdir()) == PLOTS

    metrics = json.loads((root / OUTPUTS[0]).read_text())
    assert list(metrics) == ["cnn", "lasso", "ridge"]  # sorted keys: stable bytes
    for name, m in metrics.items():
        expected = {"test_accuracy", "test_macro_f1", "per_class"} | ({"test_log_loss"} if name == "cnn" else set())
        assert set(m) == expected, name
        assert 0.5 < m["test_accuracy"] <= 1 and 0 < m["test_macro_f1"] <= 1
        assert list(m["per_class"]) == [str(c) for c in range(10)]
        assert all(set(v) == {"precision", "recall"} for v in m["per_class"].values())
    assert metrics["cnn"]["test_log_loss"] > 0

    test_y = np.load(root / "data/prepared/test.npz")["y"]
    for name in ("cnn", "ridge", "lasso"):
        lines = (root / f"plots/evaluate/confusion_{name}.csv").read_text().splitlines()
        assert lines[0] == "actual,predicted"
        assert len(lines) - 1 == N_TEST
        assert [int(line.split(",")[0]) for line in lines[1:]] == test_y.tolist()
        accuracy = np.mean([a == p for a, p in (line.split(",") for line in lines[1:])])
        assert accuracy == pytest.approx(metrics[name]["test_accuracy"])
    assert (root / "plots/evaluate/misclassified.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    report = (root / OUTPUTS[1]).read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert [row.split("|")[1].strip() for row in rows] == ["cnn", "ridge", "lasso"]
    assert "n/a" in rows[1] and "n/a" in rows[2] and "n/a" not in rows[0]
    assert "not defined for ridge and lasso" in report
    assert rows[0].endswith("| 0.5000 | cpu |")  # validation accuracy and device from the card

    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    for name in ("cnn", "ridge", "lasso"):
        record = cards.read_run(root / f"models/{name}.keras")  # any suffix: the stem names the run record
        logged = client.get_run(record["mlflow_run_id"]).data.metrics
        assert logged["test_accuracy"] == pytest.approx(metrics[name]["test_accuracy"])
        assert ("test_log_loss" in logged) == (name == "cnn")
    runs = client.search_runs(
        [client.get_experiment_by_name("mnist").experiment_id], "tags.`dvc.stage` = 'evaluate'", max_results=1
    )
    assert runs[0].data.metrics["ridge.test_accuracy"] == pytest.approx(metrics["ridge"]["test_accuracy"])

    decision = json.loads((root / "promotion.json").read_text())  # the first CNN is promoted
    assert decision["decision"] == "promoted" and decision["version"] == "1"
    assert decision["challenger_accuracy"] == metrics["cnn"]["test_accuracy"]
    assert runs[0].data.tags["promotion.decision"] == "promoted"


def test_main_refuses_a_model_whose_card_does_not_match(evaluate_dir, caplog) -> None:
    root, argv = evaluate_dir()
    (root / "models/ridge.skops").write_bytes((root / "models/lasso.skops").read_bytes())
    with pytest.raises(SystemExit) as exc:
        evaluate.main(argv)
    assert exc.value.code == 1
    assert "sha256 differs" in caplog.text and "train_baseline@ridge" in caplog.text
    assert not (root / "metrics").exists() and not (root / "plots").exists()
