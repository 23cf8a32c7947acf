"""experiment: one machine's part of a team's experiments: pull, run one params set, push.

``python -m stages.commands.experiment --name NAME -S key=value [-S ...]`` (``make experiment``) runs, in a
clone whose git remote and DVC remote the team shares:

1. ``dvc pull --allow-missing --run-cache``: the outputs of the checked-out commit and the run-cache, so a
   stage some machine already ran with the same inputs is restored instead of run again;
2. ``dvc exp run -n NAME -S ...``: the experiment, tracked to ``MLFLOW_TRACKING_URI`` (the team's server);
3. ``dvc exp push --run-cache REMOTE NAME``: the experiment's git ref to the git remote, its outputs and
   run-cache to the DVC remote.

Anyone then collects the team's experiments with ``dvc exp pull REMOTE NAME`` and ``dvc exp show``, takes
one with ``dvc exp apply NAME`` and ``dvc pull``. The same command runs by hand and in each job of the sweep
workflow (``.github/workflows/sweep.yml``). DVC's output goes to stderr; stdout gets the experiment's
metrics (``dvc metrics show --md``).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from stages.lib.errors import UserError

log = logging.getLogger(__name__)


def _dvc() -> str:
    beside = Path(sys.executable).parent / "dvc"  # the project's environment
    return str(beside) if beside.exists() else (shutil.which("dvc") or "dvc")


def dvc(*args: str, what: str) -> str:
    """Run ``dvc args`` and return its output, shown on stderr as it comes (stdout stays this command's own);
    raise :class:`UserError` saying ``what`` failed."""
    result = subprocess.run([_dvc(), *args], stdout=subprocess.PIPE, text=True)
    sys.stderr.write(result.stdout)
    if result.returncode != 0:
        raise UserError(f"{what} failed (`dvc {' '.join(args)}`, exit code {result.returncode}); see its output above")
    return result.stdout


def run_args(name: str, settings: Sequence[str]) -> list[str]:
    """``dvc exp run`` arguments for experiment ``name`` with params ``settings`` (``key=value``)."""
    for setting in settings:
        if "=" not in setting:
            raise UserError(f"-S {setting!r}: expected key=value, e.g. -S train_cnn.epochs=10")
    return ["exp", "run", "-n", name, *[arg for setting in settings for arg in ("-S", setting)]]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="the experiment's name (unique in the team)")
    parser.add_argument("-S", "--set-param", dest="settings", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--remote", default="origin", help="the shared git remote (default origin)")
    args = parser.parse_args(argv)
    from stages.lib.runtime import configure_logging

    configure_logging()
    try:
        if not Path("dvc.yaml").is_file():
            raise UserError(f"{Path.cwd()}: no dvc.yaml here; run it at the repository root")
        if not dvc("remote", "list", what="Listing the DVC remotes").strip():
            raise UserError(
                "no DVC remote: add the team's with `dvc remote add -d storage <url>`, then commit .dvc/config"
            )
        dvc("pull", "--allow-missing", "--run-cache", what="Pulling the outputs and run-cache")
        dvc(*run_args(args.name, args.settings), what=f"Experiment {args.name}")
        dvc("exp", "push", "--run-cache", args.remote, args.name, what=f"Pushing experiment {args.name}")
        sys.stdout.write(dvc("metrics", "show", "--md", what="Showing the metrics"))
        log.info("Experiment %s pushed to %s and the DVC remote", args.name, args.remote)
    except UserError as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
