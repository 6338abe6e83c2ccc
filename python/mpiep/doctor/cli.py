"""The doctor's entry points: ``collect`` runs every probe; ``mpiep doctor`` and
``python -m mpiep.doctor`` print the report."""

from __future__ import annotations

import argparse
import os
import sys

from mpiep.doctor.probes.environment import check_environment
from mpiep.doctor.probes.gpu import probe_gpus
from mpiep.doctor.probes.host import probe_host
from mpiep.doctor.probes.launcher import probe_launcher
from mpiep.doctor.probes.mpi import probe_mpi
from mpiep.doctor.probes.nvshmem import probe_nvshmem, probe_nvshmem_bootstrap
from mpiep.doctor.probes.rdma import probe_rdma
from mpiep.doctor.render import format_text
from mpiep.doctor.report import Report, to_json
from mpiep.slurm.profiles import DEFAULT_PROFILE

DESCRIPTION = "``mpiep doctor``: check this node for what an mpiep job needs and say what to fix."


def collect(
    sys_root: str = "/sys",
    env: dict[str, str] | None = None,
    mode: str = "normal",
    profile: str = DEFAULT_PROFILE,
) -> Report:
    """Run every probe and return the report."""
    env = dict(os.environ if env is None else env)
    report = Report()
    probe_host(report)
    probe_gpus(report, sys_root)
    probe_nvshmem(report)
    probe_nvshmem_bootstrap(report, env)
    probe_rdma(report, sys_root)
    probe_mpi(report)
    probe_launcher(report, env)
    check_environment(report, env, mode, profile)
    return report


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--mode",
        choices=("normal", "low-latency"),
        default="normal",
        help="mode for the 'job would get' section",
    )
    p.add_argument("--profile", default=DEFAULT_PROFILE, help="profile for that section")
    p.add_argument("--sys-root", default="/sys", help=argparse.SUPPRESS)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``doctor`` subcommand to the ``mpiep`` command line."""
    p = subparsers.add_parser(
        "doctor",
        help="check this node for GPUs, NVSHMEM, NICs, MPI and launcher",
        description=DESCRIPTION,
    )
    _add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the report; always 0 unless the options are bad."""
    try:
        report = collect(sys_root=args.sys_root, mode=args.mode, profile=args.profile)
    except ValueError as exc:
        print(f"mpiep doctor: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(to_json(report))
    else:
        sys.stdout.write(format_text(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m mpiep.doctor``."""
    parser = argparse.ArgumentParser(prog="mpiep doctor", description=DESCRIPTION)
    _add_arguments(parser)
    return run(parser.parse_args(argv))
