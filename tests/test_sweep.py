"""The sweep file and the sweep workflow's job matrix (the commands themselves run for real in test_team)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stages.commands import sweep
from stages.lib.errors import UserError
from tests.support.repo import REPO


def test_the_repository_sweep_file_is_valid() -> None:
    entries = sweep.read_sweep(REPO / sweep.SWEEP_FILE)
    assert entries and all(entry["set"] for entry in entries)


def test_plan_is_one_job_per_experiment_with_unique_names(tmp_path: Path) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_text("experiments:\n  - name: a\n    set: [x.y=1]\n  - name: b\n    set: ['x.y=2', 'z=[1,2]']\n")
    entries = sweep.read_sweep(path, suffix="12")
    assert entries == [{"name": "a-12", "set": ["x.y=1"]}, {"name": "b-12", "set": ["x.y=2", "z=[1,2]"]}]
    line = sweep.plan(entries)
    assert line.startswith("matrix=") and "\n" not in line
    assert json.loads(line.removeprefix("matrix=")) == {
        "include": [{"index": 0, "name": "a-12"}, {"index": 1, "name": "b-12"}]
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("experiments: []\n", "expected `experiments:`"),
        ("experiments:\n  - set: [a=1]\n", r"experiments\[0\]: expected a name"),
        ("experiments:\n  - name: a\n    set: [novalue]\n", "expected key=value"),
        ("experiments:\n  - name: a\n    set: [a=1]\n  - name: a\n    set: [a=2]\n", "used twice"),
    ],
)
def test_a_bad_sweep_file_names_the_entry(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        sweep.read_sweep(path)
