"""A stage logs to a real `mlflow server` process on 127.0.0.1 when MLFLOW_TRACKING_URI points at it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stages import prepare
from stages.lib import io
from tests.mlflow_server import mlflow_server
from tests.mnist_fixture import make_mnist

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with mlflow_server(tmp_path_factory.mktemp("server")) as uri:
        yield uri


def test_stage_logs_to_the_server(server: str, stage_dir: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    root = stage_dir({"prepare.val_size": 20, "settings.mlflow_experiment": "server-test"})
    io.save_arrays(root / "mnist.npz", make_mnist(100, 20))
    prepare.main(["--raw", "mnist.npz", "--out-dir", "out"])

    client = MlflowClient(tracking_uri=server)
    experiment = client.get_experiment_by_name("server-test")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.data.tags["dvc.stage"] for r in runs] == ["prepare"]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["prepare.val_size"] == "20"
    assert run.data.metrics["val_size"] == 20
    assert run.inputs.dataset_inputs[0].dataset.digest == io.file_md5(root / "mnist.npz")
