"""``mpiep soak`` (also ``python -m mpiep soak``): long runs that check every iteration.

    mpirun -n 8 mpiep soak                      # 10,000 iterations per mode on GPUs
    mpirun -n 4 mpiep soak --iters 200 --mode low-latency --json soak.json

Exit status 1 when any iteration's result differs from the recomputation (on any rank).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

GPU_ITERS, CPU_ITERS = 10_000, 200


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "soak",
        help="run many checked dispatch/combine iterations and report any mismatch",
        description=(
            "Run dispatch and combine many times per mode, on input sets whose routing "
            "changes every iteration, and compare every result with a recomputation from the "
            "inputs (checked on the device, read back every --check-every iterations). "
            "Reports the iterations whose dispatch or combine differed; exit status 1 if any."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--mode", choices=["all", "normal", "low-latency"], default="all")
    p.add_argument(
        "--iters",
        type=int,
        default=None,
        help=f"iterations per mode (default {GPU_ITERS:,} on GPUs, {CPU_ITERS} on CPUs)",
    )
    p.add_argument("--tokens", type=int, default=64, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts-per-rank", type=int, default=8)
    p.add_argument("--check-every", type=int, default=100, help="iterations per host read-back")
    p.add_argument("--backend", choices=["auto", "cuda", "reference"], default="auto")
    p.add_argument("--timeout", type=float, default=None, help="Buffer timeout_s")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    p.add_argument("--inject-fault", type=int, default=None, help=argparse.SUPPRESS)  # tests
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mpi4py import MPI

    from mpiep import Buffer, get_low_latency_rdma_size_hint, get_normal_buffer_size_hint
    from mpiep.soak.data import Shape
    from mpiep.soak.run import soak_low_latency, soak_normal

    comm = MPI.COMM_WORLD
    R = comm.size
    shape = Shape(
        args.tokens,
        args.hidden,
        min(args.topk, args.experts_per_rank * R),
        args.experts_per_rank * R,
    )
    common = {"backend": args.backend, "timeout_s": args.timeout}
    results = []
    if args.mode in ("all", "normal"):
        nvl = get_normal_buffer_size_hint(shape.tokens, shape.hidden, R, shape.topk)
        buf = Buffer(comm, num_nvl_bytes=nvl, **common)
        iters = _iterations(args, buf)
        results.append(soak_normal(comm, buf, shape, iters, args.check_every, args.inject_fault))
        buf.destroy()
    if args.mode in ("all", "low-latency"):
        rdma = get_low_latency_rdma_size_hint(shape.tokens, shape.hidden, R, shape.experts)
        buf = Buffer(
            comm,
            num_rdma_bytes=rdma,
            low_latency_mode=True,
            num_qps_per_rank=args.experts_per_rank,
            **common,
        )
        iters = _iterations(args, buf)
        results.append(
            soak_low_latency(comm, buf, shape, iters, args.check_every, args.inject_fault)
        )
        buf.destroy()
    return _report(comm, results, args.json)


def _iterations(args: argparse.Namespace, buf: object) -> int:
    if args.iters is not None:
        return args.iters
    return GPU_ITERS if getattr(buf, "backend_name", "") == "cuda" else CPU_ITERS


def _report(comm, results, path: Path | None) -> int:  # type: ignore[no-untyped-def]
    everyone = comm.gather([r.to_json() for r in results], root=0)
    ok = comm.allreduce(all(r.ok for r in results), op=_land())
    if comm.rank == 0:
        for i, res in enumerate(results):
            bad = {k: sum(e[i]["mismatches"][k] for e in everyone) for k in res.mismatches}
            us = max(e[i]["us_per_iteration"] for e in everyone)
            print(
                f"soak {res.mode:<12} {res.shape.tokens} tokens x {res.shape.hidden}, "
                f"top-{res.shape.topk} of {res.shape.experts}: {res.iterations} iterations, "
                f"{us:.0f} us each; mismatches: dispatch {bad['dispatch']}, "
                f"combine {bad['combine']}"
            )
            for rank, e in enumerate(everyone):
                for line in e[i]["first_bad"]:
                    print(f"  rank {rank}: {line}")
        print("soak: OK" if ok else "soak: MISMATCHES (see above)")
        if path is not None:
            path.write_text(
                json.dumps({"ranks": comm.size, "ok": ok, "ranks_results": everyone}, indent=1)
            )
    sys.stdout.flush()
    return 0 if ok else 1


def _land():  # type: ignore[no-untyped-def]
    from mpi4py import MPI

    return MPI.LAND
