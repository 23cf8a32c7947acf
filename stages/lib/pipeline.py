"""The pipeline as dvc.yaml defines it, and the one table of what dvc.yaml does not say about its stages.

dvc.yaml says each stage's command, dependencies (code and data), params keys and outputs. What it does
not say is here, in :data:`STAGES`: whether a stage imports TensorFlow (so its ``device`` setting places
it on a GPU or hides the GPU) and whether MLflow samples system metrics in its run. The runtime, the
benchmarks and the tests all read this table.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from stages.lib.errors import UserError

PIPELINE_FILE = "dvc.yaml"
PARAMS_FILE = "params.yaml"
VERSIONS_FILE = "versions.yaml"  # the installed versions that decide results (stages/lib/environment.py)


@dataclass(frozen=True)
class StageSettings:
    """What dvc.yaml does not say about a stage."""

    uses_tensorflow: bool  # its device setting applies (else it always runs on the CPU)
    system_metrics: bool = False  # MLflow samples CPU, memory and GPU use into its run (the training stages)


STAGES: dict[str, StageSettings] = {
    "fetch": StageSettings(uses_tensorflow=False),
    "prepare": StageSettings(uses_tensorflow=False),
    "augment": StageSettings(uses_tensorflow=True),
    "train_cnn": StageSettings(uses_tensorflow=True, system_metrics=True),
    "train_baseline": StageSettings(uses_tensorflow=False, system_metrics=True),
    "evaluate": StageSettings(uses_tensorflow=True),
}


def settings(stage: str) -> StageSettings:
    """The :data:`STAGES` entry of ``stage`` (``train_baseline@ridge`` is ``train_baseline``)."""
    return STAGES[stage.partition("@")[0]]


_TEMPLATE = re.compile(r"\$\{\s*(item|key)\s*\}")


def stage_spec(stage: str, pipeline: Mapping[str, Any], pipeline_path: str = PIPELINE_FILE) -> dict[str, Any]:
    """The dvc.yaml definition of ``stage`` (``cmd``, ``deps``, ``params``, ...), with ``${item}`` filled in.

    Supports ``foreach`` over a list (stage ``name@item``), the form dvc.yaml uses for the baselines.
    """
    name, _, item = stage.partition("@")
    stages = pipeline.get("stages") or {}
    if name not in stages:
        raise UserError(f"{pipeline_path}: no stage named '{name}' (stages: {', '.join(stages)})")
    spec = stages[name]
    if "foreach" in spec:
        if not item or item not in [str(v) for v in spec["foreach"]]:
            raise UserError(
                f"{pipeline_path}: stage '{name}' is a foreach over {spec['foreach']}; name one as {name}@<item>"
            )
        spec = spec["do"]
    elif item:
        raise UserError(f"{pipeline_path}: stage '{name}' has no foreach, so '{stage}' does not exist")
    return _fill(spec, item)


def _fill(node: Any, item: str) -> Any:
    if isinstance(node, str):
        return _TEMPLATE.sub(item, node)
    if isinstance(node, Mapping):
        return {_fill(k, item): _fill(v, item) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(v, item) for v in node]
    return node


def stage_names(pipeline: Mapping[str, Any]) -> list[str]:
    """Every stage of dvc.yaml in file order, a foreach expanded to ``name@item`` (DVC's names)."""
    names: list[str] = []
    for name, spec in (pipeline.get("stages") or {}).items():
        names += [f"{name}@{item}" for item in spec["foreach"]] if "foreach" in spec else [name]
    return names


def declared_params(
    stage: str, pipeline: Mapping[str, Any], pipeline_path: str = PIPELINE_FILE, params_file: str = PARAMS_FILE
) -> tuple[str, ...]:
    """The keys of ``params_file`` that dvc.yaml declares for ``stage``, e.g. ``("base.seed", "augment")`` of
    params.yaml or ``("python", "numpy")`` of versions.yaml."""
    keys: list[str] = []
    for entry in stage_spec(stage, pipeline, pipeline_path).get("params") or []:
        if isinstance(entry, str) and params_file == PARAMS_FILE:
            keys.append(entry)
        elif isinstance(entry, Mapping):
            keys.extend(entry.get(params_file) or [])
    return tuple(keys)
