"""The ``diffrt`` command line: argument parsing only; each command calls the library.

Errors a user can cause (ValueError, FileNotFoundError) print as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys


def _add_bench(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks (JSON results, tables, plots)")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    from .bench import samplers as bench_samplers

    bench_samplers.add_arguments(kinds.add_parser("samplers", help="sampler quality against NFE"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffrt", description="diffusion inference runtime and benchmarks")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_bench(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"diffrt: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
