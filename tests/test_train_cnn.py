"""train_cnn: learning, determinism, early stopping, and the stage's outputs (model, card, history, MLflow)."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import pytest

from stages import train_cnn
from stages.lib import cards, files, models, training
from stages.lib import params as params_lib
from stages.lib.errors import UserError
from stages.lib.preprocess import one_hot, to_model_input
from tests.support.mnist import make_mnist
from tests.support.repo import REPO

# A small model keeps each fit at a second or two; the stage test uses the real defaults
SMALL = {"filters": [8, 16], "dense_units": 16, "batch_size": 32}


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    return make_mnist(n_train=400, n_test=100, seed=1)


RUN_KEYS = ("seed", "verbose", "backup_dir", "callbacks")


def _fit(data: dict[str, np.ndarray], y_val: np.ndarray | None = None, **kwargs):
    """training.train on ``data`` with the SMALL model; ``kwargs`` are TrainConfig fields or train()'s own."""
    y_val = data["y_test"] if y_val is None else y_val
    run = {"seed": 0, "verbose": 0, **{k: v for k, v in kwargs.items() if k in RUN_KEYS}}
    config = training.TrainConfig(**{**SMALL, **{k: v for k, v in kwargs.items() if k not in RUN_KEYS}})
    return training.train(data["x_train"], data["y_train"], data["x_test"], y_val, config, **run)


def test_train_learns_tiny_data(data: dict[str, np.ndarray]) -> None:
    model, history = _fit(data, epochs=3, learning_rate=3e-3)
    assert set(history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert all(len(v) == 3 for v in history.values())
    assert history["loss"][2] < history["loss"][0]
    assert history["val_accuracy"][-1] > 0.5  # chance is 0.1
    predicted = model.predict(to_model_input(data["x_test"]), verbose=0).argmax(axis=1)
    assert np.mean(predicted == data["y_test"]) == pytest.approx(history["val_accuracy"][-1])


def test_train_bfloat16_with_more_steps_per_execution_than_steps(data: dict[str, np.ndarray]) -> None:
    # 400 images at batch 32 are 13 steps per epoch, fewer than one execution of 50
    model, history = _fit(data, epochs=2, precision="mixed_bfloat16", steps_per_execution=50, learning_rate=3e-3)
    assert model.layers[0].compute_dtype == "bfloat16"
    assert len(history["loss"]) == 2 and history["loss"][1] < history["loss"][0]


@pytest.mark.slow  # two or more trainings compared
def test_train_is_deterministic_for_a_seed(data: dict[str, np.ndarray]) -> None:
    first, h1 = _fit(data, epochs=1, seed=5, dropout=0.2)
    second, h2 = _fit(data, epochs=1, seed=5, dropout=0.2)
    other, _ = _fit(data, epochs=1, seed=6, dropout=0.2)
    assert h1 == h2
    for a, b in zip(first.get_weights(), second.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first.get_weights()[0], other.get_weights()[0])


def test_pipeline_converts_each_batch_exactly_like_to_model_input() -> None:
    import tensorflow as tf

    # Every uint8 value: the tensor path of to_model_input (training) equals its NumPy path (evaluation)
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    assert np.array_equal(to_model_input(tf.constant(pixels)).numpy(), to_model_input(pixels))

    # The training batches are to_model_input/one_hot of the examples in the epoch's order, bit for bit
    tiny = make_mnist(n_train=70, n_test=0, seed=4)
    x, y = tiny["x_train"], tiny["y_train"]
    order = tf.Variable(training.epoch_order(len(y), seed=3, epoch=1))
    got = list(training.batches(x, y, batch_size=32, order=order).as_numpy_iterator())
    assert [len(labels) for _, labels in got] == [32, 32, 6]
    index = training.epoch_order(len(y), seed=3, epoch=1)
    images, labels = np.concatenate([b[0] for b in got]), np.concatenate([b[1] for b in got])
    assert images.dtype == np.float32 and np.array_equal(images, to_model_input(x[index]))
    assert np.array_equal(labels, one_hot(y[index]))
    in_order = np.concatenate([b[0] for b in training.batches(x, y, batch_size=32).as_numpy_iterator()])
    assert np.array_equal(in_order, to_model_input(x))


def test_epoch_order_and_seeds_depend_on_seed_and_epoch_only() -> None:
    first = training.epoch_order(1000, seed=7, epoch=2)
    assert sorted(first) == list(range(1000))
    assert np.array_equal(first, training.epoch_order(1000, seed=7, epoch=2))
    assert not np.array_equal(first, training.epoch_order(1000, seed=7, epoch=3))
    assert not np.array_equal(first, training.epoch_order(1000, seed=8, epoch=2))
    seeds = {training.epoch_seed(7, epoch, stream) for epoch in range(3) for stream in range(2)}
    assert len(seeds) == 6 and training.epoch_seed(7, 1, 0) == training.epoch_seed(7, 1, 0)
    assert all(0 <= s < 2**31 - 1 for s in seeds)


@pytest.mark.slow  # two or more trainings compared
def test_resumed_training_equals_uninterrupted_training(data: dict[str, np.ndarray], tmp_path: Path) -> None:
    # Dropout and bfloat16 on: every epoch's order and dropout masks must not depend on the epochs before
    kwargs = {"dropout": 0.3, "precision": "mixed_bfloat16", "steps_per_execution": 5, "learning_rate": 3e-3}
    straight, h_straight = _fit(data, epochs=4, **kwargs)
    backup = tmp_path / "backup"
    _fit(data, epochs=2, backup_dir=backup, **kwargs)  # stops after 2 of the epochs, leaving its backup
    resumed, h_resumed = _fit(data, epochs=4, backup_dir=backup, **kwargs)
    assert h_resumed == h_straight
    for a, b in zip(straight.get_weights(), resumed.get_weights(), strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize(
    ("requested", "gpus", "used"),
    [("auto", 0, "single"), ("auto", 1, "single"), ("auto", 2, "mirrored"), ("single", 4, "single"),
     ("mirrored", 0, "mirrored"), ("mirrored", 1, "mirrored")],
)  # fmt: skip
def test_resolve_strategy(requested: str, gpus: int, used: str) -> None:
    assert training.resolve_strategy(requested, gpus) == used


@pytest.mark.parametrize(
    ("requested", "features", "used"),
    [("auto", ["avx2", "fma"], "float32"), ("auto", ["avx512f", "avx512_bf16"], "mixed_bfloat16"),
     ("auto", ["amx_bf16"], "mixed_bfloat16"), ("float32", ["amx_bf16"], "float32"),
     ("mixed_bfloat16", ["avx2"], "mixed_bfloat16")],
)  # fmt: skip
def test_precision_auto_is_bfloat16_only_where_the_cpu_has_it(
    requested: str, features: list[str], used: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stages.lib import environment

    monkeypatch.setattr(environment, "cpu_features", lambda: features)
    assert training.resolve_precision(requested) == used  # no GPU here


def test_unknown_strategy_is_refused() -> None:
    with pytest.raises(ValueError, match=r"strategy = 'tpu': expected one of auto, single, mirrored"):
        training.resolve_strategy("tpu", 0)


def test_auto_strategy_without_gpu_trains_on_one_device_without_xla(data: dict[str, np.ndarray]) -> None:
    import tensorflow as tf

    assert not tf.config.list_logical_devices("GPU")
    model, _ = _fit(data, epochs=1, strategy="auto")
    assert training.strategy_name(model.distribute_strategy) == "single"
    assert not isinstance(model.distribute_strategy, tf.distribute.MirroredStrategy)
    assert model.distribute_strategy.num_replicas_in_sync == 1
    assert not model.jit_compile  # XLA is slower than TensorFlow's kernels for this model on the CPU


@pytest.mark.slow  # two or more trainings compared
def test_micro_batches_make_the_update_of_the_whole_batch(data: dict[str, np.ndarray]) -> None:
    # float32 and no dropout, so the only difference is rounding; the L2 term checks the loss weighting. After
    # an epoch (13 Adam steps) rounding moved weights by up to 7e-5 on an AVX2 CPU (kernels sum in another
    # order than on AVX-512); dropping the weighting of the micro-batch losses moves them by 7e-3 or more
    kwargs = {"epochs": 1, "l2": 1e-3, "learning_rate": 3e-3, "steps_per_execution": 4}
    whole, h_whole = _fit(data, micro_batches=1, **kwargs)
    for parts in (2, 3):  # 3 does not divide the batch of 32, nor the last batch of 16
        split, h_split = _fit(data, micro_batches=parts, **kwargs)
        assert "micro_batch_step" in split.train_step.__qualname__
        for a, b in zip(whole.get_weights(), split.get_weights(), strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-3)
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            np.testing.assert_allclose(h_split[key], h_whole[key], rtol=1e-4, atol=1e-6)
    assert "micro_batch_step" not in whole.train_step.__qualname__


@pytest.mark.slow  # two or more trainings compared
def test_micro_batches_are_deterministic_with_dropout_and_bfloat16(data: dict[str, np.ndarray]) -> None:
    kwargs = {"epochs": 1, "dropout": 0.3, "precision": "mixed_bfloat16", "micro_batches": 2, "seed": 3}
    first, h1 = _fit(data, **kwargs)
    second, h2 = _fit(data, **kwargs)
    assert h1 == h2
    for a, b in zip(first.get_weights(), second.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_micro_batches_apply_on_the_cpu_with_one_replica_only() -> None:
    assert training.micro_batches_used(2, "auto") == 2  # no GPU here
    assert training.micro_batches_used(2, "single") == 2
    assert training.micro_batches_used(2, "mirrored") == 1  # replicas split each batch already


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"micro_batches": 40}, r"micro_batches = 40 is more than batch_size = 32"),
        ({"micro_batches": 2, "batch_norm": True}, r"micro_batches = 2 with batch_norm = true"),
        ({"filters": [8, 16, 16, 16]}, r"filters = \[8, 16, 16, 16\] with kernel_size = 3: conv layer 4"),
    ],
)
def test_impossible_settings_are_refused_before_training(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        training.TrainConfig(**{**SMALL, **kwargs})


def test_settings_from_params_read_every_key_and_name_the_section(stage_context) -> None:
    ctx = stage_context("train_cnn")
    config = training.TrainConfig.from_params(ctx.params.train_cnn)
    assert config.epochs == 1 and config.precision == "auto"  # TINY, and params.yaml's default
    assert ctx.params.reads == {f"train_cnn.{key}" for key in [*config.as_dict(), "device"]}
    bad = stage_context("train_cnn", {"train_cnn.micro_batches": 2, "train_cnn.batch_norm": True})
    with pytest.raises(UserError, match=r"^params\.yaml: train_cnn: micro_batches = 2 with batch_norm = true"):
        training.TrainConfig.from_params(bad.params.train_cnn)


MICRO_BATCHES_IN_A_NEW_PROCESS = """
import json, logging
import tensorflow as tf
from stages.lib import environment, runtime, training
from tests.support.mnist import make_mnist

logging.basicConfig(level=logging.WARNING)
d = make_mnist(n_train=100, n_test=20, seed=1)
config = training.TrainConfig(epochs=1, micro_batches=2, filters=[8], dense_units=8, batch_size=32)
model, _ = training.train(d["x_train"], d["y_train"], d["x_test"], d["y_test"], config, seed=0, verbose=0)
threading = tf.config.threading
threads = [threading.get_intra_op_parallelism_threads(), threading.get_inter_op_parallelism_threads()]
print(json.dumps({
    "threads": threads,
    "cores": environment.cpu_cores(),
    "step": model.train_step.__qualname__,
    "same_again": runtime.set_cpu_threads(*threads),
    "other_now": runtime.set_cpu_threads(threads[0] + 1, threads[1]),
}))
"""


def _in_new_process(script: str) -> tuple[dict, str]:
    """Run ``script`` in a fresh Python process on the CPU; return the JSON of its last stdout line and its stderr."""
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "-1", "TF_CPP_MIN_LOG_LEVEL": "2"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


@pytest.mark.slow
def test_micro_batches_set_the_thread_pools_before_tensorflow_starts() -> None:
    out, stderr = _in_new_process(MICRO_BATCHES_IN_A_NEW_PROCESS)
    assert out["threads"] == [max(1, out["cores"] // 2), 2]  # two ops at once, the cores shared between them
    assert "micro_batch_step" in out["step"]
    assert out["same_again"] is True
    assert out["other_now"] is False and "keeping its thread pools" in stderr


def test_batches_run_without_tf_data_autotuning() -> None:
    # Autotuning's thread made each epoch's iterator take seconds to destroy (BENCHMARKS.md)
    tiny = make_mnist(n_train=10, n_test=0, seed=4)
    dataset = training.batches(tiny["x_train"], tiny["y_train"], batch_size=4)
    assert dataset.options().autotune.enabled is False


MIRRORED_ON_TWO_CPUS = """
import json, sys
import tensorflow as tf

# Two logical CPU devices, configured before TensorFlow initialises its devices
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

from stages.lib import training
from tests.support.mnist import make_mnist

d = make_mnist(n_train=300, n_test=60, seed=1)
config = training.TrainConfig(
    epochs=2, strategy="mirrored", filters=[8, 16], dense_units=16, batch_size=32, dropout=0.2, learning_rate=3e-3,
    steps_per_execution=4,
)
model, history = training.train(d["x_train"], d["y_train"], d["x_test"], d["y_test"], config, seed=0, verbose=0)
strategy = model.distribute_strategy
print(json.dumps({
    "name": training.strategy_name(strategy),
    "replicas": strategy.num_replicas_in_sync,
    "devices": list(strategy.extended.worker_devices),
    "steps_per_execution": model.steps_per_execution,
    "history": history,
}))
"""


@pytest.mark.slow
def test_mirrored_strategy_trains_on_two_logical_cpus() -> None:
    out, stderr = _in_new_process(MIRRORED_ON_TWO_CPUS)
    assert out["name"] == "mirrored" and out["replicas"] == 2
    assert [d.rsplit(":", 2)[-2:] for d in out["devices"]] == [["CPU", "0"], ["CPU", "1"]]
    assert out["steps_per_execution"] == 1  # Keras' multi-step call fails on several replicas
    assert "using 1" in stderr
    losses = out["history"]["loss"]
    assert all(math.isfinite(v) for v in losses) and losses[1] < losses[0]


def test_early_stopping_stops_and_keeps_the_best_epoch(data: dict[str, np.ndarray]) -> None:
    # Validation labels are all wrong, so validation loss rises as the model learns the training data
    wrong = (data["y_test"] + 1) % 10
    model, history = _fit(data, y_val=wrong, epochs=10, early_stopping_patience=1, learning_rate=3e-3)
    assert len(history["val_loss"]) < 10
    best = training.best_epoch(history, early_stopping_patience=1)
    assert history["val_loss"][best] == min(history["val_loss"])
    assert best < len(history["val_loss"]) - 1
    # restore_best_weights: the model is the best epoch's, not the last one's
    val_loss, _ = model.evaluate(to_model_input(data["x_test"]), one_hot(wrong), verbose=0)
    assert val_loss == pytest.approx(history["val_loss"][best], rel=1e-4)


def test_best_epoch_and_history_csv() -> None:
    history = {
        "loss": [2.0, 1.0, 0.5],
        "accuracy": [0.1, 0.5, 0.9],
        "val_loss": [1.0, 0.4, 0.6],
        "val_accuracy": [0.2, 0.8, 0.7],
    }
    assert training.best_epoch(history, early_stopping_patience=0) == 2
    assert training.best_epoch(history, early_stopping_patience=2) == 1
    rows = list(csv.DictReader(train_cnn.history_csv(history).splitlines()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert list(rows[0]) == ["epoch", "loss", "accuracy", "val_loss", "val_accuracy"]
    assert float(rows[1]["val_loss"]) == 0.4


def _splits(root: Path) -> tuple[Path, Path]:
    tiny = make_mnist(n_train=200, n_test=50, seed=2)
    train, val = root / "data" / "train.npz", root / "data" / "val.npz"
    files.save_arrays(train, {"x": tiny["x_train"], "y": tiny["y_train"]})
    files.save_arrays(val, {"x": tiny["x_test"], "y": tiny["y_test"]})
    return train, val


def _args(train: Path, val: Path) -> list[str]:
    return [
        "--train", str(train), "--val", str(val), "--model", "models/cnn.keras",
        "--card", "models/cnn.json", "--run", "models/cnn.run.json", "--history", "plots/train_cnn/history.csv",
    ]  # fmt: skip


def test_main_writes_model_card_history_and_tracks_them(
    stage_dir: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = stage_dir({"train_cnn.epochs": 2})
    train, val = _splits(root)
    views = []
    real_load = params_lib.load
    monkeypatch.setattr(params_lib, "load", lambda stage: views.append(real_load(stage)) or views[-1])

    train_cnn.main(_args(train, val))

    model_file = root / "models" / "cnn.keras"
    card = json.loads((root / "models" / "cnn.json").read_text())
    assert card["sha256"] == cards.file_sha256(model_file)
    assert cards.read_card(model_file, "train_cnn") == card
    assert (card["name"], card["file"], card["format"], card["input"]) == ("cnn", "cnn.keras", "keras", "image")
    assert card["device"] == "cpu"
    assert card["inputs"] == {str(train): files.file_md5(train), str(val): files.file_md5(val)}
    assert card["params"]["train_cnn.epochs"] == 2 and card["params"]["base.seed"] == 42
    assert card["epochs_run"] == 2 and card["train_size"] == 200
    assert (card["strategy"], card["replicas"], card["jit_compile"]) == ("single", 1, False)
    assert card["micro_batches"] == 2  # params.yaml's default, on a CPU

    rows = list(csv.DictReader((root / "plots" / "train_cnn" / "history.csv").read_text().splitlines()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert card["metrics"]["val_accuracy"] == pytest.approx(float(rows[-1]["val_accuracy"]), abs=1e-6)

    record = cards.read_run(model_file)
    run = mlflow.get_run(record["mlflow_run_id"])
    assert run.data.tags["dvc.stage"] == "train_cnn"
    client = mlflow.MlflowClient()
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
    assert sorted(steps) == [1, 2]
    assert run.data.metrics["best_epoch"] == 2 and run.data.metrics["epochs_run"] == 2
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"cnn.json", "history.csv"} <= artifacts
    # the MLflow model: signature of the preprocessed images, and it predicts like the saved .keras file
    logged = mlflow.models.get_model_info(record["mlflow_model_uri"])
    assert logged.run_id == run.info.run_id
    assert tuple(logged.signature.inputs.inputs[0].shape) == (-1, 28, 28, 1)
    x = to_model_input(np.load(val)["x"][:4])
    served = np.asarray(mlflow.pyfunc.load_model(record["mlflow_model_uri"]).predict(x))
    np.testing.assert_allclose(served, models.load_cnn(model_file).predict(x, verbose=0), atol=1e-6)
    assert {i.dataset.digest for i in run.inputs.dataset_inputs} == set(card["inputs"].values())

    # every declared key is read, and nothing else
    (view,) = views
    assert view.reads == set(view.flat())

    probs = models.load_cnn(model_file).predict(to_model_input(np.load(val)["x"][:5]), verbose=0)
    assert probs.shape == (5, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_main_missing_input_names_the_stage_to_rerun(stage_dir: Callable[..., Path], caplog) -> None:
    root = stage_dir()
    _, val = _splits(root)
    with pytest.raises(SystemExit) as info:
        train_cnn.main(_args(root / "nope.npz", val))
    assert info.value.code == 1
    assert "nope.npz: file not found" in caplog.text and "dvc repro --force augment" in caplog.text
    assert not (root / "models").exists()


def test_main_impossible_stack_writes_nothing(stage_dir: Callable[..., Path], caplog) -> None:
    root = stage_dir({"train_cnn.kernel_size": 5})
    train, val = _splits(root)
    with pytest.raises(SystemExit) as info:
        train_cnn.main(_args(train, val))
    assert info.value.code == 1
    assert "params.yaml: train_cnn: filters = [32, 64, 64] with kernel_size = 5" in caplog.text
    assert not (root / "models").exists() and not (root / "plots").exists()


def test_main_wants_a_keras_model_path(stage_dir: Callable[..., Path]) -> None:
    root = stage_dir()
    train, val = _splits(root)
    args = _args(train, val)
    args[args.index("models/cnn.keras")] = "models/cnn.h5"
    with pytest.raises(SystemExit) as info:
        train_cnn.main(args)
    assert info.value.code == 2
