"""The CNN factory and loader: classic structure, variants, bfloat16 policy, impossible stacks, save/load."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest

from stages.lib import models
from stages.lib.errors import UserError


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
        ({"kernel_size": 5}, "train_cnn.kernel_size"),  # 28 → 24 → 12 → 8 → 4 → 0
        ({"filters": [4, 4, 4, 4]}, "train_cnn.filters"),  # 28 → 13 → 5 → 1 → 0
        ({"optimizer": "rmsprop"}, "train_cnn.optimizer"),
        ({"precision": "float16"}, "train_cnn.precision"),
    ],
)
def test_configurations_that_cannot_work_name_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
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
