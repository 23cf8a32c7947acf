"""Model cards: the small JSON file written beside each model in ``models/``.

A card says what the model is and where it came from: its file and that file's sha256 (checked before
loading), its format and input kind, the params and resolved device it was trained with, its validation
metrics, the DVC hashes (md5) of its input data, its MLflow run id and its training wall time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from stages.lib import files
from stages.lib.errors import UserError

REQUIRED = ("name", "file", "sha256", "format", "input", "params", "device", "metrics", "inputs", "mlflow_run_id")


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
    mlflow_run_id: str,
    wall_time_s: float,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the card of a model already saved at ``model_file`` (atomically) and return it."""
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
        "mlflow_run_id": mlflow_run_id,
        "wall_time_s": round(wall_time_s, 3),
        **(extra or {}),
    }
    files.write_json(path, card)
    return card


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
