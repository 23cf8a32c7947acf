"""sweep: a sweep over CI runners: the params sets of a sweep file, one experiment per runner, one summary.

The sweep file (``.github/sweep.yaml``) lists experiments, each a name and the params it sets::

    experiments:
      - name: ridge-alpha-2
        set: [baselines.ridge.alpha=2.0]

``.github/workflows/sweep.yml`` runs three commands, and a person can run each by hand:

- ``python -m stages.commands.sweep plan FILE --suffix N``: prints ``matrix=<json>`` (a line for
  ``$GITHUB_OUTPUT``), one job per experiment; ``--suffix`` makes this sweep's names unique (the run number);
- ``python -m stages.commands.sweep run FILE --index I --suffix N``: experiment ``I``, by the one-machine
  command (:mod:`stages.commands.experiment`: pull, ``dvc exp run``, ``dvc exp push``);
- ``python -m stages.commands.sweep summary FILE --suffix N``: pulls the sweep's experiments (``dvc exp
  pull``) and prints Markdown: ``dvc exp show --md`` of them (the params that vary and the metrics) and each
  one's promotion decision from the MLflow registry.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from stages.commands import experiment
from stages.lib import files, tracking
from stages.lib.errors import UserError

log = logging.getLogger(__name__)

SWEEP_FILE = ".github/sweep.yaml"


def read_sweep(path: Path, suffix: str = "") -> list[dict[str, Any]]:
    """The experiments of the sweep file ``path``: ``{"name": ..., "set": [key=value, ...]}``, each name with
    ``-<suffix>`` when a suffix is given; raise :class:`UserError` naming the file and the entry at fault."""
    data = files.read_yaml(path, "sweep file")
    entries = data.get("experiments") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{path}: expected `experiments:` with a list of {{name, set}} entries")
    out, seen = [], set()
    for i, entry in enumerate(entries):
        name = entry.get("name") if isinstance(entry, dict) else None
        settings = entry.get("set", []) if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name or not isinstance(settings, list):
            raise UserError(f"{path}: experiments[{i}]: expected a name and a list `set` of key=value params")
        experiment.run_args(name, [str(s) for s in settings])  # checks each key=value
        full = f"{name}-{suffix}" if suffix else name
        if full in seen:
            raise UserError(f"{path}: experiments[{i}]: the name {name!r} is used twice")
        seen.add(full)
        out.append({"name": full, "set": [str(s) for s in settings]})
    return out


def plan(entries: list[dict[str, Any]]) -> str:
    """The ``matrix`` output line of the sweep's first job: one job per experiment (its index and name)."""
    jobs = [{"index": i, "name": entry["name"]} for i, entry in enumerate(entries)]
    return "matrix=" + json.dumps({"include": jobs}, separators=(",", ":"))


def decisions(names: list[str]) -> list[str]:
    """A Markdown table of each experiment's promotion decision, from its evaluate run in MLflow."""
    uri = tracking.tracking_uri()
    tracking.check_reachable(uri)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    lines = [
        "| experiment | decision | version | test accuracy | against champion | reason |",
        "|---|---|---:|---:|---:|---|",
    ]
    for name in names:
        found = client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            f"tags.`dvc.exp_name` = '{name}' and tags.`dvc.stage` = 'evaluate'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        tags = found[0].data.tags if found else {}
        if "promotion.decision" not in tags:
            lines.append(f"| {name} | not evaluated | | | | evaluate did not run, or registered nothing |")
            continue
        lines.append(
            f"| {name} | {tags['promotion.decision'].replace('_', ' ')} | {tags.get('promotion.version', '')} "
            f"| {float(tags.get('promotion.challenger_accuracy', 'nan')):.4f} "
            f"| {tags.get('promotion.champion_version', '')} | {tags.get('promotion.reason', '')} |"
        )
    return lines


def summary(entries: list[dict[str, Any]], remote: str) -> str:
    """The sweep's comparison in Markdown: its experiments pulled and shown, and their promotion decisions."""
    names = [entry["name"] for entry in entries]
    experiment.dvc("exp", "pull", remote, *names, what="Pulling the sweep's experiments")
    shown = experiment.dvc(
        "exp", "show", "--md", "--only-changed", "--hide-workspace", "--drop", "per_class", "--precision", "4",
        what="Showing the experiments",
    )  # fmt: skip
    out = [f"# Sweep: {len(names)} experiments", "", shown.strip(), "", "## Promotion decisions", ""]
    try:
        out += decisions(names)
    except UserError as exc:
        out.append(f"Not available: {exc}")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("plan", "run", "summary"))
    parser.add_argument("file", nargs="?", type=Path, default=Path(SWEEP_FILE), help=f"default {SWEEP_FILE}")
    parser.add_argument("--suffix", default="", help="appended to every name (the workflow's run number)")
    parser.add_argument("--index", type=int, help="run: which experiment of the file")
    parser.add_argument("--remote", default="origin", help="the shared git remote (default origin)")
    args = parser.parse_args(argv)
    from stages.lib.runtime import configure_logging

    configure_logging()
    try:
        entries = read_sweep(args.file, args.suffix)
        if args.command == "plan":
            sys.stdout.write(plan(entries) + "\n")
        elif args.command == "summary":
            sys.stdout.write(summary(entries, args.remote))
        else:
            if args.index is None or not 0 <= args.index < len(entries):
                raise UserError(f"run: --index must be 0 to {len(entries) - 1} for {args.file}")
            entry = entries[args.index]
            experiment.main(["--name", entry["name"], "--remote", args.remote, *[f"-S{s}" for s in entry["set"]]])
    except UserError as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
