"""Temporary copies of the repository with the tiny profile, and the commands run in them."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from stages.fetch import content_digest
from stages.lib import files
from tests.support.mnist import make_mnist

REPO = Path(__file__).resolve().parents[2]
ALL_STAGES = {"fetch", "prepare", "augment", "train_cnn", "train_baseline@ridge", "train_baseline@lasso", "evaluate"}
# Pipeline outputs (and the reference run's committed metrics and plots) are not copied
DVC_OUTPUT_DIRS = {"data", "models", "metrics", "plots", "mlartifacts"}
GIT_ENV = {
    "GIT_AUTHOR_NAME": "pipeline-test",
    "GIT_AUTHOR_EMAIL": "pipeline-test@localhost",
    "GIT_COMMITTER_NAME": "pipeline-test",
    "GIT_COMMITTER_EMAIL": "pipeline-test@localhost",
}
# A stage working directory's params: small enough for a stage to run in seconds
TINY = {
    "prepare.val_size": 100,
    "train_cnn.epochs": 1,
    "train_cnn.batch_size": 32,
    "augment.batch_size": 128,
}


def set_params(path: Path, overrides: dict[str, Any]) -> None:
    """Set dotted keys (``{"augment.copies": 0}``) in a params.yaml file."""
    params = yaml.safe_load(path.read_text())
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = params
        for part in parents:
            node = node[part]
        node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def command_env() -> dict[str, str]:
    """The environment of commands run in a copy: git identity set, no tracking URI (the stages must fall
    back to ``<repo>/mlflow.db``)."""
    out = {**os.environ, **GIT_ENV}
    out.pop("MLFLOW_TRACKING_URI", None)
    return out


def run(root: Path, *args: str, **overrides: str) -> subprocess.CompletedProcess[str]:
    """Run ``args`` in ``root`` with :func:`env` (plus ``overrides``); fail the test with its output if it fails."""
    result = subprocess.run(args, cwd=root, env={**command_env(), **overrides}, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def copy_repo(dest: Path) -> Path:
    """Copy the repository's files (tracked, or untracked but not ignored) into ``dest``, without outputs."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, listed):
        if name.split("/")[0] in DVC_OUTPUT_DIRS:
            continue
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    (dest / "dvc.lock").unlink(missing_ok=True)  # the repository's own reference run
    return dest


def tiny_profile(root: Path) -> None:
    """Point fetch at a generated fixture and shrink the pipeline to seconds."""
    arrays = make_mnist(n_train=600, n_test=100, seed=1)
    fixture = root.parent / "fixture" / "mnist.npz"
    files.save_arrays(fixture, arrays)
    source = {
        "name": "fixture",
        "format": "npz",
        "url": fixture.as_uri(),
        "sha256": hashlib.sha256(fixture.read_bytes()).hexdigest(),
    }
    set_params(
        root / "params.yaml",
        {
            "fetch.sources": [source],
            "fetch.content_sha256": content_digest(arrays),
            "prepare.val_size": 100,
            "augment.copies": 1,
            "augment.batch_size": 256,
            "train_cnn.epochs": 1,
            "train_cnn.batch_size": 32,
            "evaluate.misclassified_grid": 9,
        },
    )


def tiny_repo(dest: Path) -> Path:
    """A committed git repository at ``dest``: the repository's code with the tiny profile."""
    root = copy_repo(dest)
    tiny_profile(root)
    run(root, "git", "init", "-q", "-b", "main")
    run(root, "git", "add", "-A")
    run(root, "git", "commit", "-q", "-m", "tiny profile")
    return root


def mlflow_runs(uri: str) -> list:
    """Every run of every experiment in the store at ``uri``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiments = client.search_experiments()
    return client.search_runs([e.experiment_id for e in experiments], max_results=1000)


def default_store(root: Path) -> str:
    """The tracking URI of a copy's own store (``<root>/mlflow.db``)."""
    return f"sqlite:///{root / 'mlflow.db'}"


def parents(runs: list) -> list:
    """The pipeline's parent runs among ``runs``, oldest first."""
    return sorted((r for r in runs if r.data.tags.get("pipeline.role") == "parent"), key=lambda r: r.info.start_time)


def children(runs: list, parent: object) -> dict[str, object]:
    """The stage runs of ``parent`` by stage name."""
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return {r.data.tags["dvc.stage"]: r for r in kids}


def stage_key(stage: str) -> str:
    """A stage's name in MLflow tag and metric names (``train_baseline@ridge`` → ``train_baseline:ridge``)."""
    return stage.replace("@", ":")
