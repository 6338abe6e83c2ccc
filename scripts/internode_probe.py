# ruff: noqa: B023  (each timed lambda runs inside the iteration that defines it)
"""Where the internode time goes: per (ranks per node, grid, chunk), the back-to-back time
of a full dispatch (notify + host wait + data kernel), a cached dispatch (data kernel only),
a num_worst_tokens dispatch (notify + data kernel, no host wait) and combine, at
T=4096 x 7168 top-8 of 256. Run under mpirun (scripts/gpu_check.sh style); rank 0 prints."""

from __future__ import annotations

import json
import os
import sys

import torch
from mpi4py import MPI

from mpiep.backends.cuda_internode import InternodeEngine
from mpiep.comm import Communicator
from mpiep.config import Config


def main() -> None:
    world = MPI.COMM_WORLD
    T, H, K, E = 4096, 7168, 8, 256
    results = []
    for rpn in [int(v) for v in os.environ.get("PROBE_RPN", "1,2").split(",")]:
        if world.size % rpn:
            continue
        comm = Communicator(world, ranks_per_node=rpn, timeout_s=30)
        dev = torch.device("cuda", comm.select_device(torch.cuda.device_count()))
        torch.cuda.set_device(dev)
        if comm.num_nodes == 1:  # the intranode kernels, for comparison
            from mpiep.backends.cuda_intranode import IntranodeEngine

            eng = IntranodeEngine(comm, dev, 300 << 20, 30.0)
        else:
            eng = InternodeEngine(comm, dev, 300 << 20, 600 << 20, 30.0)
        g = torch.Generator().manual_seed(7 + world.rank)
        idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(dev)
        w = torch.rand(T, K, generator=g).to(dev)
        x = torch.randn(T, H, generator=g).to(torch.bfloat16).to(dev)
        lay = eng.get_dispatch_layout(idx, E)
        grids = os.environ.get("PROBE_GRIDS", "24:6,24:32,8:32")
        for sms, chunk in [tuple(int(v) for v in g.split(":")) for g in grids.split(",")]:
            cfg = Config(sms, num_max_rdma_chunked_send_tokens=chunk)
            first = eng.dispatch(x, None, idx, w, lay, None, E, 1, 0, cfg)

            def timed(fn, iters=5):
                fn()
                torch.cuda.synchronize()
                world.Barrier()
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for _ in range(iters):
                    fn()
                b.record()
                b.synchronize()
                eng.check_errors()
                return round(a.elapsed_time(b) * 1000 / iters, 1)

            worst = world.size * T
            row = {
                "rpn": rpn,
                "sms": sms,
                "chunk": chunk,
                "full_us": timed(lambda: eng.dispatch(x, None, idx, w, lay, None, E, 1, 0, cfg)),
                "cached_us": timed(
                    lambda: eng.dispatch(x, None, None, None, None, first.handle, E, 1, 0, cfg)
                ),
                "worst_us": timed(
                    lambda: eng.dispatch(x, None, idx, w, lay, None, E, 1, worst, cfg)
                ),
                "combine_us": timed(lambda: eng.combine(first.recv_x, first.handle, None, (), cfg)),
            }
            results.append(row)
            if world.rank == 0:
                print(json.dumps(row), flush=True)
        eng.destroy()
        comm.free()
    if world.rank == 0 and os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "probe.json"), "w") as f:
            json.dump(results, f, indent=1)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
