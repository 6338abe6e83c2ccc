"""The ``mpiep`` command line: one entry point, one subcommand per job.

Each subcommand lives in its own module and exposes ``register(subparsers)``,
which adds an ``argparse`` parser whose ``func`` default is called with the
parsed namespace and returns the process exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Module that owns each subcommand, in the order ``mpiep --help`` lists them.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "mpiep.bench.cli",
    "mpiep.soak.cli",
    "mpiep.tune",
    "mpiep.slurm.cli",
    "mpiep.doctor",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpiep",
        description="mpiep: expert-parallel all-to-all for MPI-launched GPU clusters.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from mpiep import __version__

        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
