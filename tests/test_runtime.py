"""Device placement and seeding."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from stages.lib import files, runtime
from stages.lib.errors import UserError
from tests.support.mnist import make_mnist
from tests.support.repo import REPO


@pytest.fixture(autouse=True)
def _restore_cuda_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


@pytest.mark.slow
def test_cpu_hides_gpus_before_tensorflow_loads() -> None:
    code = (
        "import sys; from stages.lib import runtime\n"
        "assert runtime.resolve_device('augment', 'augment.device', 'cpu', True) == 'cpu'\n"
        "assert 'tensorflow' not in sys.modules\n"
        "import os; assert os.environ['CUDA_VISIBLE_DEVICES'] == '-1'\n"
        "import tensorflow as tf; assert tf.config.list_physical_devices('GPU') == []\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True)


def test_cpu_only_stage_never_imports_tensorflow() -> None:
    code = (
        "import sys; from stages.lib import runtime\n"
        "assert runtime.resolve_device('prepare', 'prepare.device', 'auto', False) == 'cpu'\n"
        "assert 'tensorflow' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True)


def test_auto_falls_back_to_cpu_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    assert runtime.resolve_device("train_cnn", "train_cnn.device", "auto", True) == "cpu"
    assert "no GPU visible, running on the CPU" in caplog.text


def test_gpu_without_gpu_is_one_clear_error() -> None:
    with pytest.raises(UserError) as info:
        runtime.resolve_device("train_cnn", "train_cnn.device", "gpu", True)
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert "stage 'train_cnn'" in message
    assert "dvc exp run -S train_cnn.device=auto" in message


@pytest.mark.slow
def test_gpu_stage_stops_before_writing_anything(stage_dir: Callable[..., Path]) -> None:
    root = stage_dir({"augment.device": "gpu"})
    files.save_arrays(root / "train.npz", {"x": make_mnist(20, 1)["x_train"], "y": make_mnist(20, 1)["y_train"]})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = ["--train", "train.npz", "--out", "out/train.npz", "--preview", "out/preview.png"]
    result = subprocess.run(
        ["sh", str(REPO / "stages" / "run"), "augment", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if " ERROR stages." in line]
    assert len(errors) == 1, result.stderr
    assert "augment.device is 'gpu' but TensorFlow sees no GPU" in errors[0]
    assert not (root / "out").exists()


def test_seed_everything_repeats_draws() -> None:
    runtime.seed_everything(7)
    first = (random.random(), np.random.rand())
    runtime.seed_everything(7)
    assert (random.random(), np.random.rand()) == first
