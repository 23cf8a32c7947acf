"""champion: show the registered CNN's versions as the promotion rule judges them, or pin one by hand.

``python -m stages.commands.champion show`` lists every version of the registered model (params.yaml's
``settings.registered_model``) with its test accuracy, margin, pin or rejection, the rule's verdict and its
aliases. ``python -m stages.commands.champion pin VERSION --reason TEXT`` rolls the champion back (or
forward) to VERSION for good: it pins VERSION and rejects every later version, so the rule itself ends at
VERSION and no evaluate's repair moves the alias away (:func:`stages.lib.registry.pin`). The store is
``MLFLOW_TRACKING_URI``, else the repository's ``mlflow.db``, as for the stages.
"""

from __future__ import annotations

import argparse
import logging
import sys

from stages.lib import params, registry, tracking
from stages.lib.errors import UserError

log = logging.getLogger(__name__)


def table(outcome: registry.Outcome, versions: list[registry.Version], aliases: dict[str, int]) -> str:
    """One line per version: number, accuracy, margin, pin or rejection, verdict, aliases."""
    by_version: dict[int, list[str]] = {}
    for alias, number in aliases.items():
        by_version.setdefault(number, []).append(f"@{alias}")
    lines = [f"{'version':>7}  {'accuracy':>8}  {'margin':>6}  {'state':<8}  verdict"]
    for v in versions:
        state = "rejected" if v.rejected else "pinned" if v.pinned else ""
        verdict = outcome.verdicts.get(v.number)
        said = "left out by a pin" if verdict is None else ("crowned" if verdict.promoted else "not crowned")
        tail = " ".join(by_version.get(v.number, []))
        lines.append(f"{v.number:>7}  {v.accuracy:>8.4f}  {v.margin:>6.4f}  {state:<8}  {said} {tail}".rstrip())
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="registered model (default: params.yaml settings.registered_model)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("show", help="list the versions as the rule judges them")
    pin = commands.add_parser("pin", help="make VERSION the champion for good (rejects every later version)")
    pin.add_argument("version", type=int)
    pin.add_argument("--reason", required=True, help="why (stored on each rejected version)")
    args = parser.parse_args(argv)
    from stages.lib.runtime import configure_logging

    configure_logging()
    try:
        name = args.model or params.read_all().settings.registered_model
        uri = tracking.tracking_uri()
        tracking.check_reachable(uri)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        if args.command == "pin":
            registry.pin(client, name, args.version, args.reason)
        versions = registry.read_versions(client, name)
        outcome = registry.walk(versions)
        sys.stdout.write(f"{name} in {tracking.redact_uri(uri)}\n")
        sys.stdout.write(table(outcome, versions, registry.read_aliases(client, name)))
    except UserError as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
