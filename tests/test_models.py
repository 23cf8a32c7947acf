"""The CNN factory and loader: classic structure, variants, bfloat16 policy, impossible stacks, save/load; and
its optional parts (two convs per block, batch normalisation, per-epoch learning-rate decay), whose defaults
must build exactly the model built without them."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml

from stages.lib import models, training
from stages.lib import params as params_lib
from stages.lib.errors import UserError
from tests.support.mnist import make_mnist
from tests.support.repo import REPO


def _summary(model: keras.Model) -> list[tuple[str, tuple[int | None, ...]]]:
    return [(type(layer).__name__, tuple(layer.output.shape)) for layer in model.layers]


def test_defaults_are_the_classic_keras_convnet() -> None:
    model = models.build_cnn()
    assert _summary(model) == [
        ("Conv2D", (None, 26, 26, 32)),
        ("MaxPooling2D", (None, 13, 13, 32)),
        ("Conv2D", (None, 11, 11, 64)),
        ("MaxPooling2D", (None, 5, 5, 64)),
        ("Conv2D", (None, 3, 3, 64)),
        ("Flatten", (None, 576)),
        ("Dense", (None, 64)),
        ("Dense", (None, 10)),
    ]
    assert model.count_params() == 93322
    assert model.input_shape == (None, 28, 28, 1)
    assert isinstance(model.optimizer, keras.optimizers.Adam)
    assert model.optimizer.learning_rate.numpy() == pytest.approx(1e-3)
    assert model.loss == "categorical_crossentropy"
    assert model.layers[-1].activation is keras.activations.softmax
    assert all(layer.compute_dtype == "float32" for layer in model.layers)
    assert not model.losses  # no regularisation by default


def test_dropout_l2_and_sgd() -> None:
    model = models.build_cnn(dropout=0.25, l2=1e-3, optimizer="sgd", learning_rate=0.05, steps_per_execution=7)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds[-4:] == ["Flatten", "Dropout", "Dense", "Dense"]
    assert model.layers[kinds.index("Dropout")].rate == 0.25
    weighted = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D | keras.layers.Dense)]
    assert all(isinstance(layer.kernel_regularizer, keras.regularizers.L2) for layer in weighted)
    assert weighted[0].kernel_regularizer.l2 == pytest.approx(1e-3)
    assert len(model.losses) == len(weighted)
    assert isinstance(model.optimizer, keras.optimizers.SGD)
    assert model.optimizer.learning_rate.numpy() == pytest.approx(0.05)
    assert model.steps_per_execution == 7
    assert model.count_params() == 93322  # dropout and L2 add no weights


def test_filters_and_kernel_size_shape_the_stack() -> None:
    model = models.build_cnn(filters=[8], kernel_size=5, dense_units=16)
    assert _summary(model) == [
        ("Conv2D", (None, 24, 24, 8)),
        ("Flatten", (None, 24 * 24 * 8)),
        ("Dense", (None, 16)),
        ("Dense", (None, 10)),
    ]
    assert models.feature_map_sizes([32, 64, 64], 4) == [12, 4, 1]


def test_bfloat16_computes_in_bfloat16_and_outputs_float32() -> None:
    model = models.build_cnn(precision="mixed_bfloat16")
    hidden, output = model.layers[:-1], model.layers[-1]
    assert all(layer.compute_dtype == "bfloat16" for layer in hidden)
    assert all(w.dtype == "float32" for w in model.weights)  # weights stay float32
    assert output.compute_dtype == "float32"
    probs = model.predict(np.zeros((2, 28, 28, 1), np.float32), verbose=0)
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    # the policy is per layer: the next model is float32 again
    assert keras.config.dtype_policy().name == "float32"
    assert models.build_cnn().layers[0].compute_dtype == "float32"


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"kernel_size": 5}, "kernel_size = 5"),  # 28 → 24 → 12 → 8 → 4 → 0
        ({"filters": [4, 4, 4, 4]}, "filters = [4, 4, 4, 4]"),  # 28 → 13 → 5 → 1 → 0
        ({"optimizer": "rmsprop"}, "optimizer = 'rmsprop'"),
        ({"precision": "float16"}, "precision = 'float16'"),
    ],
)
def test_configurations_that_cannot_work_name_the_argument(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=re.escape(key)):
        models.build_cnn(**kwargs)


def test_save_is_byte_stable_and_load_restores_the_model(tmp_path: Path) -> None:
    model = models.build_cnn(precision="mixed_bfloat16")
    path = tmp_path / "models" / "cnn.keras"
    models.save_cnn(model, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["cnn.keras"]  # no temp files left
    with zipfile.ZipFile(path) as zf:
        assert {info.date_time for info in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        assert "date_saved" not in json.loads(zf.read("metadata.json"))
    first = path.read_bytes()
    models.save_cnn(model, path)
    assert path.read_bytes() == first

    loaded = models.load_cnn(path)
    assert loaded.layers[0].compute_dtype == "bfloat16"
    x = np.random.default_rng(0).random((4, 28, 28, 1), dtype=np.float32)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_equal_models_built_apart_save_to_equal_bytes(tmp_path: Path) -> None:
    # Keras saves shared objects with their memory address; the factory must not share any. (Clearing the
    # session resets layer names, as a fresh process does.)
    saved = []
    for i in range(2):
        keras.backend.clear_session()
        keras.utils.set_random_seed(0)
        model = models.build_cnn(dropout=0.1, l2=1e-4, precision="mixed_bfloat16")
        models.save_cnn(model, tmp_path / f"{i}.keras")
        saved.append((tmp_path / f"{i}.keras").read_bytes())
    assert saved[0] == saved[1]


def test_load_of_a_broken_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "cnn.keras"
    path.write_bytes(b"not a zip")
    with pytest.raises(UserError, match=r"cnn\.keras: cannot load it"):
        models.load_cnn(path)


# ---------------------------------------------------------------------------------------------- options

OFF = {"convs_per_block": 1, "batch_norm": False, "lr_decay": 1.0}


def test_defaults_in_params_yaml_switch_every_option_off() -> None:
    section = yaml.safe_load((REPO / "params.yaml").read_text())["train_cnn"]
    assert {key: section[key] for key in OFF} == OFF


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
def test_options_off_save_the_same_model_file_as_without_them(precision: str, tmp_path: Path) -> None:
    built = {}
    for name, kwargs in {"plain": {}, "off": {"steps_per_epoch": 100, **OFF}}.items():
        keras.utils.clear_session()  # same auto-generated layer names for both
        keras.utils.set_random_seed(3)
        built[name] = models.build_cnn(precision=precision, **kwargs)
        models.save_cnn(built[name], tmp_path / f"{name}.keras")
    assert _summary(built["off"]) == _summary(built["plain"])
    assert built["off"].optimizer.get_config() == built["plain"].optimizer.get_config()
    for a, b in zip(built["off"].get_weights(), built["plain"].get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert (tmp_path / "off.keras").read_bytes() == (tmp_path / "plain.keras").read_bytes()


def test_two_convs_per_block_with_batch_norm() -> None:
    model = models.build_cnn(filters=[32, 64], convs_per_block=2, batch_norm=True, dense_units=128)
    assert _summary(model) == [
        ("Conv2D", (None, 26, 26, 32)),
        ("BatchNormalization", (None, 26, 26, 32)),
        ("Conv2D", (None, 24, 24, 32)),
        ("BatchNormalization", (None, 24, 24, 32)),
        ("MaxPooling2D", (None, 12, 12, 32)),
        ("Conv2D", (None, 10, 10, 64)),
        ("BatchNormalization", (None, 10, 10, 64)),
        ("Conv2D", (None, 8, 8, 64)),
        ("BatchNormalization", (None, 8, 8, 64)),
        ("Flatten", (None, 8 * 8 * 64)),
        ("Dense", (None, 128)),
        ("BatchNormalization", (None, 128)),
        ("Dense", (None, 10)),
    ]
    assert models.feature_map_sizes([32, 64], 3, convs_per_block=2) == [12, 8]


def test_batch_norm_computes_in_bfloat16_and_keeps_float32_statistics() -> None:
    model = models.build_cnn(batch_norm=True, precision="mixed_bfloat16")
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) == 4  # three convs and the hidden Dense layer
    assert all(layer.compute_dtype == "bfloat16" for layer in norms)
    assert all(w.dtype == "float32" for layer in norms for w in layer.weights)
    assert model.layers[-1].compute_dtype == "float32"


def test_too_many_convs_per_block_names_the_arguments() -> None:
    with pytest.raises(ValueError, match=r"filters = \[32, 64, 64\].*convs_per_block \(now 2\)"):
        models.build_cnn(convs_per_block=2)


def test_lr_decay_multiplies_the_rate_once_per_epoch() -> None:
    model = models.build_cnn(learning_rate=1e-2, lr_decay=0.5, steps_per_epoch=10)
    config = model.optimizer.get_config()["learning_rate"]
    assert config["class_name"] == "ExponentialDecay"
    schedule = keras.optimizers.schedules.deserialize(config)
    # staircase: constant within an epoch of 10 steps, halved at each epoch boundary
    assert [float(schedule(step)) for step in (0, 9, 10, 19, 20)] == pytest.approx([1e-2, 1e-2, 5e-3, 5e-3, 2.5e-3])
    assert float(model.optimizer.learning_rate) == pytest.approx(1e-2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr_decay": 0.0, "steps_per_epoch": 10}, r"lr_decay = 0\.0: expected a factor in \(0, 1\]"),
        ({"lr_decay": 1.5, "steps_per_epoch": 10}, r"lr_decay = 1\.5"),
        ({"lr_decay": 0.9}, r"lr_decay < 1 needs the number of training steps per epoch"),
    ],
)
def test_bad_lr_decay_is_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        models.build_cnn(**kwargs)


def test_train_applies_the_decay_per_epoch_and_batch_norm_learns() -> None:
    data = make_mnist(n_train=300, n_test=100, seed=2)
    batch_size, epochs = 32, 3
    steps = -(-len(data["y_train"]) // batch_size)
    config = training.TrainConfig(
        epochs=epochs, batch_size=batch_size, filters=[8, 16], dense_units=16, batch_norm=True, learning_rate=4e-3,
        lr_decay=0.5,
    )  # fmt: skip
    model, history = training.train(
        data["x_train"], data["y_train"], data["x_test"], data["y_test"], config, seed=0, verbose=0
    )
    assert int(model.optimizer.iterations) == steps * epochs
    assert float(model.optimizer.learning_rate) == pytest.approx(4e-3 * 0.5**epochs)
    assert history["loss"][-1] < history["loss"][0]
    assert any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("convs_per_block", 0, "Input should be greater than or equal to 1"),
        ("convs_per_block", 4, "Input should be less than or equal to 3"),
        ("batch_norm", "yes", "Input should be a valid boolean"),
        ("lr_decay", 0.0, "Input should be greater than 0"),
        ("lr_decay", 1.1, "Input should be less than or equal to 1"),
    ],
)
def test_params_validation_names_the_new_keys(key: str, value: object, message: str) -> None:
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["train_cnn"][key] = value
    with pytest.raises(UserError, match=rf"params\.yaml: train_cnn\.{key} = .*{message}"):
        params_lib.validate(data, Path("params.yaml"))
