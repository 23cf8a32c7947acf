"""Each stage's code deps in dvc.yaml are exactly its own module plus the project modules it imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from stages.lib import pipeline
from tests.support.repo import REPO

PIPELINE = yaml.safe_load((REPO / "dvc.yaml").read_text())


def project_imports(path: Path) -> set[str]:
    """Project modules (``stages.lib.files``) imported anywhere in a file, including inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("stages"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stages"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                is_module = (REPO / (candidate.replace(".", "/") + ".py")).is_file()
                found.add(candidate if is_module else node.module)
    return found


def module_file(module: str) -> str:
    return module.replace(".", "/") + ".py"


def closure(module: str) -> set[str]:
    """Files of ``module`` and every project module it imports, transitively (package ``__init__`` aside)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        path = REPO / module_file(current)
        if current in seen or not path.is_file():
            continue
        seen.add(current)
        todo.extend(project_imports(path))
    return {module_file(m) for m in seen}


STAGES = pipeline.stage_names(PIPELINE)


@pytest.mark.parametrize("stage", STAGES)
def test_code_deps_are_exactly_the_imported_modules(stage: str) -> None:
    spec = pipeline.stage_spec(stage, PIPELINE)
    cmd = spec["cmd"].split()
    assert cmd[:2] == ["sh", "stages/run"], "stage commands go through stages/run"
    expected = {"stages/run"} | closure(f"stages.{cmd[2]}")
    declared = {d for d in spec["deps"] if d.startswith("stages/")}
    assert declared == expected, f"missing: {sorted(expected - declared)}, extra: {sorted(declared - expected)}"


def test_the_stage_table_covers_every_stage() -> None:
    assert set(pipeline.STAGES) == {stage.partition("@")[0] for stage in STAGES}


def test_closure_follows_lazy_imports() -> None:
    # runtime imports tracking inside stage(); tracking imports files
    assert {"stages/lib/tracking.py", "stages/lib/files.py"} <= closure("stages.lib.runtime")
