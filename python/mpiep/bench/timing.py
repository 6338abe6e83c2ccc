"""Timing that is fair across ranks: every iteration starts after a barrier, and a
call's time is the slowest rank's (a collective is done when its last rank is)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from mpi4py import MPI


def time_call(
    fn: Callable[[], object],
    comm: MPI.Comm,
    device: torch.device,
    warmup: int,
    iters: int,
    budget_s: float,
) -> dict[str, float]:
    """Median/min/max microseconds of ``fn`` over iterations, max over ranks.

    Stops early (at least 2 timed iterations) once ``budget_s`` seconds are spent,
    decided by rank 0 so that all ranks run the same number of iterations.
    """
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
    samples: list[float] = []
    started = time.perf_counter()
    for i in range(iters):
        comm.Barrier()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            local = start.elapsed_time(end) * 1e3
        else:
            t0 = time.perf_counter()
            fn()
            local = (time.perf_counter() - t0) * 1e6
        samples.append(comm.allreduce(local, op=MPI.MAX))
        out_of_time = time.perf_counter() - started > budget_s and i >= 1
        if comm.bcast(out_of_time, root=0):
            break
    return {
        "median_us": statistics.median(samples),
        "min_us": min(samples),
        "max_us": max(samples),
        "iters": len(samples),
    }
