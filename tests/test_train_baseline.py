"""Linear baselines and the train_baseline stage: fit, fast Lasso path, safe skops loading, CPU only, outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import skops.io
from sklearn.linear_model import Lasso, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from stages import train_baseline
from stages.lib import baselines, cards, files
from stages.lib import params as params_lib
from stages.lib.errors import UserError
from stages.lib.preprocess import one_hot, to_flat_input
from tests.support.mnist import make_mnist

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    d = make_mnist(n_train=400, n_test=200, seed=1)
    return {"x": to_flat_input(d["x_train"]), "y": d["y_train"], "xt": to_flat_input(d["x_test"]), "yt": d["y_test"]}


class NotAModel:
    """A class skops does not know: a file holding it must be refused, not loaded."""

    def __init__(self) -> None:
        self.payload = [1, 2, 3]


# ------------------------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize(("name", "hyper"), [("ridge", {"alpha": 1.0}), ("lasso", {"alpha": 0.001})])
def test_baselines_learn_tiny_data(data: dict[str, np.ndarray], name: str, hyper: dict) -> None:
    model = baselines.fit_baseline(baselines.build_baseline(name, **hyper), data["x"], one_hot(data["y"]))
    scores = baselines.predict_scores(model, data["xt"])
    assert scores.shape == (len(data["yt"]), 10)
    pred = baselines.predict_classes(model, data["xt"])
    np.testing.assert_array_equal(pred, scores.argmax(axis=1))
    assert (pred == data["yt"]).mean() > 0.8  # chance is 0.1


def test_build_baseline_settings_and_errors() -> None:
    lasso = baselines.build_baseline("lasso", 0.01, max_iter=50, tol=1e-3)
    assert isinstance(lasso, Lasso)
    assert (lasso.alpha, lasso.max_iter, lasso.tol, lasso.precompute) == (0.01, 50, 1e-3, True)
    assert isinstance(baselines.build_baseline("ridge", 2.0), Ridge)
    with pytest.raises(ValueError, match="unknown baseline"):
        baselines.build_baseline("svm", 1.0)
    with pytest.raises(ValueError, match="closed-form"):
        baselines.build_baseline("ridge", 1.0, max_iter=10)


def test_lasso_gram_path_equals_plain_fit(data: dict[str, np.ndarray]) -> None:
    tol = 1e-6
    fast = baselines.fit_baseline(
        baselines.build_baseline("lasso", 0.002, max_iter=5000, tol=tol), data["x"], one_hot(data["y"])
    )
    plain = Lasso(alpha=0.002, max_iter=5000, tol=tol).fit(
        data["x"].astype(np.float64), one_hot(data["y"]).astype(np.float64)
    )
    assert plain.precompute is False
    assert np.count_nonzero(fast.coef_) > 10  # a real sparse solution, not all zeros
    np.testing.assert_allclose(fast.coef_, plain.coef_, atol=tol)
    np.testing.assert_allclose(fast.intercept_, plain.intercept_, atol=tol)


def test_skops_round_trip_is_atomic(tmp_path: Path, data: dict[str, np.ndarray]) -> None:
    for name in baselines.BASELINES:
        model = baselines.fit_baseline(baselines.build_baseline(name, 0.01), data["x"], one_hot(data["y"]))
        path = tmp_path / f"{name}.skops"
        baselines.save_sklearn(model, path)
        loaded = baselines.load_sklearn(path)
        assert type(loaded) is type(model)
        np.testing.assert_array_equal(loaded.coef_, model.coef_)
        np.testing.assert_array_equal(
            baselines.predict_scores(loaded, data["xt"]), baselines.predict_scores(model, data["xt"])
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lasso.skops", "ridge.skops"]  # no temp files left


@pytest.mark.parametrize("name", baselines.BASELINES)
def test_the_same_fitted_model_saves_to_the_same_bytes(tmp_path: Path, data: dict[str, np.ndarray], name: str) -> None:
    """skops names array files and marks objects by memory address, and stamps member times: two fits of the
    same model, saved a zip-timestamp tick apart, must still be equal files (that load like the model)."""
    saved = []
    for i in range(2):
        model = baselines.fit_baseline(baselines.build_baseline(name, 0.01), data["x"], one_hot(data["y"]))
        saved.append(tmp_path / f"{i}.skops")
        baselines.save_sklearn(model, saved[-1])
        time.sleep(2.1 if i == 0 else 0)  # zip times have a 2 s resolution
    assert saved[0].read_bytes() == saved[1].read_bytes()
    loaded = baselines.load_sklearn(saved[0])
    np.testing.assert_array_equal(
        baselines.predict_scores(loaded, data["xt"]), baselines.predict_scores(model, data["xt"])
    )


FIT_AND_HASH = """
import hashlib, sys, tempfile
import numpy as np
from stages.lib import baselines
rng = np.random.default_rng(0)
x = (rng.random((500, 784)) < 0.2) * rng.random((500, 784))
y = np.eye(10)[rng.integers(0, 10, 500)]
model = baselines.fit_baseline(baselines.build_baseline(sys.argv[1], 0.001), x, y)
with tempfile.TemporaryDirectory() as tmp:
    baselines.save_sklearn(model, f"{tmp}/m.skops")
    print(hashlib.md5(open(f"{tmp}/m.skops", "rb").read()).hexdigest())
"""


@pytest.mark.slow
def test_lasso_fits_in_fresh_processes_save_to_the_same_bytes() -> None:
    """A fresh process' Lasso held one of two dual gaps (:func:`baselines.round_dual_gap`), and so did its file."""
    hashes = {
        subprocess.run(
            [sys.executable, "-W", "ignore", "-c", FIT_AND_HASH, "lasso"],
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for _ in range(4)
    }
    assert len(hashes) == 1, hashes


def test_load_refuses_unknown_class(tmp_path: Path, data: dict[str, np.ndarray]) -> None:
    model = baselines.fit_baseline(baselines.build_baseline("ridge", 1.0), data["x"], one_hot(data["y"]))
    model.extra_ = NotAModel()
    path = tmp_path / "evil.skops"
    skops.io.dump(model, path)
    with pytest.raises(UserError, match=r"NotAModel.*refusing to load"):
        baselines.load_sklearn(path)


def test_load_refuses_types_skops_trusts_but_a_baseline_never_holds(
    tmp_path: Path, data: dict[str, np.ndarray]
) -> None:
    pipe = make_pipeline(StandardScaler(), Ridge()).fit(data["x"], one_hot(data["y"]))
    path = tmp_path / "pipe.skops"
    skops.io.dump(pipe, path)
    assert skops.io.get_untrusted_types(file=path) == []  # skops alone would load it
    with pytest.raises(UserError, match=r"sklearn.pipeline.Pipeline"):
        baselines.load_sklearn(path)


def test_load_refuses_allowed_types_that_are_not_a_fitted_baseline(tmp_path: Path) -> None:
    skops.io.dump({"coef_": np.zeros(3)}, tmp_path / "dict.skops")
    with pytest.raises(UserError, match="holds a dict, not a Ridge or Lasso"):
        baselines.load_sklearn(tmp_path / "dict.skops")
    skops.io.dump(Ridge(), tmp_path / "unfitted.skops")
    with pytest.raises(UserError, match="unfitted Ridge"):
        baselines.load_sklearn(tmp_path / "unfitted.skops")


def test_load_refuses_a_file_that_is_not_skops(tmp_path: Path) -> None:
    path = tmp_path / "junk.skops"
    path.write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a readable skops file"):
        baselines.load_sklearn(path)


def test_card_refuses_a_model_whose_hash_differs(tmp_path: Path, data: dict[str, np.ndarray]) -> None:
    path = tmp_path / "ridge.skops"
    for alpha in (1.0, 2.0):  # the card describes the first model; the second replaces the file
        model = baselines.fit_baseline(baselines.build_baseline("ridge", alpha), data["x"], one_hot(data["y"]))
        baselines.save_sklearn(model, path)
        if alpha == 1.0:
            cards.write_card(
                tmp_path / "ridge.json", name="ridge", model_file=path, fmt="skops", input_kind="flat", params={},
                device="cpu", metrics={}, inputs={},
            )  # fmt: skip
            assert cards.read_card(path, stage="train_baseline@ridge")["sha256"] == cards.file_sha256(path)
    with pytest.raises(UserError, match=r"sha256 differs.*train_baseline@ridge"):
        cards.read_card(path, stage="train_baseline@ridge")


# ------------------------------------------------------------------------------------------- the stage


def _prepared(root: Path) -> list[str]:
    d = make_mnist(n_train=300, n_test=100, seed=2)
    files.save_arrays(root / "data/prepared/train.npz", {"x": d["x_train"], "y": d["y_train"]})
    files.save_arrays(root / "data/prepared/val.npz", {"x": d["x_test"], "y": d["y_test"]})
    return ["--train", "data/prepared/train.npz", "--val", "data/prepared/val.npz"]


def _argv(root: Path, name: str) -> list[str]:
    return [
        "--name", name, *_prepared(root), "--model", f"models/{name}.skops", "--card", f"models/{name}.json",
        "--run", f"models/{name}.run.json",
    ]  # fmt: skip


@pytest.mark.parametrize("name", baselines.BASELINES)
def test_main_writes_model_and_card_and_reads_exactly_its_params(
    stage_dir: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    root = stage_dir()
    views: list[params_lib.StageParams] = []
    real_load = params_lib.load

    def spy(stage: str, *args, **kwargs) -> params_lib.StageParams:
        views.append(real_load(stage, *args, **kwargs))
        return views[-1]

    monkeypatch.setattr(params_lib, "load", spy)
    train_baseline.main(_argv(root, name))

    (view,) = views
    assert view.reads == set(view.flat()) == {k for k in view.flat() if k.startswith(f"baselines.{name}.")}
    card = cards.read_card(root / f"models/{name}.skops", stage=f"train_baseline@{name}")
    assert (card["name"], card["format"], card["input"], card["device"]) == (name, "skops", "flat", "cpu")
    assert card["params"] == view.flat()
    assert set(card["inputs"]) == {"data/prepared/train.npz", "data/prepared/val.npz"}
    assert card["inputs"]["data/prepared/train.npz"] == files.file_md5(root / "data/prepared/train.npz")
    assert card["metrics"]["val_accuracy"] > 0.8 and 0 < card["metrics"]["val_macro_f1"] <= 1
    assert isinstance(baselines.load_sklearn(root / f"models/{name}.skops"), Ridge | Lasso)

    from mlflow.tracking import MlflowClient

    record = cards.read_run(root / f"models/{name}.skops")
    assert set(record) == {"mlflow_run_id", "mlflow_model_uri", "wall_time_s"}
    run = MlflowClient().get_run(record["mlflow_run_id"])
    assert run.data.metrics["val_accuracy"] == pytest.approx(card["metrics"]["val_accuracy"])
    assert run.data.tags["dvc.stage"] == f"train_baseline@{name}"
    assert run.data.params[f"baselines.{name}.alpha"]
    # the scikit-learn flavor, stored with skops: it predicts what the .skops file predicts
    import mlflow

    x = to_flat_input(np.load(root / "data/prepared/val.npz")["x"][:5])
    served = mlflow.sklearn.load_model(record["mlflow_model_uri"])
    assert (
        mlflow.models.get_model_info(record["mlflow_model_uri"]).flavors["sklearn"]["serialization_format"] == "skops"
    )
    saved = baselines.load_sklearn(root / f"models/{name}.skops", stage=f"train_baseline@{name}")
    np.testing.assert_array_equal(served.predict(x), saved.predict(x))


@pytest.mark.slow
def test_main_runs_without_importing_tensorflow(stage_dir: Callable[..., Path]) -> None:
    root = stage_dir()
    argv = _argv(root, "lasso")
    code = (
        "import sys; from stages.train_baseline import main; "
        f"main({argv!r}); "
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'; "
        "assert 'keras' not in sys.modules, 'keras was imported'"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((root / "models/lasso.json").read_text())["file"] == "lasso.skops"


@pytest.mark.parametrize("name", baselines.BASELINES)
def test_gpu_device_is_rejected_at_validation(stage_dir: Callable[..., Path], caplog, name: str) -> None:
    root = stage_dir({f"baselines.{name}.device": "gpu"})
    with pytest.raises(SystemExit) as exc:
        train_baseline.main(_argv(root, name))
    assert exc.value.code == 1
    assert f"baselines.{name}.device" in caplog.text and "CPU only" in caplog.text
    assert not (root / "models").exists()


def test_main_refuses_unknown_name(stage_dir: Callable[..., Path]) -> None:
    root = stage_dir()
    with pytest.raises(SystemExit) as exc:
        train_baseline.main(_argv(root, "svm"))
    assert exc.value.code == 2  # argparse: --name choices
