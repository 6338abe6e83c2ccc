"""``mpiep slurm``: print a ready-to-submit sbatch script for an expert-parallel job."""

from __future__ import annotations

import argparse
import os
import sys

from mpiep.slurm.profiles import (
    DEFAULT_PROFILE,
    MODES,
    PROFILES,
    ProfileError,
    get_profile,
    parse_hca_list,
    symmetric_size_hint,
)
from mpiep.slurm.render import (
    DEFAULT_PAYLOAD,
    GPU_REQUESTS,
    LAUNCHERS,
    JobError,
    JobSpec,
    render,
)

DESCRIPTION = """\
Print an sbatch script that runs one rank per GPU with srun (PMIx or PMI-2) or with
Open MPI's mpirun inside the allocation, pins each rank's NIC, puts the job's traffic on
the service levels of a network profile and writes one log per rank. Bad combinations
are refused with a one-line message and exit code 2. See slurm/README.md.
"""


def _add_arguments(p: argparse.ArgumentParser) -> None:
    job = p.add_argument_group("job layout")
    job.add_argument("--gpus", type=int, help="total GPUs = ranks (required)")
    job.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    job.add_argument("--mode", choices=MODES, default="normal", help="mpiep mode (default normal)")
    job.add_argument("--launcher", choices=LAUNCHERS, default="srun", help="default srun")
    job.add_argument("--mpi", help="srun PMI plugin: pmix (default), pmix_vN, pmi2 or auto")
    job.add_argument("--partition")
    job.add_argument("--account")
    job.add_argument("--time", default="00:30:00", help="wall time (default 00:30:00)")
    job.add_argument("--job-name")
    job.add_argument("--output-dir", default="mpiep-logs", help="per-rank logs go to DIR/JOBID")
    job.add_argument("--payload", default=DEFAULT_PAYLOAD, help=f"default: {DEFAULT_PAYLOAD!r}")
    job.add_argument("--cpus-per-task", type=int)
    job.add_argument("--exclusive", action="store_true", help="ask for whole nodes")
    job.add_argument(
        "--gpu-request",
        choices=GPU_REQUESTS,
        default="gpus-per-node",
        help="how GPUs are requested: --gpus-per-node, --gres=gpu:N, or not at all",
    )
    job.add_argument(
        "--virtual-node-size",
        type=int,
        help="export MPIEP_RANKS_PER_NODE=N so one host acts as several nodes",
    )
    net = p.add_argument_group("network profile")
    net.add_argument(
        "--profile",
        default=DEFAULT_PROFILE,
        help=f"one of {', '.join(PROFILES)} (default {DEFAULT_PROFILE})",
    )
    net.add_argument("--list-profiles", action="store_true", help="describe the profiles, exit")
    net.add_argument("--sl-normal", type=int, help="SL of normal-mode traffic (0-15)")
    net.add_argument("--sl-low-latency", type=int, help="SL of low-latency traffic (0-15)")
    net.add_argument("--sl-other", type=int, help="SL of NCCL/MPI/other traffic (0-15)")
    net.add_argument(
        "--adaptive-routing",
        choices=("on", "off", "auto"),
        default="auto",
        help="the job's SL is (on) / is not (off) routed adaptively; auto: as the profile says",
    )
    net.add_argument("--congestion-control", choices=("on", "off"), help="expected on the SLs")
    net.add_argument("--hca-list", help="HCAs the job may use, e.g. mlx5_0:1,mlx5_1:1")
    net.add_argument("--nic-map", help="HCA per local GPU (or per equal GPU group), in order")
    net.add_argument("--traffic-class", type=int, help="RoCE traffic class for NVSHMEM and NCCL")
    net.add_argument("--ibgda", choices=("on", "off"), default="on", help="default on")
    heap = p.add_argument_group("symmetric heap (NVSHMEM_SYMMETRIC_SIZE)")
    heap.add_argument("--symmetric-size", help="explicit size, e.g. 2g; default: from the hints")
    heap.add_argument("--hidden", type=int, default=7168, help="hidden size hint (7168)")
    heap.add_argument("--max-tokens", type=int, help="tokens per rank hint (128 LL, 4096 normal)")
    heap.add_argument("--num-experts", type=int, default=256, help="experts hint (256)")
    heap.add_argument("--topk", type=int, default=8, help="top-k hint (8)")
    p.add_argument("-o", "--out", metavar="FILE", help="write the script to FILE, not stdout")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``slurm`` subcommand to the ``mpiep`` command line."""
    p = subparsers.add_parser(
        "slurm",
        help="print an sbatch script for an EP job",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(p)
    p.set_defaults(func=run)


def spec_from_args(args: argparse.Namespace) -> JobSpec:
    """Build the JobSpec; raises ProfileError/JobError on bad input."""
    if args.gpus is None:
        raise JobError("--gpus is required")
    profile = get_profile(args.profile)
    cc = None if args.congestion_control is None else args.congestion_control == "on"
    hcas = parse_hca_list(args.hca_list) if args.hca_list else None
    profile = profile.with_overrides(
        sl_normal=args.sl_normal,
        sl_low_latency=args.sl_low_latency,
        sl_other=args.sl_other,
        adaptive_routing=args.adaptive_routing,
        mode=args.mode,
        congestion_control=cc,
        hca_list=hcas,
        traffic_class=args.traffic_class,
    )
    if args.ibgda == "off":
        import dataclasses

        profile = dataclasses.replace(profile, ibgda=False)
    size = args.symmetric_size
    if size is None:
        tokens = args.max_tokens or (128 if args.mode == "low-latency" else 4096)
        for flag, value in (("--hidden", args.hidden), ("--max-tokens", tokens)):
            if value < 1:
                raise JobError(f"{flag} must be at least 1, not {value}")
        size = symmetric_size_hint(
            args.mode,
            hidden=args.hidden,
            max_tokens=tokens,
            num_experts=max(1, args.num_experts),
            topk=args.topk,
        )
    return JobSpec(
        gpus=args.gpus,
        gpus_per_node=args.gpus_per_node,
        mode=args.mode,
        network=profile,
        launcher=args.launcher,
        mpi=args.mpi,
        partition=args.partition,
        account=args.account,
        time=args.time,
        job_name=args.job_name,
        output_dir=args.output_dir,
        payload=args.payload,
        cpus_per_task=args.cpus_per_task,
        exclusive=args.exclusive,
        gpu_request=args.gpu_request,
        nic_map=parse_hca_list(args.nic_map) if args.nic_map else (),
        virtual_node_size=args.virtual_node_size,
        symmetric_size=size,
    )


def describe_profiles() -> str:
    """One paragraph per named profile."""
    lines = []
    for p in PROFILES.values():
        adaptive = ",".join(str(s) for s in sorted(p.adaptive_sls)) or "none"
        lines.append(
            f"{p.name}: SL normal={p.sl.normal} low-latency={p.sl.low_latency} "
            f"other={p.sl.other}; adaptive SLs {adaptive}; isolation "
            f"{'on' if p.isolate else 'off'}\n    {p.description}"
        )
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    """Render (or refuse) the job; 0 on success, 2 on a bad option."""
    if args.list_profiles:
        sys.stdout.write(describe_profiles())
        return 0
    try:
        text = render(spec_from_args(args))
    except (JobError, ProfileError) as exc:
        print(f"mpiep slurm: error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
        os.chmod(args.out, 0o755)
        print(f"mpiep slurm: wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m mpiep.slurm``)."""
    parser = argparse.ArgumentParser(
        prog="mpiep slurm",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(parser)
    return run(parser.parse_args(argv))
