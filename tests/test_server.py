"""Server mode: stages and the whole pipeline log to a real `mlflow server` process on 127.0.0.1."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from stages import prepare
from stages.lib import files
from tests.support.mnist import make_mnist
from tests.support.repo import ALL_STAGES, children, command_env, parents, tiny_repo
from tests.support.servers import mlflow_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with mlflow_server(tmp_path_factory.mktemp("server")) as uri:
        yield uri


def test_stage_logs_to_the_server(server: str, stage_dir: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    root = stage_dir({"prepare.val_size": 20, "settings.mlflow_experiment": "server-test"})
    files.save_arrays(root / "mnist.npz", make_mnist(100, 20))
    prepare.main(["--raw", "mnist.npz", "--out-dir", "out"])

    client = MlflowClient(tracking_uri=server)
    experiment = client.get_experiment_by_name("server-test")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.data.tags["dvc.stage"] for r in runs] == ["prepare"]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["prepare.val_size"] == "20"
    assert run.data.metrics["val_size"] == 20
    assert run.inputs.dataset_inputs[0].dataset.digest == files.file_md5(root / "mnist.npz")


def test_pipeline_runs_through_the_server(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The tiny pipeline, then an experiment with another ridge alpha, both logging to a real server."""
    from mlflow.tracking import MlflowClient

    root = tiny_repo(tmp_path_factory.mktemp("server-pipeline") / "repo")
    with mlflow_server(tmp_path_factory.mktemp("server-store")) as uri:
        env = {**command_env(), "MLFLOW_TRACKING_URI": uri}
        for args in (["dvc", "repro"], ["dvc", "exp", "run", "-n", "ridge-2", "-S", "baselines.ridge.alpha=2.0"]):
            result = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True)
            assert result.returncode == 0, result.stdout + result.stderr
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name("mnist")
        runs = client.search_runs([experiment.experiment_id], max_results=1000)
        first, exp = parents(runs)
        assert set(children(runs, first)) == ALL_STAGES
        assert set(children(runs, exp)) == {"train_baseline@ridge", "evaluate"}
        assert exp.info.run_name == "ridge-2"
        # identical keys, so the compare view lines the two pipeline runs up field by field
        assert set(first.data.params) == set(exp.data.params)
        assert set(first.data.metrics) == set(exp.data.metrics)
        assert {k for k in first.data.params if first.data.params[k] != exp.data.params[k]} == {"baselines.ridge.alpha"}
        # dataset digests are the DVC hashes in dvc.lock (the experiment's, now in the workspace)
        lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
        for stage, r in children(runs, exp).items():
            md5 = {d["path"]: d["md5"] for d in lock[stage]["deps"]}
            assert r.inputs.dataset_inputs
            for used in r.inputs.dataset_inputs:
                assert used.dataset.digest == md5[used.dataset.name]
        assert client.get_model_version_by_alias("mnist-cnn", "champion").run_id == (
            children(runs, first)["train_cnn"].info.run_id
        )
    assert not (root / "mlflow.db").exists()  # nothing went to the default store
