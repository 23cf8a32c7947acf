"""`make retrain` on the tiny profile: real dvc, a real `mlflow server` on 127.0.0.1, a local DVC remote.

One module-scoped repository goes through the scheduled-retraining story in order: the first run trains
and promotes; a second with nothing changed skips and says why; the outputs round-trip through the DVC
remote into a fresh clone, where nothing needs re-running; a failing `dvc repro` is one clear error; a
change that makes the CNN worse trains and is not promoted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from stages.commands import retrain
from stages.lib.errors import UserError
from tests.support.repo import GIT_ENV, set_params, tiny_repo
from tests.support.servers import mlflow_server

pytestmark = pytest.mark.slow

MODEL = "mnist-cnn"
VENV = Path(sys.executable).parent.parent


@dataclass
class Flow:
    root: Path
    remote: Path
    uri: str
    outputs: Path  # the file standing in for $GITHUB_OUTPUT

    def env(self) -> dict[str, str]:
        env = {**os.environ, **GIT_ENV, "MLFLOW_TRACKING_URI": self.uri, "GITHUB_OUTPUT": str(self.outputs)}
        env.pop("RETRAIN_SUMMARY", None)
        return env

    def run(self, *args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(args, cwd=cwd or self.root, env=self.env(), capture_output=True, text=True)
        if check:
            assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
        return result

    def retrain(self, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        self.outputs.write_text("")
        return self.run(sys.executable, "-m", "stages.commands.retrain", cwd=cwd, check=check)

    def github_outputs(self) -> dict[str, str]:
        return dict(line.split("=", 1) for line in self.outputs.read_text().splitlines())

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flow]:
    base = tmp_path_factory.mktemp("retrain")
    root = tiny_repo(base / "repo")
    remote = base / "remote"
    with mlflow_server(base / "server") as uri:
        flow = Flow(root, remote, uri, base / "github_output")
        flow.run("dvc", "remote", "add", "-d", "local", str(remote))
        flow.run("git", "commit", "-q", "-m", "DVC remote", ".dvc/config")
        yield flow


def lock(root: Path) -> dict:
    return yaml.safe_load((root / "dvc.lock").read_text())


def test_first_retrain_trains_and_promotes(flow: Flow) -> None:
    # The Makefile target, with this interpreter's environment (-o setup: install nothing into it; under
    # `make test` this make is nested, and would otherwise print "Entering directory" lines)
    result = flow.run("make", "--no-print-directory", "-o", "setup", "retrain", f"VENV={VENV}")
    assert "Running stage 'train_cnn'" in result.stdout
    assert f"{MODEL} version 1 promoted to champion" in result.stdout
    assert result.stdout.rstrip().endswith("summary: retrain-summary.md")

    decision = json.loads((flow.root / "promotion.json").read_text())
    assert decision["decision"] == "promoted" and decision["champion_version"] is None
    champion = flow.client().get_model_version_by_alias(MODEL, "champion")
    assert champion.version == "1" and champion.run_id == decision["run_id"]
    assert flow.github_outputs() == {
        "decision": "promoted",
        "model": MODEL,
        "version": "1",
        "summary": "retrain-summary.md",
    }

    summary = (flow.root / "retrain-summary.md").read_text()
    assert summary.startswith("# Retraining: promoted")
    assert f"{decision['challenger_accuracy']:.4f}" in summary
    assert "no champion before it" in summary
    assert "## Metrics against `HEAD`" in summary  # no champion before: against HEAD
    assert "cnn.test_accuracy" in summary and "per_class" not in summary
    assert "## Params against `HEAD`" in summary
    assert "no dvc.lock: first run" in summary


def test_nothing_changed_skips_in_one_line(flow: Flow) -> None:
    versions = len(flow.client().search_model_versions(f"name = '{MODEL}'"))
    result = flow.retrain()
    md5 = lock(flow.root)["stages"]["fetch"]["outs"][0]["md5"]
    assert result.stdout == (
        f"nothing changed since the last run: params, code and data/raw/mnist.npz (md5 {md5}) "
        "match dvc.lock; not retraining\n"
    )
    assert result.stderr == ""
    assert flow.github_outputs()["decision"] == "skipped"
    assert "skipped" in (flow.root / "retrain-summary.md").read_text()
    assert len(flow.client().search_model_versions(f"name = '{MODEL}'")) == versions


def test_outputs_round_trip_through_the_remote_into_a_fresh_clone(flow: Flow) -> None:
    # What the retrain workflow's pull request carries: dvc.lock, metrics, plots (and DVC's .gitignore files)
    flow.run("git", "add", "dvc.lock", "metrics", "plots", "data", "models")
    flow.run("git", "commit", "-q", "-m", "Retrained")
    flow.run("dvc", "push", "--run-cache")

    clone = flow.root.parent / "clone"
    flow.run("git", "clone", "-q", str(flow.root), str(clone))
    assert not (clone / "models" / "cnn.keras").exists()
    flow.run("dvc", "pull", "--allow-missing", "--run-cache", cwd=clone)  # the workflow's pull
    assert json.loads(flow.run("dvc", "status", "--json", cwd=clone).stdout) == {}
    for out in ("data/raw/mnist.npz", "models/cnn.keras", "models/ridge.skops"):
        assert (clone / out).read_bytes() == (flow.root / out).read_bytes(), out
    summary = clone / "out" / "summary.md"  # the summary's place is configurable
    result = flow.run(sys.executable, "-m", "stages.commands.retrain", "--summary", str(summary), cwd=clone)
    assert result.stdout.startswith("nothing changed since the last run")
    assert "Running stage" not in result.stdout + result.stderr
    assert summary.read_text().startswith("# Retraining: skipped")


def test_failing_repro_is_one_clear_error(flow: Flow) -> None:
    params = flow.root / "params.yaml"
    original = params.read_text()
    try:
        set_params(params, {"evaluate.batch_size": 0})  # params validation stops the evaluate stage
        result = flow.retrain(check=False)
    finally:
        params.write_text(original)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert "`dvc repro` failed (exit code " in last and "run `make retrain` again" in last
    # DVC removed the stage's outputs before running it; only that stage is stale, the next run re-creates them
    assert set(json.loads(flow.run("dvc", "status", "--json").stdout)) == {"evaluate"}


def test_worse_model_trains_and_is_not_promoted(flow: Flow) -> None:
    recorded = flow.run("git", "rev-parse", "--short=12", "HEAD").stdout.strip()  # the commit with its results
    # Training barely moves the weights: chance-level accuracy, never better than the champion
    set_params(flow.root / "params.yaml", {"train_cnn.learning_rate": 1e-7})
    result = flow.retrain()
    assert "Running stage 'train_cnn'" in result.stdout
    assert "Running stage 'train_baseline" not in result.stdout  # only what the change affects

    decision = json.loads((flow.root / "promotion.json").read_text())
    assert decision["decision"] == "not_promoted"
    assert decision["version"] == "2" and decision["champion_version"] == "1"
    assert decision["challenger_accuracy"] <= decision["champion_accuracy"]
    client = flow.client()
    assert client.get_model_version_by_alias(MODEL, "champion").version == "1"
    assert client.get_model_version_by_alias(MODEL, "challenger").version == "2"
    assert f"{MODEL} version 2 not promoted" in result.stdout
    assert flow.github_outputs()["decision"] == "not_promoted"

    summary = (flow.root / "retrain-summary.md").read_text()
    assert summary.startswith("# Retraining: not promoted")
    assert f"{decision['challenger_accuracy']:.4f}" in summary
    assert f"{decision['champion_accuracy']:.4f}" in summary
    assert decision["reason"] in summary
    assert "train_cnn: params.yaml (train_cnn modified)" in summary
    # Against the first commit of dvc.lock after the one the champion was trained at: the champion's metrics
    trained_at = client.get_model_version_by_alias(MODEL, "champion").tags["git.commit"].removesuffix("-dirty")
    assert flow.run("git", "rev-parse", f"{recorded}^").stdout.strip() == trained_at
    assert f"## Metrics against `{recorded}`" in summary
    row = next(line for line in summary.splitlines() if "| cnn.test_accuracy " in line)
    old, new = (cell.strip() for cell in row.split("|")[3:5])
    assert (float(old), float(new)) == (decision["champion_accuracy"], decision["challenger_accuracy"])
    assert "| train_cnn.learning_rate " in summary  # the params diff


def test_reverting_the_change_keeps_the_champion(flow: Flow) -> None:
    """Back to the champion's params: DVC restores the champion's outputs from its run cache or re-runs the
    stages; either way no new version is registered and the champion stays."""
    flow.run("git", "checkout", "params.yaml")
    result = flow.retrain()
    assert flow.github_outputs()["decision"] in ("unchanged", "not_evaluated"), result.stdout
    client = flow.client()
    assert client.get_model_version_by_alias(MODEL, "champion").version == "1"
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == 2
    assert flow.retrain().stdout.startswith("nothing changed since the last run")


def test_a_dependency_update_retrains_and_decides(flow: Flow) -> None:
    """A merged TensorFlow update, as the retrain workflow sees it: dvc.lock was written with the old version,
    versions.yaml (rewritten by `make setup`) holds the installed one. The retrain command (not make, which
    would reinstall) retrains the stages that use TensorFlow, gates the new model and names the versions."""
    data = lock(flow.root)
    installed = data["stages"]["train_cnn"]["params"]["versions.yaml"]["tensorflow"]
    for entry in data["stages"].values():
        if "tensorflow" in entry["params"].get("versions.yaml", {}):
            entry["params"]["versions.yaml"]["tensorflow"] = "2.0.0"
    (flow.root / "dvc.lock").write_text(yaml.safe_dump(data, sort_keys=False))
    flow.run("git", "commit", "-q", "-m", "Results of the old TensorFlow", "dvc.lock")
    # The first retrain ran these stages with the installed version, and DVC's run cache would restore them; a
    # runner meeting a new version for the first time has no such entry
    shutil.rmtree(flow.root / ".dvc" / "cache" / "runs")
    versions = len(flow.client().search_model_versions(f"name = '{MODEL}'"))

    result = flow.retrain()
    ran = {line.split("'")[1] for line in result.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"augment", "train_cnn", "evaluate"}, result.stdout
    decision = json.loads((flow.root / "promotion.json").read_text())
    assert decision["decision"] in ("promoted", "not_promoted") and int(decision["version"]) == versions + 1
    assert flow.github_outputs()["decision"] == decision["decision"]
    summary = (flow.root / "retrain-summary.md").read_text()
    assert f"Library versions changed (versions.yaml): tensorflow 2.0.0 → {installed}." in summary
    assert "train_cnn: versions.yaml (tensorflow modified)" in summary
    assert json.loads(flow.run("dvc", "status", "--json").stdout) == {}


# ---------------------------------------------------------------------------------------------- pure parts


def test_describe_changes() -> None:
    status = {
        "train_cnn": [{"changed deps": {"params.yaml": {"train_cnn": "modified"}}}],
        "prepare": [{"changed outs": {"data/prepared/val.npz": "deleted"}}, "always changed"],
        "evaluate": [{"changed deps": {f"stages/m{i}.py": "modified" for i in range(6)}}],
    }
    assert retrain.describe_changes(status) == [
        "train_cnn: params.yaml (train_cnn modified)",
        "prepare: data/prepared/val.npz deleted, always changed",
        "evaluate: stages/m0.py modified, stages/m1.py modified, stages/m2.py modified, stages/m3.py modified, "
        "and 2 more",
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "file not found; it is written by the evaluate stage"),
        ("{", "cannot read it as JSON"),
        ("[]", "expected a JSON object, got list"),
        ('{"decision": "promoted"}', "missing model, version, challenger_accuracy"),
        (
            json.dumps({k: "x" for k in retrain.DECISION_KEYS}),
            "decision is 'x', expected one of promoted, not_promoted, unchanged",
        ),
    ],
)
def test_bad_decision_file_names_file_and_fix(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "promotion.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError) as info:
        retrain.read_decision(path)
    assert str(info.value).startswith(f"{path}: {message}")
    assert str(info.value).endswith("re-create it with `dvc repro --force evaluate`")


def test_outside_the_repository_root_is_one_clear_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "stages.commands.retrain"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(retrain.__file__).parents[2])},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip().endswith(f"{tmp_path}: no dvc.yaml here; run `make retrain` at the repository root")
