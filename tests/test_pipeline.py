"""End to end: the real `dvc repro` in a temporary copy of the repository, on a generated MNIST fixture.

One module-scoped run of the whole pipeline (tiny profile), then checks of its outputs, its MLflow
runs in the default SQLite store, no-op re-runs, and which stages a params change makes stale.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from stages.fetch import content_digest
from stages.lib import files, lineage
from tests.support.repo import (
    ALL_STAGES,
    REPO,
    children,
    command_env,
    default_store,
    mlflow_runs,
    parents,
    run,
    set_params,
    stage_key,
    tiny_repo,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tiny_repo(tmp_path_factory.mktemp("pipeline") / "repo")
    run(root, "dvc", "repro")
    return root


def test_every_declared_output_exists(pipeline: Path) -> None:
    lock = yaml.safe_load((pipeline / "dvc.lock").read_text())
    assert set(lock["stages"]) == ALL_STAGES
    outs = [out["path"] for stage in lock["stages"].values() for out in stage.get("outs", [])]
    assert len(outs) >= 16
    for path in outs:
        assert (pipeline / path).is_file(), path
        assert (pipeline / path).stat().st_size > 0, path
    raw = np.load(pipeline / "data" / "raw" / "mnist.npz")
    assert content_digest(raw) == yaml.safe_load((pipeline / "params.yaml").read_text())["fetch"]["content_sha256"]


def test_metrics_and_plots(pipeline: Path) -> None:
    metrics = json.loads((pipeline / "metrics" / "evaluate.json").read_text())
    assert set(metrics) == {"cnn", "ridge", "lasso"}
    for model in metrics.values():
        assert 0.0 <= model["test_accuracy"] <= 1.0
        assert set(model["per_class"]) == {str(d) for d in range(10)}
    assert metrics["ridge"]["test_accuracy"] > 0.5  # the fixture is learnable
    shown = json.loads(run(pipeline, "dvc", "metrics", "show", "--json").stdout)
    assert shown
    run(pipeline, "dvc", "plots", "show", "--json")
    lines = (pipeline / "plots" / "evaluate" / "confusion_cnn.csv").read_text().splitlines()
    assert lines[0] == "actual,predicted" and len(lines) == 101
    assert "| cnn |" in (pipeline / "metrics" / "evaluate.md").read_text()


def test_one_parent_and_one_child_per_stage_in_default_store(pipeline: Path) -> None:
    runs = mlflow_runs(default_store(pipeline))
    (parent,) = parents(runs)
    kids = children(runs, parent)
    assert len(runs) == 1 + len(ALL_STAGES) and set(kids) == ALL_STAGES
    lock = yaml.safe_load((pipeline / "dvc.lock").read_text())["stages"]
    lock_hashes = lineage.lock_hashes(pipeline)
    for stage, r in kids.items():
        assert r.info.status == "FINISHED"
        assert r.data.tags["device"] == "cpu"
        assert len(r.data.tags["git.commit"]) >= 40
        assert "params.unread" not in r.data.tags, stage  # each stage reads what it declares
        assert r.data.tags["dvc.lock_hash"] == lock_hashes[stage], stage  # computed before DVC wrote it
        md5 = {d["path"]: d["md5"] for d in lock[stage]["deps"]}
        for used in r.inputs.dataset_inputs:  # lineage: the dataset digest is DVC's hash of that input
            assert used.dataset.digest == md5[used.dataset.name], (stage, used.dataset.name)
        assert bool(r.inputs.dataset_inputs) == (stage != "fetch")
        # the parent: this child produced the stage's current outputs, and its final metrics are there too
        assert parent.data.tags[f"stage.{stage_key(stage)}.status"] == "ran"
        assert parent.data.tags[f"stage.{stage_key(stage)}.run_id"] == r.info.run_id
        for metric, value in r.data.metrics.items():
            if not metric.startswith("system/"):
                assert parent.data.metrics[f"{stage_key(stage)}.{metric}"] == value, (stage, metric)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["dvc.command"] == "dvc repro"
    assert parent.info.run_name == "pipeline"
    assert parent.data.params["baselines.lasso.alpha"] == str(
        yaml.safe_load((pipeline / "params.yaml").read_text())["baselines"]["lasso"]["alpha"]
    )
    assert not any(k.startswith("settings.") for k in parent.data.params)

    train = kids["train_cnn"]
    assert train.data.params["train_cnn.epochs"] == "1"
    assert "val_accuracy" in train.data.metrics
    assert any(m.startswith("system/cpu") for m in train.data.metrics)  # system metrics of a training run
    record = json.loads((pipeline / "models" / "cnn.run.json").read_text())
    assert record["mlflow_run_id"] == train.info.run_id
    decision = json.loads((pipeline / "promotion.json").read_text())
    assert decision["decision"] == "promoted" and decision["run_id"] == train.info.run_id


def test_champion_loads_and_predicts_in_a_fresh_process(pipeline: Path) -> None:
    script = (
        "import sys, numpy as np, mlflow\n"
        "from stages.lib.preprocess import to_model_input\n"
        "x = np.load('data/prepared/test.npz')['x'][:20]\n"
        "model = mlflow.pyfunc.load_model('models:/mnist-cnn@champion')\n"
        "out = np.asarray(model.predict(to_model_input(x)))\n"
        "assert out.shape == (20, 10), out.shape\n"
        "print(','.join(map(str, out.argmax(axis=1))))\n"
    )
    env = {**command_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{pipeline / 'mlflow.db'}", "PYTHONPATH": str(pipeline)}
    result = subprocess.run(["python", "-c", script], cwd=pipeline, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    digits = [int(d) for d in result.stdout.strip().splitlines()[-1].split(",")]
    assert len(digits) == 20 and all(0 <= d <= 9 for d in digits)


def test_second_repro_does_nothing(pipeline: Path) -> None:
    before = len(mlflow_runs(default_store(pipeline)))
    out = run(pipeline, "dvc", "repro").stdout
    assert "Running stage" not in out
    assert len(mlflow_runs(default_store(pipeline))) == before


# Which stages a change to each params section makes stale, written by hand (not derived from dvc.yaml),
# so a wrong params: list in dvc.yaml fails the test. Downstream stages follow only if outputs change.
EXPECTED_STALE = {
    "base.seed": {"prepare", "augment", "train_cnn"},
    "settings": set(),
    "fetch": {"fetch"},
    "prepare": {"prepare"},
    "augment": {"augment"},
    "train_cnn": {"train_cnn"},
    "baselines.ridge": {"train_baseline@ridge"},
    "baselines.lasso": {"train_baseline@lasso"},
    "evaluate": {"evaluate"},
}


def leaves(node: object, prefix: str = "") -> list[tuple[str, object]]:
    if isinstance(node, dict):
        return [leaf for key, value in node.items() for leaf in leaves(value, f"{prefix}{key}.")]
    return [(prefix[:-1], node)]


def changed(value: object) -> object:
    """A different value of the same type (DVC compares values; it does not validate them)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    return [*value, value[0]] if value else ["x"]


PARAM_LEAVES = leaves(yaml.safe_load((REPO / "params.yaml").read_text()))


def expected_stale(key: str) -> set[str]:
    section = max((s for s in EXPECTED_STALE if key == s or key.startswith(s + ".")), key=len)
    return EXPECTED_STALE[section]


def test_every_params_leaf_has_an_expectation() -> None:
    assert len(PARAM_LEAVES) > 30
    for key, _ in PARAM_LEAVES:
        expected_stale(key)


def test_staleness_matrix(pipeline: Path) -> None:
    """Mutate every leaf of params.yaml, one at a time: `dvc status` reports exactly the expected stages."""
    params = pipeline / "params.yaml"
    original = params.read_text()
    wrong = {}
    try:
        for key, value in PARAM_LEAVES:
            set_params(params, {key: changed(value)})
            status = set(json.loads(run(pipeline, "dvc", "status", "--json").stdout))
            if status != expected_stale(key):
                wrong[key] = sorted(status)
            params.write_text(original)
    finally:
        params.write_text(original)
    assert not wrong, f"unexpected stale stages: {wrong}"


# Which stages a change of each installed version makes stale (versions.yaml), written by hand
BASELINES = {"train_baseline@ridge", "train_baseline@lasso"}
VERSIONS_STALE = {
    "python": ALL_STAGES,
    "numpy": ALL_STAGES,
    "scipy": BASELINES | {"evaluate"},
    "scikit-learn": BASELINES | {"evaluate"},
    "skops": BASELINES | {"evaluate"},
    "tensorflow": {"augment", "train_cnn", "evaluate"},
    "keras": {"train_cnn", "evaluate"},
    "matplotlib": {"augment", "evaluate"},
    "pillow": {"augment", "evaluate"},
}


def test_every_recorded_version_has_an_expectation() -> None:
    assert set(yaml.safe_load((REPO / "versions.yaml").read_text())) == set(VERSIONS_STALE)


def test_version_changes_make_exactly_the_stages_that_use_them_stale(pipeline: Path) -> None:
    """A results-relevant bump (versions.yaml, as `make setup` writes it after an upgrade) re-runs the stages that
    use that library; a comment, a dev-only tool or an edit of constraints.txt re-runs nothing."""
    versions, constraints = pipeline / "versions.yaml", pipeline / "constraints.txt"
    original, original_constraints = versions.read_text(), constraints.read_text()
    wrong = {}
    try:
        for name in VERSIONS_STALE:
            set_params(versions, {name: "0.0.1"})
            status = set(json.loads(run(pipeline, "dvc", "status", "--json").stdout))
            if status != VERSIONS_STALE[name]:
                wrong[name] = sorted(status)
            versions.write_text(original)
        versions.write_text("# edited by hand\n" + original + 'pytest: "0.0.1"\n')
        constraints.write_text(original_constraints.replace("pytest==", "pytest==0.0.1  # was ") + "# a comment\n")
        assert json.loads(run(pipeline, "dvc", "status", "--json").stdout) == {}
    finally:
        versions.write_text(original)
        constraints.write_text(original_constraints)
    assert not wrong, f"unexpected stale stages: {wrong}"


def outputs(root: Path) -> dict[str, str]:
    """md5 of every output dvc.lock lists (data, models, cards, metrics, plots), the run records aside."""
    stages = yaml.safe_load((root / "dvc.lock").read_text())["stages"].values()
    paths = sorted({out["path"] for stage in stages for out in stage.get("outs", [])})
    return {path: files.file_md5(root / path) for path in paths if not path.endswith(".run.json")}


def test_forced_rerun_on_cpu_is_bit_identical(pipeline: Path) -> None:
    """The README's reproducibility claim: every stage run again gives the same bytes in every output."""
    before = outputs(pipeline)
    assert {"models/cnn.keras", "models/ridge.skops", "models/cnn.json", "plots/augment/preview.png"} <= set(before)
    run(pipeline, "dvc", "repro", "--force")
    after = outputs(pipeline)
    assert [k for k in before if before[k] != after[k]] == []


def test_a_baseline_retrained_to_the_same_model_re_runs_nothing_downstream(pipeline: Path) -> None:
    record = (pipeline / "models" / "ridge.run.json").read_text()
    out = run(pipeline, "dvc", "repro", "--force", "--single-item", "train_baseline@ridge").stdout
    assert "Running stage 'train_baseline@ridge'" in out
    assert (pipeline / "models" / "ridge.run.json").read_text() != record  # a new run, the same model
    assert json.loads(run(pipeline, "dvc", "status", "--json").stdout) == {}


def test_exp_run_lasso_alpha_reruns_only_lasso_and_evaluate(pipeline: Path) -> None:
    before = {r.info.run_id for r in mlflow_runs(default_store(pipeline))}
    out = run(pipeline, "dvc", "exp", "run", "-n", "lasso-0.01", "-S", "baselines.lasso.alpha=0.01").stdout
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"train_baseline@lasso", "evaluate"}, out
    runs = mlflow_runs(default_store(pipeline))
    new = [r for r in runs if r.info.run_id not in before]
    assert sorted(r.data.tags.get("dvc.stage", "") for r in new) == ["", "evaluate", "train_baseline@lasso"]
    assert all(r.data.tags.get("dvc.exp_name") == "lasso-0.01" for r in new)

    # The experiment's parent compares field by field with the first pipeline run's
    first, exp = parents(runs)[0], parents(runs)[-1]
    assert exp.info.run_name == "lasso-0.01"
    assert set(exp.data.params) == set(first.data.params)
    assert {k for k, v in exp.data.params.items() if v != first.data.params[k]} == {"baselines.lasso.alpha"}
    assert set(exp.data.metrics) == set(first.data.metrics)
    status = {k.split(".")[1]: v for k, v in exp.data.tags.items() if k.endswith(".status")}
    assert status == {stage_key(s): "ran" if s in ran else "unchanged" for s in ALL_STAGES}
    previous = parents(runs)[-2]  # the latest pipeline run before the experiment produced the unchanged outputs
    assert exp.data.tags["stage.train_cnn.run_id"] == previous.data.tags["stage.train_cnn.run_id"]


def test_parent_records_stages_restored_from_the_run_cache(pipeline: Path) -> None:
    """Lasso back to its first alpha (DVC restores it from its run-cache) with a new evaluate batch size."""
    original = yaml.safe_load((REPO / "params.yaml").read_text())["baselines"]["lasso"]["alpha"]
    set_params(pipeline / "params.yaml", {"baselines.lasso.alpha": original, "evaluate.batch_size": 77})
    out = run(pipeline, "dvc", "repro").stdout
    assert "Stage 'train_baseline@lasso' is cached" in out, out
    runs = mlflow_runs(default_store(pipeline))
    last = parents(runs)[-1]
    assert set(children(runs, last)) == {"evaluate"}
    assert last.data.tags["stage.train_baseline:lasso.status"] == "restored"
    producer = next(r for r in runs if r.info.run_id == last.data.tags["stage.train_baseline:lasso.run_id"])
    assert producer.data.tags["dvc.stage"] == "train_baseline@lasso"
    assert producer.data.tags["dvc.lock_hash"] == lineage.lock_hashes(pipeline)["train_baseline@lasso"]
    assert producer.data.tags["mlflow.parentRunId"] != last.info.run_id
    assert last.data.tags["stage.train_cnn.status"] == "unchanged"
