"""What a user compares in the MLflow UI: two tiny-profile pipeline runs with different params, tracked to a
real ``mlflow server``; used by tests/test_ui.py and by ``make screenshots`` (this module run as a script,
which writes the pictures of docs/mlflow.md)."""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.repo import children, mlflow_runs, parents, run, tiny_repo
from tests.support.servers import mlflow_server

# The second run: the experiment a user compares with the first pipeline run
EXPERIMENT = ("ridge-2", {"baselines.ridge.alpha": 2.0, "train_cnn.epochs": 2})
MODEL = "mnist-cnn"


@dataclass
class Comparison:
    """Two pipeline runs on a server: their parents and stage runs, their params and metrics as MLflow holds
    them, and the registered model's aliases."""

    uri: str
    experiment_id: str
    parents: dict[str, str]  # run name -> run id, in the order they ran
    children: dict[str, list[str]]  # parent name -> its stage runs' names
    changed: dict[str, dict[str, str]]  # changed param -> {parent name: value shown}
    metrics: dict[str, dict[str, float]]  # evaluate.* test accuracy -> {parent name: value}
    aliases: dict[str, str]  # alias -> version


@contextlib.contextmanager
def comparison(base: Path) -> Iterator[Comparison]:
    """``dvc repro`` and then ``dvc exp run`` of :data:`EXPERIMENT` in a tiny repository under ``base``, both
    tracked to a fresh ``mlflow server``; yield what they left there, the server still running."""
    root = tiny_repo(base / "repo")
    with mlflow_server(base / "server") as uri:
        run(root, "dvc", "repro", MLFLOW_TRACKING_URI=uri)
        name, changes = EXPERIMENT
        run(root, "dvc", "exp", "run", "-n", name, *[f"-S{k}={v}" for k, v in changes.items()], MLFLOW_TRACKING_URI=uri)
        yield read(uri)


def read(uri: str) -> Comparison:
    """What the two runs left on the server at ``uri`` (through MLflow's client: the expected values)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = mlflow_runs(uri)
    ordered = parents(runs)
    names = {p.info.run_name: p for p in ordered}
    changed_keys = sorted(k for k in ordered[0].data.params if ordered[0].data.params[k] != ordered[-1].data.params[k])
    accuracies = sorted(
        k for k in ordered[0].data.metrics if k.startswith("evaluate.") and k.endswith(".test_accuracy")
    )
    model = client.get_registered_model(MODEL)
    return Comparison(
        uri=uri,
        experiment_id=ordered[0].info.experiment_id,
        parents={name: p.info.run_id for name, p in names.items()},
        children={name: sorted(r.info.run_name for r in children(runs, p).values()) for name, p in names.items()},
        changed={k: {name: p.data.params[k] for name, p in names.items()} for k in changed_keys},
        metrics={k: {name: p.data.metrics[k] for name, p in names.items()} for k in accuracies},
        aliases={alias: str(version) for alias, version in model.aliases.items()},
    )


def screenshots(out: Path) -> list[Path]:
    """Pictures of the three pages the comparing-runs docs show: the training runs (stage runs expanded), the
    compare page of the two pipeline runs, the registered model with its aliases."""
    from playwright.sync_api import sync_playwright

    from tests.support import browser

    with tempfile.TemporaryDirectory(prefix="mnist-ui-") as tmp, comparison(Path(tmp)) as c, sync_playwright() as pw:
        chromium = browser.launch_chromium(pw)
        page = browser.new_page(chromium, workflow="machine_learning")
        browser.check_runs_list(page, c.uri, c.experiment_id, c.parents, c.children)
        shots = [browser.screenshot(page, out / "mlflow-training-runs.png")]
        browser.check_compare(page, c.uri, c.experiment_id, c.parents, c.changed, c.metrics)
        shots.append(browser.screenshot(page, out / "mlflow-compare.png"))
        browser.check_model_aliases(page, c.uri, MODEL, c.aliases)
        shots.append(browser.screenshot(page, out / "mlflow-model.png"))
        chromium.close()
    return shots


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Save the MLflow UI pictures of docs/mlflow.md")
    parser.add_argument("out", type=Path, help="directory of the PNG files (docs/images)")
    for path in screenshots(parser.parse_args(argv).out):
        print(path)  # noqa: T201


if __name__ == "__main__":
    main()
