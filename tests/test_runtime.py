"""Device placement and seeding."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from stages.lib import files, runtime, tflog
from stages.lib.errors import UserError
from tests.support.mnist import make_mnist
from tests.support.repo import REPO, set_params


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


# ------------------------------------------------------------------------------------------- TensorFlow's log

CPP_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")  # absl's C++ log prefix: severity, date, time


def _augment(root: Path, log_level: str) -> subprocess.CompletedProcess[str]:
    set_params(root / "params.yaml", {"augment.device": "cpu", "settings.log_level": log_level})
    files.save_arrays(root / "train.npz", {"x": make_mnist(20, 1)["x_train"], "y": make_mnist(20, 1)["y_train"]})
    args = ["--train", "train.npz", "--out", "out/train.npz", "--preview", "out/preview.png"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return subprocess.run(
        ["sh", str(REPO / "stages" / "run"), "augment", *args], cwd=root, env=env, capture_output=True, text=True
    )


@pytest.mark.slow
def test_a_tensorflow_stage_prints_no_cpp_log_lines(stage_dir: Callable[..., Path]) -> None:
    """TensorFlow's start-up lines (CUDA not found, cuInit 303, oneDNN, CPU features, absl's preamble) are gone
    from a stage's stderr at the default log level; DEBUG brings them back."""
    quiet = _augment(stage_dir(), "INFO")
    assert quiet.returncode == 0, quiet.stderr
    lines = quiet.stderr.splitlines()
    assert [line for line in lines if CPP_LINE.match(line) or "absl::InitializeLog" in line] == [], quiet.stderr
    assert sum("running on the CPU" in line or "Augmented" in line for line in lines) >= 1  # the stage's own log
    loud = _augment(stage_dir(), "DEBUG")
    assert loud.returncode == 0, loud.stderr
    if not Path("/proc/driver/nvidia").exists():  # without a GPU driver TensorFlow says so, in C++
        assert any(CPP_LINE.match(line) for line in loud.stderr.splitlines()), loud.stderr


def test_the_filter_drops_only_tensorflows_known_start_up_lines() -> None:
    known = [
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "I0000 00:00:1796218559.883878   18871 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU "
        "will not be used.",
        "E0000 00:00:1796214523.804343    5456 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: "
        "Failed call to cuInit: UNKNOWN ERROR (303)",
        "I0000 00:00:1.5 1 port.cc:153] oneDNN custom operations are on. You may see slightly different numerical "
        "results due to floating-point round-off errors from different computation orders.",
    ]
    kept = [
        "E0000 00:00:1796214523.804343    5456 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: "
        "Failed call to cuInit: CUDA_ERROR_UNKNOWN: unknown error (999)",  # a broken driver: a real failure
        "F0000 00:00:1.0 1 check.cc:1] Check failed: x == y",
        "Traceback (most recent call last):",
        "12:00:00 ERROR stages.augment: something the user must see",
    ]
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", tflog.FILTER],
        input="\n".join(known + kept) + "\n",
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.splitlines() == kept
