"""Lineage helpers: the dvc.lock hash of a stage and the `dvc` process a stage runs under."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stages.lib import lineage
from tests.support.repo import REPO


@pytest.mark.parametrize(
    ("argv", "args"),
    [
        (["/usr/bin/dvc", "repro"], ["repro"]),
        (["/venv/bin/python3", "/venv/bin/dvc", "exp", "run"], ["exp", "run"]),
        (["python", "-m", "dvc", "exp", "exec-run", "--infofile", "x"], ["exp", "exec-run", "--infofile", "x"]),
        (["python", "-m", "pytest"], None),
        (["/bin/sh", "-c", "dvc repro"], None),
    ],
)
def test_dvc_args(argv: list[str], args: list[str] | None) -> None:
    assert lineage._dvc_args(argv) == args


def test_no_invocation_outside_dvc() -> None:
    assert lineage.dvc_invocation() is None


def test_invocation_is_the_nearest_dvc_ancestor(tmp_path: Path) -> None:
    """A program named `dvc` starts a shell that starts Python: the key names that `dvc` process."""
    fake = tmp_path / "dvc"
    fake.write_text(
        f"#!/bin/sh\necho $$\nsh -c '{sys.executable} -c \"from stages.lib.lineage import dvc_invocation as d; "
        "i = d(); print(i.key); print(i.command)\"'\n"
    )
    fake.chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([str(fake), "repro", "-s", "x"], capture_output=True, text=True, env=env, check=True)
    pid, key, command = out.stdout.split("\n")[:3]
    assert key.split(":")[1] == pid
    assert command == "dvc repro -s x"


def test_stage_hash_matches_the_lock_entry_it_will_have(tmp_path: Path) -> None:
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  s:\n    foreach: [a]\n    do:\n      cmd: run ${item}\n      deps:\n        - in-${item}.txt\n"
        "      params:\n        - p.${item}\n        - versions.yaml:\n            - lib\n"
    )
    (tmp_path / "params.yaml").write_text("p:\n  a: {x: 1.5}\n")
    (tmp_path / "versions.yaml").write_text('# a comment\nlib: "1.0"\nother: "2"\n')
    (tmp_path / "in-a.txt").write_text("data")
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  s@a:\n    cmd: run a\n    deps:\n    - path: in-a.txt\n      hash: md5\n"
        "      md5: 8d777f385d3dfec8815d20f7496026dc\n      size: 4\n    params:\n      params.yaml:\n"
        "        p.a:\n          x: 1.5\n      versions.yaml:\n        lib: '1.0'\n"
    )
    assert lineage.stage_hash("s@a", tmp_path) == lineage.lock_hashes(tmp_path)["s@a"]
    (tmp_path / "versions.yaml").write_text('lib: "1.0"\nother: "3"\n')  # undeclared entry, comment
    assert lineage.stage_hash("s@a", tmp_path) == lineage.lock_hashes(tmp_path)["s@a"]
    (tmp_path / "versions.yaml").write_text('lib: "1.1"\n')
    assert lineage.stage_hash("s@a", tmp_path) != lineage.lock_hashes(tmp_path)["s@a"]
    (tmp_path / "versions.yaml").write_text('lib: "1.0"\n')
    (tmp_path / "params.yaml").write_text("p:\n  a: {x: 2.5}\n")
    assert lineage.stage_hash("s@a", tmp_path) != lineage.lock_hashes(tmp_path)["s@a"]
    assert lineage.pipeline_stages(tmp_path) == ["s@a"]
