"""``mpiep tune``: find the fastest normal-mode SM count per EP size and write it down.

The result is a small JSON file (``--out``, default ``mpiep_tuned.json``) that
``MPIEP_TUNED_CONFIG=path`` makes ``Buffer.get_dispatch_config``/``get_combine_config``
use, so a cluster's measured best settings travel with its job scripts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tune",
        help="sweep SM counts for normal-mode dispatch/combine and write the best config",
        description="Time normal-mode dispatch and combine over several SM counts on this "
        "job's ranks and write the fastest per EP size as JSON (use with MPIEP_TUNED_CONFIG).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--sms", type=int, nargs="+", default=[8, 12, 16, 20, 24, 32])
    p.add_argument("--backend", choices=["auto", "cuda", "reference"], default="auto")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("mpiep_tuned.json"))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mpi4py import MPI

    from mpiep.bench.cases import Shape
    from mpiep.bench.run import Settings, run_normal

    comm = MPI.COMM_WORLD
    shape = Shape("normal", args.tokens, args.hidden, args.topk, args.experts)
    best: dict[str, tuple[float, int]] = {}
    for sms in args.sms:
        settings = Settings(
            warmup=2, iters=args.iters, budget_s=5.0, nccl=False, backend=args.backend, num_sms=sms
        )
        for row in run_normal(comm, shape, settings):
            if row.check != "ok":
                raise SystemExit(f"mpiep tune: wrong results with {sms} SMs: {row.check}")
            kind = "combine" if "combine" in row.case else "dispatch"
            if row.case.endswith("fp8"):
                continue
            if kind not in best or row.time["median_us"] < best[kind][0]:
                best[kind] = (row.time["median_us"], sms)
            if comm.rank == 0:
                print(f"{row.case:<24} num_sms={sms:<3} {row.time['median_us']:9.1f} us")
    if comm.rank == 0:
        table = load(args.out)
        table[str(comm.size)] = {k: {"num_sms": v[1], "median_us": v[0]} for k, v in best.items()}
        args.out.write_text(json.dumps(table, indent=1))
        print(f"wrote {args.out}: {table[str(comm.size)]}")
    return 0


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}
