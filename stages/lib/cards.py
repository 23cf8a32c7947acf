"""Model cards: the small JSON file written beside each model in ``models/``.

A card says what the model is and where it came from: its file and that file's sha256 (checked before
loading), its format and input kind, the params and resolved device it was trained with, its validation
metrics, the DVC hashes (md5) of its input data, and the environment (the library versions that decide
results, the CPU model, its features and cores). Beside it, the run record (``<model>.run.json``) holds
what changes on every run: the MLflow run id, the MLflow model's URI and the training wall time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from stages.lib import environment, files
from stages.lib.errors import UserError

REQUIRED = ("name", "file", "sha256", "format", "input", "params", "device", "metrics", "inputs")
RUN_SUFFIX = ".run.json"


def file_sha256(path: str | os.PathLike[str]) -> str:
    return files.file_digest(path, "sha256")


def write_card(
    path: str | os.PathLike[str],
    *,
    name: str,
    model_file: str | os.PathLike[str],
    fmt: Literal["keras", "skops"],
    input_kind: Literal["image", "flat"],
    params: dict[str, Any],
    device: str,
    metrics: dict[str, float],
    inputs: dict[str, str],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the card of a model already saved at ``model_file`` (atomically) and return it. Its bytes depend
    only on the model and how it was made: what changes on every run is in the run record
    (:func:`write_run`)."""
    card = {
        "name": name,
        "file": Path(model_file).name,
        "sha256": file_sha256(model_file),
        "format": fmt,
        "input": input_kind,
        "params": params,
        "device": device,
        "metrics": {k: float(v) for k, v in metrics.items()},
        "inputs": inputs,
        "environment": environment.describe(),
        **(extra or {}),
    }
    files.write_json(path, card)
    return card


def write_run(path: str | os.PathLike[str], *, run_id: str, model_uri: str, wall_time_s: float) -> None:
    """Write the run record of a training (atomically): its MLflow run, the MLflow model it logged, its wall
    time. It changes on every run, so evaluate reads it (to add test metrics to that run and register that
    model) without depending on it: a retraining to the same model re-runs nothing downstream."""
    files.write_json(
        path, {"mlflow_run_id": run_id, "mlflow_model_uri": model_uri, "wall_time_s": round(wall_time_s, 3)}
    )


def read_run(model_file: str | os.PathLike[str]) -> dict[str, Any]:
    """The run record beside ``model_file`` (same stem, ``.run.json``); {} when there is none or it is unreadable
    (a model trained without MLflow)."""
    try:
        record = json.loads(Path(model_file).with_suffix(RUN_SUFFIX).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def read_card(model_file: str | os.PathLike[str], stage: str) -> dict[str, Any]:
    """Read the card beside ``model_file`` (same stem, ``.json``) and check the model file's sha256 against it."""
    model_file = Path(model_file)
    card_path = model_file.with_suffix(".json")
    fix = f"Re-create it with `dvc repro --force {stage}`."
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{card_path}: model card not found. {fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{card_path}: not a valid model card ({exc}). {fix}") from None
    missing = [k for k in REQUIRED if k not in card]
    if missing:
        raise UserError(f"{card_path}: model card lacks {', '.join(missing)}. {fix}")
    if not model_file.is_file():
        raise UserError(f"{model_file}: model file not found. {fix}")
    if file_sha256(model_file) != card["sha256"]:
        raise UserError(f"{model_file}: sha256 differs from its card {card_path}; refusing to load it. {fix}")
    return card
