"""MoE-layer call sequences driven through ``mpiep.deep_ep`` as DeepEP's callers write them,
checked against the numpy oracle (tests/oracle.py), never against mpiep's own Buffer.

Shared by tests/test_deep_ep_compat.py (CPU, reference backend) and
tests/gpu/test_gpu_deep_ep_compat.py (GPU kernels). Every scenario gathers its inputs and
computes the oracle over a test-owned MPI communicator before the first library call, so the
only collectives after that are the library's own (which time out) and the caller's final
pass/fail reduction.

torch.distributed appears in the tests only: the process groups of the callers being imitated.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from mpi4py import MPI

import mpiep.deep_ep as deep_ep
import oracle
from conftest import bf16_bits, bf16_tensor, gather_arrays, random_bf16

PADDING_VALUE = 30000.0  # rows past recv_count: must never reach a result
BF16_TOL = 2.0**-7  # two bf16 roundings (expert output, combined sum), relative to sum |terms|


# --------------------------------------------------------------------------- torch.distributed
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def torch_world(
    members: list[int] | None = None,
    rank_of: Callable[[int], int] | None = None,
    backend: str = "gloo",
) -> Iterator[bool]:
    """``init_process_group`` on the MPI ranks ``members`` (default: all), as mpirun-launched
    training scripts do: rank and world size from MPI, MASTER_ADDR/PORT agreed over MPI.

    ``rank_of`` maps an MPI rank to the torch rank it claims (default: its index in
    ``members``), which lets a test build mismatched launches. Yields whether this rank is in
    the torch world; destroys the process group at the end. Collective on COMM_WORLD.
    """
    world = MPI.COMM_WORLD
    port = world.bcast(free_port() if world.rank == 0 else None, root=0)
    members = list(range(world.size)) if members is None else members
    mine = world.rank in members
    if mine:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        rank = members.index(world.rank) if rank_of is None else rank_of(world.rank)
        dist.init_process_group(
            backend, rank=rank, world_size=len(members), timeout=timedelta(seconds=120)
        )
    try:
        yield mine
    finally:
        if mine:
            dist.destroy_process_group()


GROUP_KINDS = ("world", "pair", "tail")


def group_members(kind: str, world_size: int) -> list[int]:
    return {
        "world": list(range(world_size)),
        "pair": [0, 1],
        "tail": list(range(1, world_size)),
    }[kind]


def make_group(kind: str) -> tuple[Any, MPI.Comm | None]:
    """A torch group of ``kind`` (the caller's EP group) and the test's own MPI communicator
    over the same ranks, for the oracle's gathers. Collective on every rank (torch's
    ``new_group`` is); non-members get ``(the non-member sentinel, None)``."""
    world = MPI.COMM_WORLD
    members = group_members(kind, world.size)
    group: Any = dist.group.WORLD if kind == "world" else dist.new_group(members)
    mine = world.rank in members
    test_comm = world.Split(0 if mine else MPI.UNDEFINED, world.rank)
    return group, (test_comm if mine else None)


# --------------------------------------------------------------------------- normal mode
class Dispatch(torch.autograd.Function):
    """A dispatch as MoE training code wraps it: layout + dispatch forward, combine backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        num_experts: int,
        buffer: deep_ep.Buffer,
        async_finish: bool,
    ) -> Any:
        previous = deep_ep.EventOverlap(deep_ep.EventHandle()) if async_finish else None
        per_rank, per_rdma, per_expert, in_rank, event = buffer.get_dispatch_layout(
            topk_idx,
            num_experts,
            previous_event=previous,
            async_finish=async_finish,
            allocate_on_comm_stream=async_finish,
        )
        recv_x, recv_idx, recv_w, counts, handle, after = buffer.dispatch(
            x,
            topk_idx=topk_idx,
            topk_weights=topk_weights,
            num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            previous_event=event,
            async_finish=async_finish,
            allocate_on_comm_stream=async_finish,
        )
        if async_finish:
            after.current_stream_wait()
        ctx.buffer, ctx.handle, ctx.async_finish = buffer, handle, async_finish
        tokens_per_expert = torch.tensor(counts)
        ctx.mark_non_differentiable(recv_idx, tokens_per_expert, in_rank)
        return recv_x, recv_idx, recv_w, tokens_per_expert, handle, in_rank

    @staticmethod
    def backward(ctx: Any, grad_x: torch.Tensor, _i: Any, grad_w: torch.Tensor, *_: Any) -> Any:
        previous = deep_ep.EventOverlap(deep_ep.EventHandle()) if ctx.async_finish else None
        grad_in, grad_weights, after = ctx.buffer.combine(
            grad_x.contiguous(),
            ctx.handle,
            topk_weights=grad_w.float().contiguous(),
            previous_event=previous,
            async_finish=ctx.async_finish,
            allocate_on_comm_stream=ctx.async_finish,
        )
        if ctx.async_finish:
            after.current_stream_wait()
        return grad_in, None, grad_weights, None, None, None


class Combine(torch.autograd.Function):
    """A combine as MoE training code wraps it: combine forward, cached dispatch backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, y: torch.Tensor, buffer: deep_ep.Buffer, handle: Any, async_finish: bool
    ) -> torch.Tensor:
        previous = deep_ep.EventOverlap(deep_ep.EventHandle()) if async_finish else None
        combined, _, after = buffer.combine(
            y, handle=handle, previous_event=previous, async_finish=async_finish
        )
        if async_finish:
            after.current_stream_wait()
        ctx.buffer, ctx.handle, ctx.async_finish = buffer, handle, async_finish
        return combined

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Any:
        previous = deep_ep.EventOverlap(deep_ep.EventHandle()) if ctx.async_finish else None
        grad_y, *nothing, after = ctx.buffer.dispatch(
            grad_out.contiguous(),
            handle=ctx.handle,
            previous_event=previous,
            async_finish=ctx.async_finish,
        )
        assert nothing == [None, None, None, None], nothing  # DeepEP's cached-mode tuple
        if ctx.async_finish:
            after.current_stream_wait()
        return grad_y, None, None, None


def expert_scale(num_experts: int) -> np.ndarray:
    """c[e]: what global expert e multiplies its tokens by in these tests."""
    return (0.5 + np.arange(num_experts) / num_experts).astype(np.float32)


@dataclass
class NormalCase:
    comm: MPI.Comm  # the test's communicator over the EP group's ranks
    num_experts: int
    hidden: int
    idx: np.ndarray
    w: np.ndarray
    x_bits: np.ndarray
    g_bits: np.ndarray  # the loss is sum(out * g): g is the gradient arriving at out
    all_idx: list[np.ndarray]
    all_w: list[np.ndarray]
    all_x: list[np.ndarray]
    all_g: list[np.ndarray]

    @property
    def rank(self) -> int:
        return int(self.comm.rank)

    @property
    def num_ranks(self) -> int:
        return int(self.comm.size)

    @property
    def e_local(self) -> int:
        return self.num_experts // self.num_ranks


def make_normal_case(
    comm: MPI.Comm, seed: int, hidden: int, num_topk: int, e_local: int, pattern: str
) -> NormalCase:
    rng = np.random.default_rng(seed + comm.rank)
    num_experts = e_local * comm.size
    idx, w = oracle.make_routing(
        rng, 9 + 4 * comm.rank, num_topk, num_experts, comm.size, comm.rank, pattern
    )
    x_bits = bf16_bits(random_bf16(rng, idx.shape[0], hidden))
    g_bits = bf16_bits(random_bf16(rng, idx.shape[0], hidden))
    return NormalCase(
        comm,
        num_experts,
        hidden,
        idx,
        w,
        x_bits,
        g_bits,
        gather_arrays(comm, idx),
        gather_arrays(comm, w),
        gather_arrays(comm, x_bits),
        gather_arrays(comm, g_bits),
    )


def moe_layer(
    buffer: deep_ep.Buffer,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    num_experts: int,
    async_finish: bool,
) -> tuple[torch.Tensor, tuple[Any, ...]]:
    """Dispatch, local experts (token * sum of its local weights * c[e]), combine."""
    recv_x, recv_idx, recv_w, counts, handle, in_rank = Dispatch.apply(
        x, topk_idx, topk_weights, num_experts, buffer, async_finish
    )
    first = buffer.rank * (num_experts // buffer.group_size)
    scale = torch.from_numpy(expert_scale(num_experts)).to(recv_w.device)
    s = torch.where(recv_idx >= 0, scale[(recv_idx + first).clamp(min=0)], 0.0)
    factor = (recv_w * s).sum(dim=1, keepdim=True)
    y = (recv_x.float() * factor).to(torch.bfloat16)
    out = Combine.apply(y, buffer, handle, async_finish)
    return out, (recv_x, recv_idx, recv_w, counts, handle, in_rank)


def _bf16_f32(bits: np.ndarray) -> np.ndarray:
    return oracle.bf16_to_f32(bits).astype(np.float64)


def check_close(name: str, got: np.ndarray, want: np.ndarray, tol: np.ndarray) -> None:
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    bad = np.abs(got.astype(np.float64) - want) > tol
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.size} elements off, first at {i}: "
            f"got {got[i]!r}, want {want[i]!r} (tol {tol[i]!r})"
        )


def run_normal_layer(
    buffer: deep_ep.Buffer, case: NormalCase, device: torch.device, async_finish: bool
) -> None:
    """Forward and backward of one MoE layer through the compat Buffer, against the oracle."""
    E, R, me = case.num_experts, case.num_ranks, case.rank
    assert buffer.rank == me and buffer.group_size == R
    recv_all = [oracle.normal_dispatch(case.all_idx, case.all_w, E, r) for r in range(R)]
    recv = recv_all[me]
    layout = oracle.layout(case.idx, E, R)

    x = bf16_tensor(case.x_bits).to(device).requires_grad_(True)
    w = torch.from_numpy(case.w.copy()).to(device).requires_grad_(True)
    topk_idx = torch.from_numpy(case.idx.copy()).to(device)
    g = bf16_tensor(case.g_bits).to(device)

    out, (recv_x, recv_idx, recv_w, counts, handle, in_rank) = moe_layer(
        buffer, x, topk_idx, w, E, async_finish
    )
    (out.float() * g.float()).sum().backward()

    # Dispatch: rows, ids, weights and counts exactly as the oracle says.
    assert np.array_equal(bf16_bits(recv_x.detach().cpu()), recv.rows(case.all_x))
    assert np.array_equal(recv_idx.cpu().numpy(), recv.topk_idx)
    assert np.array_equal(recv_w.detach().cpu().numpy(), recv.topk_weights)
    assert counts.tolist() == recv.num_recv_tokens_per_expert
    assert np.array_equal(in_rank.cpu().numpy(), layout.is_token_in_rank)
    # DeepEP's intranode handle tuple: recv_src_idx at 3, is_token_in_rank at 4.
    assert isinstance(handle, tuple) and len(handle) == 6
    rank_prefix, chan_prefix, recv_chan_prefix, src_idx, handle_in_rank, send_head = handle
    assert rank_prefix is None and chan_prefix is None and recv_chan_prefix is None
    assert send_head is None
    assert np.array_equal(src_idx.cpu().numpy(), recv.src_token)
    assert np.array_equal(handle_in_rank.cpu().numpy(), layout.is_token_in_rank)

    # Every receiver r computes y_r(t) = bf16(x[t] * f_r(t)), f_r(t) = sum of t's weights
    # on r's experts times c[e]; combine sums y_r(t) over the ranks t went to.
    c = expert_scale(E).astype(np.float64)
    owner = oracle.owner_rank(case.idx, E, R)
    x64, g64 = _bf16_f32(case.x_bits), _bf16_f32(case.g_bits)
    want_out = np.zeros_like(x64)
    want_gx = np.zeros_like(x64)
    abs_out = np.zeros_like(x64)
    abs_gx = np.zeros_like(x64)
    for r in range(R):
        on_r = (owner == r) & (case.idx >= 0)
        f = np.where(on_r, case.w.astype(np.float64) * c[np.maximum(case.idx, 0)], 0.0).sum(1)
        went = on_r.any(axis=1)[:, None]
        want_out += np.where(went, x64 * f[:, None], 0.0)
        abs_out += np.where(went, np.abs(x64 * f[:, None]), 0.0)
        want_gx += np.where(went, g64 * f[:, None], 0.0)
        abs_gx += np.where(went, np.abs(g64 * f[:, None]), 0.0)
    check_close("forward output", out.detach().float().cpu().numpy(), want_out, BF16_TOL * abs_out)
    check_close("grad x", x.grad.float().cpu().numpy(), want_gx, BF16_TOL * abs_gx)

    # d loss / d w[t, k] = c[e] * <g[t], x[t]> for slots with an expert (on whichever rank).
    dot = (g64 * x64).sum(1, keepdims=True)
    dot_abs = np.abs(g64 * x64).sum(1, keepdims=True)
    has = case.idx >= 0
    want_gw = np.where(has, c[np.maximum(case.idx, 0)] * dot, 0.0)
    tol_gw = np.where(has, 1e-4 * c[np.maximum(case.idx, 0)] * dot_abs, 0.0) + 1e-30
    check_close("grad topk_weights", w.grad.cpu().numpy(), want_gw, tol_gw)


def run_normal_extras(
    buffer: deep_ep.Buffer, case: NormalCase, device: torch.device, fp8: bool, worst: int
) -> None:
    """FP8 input, expert_alignment and num_worst_tokens, and a direct cached dispatch."""
    E, R, me = case.num_experts, case.num_ranks, case.rank
    recv = oracle.normal_dispatch(case.all_idx, case.all_w, E, me, expert_alignment=4)
    topk_idx = torch.from_numpy(case.idx.copy()).to(device)
    w = torch.from_numpy(case.w.copy()).to(device)
    if fp8:
        all_q, all_s = [], []
        for bits in case.all_x:
            q, s = oracle.per_token_cast_to_fp8(oracle.bf16_to_f32(bits))
            all_q.append(q)
            all_s.append(s)
        x: Any = (
            torch.from_numpy(all_q[me].copy()).view(torch.float8_e4m3fn).to(device),
            torch.from_numpy(all_s[me].copy()).to(device),
        )
    else:
        x = bf16_tensor(case.x_bits).to(device)
    per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, E)
    recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
        x,
        None,
        per_rank,
        per_rdma,
        in_rank,
        per_expert,
        topk_idx,
        w,
        expert_alignment=4,
        num_worst_tokens=worst,
    )
    n = recv.num_rows
    rows = worst if worst else n
    if fp8:
        q, s = recv_x
        assert q.shape == (rows, case.hidden) and s.shape == (rows, case.hidden // 128)
        assert np.array_equal(q[:n].cpu().view(torch.uint8).numpy(), recv.rows(all_q))
        assert np.array_equal(s[:n].cpu().numpy(), recv.rows(all_s))
    else:
        assert recv_x.shape == (rows, case.hidden)
        assert np.array_equal(bf16_bits(recv_x[:n].cpu()), recv.rows(case.all_x))
    assert np.array_equal(recv_idx[:n].cpu().numpy(), recv.topk_idx)
    assert np.array_equal(recv_w[:n].cpu().numpy(), recv.topk_weights)
    if worst:
        assert counts == []  # DeepEP: empty with num_worst_tokens
        assert (recv_idx[n:] == -1).all()
    else:
        assert isinstance(counts, list) and all(type(v) is int for v in counts)
        assert counts == recv.num_recv_tokens_per_expert

    # Cached dispatch of other data along the same routes: DeepEP's 6-tuple, handle None.
    g = bf16_tensor(case.g_bits).to(device)
    got = buffer.dispatch(g, handle=handle)
    assert len(got) == 6 and got[1:5] == (None, None, None, None)
    assert isinstance(got[5], deep_ep.EventOverlap)
    assert np.array_equal(bf16_bits(got[0][:n].cpu()), recv.rows(case.all_g))

    # Combine with the received weights: each slot's weight comes back once, from its owner.
    y = torch.zeros((rows, case.hidden), dtype=torch.bfloat16, device=device)
    y[:n] = bf16_tensor(recv.rows(case.all_g)).to(device)
    combined, combined_w, event = buffer.combine(y, handle, topk_weights=recv_w)
    assert isinstance(event, deep_ep.EventOverlap)
    assert np.array_equal(combined_w.cpu().numpy(), np.where(case.idx >= 0, case.w, 0.0))
    went = oracle.layout(case.idx, E, R).is_token_in_rank.sum(1, keepdims=True)
    g64 = _bf16_f32(case.g_bits)
    check_close(
        "combine", combined.float().cpu().numpy(), g64 * went, BF16_TOL * np.abs(g64) * went
    )


# --------------------------------------------------------------------------- low latency
LL_MODES = {  # name -> (use_fp8, round_scale, use_ue8m0)
    "bf16": (False, False, False),
    "fp8": (True, False, False),
    "fp8_ue8m0": (True, True, True),
}


@dataclass
class LowLatencyCase:
    comm: MPI.Comm
    num_experts: int
    hidden: int
    max_tokens: int
    idx: np.ndarray
    w: np.ndarray
    x_bits: np.ndarray
    all_x: list[np.ndarray]
    want: oracle.LowLatencyRecv

    @property
    def rank(self) -> int:
        return int(self.comm.rank)

    @property
    def num_ranks(self) -> int:
        return int(self.comm.size)

    @property
    def e_local(self) -> int:
        return self.num_experts // self.num_ranks


def make_low_latency_case(
    comm: MPI.Comm, seed: int, hidden: int, num_topk: int, e_local: int, max_tokens: int
) -> LowLatencyCase:
    rng = np.random.default_rng(seed + comm.rank)
    num_experts = e_local * comm.size
    tokens = min(max_tokens, 5 + 6 * comm.rank)
    idx, w = oracle.make_routing(rng, tokens, num_topk, num_experts, comm.size, comm.rank, "holes")
    x_bits = bf16_bits(random_bf16(rng, tokens, hidden))
    all_idx = gather_arrays(comm, idx)
    all_x = gather_arrays(comm, x_bits)
    want = oracle.low_latency_dispatch(all_idx, num_experts, comm.rank)
    return LowLatencyCase(comm, num_experts, hidden, max_tokens, idx, w, x_bits, all_x, want)


def low_latency_buffer_args(case: LowLatencyCase) -> tuple[int, int]:
    """``(num_rdma_bytes, num_qps_per_rank)`` as DeepEP's callers compute them."""
    hint = deep_ep.Buffer.get_low_latency_rdma_size_hint(
        case.max_tokens, case.hidden, case.num_ranks, case.num_experts
    )
    return hint, case.e_local


def run_low_latency_layer(
    buffer: deep_ep.Buffer,
    case: LowLatencyCase,
    device: torch.device,
    mode: str,
    use_hook: bool,
    zero_copy: bool,
) -> None:
    """A decode step: low_latency_dispatch, experts, low_latency_combine."""
    use_fp8, round_scale, use_ue8m0 = LL_MODES[mode]
    E, R, M, H, EL = case.num_experts, case.num_ranks, case.max_tokens, case.hidden, case.e_local
    x = bf16_tensor(case.x_bits).to(device)
    topk_idx = torch.from_numpy(case.idx.copy()).to(device)
    w = torch.from_numpy(case.w.copy()).to(device)
    stats = torch.zeros(EL, dtype=torch.int32, device=device)

    recv_x, recv_count, handle, event, hook = buffer.low_latency_dispatch(
        x,
        topk_idx,
        M,
        E,
        cumulative_local_expert_recv_stats=stats,
        use_fp8=use_fp8,
        round_scale=round_scale,
        use_ue8m0=use_ue8m0,
        async_finish=not use_hook,
        return_recv_hook=use_hook,
    )
    assert isinstance(event, deep_ep.EventOverlap)
    if use_hook:
        assert callable(hook)
        hook()
    else:
        assert hook is None
        event.current_stream_wait()

    want = case.want
    assert np.array_equal(recv_count.cpu().numpy(), want.recv_count)
    assert np.array_equal(stats.cpu().numpy(), want.recv_count)
    # DeepEP's tuple: (src_info, layout_range packed count | begin << 32, M, hidden, E).
    src_info, layout_range, got_m, got_h, got_e = handle
    assert (got_m, got_h, got_e) == (M, H, E) and len(handle) == 5
    assert layout_range.dtype == torch.int64 and tuple(layout_range.shape) == (EL, R)
    packed = layout_range.cpu().numpy()
    ranges = np.stack([packed >> 32, packed & 0xFFFFFFFF], axis=-1)
    assert np.array_equal(ranges, want.layout_range())
    assert np.array_equal(handle[1].cpu().numpy(), packed)  # indexing agrees with unpacking

    src = src_info.cpu().numpy()
    if use_fp8:
        q, scales = recv_x
        assert q.shape == (EL, R * M, H)
        got_q = q.cpu().view(torch.uint8).numpy()
        got_s = scales.cpu().numpy()
        refs = [
            oracle.per_token_cast_to_fp8(oracle.bf16_to_f32(b), round_scale, use_ue8m0)
            for b in case.all_x
        ]
    else:
        assert recv_x.dtype == torch.bfloat16 and recv_x.shape == (EL, R * M, H)
        got_x = bf16_bits(recv_x.cpu())
    c = expert_scale(E)
    y = np.full((EL, R * M, H), PADDING_VALUE, dtype=np.float32)
    for e in range(EL):
        for s in range(R):
            begin, count = (int(v) for v in ranges[e, s])
            tokens = src[e, begin : begin + count]
            assert np.array_equal(np.sort(tokens), want.groups[e][s]), (e, s)
            for row, t in zip(range(begin, begin + count), tokens, strict=True):
                if use_fp8:
                    assert np.array_equal(got_q[e, row], refs[s][0][t]), (e, row)
                    assert np.array_equal(got_s[e, row], refs[s][1][t]), (e, row)
                else:
                    assert np.array_equal(got_x[e, row], case.all_x[s][t]), (e, row)
                # The expert's output for this row: bf16(x_s[t] * c[e]).
                y[e, row] = oracle.bf16_to_f32(case.all_x[s][t]) * c[case.rank * EL + e]

    y_t = bf16_tensor(oracle.f32_to_bf16(y)).to(device)
    if zero_copy:
        target = buffer.get_next_low_latency_combine_buffer(handle)
        assert target.shape == (EL, R * M, H) and target.dtype == torch.bfloat16
        target.copy_(y_t)
    combined, event, hook = buffer.low_latency_combine(
        y_t, topk_idx, w, handle, zero_copy=zero_copy, return_recv_hook=use_hook
    )
    if use_hook:
        hook()
    else:
        event.current_stream_wait()

    # out[t] = sum_k w[t, k] * bf16(x[t] * c[idx[t, k]]), over slots with an expert.
    x32 = oracle.bf16_to_f32(case.x_bits)
    cidx = c[np.maximum(case.idx, 0)]
    rows = oracle.bf16_to_f32(oracle.f32_to_bf16(x32[:, None, :] * cidx[:, :, None]))
    want_out = oracle.low_latency_combine(case.idx, case.w, rows).astype(np.float64)
    weights = np.where(case.idx >= 0, np.abs(case.w), 0.0)
    abs_sum = np.einsum("tk,tkh->th", weights, np.abs(rows.astype(np.float64)))
    check_close("low-latency combine", combined.float().cpu().numpy(), want_out, 2.0**-7 * abs_sum)
