"""The CNN's optional parts: two convs per block, batch normalisation, per-epoch learning-rate decay.

Their defaults must build exactly the model built without them; each option must do what it says, in
build_cnn, through train(), and from params.yaml.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import yaml

from stages import train_cnn
from stages.lib import models
from stages.lib import params as params_lib
from stages.lib.errors import UserError
from tests.conftest import REPO
from tests.mnist_fixture import make_mnist
from tests.test_models import _summary

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


def test_too_many_convs_per_block_is_a_user_error_naming_the_keys() -> None:
    with pytest.raises(UserError, match=r"train_cnn\.filters = \[32, 64, 64\].*convs_per_block \(now 2\)"):
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
        ({"lr_decay": 0.0, "steps_per_epoch": 10}, r"train_cnn\.lr_decay = 0\.0: expected a factor in \(0, 1\]"),
        ({"lr_decay": 1.5, "steps_per_epoch": 10}, r"train_cnn\.lr_decay = 1\.5"),
        ({"lr_decay": 0.9}, r"train_cnn\.lr_decay < 1 needs the number of training steps per epoch"),
    ],
)
def test_bad_lr_decay_is_a_user_error(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(UserError, match=message):
        models.build_cnn(**kwargs)


def test_train_applies_the_decay_per_epoch_and_batch_norm_learns() -> None:
    data = make_mnist(n_train=300, n_test=100, seed=2)
    batch_size, epochs = 32, 3
    steps = -(-len(data["y_train"]) // batch_size)
    model, history = train_cnn.train(
        data["x_train"],
        data["y_train"],
        data["x_test"],
        data["y_test"],
        seed=0,
        verbose=0,
        epochs=epochs,
        batch_size=batch_size,
        filters=[8, 16],
        dense_units=16,
        batch_norm=True,
        learning_rate=4e-3,
        lr_decay=0.5,
        steps_per_epoch=steps,
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
