"""Timing that is fair across ranks.

Two figures per call:
- ``median_us``: back-to-back throughput, as DeepEP's benchmark measures it: after one
  barrier, a batch of calls runs without host synchronisation between them (beyond what
  the call itself does) and the batch time is divided by its length; the median over
  batches, slowest rank's. Launch skew between ranks is paid once per batch.
- ``synced_us``: one call started right after an MPI barrier, slowest rank's; it includes
  the skew between ranks leaving the barrier, as a lone call in a real step would.
- ``kernel_us`` (GPUs): the device time of the call's kernels and copies, summed, from the
  torch profiler (CUPTI), per call, slowest rank's. This is what DeepEP's tables report
  (its bench_kineto); host overhead and idle gaps between kernels are not in it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from mpi4py import MPI


def elapsed_us(fn: Callable[[], object], repeat: int, device: torch.device) -> float:
    """Time of ``repeat`` back-to-back calls of ``fn``: CUDA events around them on a GPU
    (synchronised after the last), the host clock on a CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeat):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) * 1e6


def time_call(
    fn: Callable[[], object],
    comm: MPI.Comm,
    device: torch.device,
    warmup: int,
    iters: int,
    budget_s: float,
    batch: int | None = None,
    profile_kernels: bool = True,
    step: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """Time ``fn``; stops early once ``budget_s`` is spent (rank 0 decides, so that all
    ranks run the same calls). ``batch`` calls per throughput sample (default: 10 on
    GPUs, 1 on CPUs, where a call is long enough on its own). ``profile_kernels=False`` for
    calls that must not run 10 more times in a row (sends whose hooks are still pending).
    ``step(done, total)`` is told of each timed call (a progress line)."""
    if batch is None:
        batch = 10 if device.type == "cuda" else 1
    if step is not None:
        step(0, iters)
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    synced: list[float] = []
    batched: list[float] = []
    started = time.perf_counter()
    for i in range(iters):
        comm.Barrier()
        synced.append(comm.allreduce(elapsed_us(fn, 1, device), op=MPI.MAX))
        if batch > 1:
            comm.Barrier()
            batched.append(comm.allreduce(elapsed_us(fn, batch, device) / batch, op=MPI.MAX))
        if step is not None:
            step(i + 1, iters)
        out_of_time = time.perf_counter() - started > budget_s and i >= 1
        if comm.bcast(out_of_time, root=0):
            break
    kernel = 0.0
    if profile_kernels and device.type == "cuda":
        kernel = comm.allreduce(kernel_time_us(fn, device), op=MPI.MAX)
    samples = batched or synced
    return {
        "kernel_us": kernel,
        "median_us": statistics.median(samples),
        "min_us": min(samples),
        "max_us": max(samples),
        "synced_us": statistics.median(synced),
        "iters": len(synced),
        "batch": batch,
    }


def kernel_time_us(fn: Callable[[], object], device: torch.device, calls: int = 10) -> float:
    """Device time per call of everything ``fn`` runs on the GPU (0.0 if CUPTI is unusable).

    ``fn`` runs ``calls`` times whatever the profiler does, and its own errors propagate:
    every rank must make the same calls, or peers wait for data that never comes.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    global _profiler_warm
    if not _profiler_warm:  # the first profiled region also times CUPTI's own start-up
        _profiler_warm = True
        kernel_time_us(fn, device, calls=1)
    prof = profile(activities=[ProfilerActivity.CUDA])
    try:
        prof.__enter__()
    except Exception as exc:
        _warn_once(f"kernel times unavailable: {type(exc).__name__}: {exc}")
        prof = None
    for _ in range(calls):
        fn()
    torch.cuda.synchronize(device)
    if prof is None:
        return 0.0
    try:
        prof.__exit__(None, None, None)
        events = prof.events()
    except Exception as exc:
        _warn_once(f"kernel times unavailable: {type(exc).__name__}: {exc}")
        return 0.0
    total = sum(e.time_range.elapsed_us() for e in events if e.device_type == DeviceType.CUDA)
    return total / calls


_warned: set[str] = set()
_profiler_warm = False


def _warn_once(message: str) -> None:
    import sys

    if message not in _warned:
        _warned.add(message)
        print(f"mpiep bench: {message}", file=sys.stderr)


def time_interleaved(
    fns: list[Callable[[], object]],
    comm: MPI.Comm,
    warmup: int,
    iters: int,
    budget_s: float,
    step: Callable[[int, int], None] | None = None,
) -> list[dict[str, float]]:
    """Time CPU calls in turn (a, b, a, b, ...), each right after a barrier, slowest rank's.

    For a call and its MPI floor: both see the same load from whatever else runs on the
    machine, so their ratio holds even when absolute times drift."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    samples: list[list[float]] = [[] for _ in fns]
    started = time.perf_counter()
    if step is not None:
        step(0, iters)
    for i in range(iters):
        for fn, out in zip(fns, samples, strict=True):
            comm.Barrier()
            out.append(comm.allreduce(elapsed_us(fn, 1, torch.device("cpu")), op=MPI.MAX))
        if step is not None:
            step(i + 1, iters)
        out_of_time = time.perf_counter() - started > budget_s and i >= 1
        if comm.bcast(out_of_time, root=0):
            break
    return [
        {
            "kernel_us": 0.0,
            "median_us": statistics.median(s),
            "min_us": min(s),
            "max_us": max(s),
            "synced_us": statistics.median(s),
            "iters": len(s),
            "batch": 1,
        }
        for s in samples
    ]
