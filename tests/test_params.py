"""The params contract: declared keys only, validated values, errors that name file, key, value and fix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from stages.lib import params as P
from stages.lib import pipeline as pipeline_lib
from stages.lib.errors import UserError
from tests.support.repo import REPO

ALL_STAGES = [
    "fetch",
    "prepare",
    "augment",
    "train_cnn",
    "train_baseline@ridge",
    "train_baseline@lasso",
    "evaluate",
]


def _raw() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def _errors_for(data: object) -> str:
    with pytest.raises(UserError) as info:
        P.validate(data, Path("params.yaml"))
    return str(info.value)


def test_repository_params_are_valid() -> None:
    P.validate(_raw(), Path("params.yaml"))


def test_declared_params_match_dvc_own_reading() -> None:
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    with Repo(str(REPO)) as repo:
        dvc_view = {
            (stage.addressing, Path(d.def_path).name): tuple(d.params)
            for stage in repo.index.stages
            for d in stage.deps
            if isinstance(d, ParamsDependency)
        }
    assert sorted({stage for stage, _ in dvc_view}) == sorted(ALL_STAGES)
    for (stage, params_file), keys in dvc_view.items():
        assert pipeline_lib.declared_params(stage, pipeline, params_file=params_file) == keys, (stage, params_file)


def test_view_exposes_declared_keys_and_settings_only() -> None:
    view = P.load("augment", REPO)
    assert view.augment.rotation_deg == _raw()["augment"]["rotation_deg"]
    assert view.base.seed == _raw()["base"]["seed"]
    assert view.settings.mlflow_experiment
    with pytest.raises(P.UndeclaredParamError, match=r"'prepare'.*dvc.yaml"):
        _ = view.prepare
    with pytest.raises(P.UndeclaredParamError, match="base.other"):
        _ = view.base.other


def test_view_records_leaf_reads_but_not_settings_or_flat() -> None:
    view = P.load("train_baseline@lasso", REPO)
    flat = view.flat()
    assert set(flat) == {
        "baselines.lasso.device",
        "baselines.lasso.alpha",
        "baselines.lasso.max_iter",
        "baselines.lasso.tol",
    }
    assert view.reads == frozenset()
    _ = view.baselines.lasso.alpha
    _ = view.settings.log_level
    assert view.reads == {"baselines.lasso.alpha"}
    with pytest.raises(P.UndeclaredParamError):
        _ = view.baselines.ridge


def test_dvc_stage_env_must_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DVC_STAGE", "prepare")
    with pytest.raises(UserError, match="cmd in dvc.yaml"):
        P.load("augment", REPO)
    monkeypatch.setenv("DVC_STAGE", "augment")
    assert P.load("augment", REPO).augment.copies >= 0


def test_unknown_stage_and_foreach_item() -> None:
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    with pytest.raises(UserError, match="no stage named 'nope'"):
        pipeline_lib.declared_params("nope", pipeline)
    with pytest.raises(UserError, match="foreach"):
        pipeline_lib.declared_params("train_baseline@svm", pipeline)


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("augment", "rotation_deg", 270, r"augment.rotation_deg = 270: .*less than or equal to 180"),
        ("train_cnn", "epochs", 0, r"train_cnn.epochs = 0: .*greater than or equal to 1"),
        ("train_cnn", "epochs", "5", r"train_cnn.epochs = '5': .*valid integer"),
        ("train_cnn", "optimizer", "rmsprop", r"train_cnn.optimizer = 'rmsprop': .*'adam' or 'sgd'"),
        ("augment", "device", "tpu", r"augment.device = 'tpu': .*'cpu', 'gpu' or 'auto'"),
        ("prepare", "device", "gpu", r"prepare.device = 'gpu': .*CPU only"),
        ("fetch", "content_sha256", "abc", r"fetch.content_sha256 = 'abc': .*pattern"),
    ],
)
def test_bad_values_name_file_key_value_and_form(section: str, key: str, value: object, message: str) -> None:
    data = _raw()
    data[section][key] = value
    error = _errors_for(data)
    assert error.startswith("params.yaml: ")
    assert len(error.splitlines()) == 1
    assert re.search(message, error), error


def test_baselines_reject_gpu_saying_why() -> None:
    data = _raw()
    data["baselines"]["lasso"]["device"] = "gpu"
    assert "baselines.lasso.device = 'gpu'" in _errors_for(data)
    assert "CPU only" in _errors_for(data)


def test_lasso_alpha_must_be_positive() -> None:
    data = _raw()
    data["baselines"]["lasso"]["alpha"] = 0
    assert "baselines.lasso.alpha = 0: Input should be greater than 0" in _errors_for(data)


def test_unknown_and_missing_keys() -> None:
    data = _raw()
    data["augment"]["rotaton_deg"] = 5
    del data["evaluate"]
    error = _errors_for(data)
    assert "params.yaml: augment.rotaton_deg: unknown key" in error
    assert "params.yaml: evaluate: missing" in error


def test_not_a_mapping() -> None:
    assert "expected a mapping of sections" in _errors_for(["a", "b"])


def test_malformed_yaml_names_line(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("base:\n  seed: [1, 2\nsettings: {}\n")
    (tmp_path / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    with pytest.raises(UserError, match=r"params.yaml line \d+, column \d+: not valid YAML"):
        P.load("prepare", tmp_path)


def test_missing_params_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="params file not found"):
        P.load("prepare", tmp_path)


def test_declared_key_absent_from_params(tmp_path: Path) -> None:
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    pipeline["stages"]["prepare"]["params"].append("prepare.nonexistent")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(pipeline))
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    with pytest.raises(UserError, match="declares params key 'prepare.nonexistent'"):
        P.load("prepare", tmp_path)
