"""Benchmark cases: set up inputs, check results once, then time each call.

Bytes are counted per receiving rank and reported as GB/s = bytes / time:
- logical: every row a rank receives (its own rows included), as DeepEP counts;
- nvlink: only rows another GPU of the node writes into it (low-latency: other ranks' pairs);
- rdma (normal mode on several nodes): rows it receives over RDMA as its node's forwarder
  (bench/topology.py).
A normal dispatch row is H x element size (+ H/128 x 4 scale bytes for FP8); a
combine row is H x 2. Low-latency counts one row per (token, expert) pair.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from mpi4py import MPI

from mpiep import Buffer, get_low_latency_rdma_size_hint, get_normal_buffer_size_hint
from mpiep.bench import nccl
from mpiep.bench.cases import Shape
from mpiep.bench.data import make_routing, make_x, token_rows
from mpiep.bench.floor import alltoallv_fn, rows_to
from mpiep.bench.timing import kernel_time_us, time_call, time_interleaved
from mpiep.bench.topology import ranks_per_node, row_counts
from mpiep.config import get_internode_rdma_size_hint
from mpiep.fp8 import per_token_cast_to_fp8


@dataclass
class Row:
    case: str
    shape: Shape
    time: dict[str, float]
    logical_bytes: float  # mean over ranks
    nvlink_bytes: float
    check: str
    extra: dict[str, object] = field(default_factory=dict)
    rdma_bytes: float = 0.0  # mean over ranks: rows received over RDMA (normal mode, nodes > 1)

    def gbps(self, which: str) -> float:
        nbytes = {"logical": self.logical_bytes, "nvlink": self.nvlink_bytes}.get(
            which, self.rdma_bytes
        )
        return nbytes / (self.time["median_us"] * 1e3) if self.time["median_us"] else 0.0

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d["logical_gbps"], d["nvlink_gbps"] = self.gbps("logical"), self.gbps("nvlink")
        d["rdma_gbps"] = self.gbps("rdma")
        kernel = self.time.get("kernel_us", 0.0)
        if kernel:  # whole call minus its kernels: the host's share
            d["host_us"] = self.time["median_us"] - kernel
        return d


@dataclass
class Settings:
    warmup: int
    iters: int
    budget_s: float
    nccl: bool
    backend: str
    num_sms: int | None
    kernel_times: bool = False
    hooks: bool = True
    floor: bool = True  # time a raw MPI Alltoallv of each case's bytes (CPU runs)
    progress: Callable[[str, int, int], None] | None = None  # (case, done, total) on rank 0


def _mean(comm: MPI.Comm, value: float) -> float:
    return comm.allreduce(float(value), op=MPI.SUM) / comm.size


def _verdict(comm: MPI.Comm, problems: list[str]) -> str:
    """'ok' when every rank found nothing wrong, else the first rank's first problem."""
    found = comm.allgather(problems[0] if problems else None)
    bad = [(r, p) for r, p in enumerate(found) if p]
    return "ok" if not bad else f"FAIL rank {bad[0][0]}: {bad[0][1]}"


def run_normal(comm: MPI.Comm, shape: Shape, s: Settings) -> list[Row]:
    shape = shape.fit(comm.size)
    if s.num_sms:
        Buffer.set_num_sms(s.num_sms)
    nvl = get_normal_buffer_size_hint(shape.tokens, shape.hidden, comm.size, shape.topk)
    rpn = ranks_per_node(comm)
    rdma = 0
    if rpn < comm.size:  # several nodes: the internode kernels need their RDMA buffer too
        rdma = get_internode_rdma_size_hint(shape.tokens, shape.hidden, comm.size, rpn, shape.topk)
    buf = Buffer(comm, num_nvl_bytes=nvl, num_rdma_bytes=rdma, backend=s.backend, validate=False)
    dev, rank, R = buf.device, buf.rank, buf.group_size
    x = make_x(rank, shape.tokens, shape.hidden, dev)
    topk_idx, weights = make_routing(rank, shape.tokens, shape.experts, shape.topk, dev)
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, shape.experts)
    layout = dict(
        num_tokens_per_rank=per_rank,
        num_tokens_per_rdma_rank=per_rdma,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=topk_idx,
        topk_weights=weights,
    )
    x_fp8 = per_token_cast_to_fp8(x)

    recv_x, _, recv_w, _, handle, _ = buf.dispatch(x, **layout)
    recv_fp8, *_ = buf.dispatch(x_fp8, **layout)
    combined, _, _ = buf.combine(recv_x, handle, topk_weights=recv_w)

    # Expected rows, regenerated from (source rank, source token) of each received row.
    src_rank = torch.repeat_interleave(
        torch.arange(R, device=dev), handle.num_recv_per_src.to(dev).long()
    )
    src_tok = handle.recv_src_idx.to(dev).long()
    expect = token_rows(src_rank, src_tok, shape.hidden)
    problems = []
    order = src_rank * (shape.tokens + 1) + src_tok
    if order.numel() > 1 and not bool((order[1:] > order[:-1]).all()):
        problems.append("rows not ordered by (source rank, token)")
    if not torch.equal(recv_x.view(torch.int16), expect.view(torch.int16)):
        problems.append("BF16 dispatch rows differ from their source rows")
    q, sc = per_token_cast_to_fp8(expect)
    if not (
        torch.equal(recv_fp8[0].view(torch.uint8), q.view(torch.uint8))
        and torch.equal(recv_fp8[1], sc)
    ):
        problems.append("FP8 dispatch rows or scales differ from their source")
    want = (x.float() * in_rank.sum(1, keepdim=True).float()).to(torch.bfloat16)
    if not torch.equal(combined.view(torch.int16), want.view(torch.int16)):
        problems.append("combine sums differ from x * (number of ranks the token went to)")
    check = _verdict(comm, problems)

    n_recv = recv_x.shape[0]
    rdma_rows, nvlink_rows = row_counts(comm, per_rank, per_rdma, rpn)

    def nbytes(row: float, rows: int) -> float:
        return _mean(comm, row * rows)

    bf16_row, fp8_row = shape.hidden * 2, shape.hidden + shape.hidden // 128 * 4
    sent, got = rows_to(per_rank), rows_to(handle.num_recv_per_src)
    timings: list[tuple[str, Callable[[], object], int, list[int], list[int]]] = [
        ("dispatch bf16", lambda: buf.dispatch(x, **layout), bf16_row, sent, got),
        ("dispatch fp8", lambda: buf.dispatch(x_fp8, **layout), fp8_row, sent, got),
        (
            "combine bf16",
            lambda: buf.combine(recv_x, handle, topk_weights=recv_w),
            bf16_row,
            got,
            sent,
        ),
    ]
    rows = []
    for name, fn, row_bytes, send_rows, recv_rows in timings:
        t, extra = _time_with_floor(
            f"normal {name}", fn, comm, dev, s, send_rows, recv_rows, row_bytes
        )
        extra["backend"] = buf.backend_name
        rows.append(
            Row(
                f"normal {name}",
                shape,
                t,
                nbytes(row_bytes, n_recv),
                nbytes(row_bytes, nvlink_rows),
                check,
                extra,
                rdma_bytes=nbytes(row_bytes, rdma_rows),
            )
        )
    if dev.type == "cuda":
        outs = (recv_x, recv_fp8, recv_w, combined)
        rows += _normal_graph_rows(comm, buf, shape, x, x_fp8, layout, handle, outs, s)
    if s.nccl and dev.type == "cuda":
        rows += _nccl_rows(comm, buf, shape, per_rank, handle.num_recv_per_src, bf16_row, s)
    buf.destroy()
    return rows


_NO_TIME = {"median_us": 0.0, "min_us": 0.0, "max_us": 0.0, "iters": 0}


def _capture(comm: MPI.Comm, dev: torch.device, fn: Callable[[], object]) -> tuple[object, str]:
    """``fn`` captured in a CUDA graph on every rank, after a warm-up on a side stream as
    torch.cuda.graphs asks. Returns (graph, "") or (None, why) when any rank failed (every
    rank then skips the replays, which are collective like the calls they hold)."""
    graph, why = torch.cuda.CUDAGraph(), ""
    try:
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize(dev)
        comm.Barrier()
        with torch.cuda.graph(graph):
            fn()
    except Exception as exc:  # told to every rank below
        why = f"{type(exc).__name__}: {exc}".splitlines()[0][:120]
    torch.cuda.synchronize(dev)
    found = [w for w in comm.allgather(why) if w]
    return (None, found[0]) if found else (graph, "")


def _normal_graph_rows(
    comm: MPI.Comm,
    buf: Buffer,
    shape: Shape,
    x: torch.Tensor,
    x_fp8: tuple[torch.Tensor, torch.Tensor],
    layout: dict[str, torch.Tensor | None],
    handle: object,
    outs: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor],
    s: Settings,
) -> list[Row]:
    """Normal mode without the host wait: a cached dispatch (with a handle), a dispatch with
    num_worst_tokens and combine, as whole calls and replayed from CUDA graphs (the
    kernel-only floor). A dispatch without either cannot be captured: it waits on the host
    for the notify kernel's counts to size its outputs."""
    dev, T, R = buf.device, shape.tokens, buf.group_size
    recv_x, recv_fp8, recv_w, combined = outs
    n = recv_x.shape[0]
    worst = T * R  # every token of every rank: the most a rank can receive

    def pad(t: torch.Tensor) -> torch.Tensor:  # the worst-case output: rows, then zeros
        return torch.cat([t, t.new_zeros((worst - n, *t.shape[1:]))])

    # (case, call returning the output to check, expected output, also time the whole call)
    calls: list[tuple[str, Callable[[], torch.Tensor], torch.Tensor, bool]] = [
        ("dispatch bf16 cached", lambda: buf.dispatch(x, handle=handle)[0], recv_x, True),
        (
            "dispatch fp8 cached",
            lambda: buf.dispatch(x_fp8, handle=handle)[0][0],
            recv_fp8[0],
            False,
        ),
        (
            "dispatch bf16 num_worst_tokens",
            lambda: buf.dispatch(x, **layout, num_worst_tokens=worst)[0],
            pad(recv_x),
            True,
        ),
        (
            "combine bf16",
            lambda: buf.combine(recv_x, handle, topk_weights=recv_w)[0],
            combined,
            False,
        ),
    ]
    rows = [
        Row(
            "normal dispatch bf16, CUDA graph: not capturable (host waits for the counts; "
            "use a handle or num_worst_tokens)",
            shape,
            dict(_NO_TIME),
            0,
            0,
            "-",
        )
    ]
    for name, fn, want, eager in calls:
        if eager:
            problems = [] if _same(fn(), want) else [f"{name}: differs from the first call"]
            t = _time(f"normal {name}", fn, comm, dev, s)
            rows.append(Row(f"normal {name}", shape, t, 0, 0, _verdict(comm, problems), {}))
        out: list[torch.Tensor] = []
        graph, why = _capture(comm, dev, lambda fn=fn, out=out: out.append(fn()))
        if graph is None:
            rows.append(
                Row(f"normal {name}, CUDA graph: failed ({why})", shape, dict(_NO_TIME), 0, 0, "-")
            )
            continue
        comm.Barrier()
        graph.replay()
        torch.cuda.synchronize(dev)
        problems = [] if _same(out[-1], want) else [f"{name}: graph replay differs from the call"]
        t = _time(f"normal {name} (CUDA graph)", graph.replay, comm, dev, s)
        rows.append(
            Row(f"normal {name}, CUDA graph replay", shape, t, 0, 0, _verdict(comm, problems))
        )
        torch.cuda.synchronize(dev)
        del graph
    return rows


def _same(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Bit-exact equality (FP8 and BF16 compared as bytes)."""
    return got.shape == want.shape and torch.equal(
        got.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8)
    )


def _time(
    case: str, fn: Callable[[], object], comm: MPI.Comm, dev: torch.device, s: Settings
) -> dict[str, float]:
    def step(done: int, total: int) -> None:
        if s.progress is not None:
            s.progress(case, done, total)

    return time_call(
        fn, comm, dev, s.warmup, s.iters, s.budget_s, profile_kernels=s.kernel_times, step=step
    )


def _time_with_floor(
    case: str,
    fn: Callable[[], object],
    comm: MPI.Comm,
    dev: torch.device,
    s: Settings,
    send_rows: list[int],
    recv_rows: list[int],
    row_bytes: int,
) -> tuple[dict[str, float], dict[str, object]]:
    """Time a case; on CPUs also its MPI floor, a raw Alltoallv of the same rows between
    the same ranks, timed in alternation with the case. Returns (times, extra fields)."""
    extra: dict[str, object] = {}
    if not s.floor or dev.type == "cuda":
        return _time(case, fn, comm, dev, s), extra
    floor = alltoallv_fn(comm, send_rows, recv_rows, row_bytes)

    def step(done: int, total: int) -> None:
        if s.progress is not None:
            s.progress(f"{case} + MPI floor", done, total)

    t, tf = time_interleaved([fn, floor], comm, s.warmup, s.iters, s.budget_s, step=step)
    extra["floor_us"] = tf["median_us"]
    return t, extra


def _nccl_rows(
    comm: MPI.Comm,
    buf: Buffer,
    shape: Shape,
    send: torch.Tensor,
    recv: torch.Tensor,
    row_bytes: int,
    s: Settings,
) -> list[Row]:
    why = nccl.init_nccl(comm, buf.device)
    if why:
        return [
            Row(
                "nccl all_to_all (unavailable)",
                shape,
                {"median_us": 0.0, "min_us": 0.0, "max_us": 0.0, "iters": 0},
                0,
                0,
                why,
            )
        ]
    send_rows, recv_rows = send.cpu().tolist(), recv.cpu().tolist()
    fn = nccl.all_to_all_fn(send_rows, recv_rows, row_bytes, buf.device)
    t = _time("nccl all_to_all", fn, comm, buf.device, s)
    total = sum(recv_rows) * row_bytes
    remote = total - recv_rows[buf.rank] * row_bytes
    return [
        Row(
            "nccl all_to_all bf16 (dispatch bytes)",
            shape,
            t,
            _mean(comm, total),
            _mean(comm, remote),
            "-",
        )
    ]


def run_low_latency(comm: MPI.Comm, shape: Shape, s: Settings) -> list[Row]:
    shape = shape.fit(comm.size)
    R = comm.size
    rdma = get_low_latency_rdma_size_hint(shape.tokens, shape.hidden, R, shape.experts)
    buf = Buffer(
        comm,
        num_rdma_bytes=rdma,
        low_latency_mode=True,
        num_qps_per_rank=max(1, shape.experts // R),
        backend=s.backend,
        validate=False,
    )
    dev, rank = buf.device, buf.rank
    T, H, E = shape.tokens, shape.hidden, shape.experts
    x = make_x(rank, T, H, dev)
    topk_idx, weights = make_routing(rank, T, E, shape.topk, dev)

    def dispatch(fp8: bool):
        return buf.low_latency_dispatch(x, topk_idx, T, E, use_fp8=fp8)

    (q, scales), count_fp8, handle_fp8, _, _ = dispatch(True)
    recv_bf16, count, handle, _, _ = dispatch(False)
    combined, _, _ = buf.low_latency_combine(recv_bf16, topk_idx, weights, handle)

    problems = []
    e_local = E // R
    for e in range(e_local):
        n = int(count[e])
        if n != int(count_fp8[e]):
            problems.append(f"expert {e}: FP8 and BF16 dispatch counts differ")
            break
        src_rank = torch.repeat_interleave(
            torch.arange(R, device=dev), handle.layout_range[e, :, 1].long()
        )
        expect = token_rows(src_rank, handle.src_token_idx[e, :n].long(), H)
        if not torch.equal(recv_bf16[e, :n].view(torch.int16), expect.view(torch.int16)):
            problems.append(f"expert {e}: BF16 rows differ from their source rows")
            break
        src_rank8 = torch.repeat_interleave(
            torch.arange(R, device=dev), handle_fp8.layout_range[e, :, 1].long()
        )
        q_want, s_want = per_token_cast_to_fp8(
            token_rows(src_rank8, handle_fp8.src_token_idx[e, :n].long(), H)
        )
        if not (
            torch.equal(q[e, :n].view(torch.uint8), q_want.view(torch.uint8))
            and torch.equal(scales[e, :n], s_want)
        ):
            problems.append(f"expert {e}: FP8 rows or scales differ from their source")
            break
    want = x.float() * torch.where(topk_idx >= 0, weights, 0).sum(1, keepdim=True)
    err = (combined.float() - want).abs().max().item() if T else 0.0
    if err > 0.02 * max(1.0, want.abs().max().item() if T else 1.0):
        problems.append(f"combine differs from sum_k w*x by {err:.3g}")
    check = _verdict(comm, problems)

    pairs = int(count.sum())
    pairs_self = int(sum(int(handle.layout_range[e, rank, 1]) for e in range(e_local)))
    fp8_row, bf16_row = H + H // 128 * 4, H * 2
    valid = topk_idx[topk_idx >= 0]
    sent = rows_to(torch.bincount(valid.cpu() // e_local, minlength=R))
    got = rows_to(handle.layout_range[:, :, 1].sum(0))
    rows = []
    for name, fn, row_bytes, send_rows, recv_rows in (
        ("dispatch fp8", lambda: dispatch(True), fp8_row, sent, got),
        ("dispatch bf16", lambda: dispatch(False), bf16_row, sent, got),
        (
            "combine bf16",
            lambda: buf.low_latency_combine(recv_bf16, topk_idx, weights, handle),
            bf16_row,
            got,
            sent,
        ),
    ):
        t, extra = _time_with_floor(
            f"low-latency {name}", fn, comm, dev, s, send_rows, recv_rows, row_bytes
        )
        extra["backend"] = buf.backend_name
        rows.append(
            Row(
                f"low-latency {name}",
                shape,
                t,
                _mean(comm, pairs * row_bytes),
                _mean(comm, (pairs - pairs_self) * row_bytes),
                check,
                extra,
            )
        )
    if dev.type == "cuda":
        rows += _ll_pair_rows(comm, buf, shape, x, topk_idx, weights, recv_bf16, s)
    if dev.type == "cuda" and s.hooks:
        rows += _hook_rows(comm, buf, shape, x, topk_idx, s)
    buf.destroy()
    return rows


def _ll_pair_rows(
    comm: MPI.Comm,
    buf: Buffer,
    shape: Shape,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    weights: torch.Tensor,
    expert_out: torch.Tensor,
    s: Settings,
) -> list[Row]:
    """A decode step's pair, FP8 dispatch then combine: as called back-to-back (the whole
    calls, host included) and replayed from a CUDA graph (the kernel-only floor)."""
    T, E = shape.tokens, shape.experts

    def pair() -> None:
        *_, handle, _, _ = buf.low_latency_dispatch(x, topk_idx, T, E, use_fp8=True)
        buf.low_latency_combine(expert_out, topk_idx, weights, handle)

    rows = [
        Row(
            "low-latency dispatch fp8 + combine",
            shape,
            _time("low-latency pair", pair, comm, buf.device, s),
            0,
            0,
            "-",
        )
    ]
    # Capture on every rank (nothing runs while capturing), after a warm-up on a side
    # stream as torch.cuda.graphs asks; replays are collective like the calls they hold.
    side = torch.cuda.Stream(buf.device)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        pair()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize(buf.device)
    comm.Barrier()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pair()
    comm.Barrier()
    t = _time("low-latency pair (CUDA graph)", graph.replay, comm, buf.device, s)
    rows.append(Row("low-latency dispatch fp8 + combine, CUDA graph replay", shape, t, 0, 0, "-"))
    torch.cuda.synchronize(buf.device)
    del graph
    return rows


def _hook_rows(
    comm: MPI.Comm, buf: Buffer, shape: Shape, x: torch.Tensor, topk_idx: torch.Tensor, s: Settings
) -> list[Row]:
    """With receive hooks: the time of the send phase alone (what the SMs are busy for)."""
    T, E = shape.tokens, shape.experts
    pending = []

    def send_only() -> None:
        *_, hook = buf.low_latency_dispatch(x, topk_idx, T, E, use_fp8=True, return_recv_hook=True)
        pending.append(hook)

    time_call(send_only, comm, buf.device, 0, 1, 0, batch=1, profile_kernels=False)  # warm
    for hook in pending:
        hook()
    pending.clear()
    samples = []
    for _ in range(max(2, min(s.iters, 20))):
        # One send at a time: at most two dispatches may wait for their hooks.
        t = time_call(send_only, comm, buf.device, 0, 1, 0, batch=1, profile_kernels=False)
        samples.append(t["median_us"])
        for hook in pending:
            hook()
        pending.clear()
    kernels = []
    for _ in range(5 if s.kernel_times else 0):  # device time of the send launch alone
        comm.Barrier()
        kernels.append(kernel_time_us(send_only, buf.device, calls=1))
        for hook in pending:
            hook()
        pending.clear()
    blocked = []  # how long the call holds the caller's thread (GPU idle before it)
    for _ in range(max(2, min(s.iters, 20))):
        comm.Barrier()
        torch.cuda.synchronize(buf.device)
        started = time.perf_counter()
        send_only()
        blocked.append(comm.allreduce((time.perf_counter() - started) * 1e6, op=MPI.MAX))
        for hook in pending:
            hook()
        pending.clear()
    samples.sort()
    blocked.sort()
    t = {
        "kernel_us": comm.allreduce(sorted(kernels)[len(kernels) // 2], op=MPI.MAX)
        if kernels
        else 0.0,
        "median_us": samples[len(samples) // 2],
        "min_us": samples[0],
        "max_us": samples[-1],
        "synced_us": samples[len(samples) // 2],
        "iters": len(samples),
    }
    call = {
        "kernel_us": 0.0,
        "median_us": blocked[len(blocked) // 2],
        "min_us": blocked[0],
        "max_us": blocked[-1],
        "synced_us": blocked[len(blocked) // 2],
        "iters": len(blocked),
    }
    return [
        Row("low-latency dispatch fp8, send phase (hook)", shape, t, 0, 0, "-"),
        Row("low-latency dispatch fp8, send phase (hook): host call", shape, call, 0, 0, "-"),
    ]


def rows_json(rows: list[Row]) -> list[dict[str, object]]:
    return [r.to_json() for r in rows]
