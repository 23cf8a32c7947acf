"""Run every benchmark module in this package (``bench_*.py``), or only those named on the command line.

python -m benchmarks                         # all of them, each with its defaults
python -m benchmarks augment                 # bench_augment.py only
python -m benchmarks train_cnn --epoch-time  # one benchmark with its own options (everything after a "-")
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
from pathlib import Path


def discover() -> list[str]:
    """Names of the benchmark modules (``bench_*``) in this package, sorted."""
    here = str(Path(__file__).resolve().parent)
    return sorted(m.name for m in pkgutil.iter_modules([here]) if m.name.startswith("bench_"))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    first_option = next((i for i, a in enumerate(args) if a.startswith("-")), len(args))
    wanted, options = args[:first_option], args[first_option:]
    names = discover()
    if options and len(wanted) != 1:
        print("options go to one benchmark: python -m benchmarks <name> [options]", file=sys.stderr)
        return 2
    if wanted:
        unknown = [w for w in wanted if f"bench_{w.removeprefix('bench_')}" not in names]
        if unknown:
            print(f"unknown benchmark(s): {', '.join(unknown)}; available: {', '.join(names)}", file=sys.stderr)
            return 2
        names = [n for n in names if n.removeprefix("bench_") in {w.removeprefix("bench_") for w in wanted}]
    for name in names:
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        module = importlib.import_module(f"{__package__}.{name}")
        if options:
            (getattr(module, "cli", None) or module.main)(options)  # python -m benchmarks.<module> --help
        else:
            module.main()
        print(f"== {name} done in {time.perf_counter() - start:.1f} s\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
