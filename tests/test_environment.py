"""The environment as an input: versions.yaml written from what is installed, checked by the stages that
declare its entries, and recorded with the machine in cards and runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from stages.lib import environment
from stages.lib import params as params_lib
from stages.lib.errors import UserError
from tests.support.repo import REPO


def test_the_committed_file_is_what_make_setup_writes_here() -> None:
    assert (REPO / "versions.yaml").read_text() == environment.render(environment.installed())


def test_write_records_the_installed_versions_and_reports_changes(tmp_path: Path) -> None:
    changes = environment.write(tmp_path)
    assert set(changes) == {"python", *environment.PACKAGES}
    text = (tmp_path / "versions.yaml").read_text()
    assert yaml.safe_load(text) == environment.installed()
    assert environment.write(tmp_path) == {}  # equal versions: nothing rewritten
    (tmp_path / "versions.yaml").write_text(text.replace(environment.installed()["keras"], "0.1"))
    assert environment.write(tmp_path) == {"keras": ("0.1", environment.installed()["keras"])}
    assert (tmp_path / "versions.yaml").read_text() == text


def test_a_stage_refuses_versions_it_declares_that_are_not_installed(stage_dir: Callable[..., Path]) -> None:
    root = stage_dir()
    installed = environment.installed()
    text = (root / "versions.yaml").read_text()
    (root / "versions.yaml").write_text(text.replace(f'tensorflow: "{installed["tensorflow"]}"', 'tensorflow: "2.0.0"'))
    with pytest.raises(UserError) as info:
        params_lib.load("train_cnn")
    message = str(info.value)
    assert "versions.yaml: stage 'train_cnn'" in message
    assert f"tensorflow 2.0.0 recorded, {installed['tensorflow']} installed" in message
    assert "make setup" in message
    params_lib.load("prepare")  # prepare does not use TensorFlow


def test_the_machine_is_described() -> None:
    described = environment.describe()
    assert described["tensorflow"] == environment.installed()["tensorflow"]
    assert described["cpu"] and described["cpu_cores"] >= 1
    assert set(described["cpu_features"]) <= {
        "avx2",
        "fma",
        "avx512f",
        "avx512_bf16",
        "avx512_vnni",
        "amx_bf16",
        "amx_tile",
    }
