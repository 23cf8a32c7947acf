"""What ties an MLflow run to DVC: the stage's dvc.lock hash and the ``dvc`` invocation that ran it.

**Lock hash.** A stage's dvc.lock entry records its command, the md5 of each dependency and the values of
its params (of params.yaml and versions.yaml). :func:`entry_hash` is the sha256 of exactly those three
(outputs excluded, as in DVC's own run-cache key), so it names "this code on this data with these params
and library versions". A running stage computes it from dvc.yaml, its dependency files and params files
(:func:`stage_hash`) before DVC has written the
entry; afterwards the same value follows from dvc.lock (:func:`lock_hashes`), so a run can be found from
the lock file and the lock file checked against a run.

**Invocation.** Every stage DVC runs is a child process of one ``dvc`` process (``dvc repro``,
``dvc exp run``, or the ``dvc exp exec-run`` worker of a queued experiment). :func:`dvc_invocation`
finds that ancestor and names it by host, process id and start time, which together are unique, so
all stages of one invocation share one parent run.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.lib.files import file_md5, parse_yaml, read_yaml
from stages.lib.pipeline import PARAMS_FILE, PIPELINE_FILE, stage_names, stage_spec

LOCK_FILE = "dvc.lock"


def entry_hash(cmd: str, deps: Mapping[str, str], params: Mapping[str, Mapping[str, Any]]) -> str:
    """sha256 of a stage's command, dependency md5s (``{path: md5}``) and params values (``{params file: {key:
    value}}``, versions.yaml's included)."""
    blob = json.dumps({"cmd": cmd, "deps": dict(deps), "params": dict(params)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _lookup(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def stage_hash(stage: str, root: str | os.PathLike[str] = ".") -> str:
    """The lock hash ``stage`` will have in dvc.lock once it has run on the current files under ``root``."""
    root = Path(root)
    spec = stage_spec(stage, read_yaml(root / PIPELINE_FILE, "pipeline file"))
    params: dict[str, dict[str, Any]] = {}
    for entry in spec.get("params") or []:
        for name, keys in ({PARAMS_FILE: [entry]} if isinstance(entry, str) else entry).items():
            values = read_yaml(root / name, "params file")
            params.setdefault(name, {}).update({key: _lookup(values, key) for key in keys})
    # DVC runs a stage only when its deps exist; by hand, a missing one just yields a hash no lock matches
    deps = {path: file_md5(root / path) if (root / path).is_file() else "" for path in spec.get("deps") or []}
    return entry_hash(spec["cmd"], deps, params)


def lock_hashes(root: str | os.PathLike[str] = ".") -> dict[str, str]:
    """The lock hash of every stage dvc.lock holds under ``root`` (none when there is no dvc.lock yet)."""
    path = Path(root) / LOCK_FILE
    return _hashes(read_yaml(path, "lock file")) if path.is_file() else {}


def lock_hashes_from_text(text: str) -> dict[str, str]:
    """:func:`lock_hashes` of the dvc.lock content ``text`` (e.g. a committed version)."""
    return _hashes(parse_yaml(text))


def _hashes(lock: Any) -> dict[str, str]:
    hashes = {}
    for stage, entry in ((lock or {}).get("stages") or {}).items():
        deps = {d["path"]: d.get("md5", "") for d in entry.get("deps") or []}
        hashes[stage] = entry_hash(entry.get("cmd", ""), deps, entry.get("params") or {})
    return hashes


def pipeline_stages(root: str | os.PathLike[str] = ".") -> list[str]:
    """The stages of dvc.yaml under ``root``, in file order, foreach stages expanded (``train_baseline@ridge``)."""
    return stage_names(read_yaml(Path(root) / PIPELINE_FILE, "pipeline file") or {})


@dataclass(frozen=True)
class Invocation:
    """The ``dvc`` process that runs this stage: ``key`` is unique to it, ``command`` is its command line."""

    key: str
    command: str


def _proc_info(pid: int) -> tuple[int, str, list[str]] | None:
    """``(parent pid, start time, argv)`` of process ``pid``, from /proc or else ``ps``; None when gone."""
    proc = Path("/proc") / str(pid)
    if proc.is_dir():
        try:
            stat = (proc / "stat").read_text()
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            return None
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, ..., starttime (22nd)
        return int(fields[1]), fields[19], [a for a in argv if a]
    try:
        out = subprocess.run(
            ["ps", "-o", "ppid=", "-o", "lstart=", "-o", "command=", "-p", str(pid)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return None
    if len(out) < 7:
        return None
    return int(out[0]), " ".join(out[1:6]), out[6:]


def _dvc_args(argv: list[str]) -> list[str] | None:
    """The arguments after ``dvc`` when a command line runs DVC (``dvc ...``, ``python .../dvc ...`` or
    ``python -m dvc ...``); None when it does not."""
    names = [Path(a).name for a in argv[:3]]
    if names[:1] == ["dvc"]:
        return argv[1:]
    if names[1:2] == ["dvc"]:
        return argv[2:]
    if names[1:3] == ["-m", "dvc"]:
        return argv[3:]
    return None


def dvc_invocation() -> Invocation | None:
    """The nearest ``dvc`` ancestor of this process; None when DVC did not start it."""
    current = os.getppid()
    for _ in range(32):  # a guard against cycles in a racing process table
        info = _proc_info(current)
        if info is None:
            return None
        ppid, started, argv = info
        args = _dvc_args(argv)
        if args is not None:
            return Invocation(f"{socket.gethostname()}:{current}:{started}", " ".join(["dvc", *args]))
        if ppid <= 1:
            return None
        current = ppid
    return None
