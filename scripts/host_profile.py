# ruff: noqa: B023  (each timed closure runs inside the iteration that defines it)
"""Where the host microseconds of a call go, layer by layer (issue 10's profile).

For each operation, the host time of one call (perf_counter around the call, GPU idle
before it, so nothing blocks on a full launch queue), median over many calls, at each
layer of the stack:

- ``op``: the native op alone (``mpiep._ops``: checks, allocation, launch),
- ``engine``: the CUDA backend's engine (``backends/cuda_*.py``),
- ``buffer``: the public ``Buffer`` method, as users call it.

Then a cProfile of the Buffer calls (``--cprofile``), and a torch-profiler trace summary
(``--trace DIR``). Run with one rank (``mpirun -np 1 python scripts/host_profile.py``) or
several under MPS; rank 0 prints a JSON line per row and a table.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time
from collections.abc import Callable

import torch
from mpi4py import MPI

from mpiep import Buffer, EventOverlap
from mpiep.backends.base import LowLatencyCombineRequest as LLC
from mpiep.backends.base import LowLatencyDispatchRequest as LLD
from mpiep.bench.timing import elapsed_us
from mpiep.config import get_low_latency_rdma_size_hint


def host_us(fn: Callable[[], object], n: int, after: Callable[[], None] | None = None) -> float:
    """Median host time of ``fn()`` with the GPU idle before each call."""
    samples = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
        if after is not None:
            after()
    torch.cuda.synchronize()
    return statistics.median(samples)


def stream_us(fn: Callable[[], object], n: int, batch: int = 10) -> float:
    """Back-to-back time per call on the stream, as the bench measures it: batches of
    ``batch`` calls between CUDA events (``bench.timing.elapsed_us``), median over the batches
    (one preempted batch on a busy host would move a mean by tens of microseconds), after a
    warm-up (the first calls of a new pattern grow the caching allocator's pools)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    device = torch.device("cuda", torch.cuda.current_device())
    return statistics.median(
        elapsed_us(fn, batch, device) / batch for _ in range(max(1, n // batch))
    )


def per_call_us(stmt: Callable[[], object], n: int = 2000) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        stmt()
    return (time.perf_counter() - t0) / n * 1e6


def pieces(buf, x, idx, w, recv, handle, T, E, emit) -> None:  # type: ignore[no-untyped-def]
    """Host cost of the pieces a call is made of (no launches, or one each)."""
    from mpiep.buffer import checks

    s = torch.cuda.Stream()
    ev = torch.cuda.Event()
    t = torch.empty(16, device=buf.device)
    emit("piece torch.cuda.current_stream()", host_us=per_call_us(torch.cuda.current_stream))

    def ctx() -> None:
        with torch.cuda.stream(s):
            pass

    emit("piece with torch.cuda.stream(s)", host_us=per_call_us(ctx))
    emit("piece event.record(stream)", host_us=per_call_us(lambda: ev.record(s)))
    emit("piece stream.wait_event(ev)", host_us=per_call_us(lambda: s.wait_event(ev)))
    emit("piece tensor.record_stream(s)", host_us=per_call_us(lambda: t.record_stream(s)))
    emit(
        "piece torch.empty(16) cuda",
        host_us=per_call_us(lambda: torch.empty(16, device=buf.device)),
    )
    torch.cuda.synchronize()
    emit(
        "piece checks.low_latency_dispatch",
        host_us=per_call_us(
            lambda: checks.low_latency_dispatch(
                buf, LLD(x, idx, T, E, True, False, False, None, False)
            )
        ),
    )
    emit(
        "piece checks.low_latency_combine",
        host_us=per_call_us(
            lambda: checks.low_latency_combine(
                buf, LLC(recv, idx, w, handle, False, None, False), False
            )
        ),
    )
    emit(
        "piece checks.low_latency_combine_lean",
        host_us=per_call_us(
            lambda: checks.low_latency_combine_lean(
                buf, LLC(recv, idx, w, handle, False, None, False), False
            )
        ),
    )
    emit("piece EventOverlap(None)", host_us=per_call_us(lambda: EventOverlap(None)))


def kernel_table(name: str, fn: Callable[[], object]) -> None:
    """The torch profiler's view of 20 back-to-back calls: CPU ops and CUDA kernels."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14)
    print(f"==== torch profiler: {name} x20\n{table}", flush=True)
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=8)
    print(f"==== torch profiler (device): {name} x20\n{table}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--experts", type=int, default=288)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--normal-tokens", type=str, default="128,4096")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--cprofile", action="store_true")
    ap.add_argument("--json", type=str, default="")
    ap.add_argument("--pieces", action="store_true", help="time the Python pieces of a call")
    ap.add_argument("--kernels", action="store_true", help="torch profiler table per call")
    args = ap.parse_args()
    comm = MPI.COMM_WORLD
    rows: list[dict[str, object]] = []

    def emit(name: str, **fields: float) -> None:
        row = {"name": name, "ranks": comm.size, **{k: round(v, 2) for k, v in fields.items()}}
        rows.append(row)
        if comm.rank == 0:
            print(json.dumps(row), flush=True)

    T, H, E, K = args.tokens, args.hidden, args.experts, args.topk
    R = comm.size
    E = E // R * R
    buf = Buffer(
        comm,
        num_nvl_bytes=1 << 30,
        num_rdma_bytes=get_low_latency_rdma_size_hint(T, H, R, E),
        low_latency_mode=True,
        num_qps_per_rank=max(1, E // R),
        validate=False,
    )
    dev = buf.device
    g = torch.Generator().manual_seed(1 + comm.rank)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16).to(dev)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(dev)
    w = torch.rand(T, K, generator=g).to(dev)
    engine = buf.backend._ll()  # the LowLatencyEngine
    ops = engine._ops
    addr = engine._address
    both = engine._send | engine._recv

    # -- low-latency dispatch, three layers ---------------------------------------------
    def op_dispatch() -> object:
        return ops.ll_dispatch(addr, x, idx, T, E, True, False, False, None, 0, both)

    def engine_dispatch() -> object:
        return engine.low_latency_dispatch(LLD(x, idx, T, E, True, False, False, None, False))

    def buffer_dispatch() -> object:
        return buf.low_latency_dispatch(x, idx, T, E, use_fp8=True)

    for name, fn in (("op", op_dispatch), ("engine", engine_dispatch), ("buffer", buffer_dispatch)):
        comm.Barrier()
        emit(f"ll dispatch fp8 [{name}]", host_us=host_us(fn, args.iters))
    recv, _, handle, _, _ = buf.low_latency_dispatch(x, idx, T, E, use_fp8=False)

    def buffer_combine() -> object:
        return buf.low_latency_combine(recv, idx, w, handle)

    def engine_combine() -> object:
        return engine.low_latency_combine(LLC(recv, idx, w, handle, False, None, False))

    for name, fn in (("engine", engine_combine), ("buffer", buffer_combine)):
        comm.Barrier()
        emit(f"ll combine [{name}]", host_us=host_us(fn, args.iters))

    def pair() -> None:
        buffer_dispatch()
        buffer_combine()

    comm.Barrier()
    emit("ll pair fp8 dispatch + combine [buffer]", stream_us=stream_us(pair, 100))
    comm.Barrier()
    emit("ll dispatch fp8 back-to-back [buffer]", stream_us=stream_us(buffer_dispatch, 100))
    comm.Barrier()
    emit("ll combine back-to-back [buffer]", stream_us=stream_us(buffer_combine, 100))

    hooks: list[Callable[[], None]] = []

    def send_only() -> None:
        *_, hook = buf.low_latency_dispatch(x, idx, T, E, use_fp8=True, return_recv_hook=True)
        hooks.append(hook)

    def drain() -> None:
        while hooks:
            hooks.pop()()

    comm.Barrier()
    emit("ll dispatch send phase (hook) [buffer]", host_us=host_us(send_only, 50, drain))
    comm.Barrier()
    emit("ll hook() receive [buffer]", host_us=host_us(drain, 50, lambda: (send_only(), None)[1]))
    drain()

    # -- normal mode -------------------------------------------------------------------
    En = 256 // R * R
    for t in [int(v) for v in args.normal_tokens.split(",") if v]:
        xn = torch.randn(t, H, generator=g).to(torch.bfloat16).to(dev)
        idn = torch.stack([torch.randperm(En, generator=g)[:K] for _ in range(t)]).to(dev)
        wn = torch.rand(t, K, generator=g).to(dev)
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idn, En)

        def n_layout() -> object:
            return buf.get_dispatch_layout(idn, En)

        def n_dispatch() -> object:
            return buf.dispatch(
                xn,
                num_tokens_per_rank=per_rank,
                is_token_in_rank=in_rank,
                num_tokens_per_expert=per_expert,
                topk_idx=idn,
                topk_weights=wn,
            )

        recv_n, _, recv_w, _, hn, _ = n_dispatch()

        def n_combine() -> object:
            return buf.combine(recv_n, hn, recv_w)

        normal = buf.backend._normal()
        comm.Barrier()
        emit(
            f"normal layout T={t} [op]",
            host_us=host_us(
                lambda: normal._ops.layout(idn, En, R, R, normal._hop), args.iters // 2
            ),
        )
        emit(
            f"normal layout T={t} [engine]",
            host_us=host_us(lambda: normal.get_dispatch_layout(idn, En), args.iters // 2),
        )
        if args.kernels and comm.rank == 0:
            kernel_table(f"normal dispatch T={t}", n_dispatch)
            kernel_table(f"normal combine T={t}", n_combine)
        for name, fn in (("layout", n_layout), ("dispatch", n_dispatch), ("combine", n_combine)):
            comm.Barrier()
            emit(
                f"normal {name} T={t} [buffer]",
                host_us=host_us(fn, args.iters // 2),
                stream_us=stream_us(fn, 40),
            )

    if args.pieces and comm.rank == 0:
        pieces(buf, x, idx, w, recv, handle, T, E, emit)
    if args.kernels and comm.rank == 0:
        for name, fn in (
            ("ll dispatch fp8", buffer_dispatch),
            ("ll combine", buffer_combine),
            ("ll pair", pair),
        ):
            kernel_table(name, fn)
    if args.cprofile and comm.rank == 0:
        for name, fn in (
            ("ll dispatch", buffer_dispatch),
            ("ll combine", buffer_combine),
            ("ll send with hook", lambda: (send_only(), drain())),
        ):
            prof = cProfile.Profile()
            torch.cuda.synchronize()
            prof.enable()
            for _ in range(200):
                fn()
            prof.disable()
            torch.cuda.synchronize()
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
            print(f"==== cProfile {name} x200 (tottime)\n{s.getvalue()}", flush=True)
    if args.json and comm.rank == 0:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    buf.destroy()


if __name__ == "__main__":
    main()
