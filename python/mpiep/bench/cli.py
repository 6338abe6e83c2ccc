"""``mpiep bench`` (also ``python -m mpiep bench``): the main job.

Run it under the job's launcher, one rank per GPU, e.g.
``mpiexec -n 4 mpiep bench`` or ``srun -n 16 mpiep bench --json out.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

from mpiep.bench.cases import QUICK, SMALL, STANDARD, Shape, sweep


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="time dispatch/combine (normal and low-latency) and print a table",
        description=(
            "Benchmark mpiep's dispatch and combine, in normal and low-latency mode, on the "
            "fastest backend available (GPU kernels when GPUs and the compiled core are "
            "present, else the reference backend on CPU tensors). Results are checked against "
            "a local recomputation first. With GPUs, an NCCL all_to_all of the same bytes is "
            "timed alongside; on CPUs, a raw MPI Alltoallv of each case's bytes (the floor). "
            "Run one rank per GPU under mpirun/mpiexec/srun."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--mode", choices=["all", "normal", "low-latency"], default="all")
    p.add_argument(
        "--shapes",
        choices=["all", "standard", "small", "quick"],
        default="all",
        help="DeepEP's standard shapes, smaller ones, or both (all)",
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny shapes and few iterations (smoke test)"
    )
    p.add_argument("--tokens", type=int, help="override tokens per rank")
    p.add_argument("--hidden", type=int, help="override the hidden size")
    p.add_argument("--topk", type=int, help="override top-k")
    p.add_argument("--experts", type=int, help="override the number of experts")
    p.add_argument(
        "--sweep",
        action="store_true",
        help="token-count sweep (normal 128..8192, low latency 1..256)",
    )
    p.add_argument("--backend", choices=["auto", "cuda", "reference"], default="auto")
    p.add_argument(
        "--ranks-per-node",
        type=int,
        help="treat every N consecutive ranks as one node (virtual nodes: the internode path "
        "on one host; sets MPIEP_RANKS_PER_NODE)",
    )
    p.add_argument("--num-sms", type=int, help="SMs for the normal-mode kernels")
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed calls per case (None: 5 GPU, 3 CPU)"
    )
    p.add_argument(
        "--iters", type=int, default=None, help="timed calls per case, at most (None: 50)"
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds per case before stopping early (None: 10 GPU, 3 CPU)",
    )
    p.add_argument("--no-nccl", action="store_true", help="skip the NCCL baseline")
    p.add_argument(
        "--no-floor",
        action="store_true",
        help="skip the MPI floor (a raw Alltoallv of each case's bytes, CPU runs)",
    )
    p.add_argument(
        "--no-hooks",
        action="store_true",
        help="skip the low-latency send-phase row timed with receive hooks (GPUs)",
    )
    p.add_argument(
        "--kernel-times",
        action="store_true",
        help="add a kernel-time column from the torch profiler (GPUs; experimental: "
        "implausible under CUDA MPS, see docs/PERFORMANCE.md)",
    )
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    p.add_argument("--plot", type=Path, help="with --sweep, write a PNG of time vs tokens here")
    p.set_defaults(func=run)


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _share_cores(comm: object) -> None:
    """CPU runs: give each rank its share of this node's cores as torch threads. Four ranks
    on two cores with torch's default (a thread per core each) spend their time preempting
    each other's OpenMP threads. OMP_NUM_THREADS, when set, wins."""
    import os

    import torch
    from mpi4py import MPI

    if os.environ.get("OMP_NUM_THREADS"):
        return
    assert isinstance(comm, MPI.Comm)
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local = node.Get_size()
    node.Free()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local))


def _shapes(args: argparse.Namespace) -> list[Shape]:
    name = "quick" if args.quick else args.shapes
    base = {"standard": STANDARD, "small": SMALL, "quick": QUICK, "all": STANDARD + SMALL}[name]
    shapes = []
    for s in base:
        if args.mode != "all" and s.mode != args.mode:
            continue
        s = Shape(
            s.mode,
            args.tokens or s.tokens,
            args.hidden or s.hidden,
            args.topk or s.topk,
            args.experts or s.experts,
        )
        shapes += sweep(s) if args.sweep else [s]
    return shapes


def run(args: argparse.Namespace) -> int:
    import torch
    from mpi4py import MPI

    from mpiep.bench import nccl
    from mpiep.bench.report import FOOTNOTE, Progress, format_table
    from mpiep.bench.run import Settings, rows_json, run_low_latency, run_normal

    comm = MPI.COMM_WORLD
    if args.ranks_per_node:
        import os

        os.environ["MPIEP_RANKS_PER_NODE"] = str(args.ranks_per_node)  # every Buffer below
    on_gpu = torch.cuda.is_available() and args.backend != "reference"
    if not on_gpu:
        _share_cores(comm)
    # CPU runs: every case timed for up to 50 calls or 3 s, whichever comes first. Five
    # calls after one warm-up (the old default) left the few-ms low-latency cases noisy and
    # still warming up: their ratio to the floor moved by 20% from run to run.
    default_warmup = 1 if args.quick else (5 if on_gpu else 3)
    settings = Settings(
        warmup=args.warmup if args.warmup is not None else default_warmup,
        iters=args.iters if args.iters is not None else (3 if args.quick else 50),
        budget_s=args.budget
        if args.budget is not None
        else (2.0 if args.quick else (10.0 if on_gpu else 3.0)),
        nccl=not args.no_nccl,
        kernel_times=args.kernel_times,
        hooks=not args.no_hooks,
        backend=args.backend,
        num_sms=args.num_sms,
        floor=not args.no_floor,
    )
    progress = Progress() if comm.rank == 0 else None
    if progress is not None:
        settings.progress = progress.step
    shapes = _shapes(args)
    rows = []
    for i, shape in enumerate(shapes):
        if progress is not None:
            progress.shape(i + 1, len(shapes), f"{shape.mode} {shape.label}")
        runner = run_normal if shape.mode == "normal" else run_low_latency
        rows += runner(comm, shape, settings)
    if progress is not None:
        progress.close()
    nccl.shutdown()

    backends = sorted({str(r.extra.get("backend")) for r in rows if r.extra.get("backend")})
    failed = any(r.check.startswith("FAIL") for r in rows)
    if comm.rank == 0:
        device = (
            torch.cuda.get_device_name()
            if on_gpu
            else f"cpu ({platform.processor() or platform.machine()})"
        )
        title = (
            f"mpiep bench  backend={','.join(backends)}  ranks={comm.size}  device={device}  "
            f"commit={_git_commit()}"
        )
        print(format_table(title, rows))
        print(FOOTNOTE)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(
                json.dumps(
                    {"title": title, "ranks": comm.size, "device": device, "rows": rows_json(rows)},
                    indent=1,
                    default=str,
                )
            )
        if args.plot and args.sweep:
            _plot(rows, args.plot)
        if failed:
            print("mpiep bench: some results were wrong (see the check column)", file=sys.stderr)
    return 1 if failed else 0


def _plot(rows: list, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("mpiep bench: matplotlib is not installed; no plot written", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for case in dict.fromkeys(r.case for r in rows):
        pts = [
            (r.shape.tokens, r.time["median_us"])
            for r in rows
            if r.case == case and r.time["iters"]
        ]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=case)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens per rank")
    ax.set_ylabel("median time (us)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
