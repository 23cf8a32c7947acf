"""The environment as an input: the installed versions that decide a stage's numbers or bytes.

``versions.yaml`` (committed) holds the version of each package that can change what a stage writes
(:data:`PACKAGES`), and Python's minor version. ``make setup`` rewrites it from what is installed
(``python -m stages.commands.versions``), so a user who installs other versions, with or without
``constraints.txt``, gets a file that says so. Each stage declares in dvc.yaml, as params of
``versions.yaml``, the entries its outputs depend on: a TensorFlow bump makes the TensorFlow stages stale,
a comment or a dev-only tool makes nothing stale (DVC compares the values, and dev tools are not listed).

A stage checks at its start that the entries it declares match what is installed (:func:`check`):
otherwise its declared input would not be what it ran with.

:func:`machine` describes what else decides the numbers without being an input (the CPU and the threads):
it is recorded in every model card and MLflow run.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path

from stages.lib import files
from stages.lib.errors import UserError
from stages.lib.pipeline import VERSIONS_FILE

PYTHON = "python"
# Distributions whose version can change a stage's numbers or bytes (scipy: scikit-learn's solvers;
# matplotlib and pillow: the PNG outputs)
PACKAGES = ("numpy", "scipy", "scikit-learn", "skops", "tensorflow", "keras", "matplotlib", "pillow")
HEADER = """\
# The installed versions that decide the pipeline's numbers and bytes, written by `make setup`
# (python -m stages.commands.versions) from what is installed. Each stage declares in dvc.yaml the
# entries it depends on, so a version change re-runs exactly those stages; a stage refuses to run when
# an entry it declares differs from what is installed. Do not edit: run `make setup`.
"""
FIX = "run `make setup` (it rewrites versions.yaml from what is installed)"


def installed(packages: Iterable[str] = PACKAGES) -> dict[str, str]:
    """``{"python": "3.11", package: version, ...}`` as installed in this interpreter ("none" when absent)."""
    out = {PYTHON: f"{sys.version_info.major}.{sys.version_info.minor}"}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "none"
    return out


def render(versions: Mapping[str, str]) -> str:
    """The text of ``versions.yaml`` for ``versions`` (a fixed order: equal versions, equal bytes)."""
    return HEADER + "".join(f'{name}: "{version}"\n' for name, version in versions.items())


def read(root: str | os.PathLike[str] = ".") -> dict[str, str]:
    """The versions recorded in ``<root>/versions.yaml``."""
    path = Path(root) / VERSIONS_FILE
    data = files.read_yaml(path, "versions file")
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of package names to versions; {FIX}")
    return {str(name): str(version) for name, version in data.items()}


def write(root: str | os.PathLike[str] = ".") -> dict[str, tuple[str | None, str]]:
    """Rewrite ``<root>/versions.yaml`` from what is installed (only when it differs); return the entries that
    changed as ``{name: (old, new)}``."""
    path = Path(root) / VERSIONS_FILE
    now = installed()
    try:
        before = read(root) if path.is_file() else {}
    except UserError:
        before = {}
    if path.is_file() and path.read_text(encoding="utf-8") == render(now):
        return {}
    files.write_text(path, render(now))
    return {name: (before.get(name), version) for name, version in now.items() if before.get(name) != version}


def check(stage: str, declared: Iterable[str], root: str | os.PathLike[str] = ".") -> None:
    """Raise :class:`UserError` when an entry of versions.yaml that ``stage`` declares differs from what is
    installed (or is missing)."""
    declared = list(declared)
    if not declared:
        return
    recorded, now = read(root), installed([name for name in declared if name != PYTHON])
    wrong = [
        f"{name} {recorded.get(name, '(missing)')} recorded, {now[name]} installed"
        for name in declared
        if recorded.get(name) != now[name]
    ]
    if wrong:
        raise UserError(
            f"{Path(root) / VERSIONS_FILE}: stage '{stage}' depends on versions that differ from what is "
            f"installed ({'; '.join(wrong)}); {FIX}"
        )


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_features() -> list[str]:
    """The CPU features that change which kernels TensorFlow's oneDNN runs (and so the float rounding)."""
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in flags]
    except OSError:
        pass
    return []


def cpu_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and ``taskset`` narrow)."""
    return len(os.sched_getaffinity(0))


def machine() -> dict[str, object]:
    """The CPU model, its kernel-relevant features and the cores this process may use."""
    return {"cpu": cpu_model(), "cpu_features": cpu_features(), "cpu_cores": cpu_cores()}


def describe() -> dict[str, object]:
    """Everything a model card and an MLflow run record of the environment: the installed versions that decide
    results, and the machine."""
    return {**installed(), **machine()}
