"""Team scale, for real on loopback: the team's MLflow server on PostgreSQL with basic auth (``team``
fixture), the tiny pipeline tracked to it, and experiments run on two machines (clones) that share a bare
git remote, a directory DVC remote and that server, collected on a third. (Queued experiments against the
team server: tests/test_queue.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from stages.commands.server import allowed_hosts_warning
from tests.support.repo import ALL_STAGES, children, command_env, parents, run, set_params, tiny_repo
from tests.support.servers import TEAM_HOST, MlflowServer, http_status

pytestmark = pytest.mark.slow


SWEEP = """experiments:
  - name: exp-a
    set: [baselines.ridge.alpha=2.0]
  - name: exp-b
    set: [evaluate.misclassified_grid=4, baselines.lasso.alpha=0.002]
"""


def team_repo(dest: Path, server: MlflowServer) -> tuple[Path, dict[str, str], str]:
    """A tiny repository whose experiment and registered model are its own on the shared server; its root,
    the environment of commands run against the server, and the registered model's name."""
    root = tiny_repo(dest)
    tag = uuid.uuid4().hex[:8]
    model = f"mnist-cnn-{tag}"
    set_params(root / "params.yaml", {"settings.mlflow_experiment": f"mnist-{tag}", "settings.registered_model": model})
    run(root, "git", "commit", "-q", "-am", "Own experiment and model on the team server")
    return root, server.env(), model


def client(server: MlflowServer):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=server.uri)


def runs_of(server: MlflowServer, root: Path) -> list:
    experiment = yaml.safe_load((root / "params.yaml").read_text())["settings"]["mlflow_experiment"]
    c = client(server)
    return c.search_runs([c.get_experiment_by_name(experiment).experiment_id], max_results=1000)


@pytest.fixture(scope="module")
def authenticated(team: MlflowServer) -> MlflowServer:
    """The team server, with this test process's MLflow client logged in."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in team.env().items():
            patch.setenv(key, value)
        yield team


def test_a_request_without_credentials_is_refused(team: MlflowServer) -> None:
    api = f"{team.uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert http_status(api) == 401
    assert http_status(api, {"Authorization": "Basic bm9ib2R5Om5vcGFzc3dvcmQ="}) == 401  # nobody:nopassword
    assert http_status(api, team.auth_header()) == 200


def test_the_server_answers_the_host_names_it_is_given(team: MlflowServer) -> None:
    api = f"{team.uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert http_status(api, {**team.auth_header(), "Host": TEAM_HOST}) == 200
    assert http_status(api, {**team.auth_header(), "Host": "elsewhere.example"}) == 403


def test_a_server_beyond_loopback_without_allowed_hosts_is_warned_about() -> None:
    assert allowed_hosts_warning("0.0.0.0", "") is not None
    assert "MLFLOW_SERVER_ALLOWED_HOSTS" in allowed_hosts_warning("0.0.0.0", "")
    assert allowed_hosts_warning("0.0.0.0", "mlflow.internal") is None
    assert allowed_hosts_warning("127.0.0.1", "") is None


def test_the_pipeline_is_tracked_to_the_team_server(authenticated: MlflowServer, tmp_path: Path) -> None:
    root, env, model = team_repo(tmp_path / "repo", authenticated)
    run(root, "dvc", "repro", **env)
    runs = runs_of(authenticated, root)
    (parent,) = parents(runs)
    kids = children(runs, parent)
    assert set(kids) == ALL_STAGES and all(r.info.status == "FINISHED" for r in kids.values())
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    for stage, r in kids.items():  # lineage: each dataset digest is DVC's md5 of that input
        md5 = {d["path"]: d["md5"] for d in lock[stage]["deps"]}
        for used in r.inputs.dataset_inputs:
            assert used.dataset.digest == md5[used.dataset.name], (stage, used.dataset.name)
        assert bool(r.inputs.dataset_inputs) == (stage != "fetch")
    champion = client(authenticated).get_model_version_by_alias(model, "champion")
    assert champion.run_id == kids["train_cnn"].info.run_id
    assert not (root / "mlflow.db").exists()  # nothing went to the default store


def test_experiments_on_two_machines_are_collected_on_a_third(authenticated: MlflowServer, tmp_path: Path) -> None:
    """Clones A and B of a bare git remote, sharing a directory DVC remote and the team server, each run one
    experiment of a sweep file with the one-machine command and push it; clone C writes the sweep's summary
    (pulls and compares both, with their promotion decisions) and takes B's."""
    origin, storage = tmp_path / "origin.git", tmp_path / "dvc-storage"
    seed, env, model = team_repo(tmp_path / "seed", authenticated)
    run(seed, "dvc", "remote", "add", "-d", "team", str(storage))
    (seed / ".github" / "sweep.yaml").write_text(SWEEP)
    run(seed, "git", "add", ".dvc/config", ".github/sweep.yaml")
    run(seed, "git", "commit", "-q", "-m", "The team's DVC remote and a sweep")
    run(tmp_path, "git", "clone", "-q", "--bare", str(seed), str(origin))
    clones = {name: tmp_path / name for name in ("a", "b", "c")}
    for path in clones.values():
        run(tmp_path, "git", "clone", "-q", str(origin), str(path))
    # Each machine runs its entry of the sweep, as a job of the sweep workflow does
    command = [sys.executable, "-m", "stages.commands.sweep", "run", ".github/sweep.yaml", "--suffix", "7"]
    machines = {
        name: subprocess.Popen(
            [*command, "--index", str(index)],
            cwd=clones[name],
            env={**command_env(), **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for index, name in enumerate(("a", "b"))
    }
    for name, proc in machines.items():
        out = proc.communicate(timeout=1200)[0]
        assert proc.returncode == 0, f"machine {name}:\n{out}"

    # The sweep's summary job on C: both experiments pulled and compared, with their promotion decisions
    c = clones["c"]
    summary = run(
        c, sys.executable, "-m", "stages.commands.sweep", "summary", ".github/sweep.yaml", "--suffix", "7", **env
    )
    shown = summary.stdout
    assert shown.startswith("# Sweep: 2 experiments")
    for exp in ("exp-a-7", "exp-b-7"):
        rows = [line for line in shown.splitlines() if line.startswith("|") and exp in line]
        assert len(rows) == 2, shown  # its metrics, and its decision
        assert any(word in rows[1] for word in ("promoted", "not promoted", "unchanged")), rows[1]
    assert "baselines.ridge.alpha" in shown and "cnn.test_accuracy" in shown
    run(c, "dvc", "exp", "apply", "exp-b-7", **env)
    run(c, "dvc", "pull", **env)
    assert json.loads(run(c, "dvc", "status", "--json", **env).stdout) == {}  # nothing to re-run
    for out in ("models/cnn.keras", "models/ridge.skops", "metrics/evaluate.json"):
        assert (c / out).read_bytes() == (clones["b"] / out).read_bytes(), out

    by_name = {p.info.run_name: p for p in parents(runs_of(authenticated, seed))}
    assert {"exp-a-7", "exp-b-7"} <= set(by_name)
    assert all(children(runs_of(authenticated, seed), by_name[exp]) for exp in ("exp-a-7", "exp-b-7"))
    registry = client(authenticated)
    versions = {
        int(v.version): float(v.tags["test_accuracy"]) for v in registry.search_model_versions(f"name = '{model}'")
    }
    from stages.lib import registry as rule

    margin = yaml.safe_load((seed / "params.yaml").read_text())["evaluate"]["promotion_margin"]
    expected = rule.walk([rule.Version(n, a, margin) for n, a in versions.items()]).champion.number
    assert str(registry.get_model_version_by_alias(model, "champion").version) == str(expected)

    script = (
        "import sys, numpy as np, mlflow\n"
        "from stages.lib.preprocess import to_model_input\n"
        "x = np.load('data/prepared/test.npz')['x'][:20]\n"
        f"out = np.asarray(mlflow.pyfunc.load_model('models:/{model}@champion').predict(to_model_input(x)))\n"
        "print(out.argmax(axis=1).tolist())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=c, env={**command_env(), **env}, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    digits = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(digits) == 20 and all(0 <= d <= 9 for d in digits)
