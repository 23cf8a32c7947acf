"""versions: write versions.yaml from what is installed (``make setup`` runs it), or check it (``--check``).

``python -m stages.commands.versions`` rewrites ``versions.yaml`` at the repository root when an entry
differs from the installed version, and prints each change; ``--check`` only compares, and exits 1 naming
the differences. See :mod:`stages.lib.environment`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from stages.lib import environment
from stages.lib.errors import UserError

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 when versions.yaml differs")
    args = parser.parse_args(argv)
    from stages.lib.runtime import configure_logging

    configure_logging()
    path = Path(environment.VERSIONS_FILE)
    try:
        if args.check:
            recorded, now = environment.read(), environment.installed()
            wrong = [f"{k}: {recorded.get(k)} recorded, {v} installed" for k, v in now.items() if recorded.get(k) != v]
            if wrong:
                raise UserError(f"{path} differs from what is installed ({'; '.join(wrong)}); {environment.FIX}")
            return
        for name, (old, new) in environment.write().items():
            sys.stdout.write(f"{path}: {name} {old or '(new)'} -> {new}\n")
    except UserError as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
