"""Low-latency dispatch and combine of the reference backend.

Dispatch: each (token, slot) pair with an expert is one packed row ``[x | FP8 scales |
token, slot]``, sent in (expert, token, slot) order. Every rank's per-expert counts travel
first in one allgather, so every rank knows where each source's rows for each local expert
land (grouped by source rank inside an expert, as the contract says) and all ranks refuse
the same overflow. One ``index_copy_`` then places the received rows. The outputs are
``torch.empty``: rows past ``recv_count`` are undefined, as on the GPU, and only
``src_token_idx`` is filled with -1 there (the contract).

Combine: each rank sends every received row back tagged (token, slot), and the source
sums ``w[t, k] * row`` over the slots in order (see ``reduce.gather_sum``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from mpiep.backends.base import LowLatencyDispatchResult
from mpiep.backends.reference.host_cache import host_empty
from mpiep.backends.reference.normal import _check_handles, _cpu, _gather_counts
from mpiep.backends.reference.packing import RowLayout, as_words
from mpiep.backends.reference.reduce import gather_sum
from mpiep.errors import CapacityError
from mpiep.fp8 import pack_ue8m0, per_token_cast_to_fp8, round_scale_to_pow2
from mpiep.handles import LowLatencyHandle

if TYPE_CHECKING:
    from mpiep.backends.reference.backend import ReferenceBackend


def _group_rows(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows listed group after group (``counts`` flattened, row-major): each row's group
    id and its index inside the group."""
    flat = counts.reshape(-1).to(torch.int64)
    gid = torch.repeat_interleave(torch.arange(flat.numel()), flat)
    first = torch.cumsum(flat, 0) - flat
    return gid, torch.arange(gid.numel()) - first[gid]


def dispatch(
    backend: ReferenceBackend,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    max_tokens: int,
    num_experts: int,
    use_fp8: bool,
    round_scale: bool,
    use_ue8m0: bool,
    stats: torch.Tensor | None,
    return_recv_hook: bool,
) -> LowLatencyDispatchResult:
    comm, device = backend.comm, backend.device
    num_ranks, rank = comm.size, comm.rank
    epr = num_experts // num_ranks
    rows_per_expert = num_ranks * max_tokens
    tokens, hidden = x.shape
    num_topk = topk_idx.shape[1]
    ids = _cpu(topk_idx)
    bad_id = bool(ids.numel()) and bool((ids >= num_experts).any() or (ids < -1).any())
    slot = backend.dispatch_slots.claim()  # before anything is sent

    # One row per (token, slot) with an expert, in (expert, token, slot) order.
    token, k = torch.nonzero(ids >= 0, as_tuple=True)
    expert = ids[token, k]
    if bad_id:
        token, k, expert = token[:0], k[:0], expert[:0]
    order = torch.argsort(expert * (tokens * num_topk) + token * num_topk + k)
    token, k, expert = token[order], k[order], expert[order]
    per_expert = torch.bincount(expert, minlength=num_experts)
    everyone = _gather_counts(
        backend,
        "low_latency_dispatch: count exchange",
        (num_experts, per_expert),
        (1, torch.tensor([int(bad_id)])),
    )
    if everyone[:, -1].any():
        bad = int(np.argmax(everyone[:, -1]))
        raise ValueError(
            f"low_latency_dispatch: rank {bad} passed a topk_idx with expert ids outside "
            f"[-1, {num_experts})"
        )
    totals = everyone[:, :num_experts].sum(axis=0)
    if totals.max(initial=0) > rows_per_expert:
        e = int(totals.argmax())
        raise CapacityError(
            f"low_latency_dispatch: expert {e} would receive {int(totals[e])} rows, more than "
            f"the {rows_per_expert} (ranks x num_max_dispatch_tokens_per_rank) it has room for "
            "(a token names the same expert in several slots?)"
        )
    counts = torch.from_numpy(everyone[:, rank * epr : (rank + 1) * epr].copy())  # [src, e]
    send_rows = per_expert.view(num_ranks, epr).sum(1).tolist()
    recv_rows = counts.sum(1).tolist()

    # Pack: x (or its FP8 cast, done once per token), scales, (token, slot).
    xc = _cpu(x)
    groups = hidden // 128
    if use_fp8:
        data, scales = per_token_cast_to_fp8(xc, round_scale=round_scale or use_ue8m0)
        data = data.view(torch.uint8)
        fields = [("x", torch.uint8, hidden), ("scales", torch.float32, groups)]
    else:
        data, scales = xc, None
        fields = [("x", torch.bfloat16, hidden)]
    layout = RowLayout([*fields, ("meta", torch.int32, 2)])
    send = host_empty((token.numel(), layout.row_bytes), torch.uint8)
    torch.index_select(data, 0, token, out=layout.view(send, "x"))
    if scales is not None:
        torch.index_select(scales, 0, token, out=layout.view(send, "scales"))
    meta = layout.view(send, "meta")
    meta[:, 0].copy_(token)
    meta[:, 1].copy_(k)
    recv = host_empty((int(counts.sum()), layout.row_bytes), torch.uint8)
    exchange = backend.exchange("low_latency_dispatch: data")
    exchange.start_alltoallv(send, send_rows, recv, recv_rows, layout.row_bytes)

    # Outputs: shapes fixed by the arguments; filled by finish().
    def output(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        # CPU: a cached block, whose pages are mapped already (first touch of fresh pages
        # cost more than the exchange); rows past recv_count stay undefined either way.
        if device.type == "cpu":
            return host_empty(shape, dtype)
        return torch.empty(shape, dtype=dtype, device=device)

    x_dtype = torch.float8_e4m3fn if use_fp8 else torch.bfloat16
    recv_x = output((epr, rows_per_expert, hidden), x_dtype)
    recv_scales = None
    if use_fp8:
        width, dtype = ((groups + 3) // 4, torch.int32) if use_ue8m0 else (groups, torch.float32)
        recv_scales = output((epr, rows_per_expert, width), dtype)
    recv_count = torch.empty(epr, dtype=torch.int32, device=device)
    src_token_idx = torch.empty(epr, rows_per_expert, dtype=torch.int32, device=device)
    layout_range = torch.empty(epr, num_ranks, 2, dtype=torch.int32, device=device)
    src_slot = torch.empty(epr * rows_per_expert, dtype=torch.int32)
    state = {"received": False, "src_slot": src_slot}

    def finish() -> None:
        backend.wait(exchange)
        # Received rows come by source, then local expert: place each in its expert's
        # rows, after the rows of lower source ranks.
        gid, within = _group_rows(counts)
        src, e = gid // epr, gid % epr
        start = torch.cumsum(counts, 0) - counts  # [src, e]: first row of src's group
        dst = e * rows_per_expert + start[src, e] + within
        dst_dev, dst_np = dst.to(device), dst.numpy()

        def place(out: torch.Tensor, rows: torch.Tensor) -> None:
            target = as_words(out.view(epr * rows_per_expert, -1))
            if device.type == "cpu":  # numpy's row scatter is ~2.5x torch's index_copy_
                target.numpy()[dst_np] = as_words(rows).numpy()
            else:
                target.index_copy_(0, dst_dev, as_words(rows).to(device))

        place(recv_x, layout.view(recv, "x"))
        if recv_scales is not None:
            sc = layout.view(recv, "scales")
            place(recv_scales, pack_ue8m0(round_scale_to_pow2(sc)) if use_ue8m0 else sc)
        meta_r = layout.view(recv, "meta")
        src_token_idx.fill_(-1)
        place(src_token_idx, meta_r[:, :1])
        src_slot.index_copy_(0, dst, meta_r[:, 1])
        layout_range.copy_(torch.stack([start.t(), counts.t()], dim=2))
        recv_count.copy_(counts.sum(0))
        if stats is not None:
            stats.add_(recv_count.to(stats.device))
        state["received"] = True

    handle = LowLatencyHandle(
        num_max_dispatch_tokens_per_rank=max_tokens,
        hidden=hidden,
        num_experts=num_experts,
        src_token_idx=src_token_idx,
        layout_range=layout_range,
        num_tokens=tokens,
        backend_state=state,
    )
    hook: Callable[[], None] | None = None
    if return_recv_hook:
        hook = backend.dispatch_slots.park(slot, exchange, finish, backend.check_usable)
    else:
        finish()
    return LowLatencyDispatchResult(recv_x, recv_scales, recv_count, handle, hook)


def combine(
    backend: ReferenceBackend,
    y: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    handle: LowLatencyHandle,
    out: torch.Tensor | None,
    return_recv_hook: bool,
) -> tuple[torch.Tensor, Callable[[], None] | None]:
    comm, device = backend.comm, backend.device
    num_ranks = comm.size
    epr = handle.num_experts // num_ranks
    rows_per_expert = num_ranks * handle.num_max_dispatch_tokens_per_rank
    hidden = handle.hidden
    tokens, num_topk = topk_idx.shape
    if not handle.backend_state.get("received", False):
        raise RuntimeError(
            "low_latency_combine: the dispatch of this handle has not received its rows yet; "
            "call its receive hook first"
        )
    ranges = _cpu(handle.layout_range).to(torch.int64)
    first, counts = ranges[:, :, 0].t(), ranges[:, :, 1].t()  # [src, e]
    if bool((counts < 0).any() or (first < 0).any() or (first + counts > rows_per_expert).any()):
        raise ValueError("low_latency_combine: the handle's layout_range is corrupt")
    slot = backend.combine_slots.claim()  # before anything is sent

    # Every received row goes back to its source, by source then expert.
    gid, within = _group_rows(counts)
    src, e = gid // epr, gid % epr
    flat = e * rows_per_expert + first[src, e] + within
    ids = _cpu(topk_idx)
    valid = ids >= 0
    back_rows = torch.bincount(ids[valid] // epr, minlength=num_ranks)[:num_ranks]
    send_rows = counts.sum(1)
    everyone = _gather_counts(
        backend,
        "low_latency_combine: count exchange",
        (num_ranks, send_rows),
        (num_ranks, back_rows),
    )
    _check_handles(everyone[:, :num_ranks], everyone[:, num_ranks:], "low_latency_combine")

    layout = RowLayout([("y", torch.bfloat16, hidden), ("meta", torch.int32, 2)])
    send = host_empty((flat.numel(), layout.row_bytes), torch.uint8)
    yc = _cpu(y).view(epr * rows_per_expert, hidden)
    torch.index_select(yc, 0, flat, out=layout.view(send, "y"))
    meta = layout.view(send, "meta")
    meta[:, 0].copy_(_cpu(handle.src_token_idx).reshape(-1)[flat])
    meta[:, 1].copy_(handle.backend_state["src_slot"][flat])
    num_back = int(back_rows.sum())
    recv = host_empty((num_back + 1, layout.row_bytes), torch.uint8)
    recv[num_back].zero_()  # the row that slots without an expert point at
    exchange = backend.exchange("low_latency_combine: data")
    exchange.start_alltoallv(
        send, send_rows.tolist(), recv[:num_back], back_rows.tolist(), layout.row_bytes
    )
    result = (
        out if out is not None else torch.empty(tokens, hidden, dtype=torch.bfloat16, device=device)
    )

    def finish() -> None:
        backend.wait(exchange)
        meta_r = layout.view(recv[:num_back], "meta").to(torch.int64)
        tok, k = meta_r[:, 0], meta_r[:, 1]
        if num_back and bool(((tok < 0) | (tok >= tokens) | (k < 0) | (k >= num_topk)).any()):
            raise ValueError("low_latency_combine: rows came back for tokens this rank lacks")
        idx = torch.full((tokens * num_topk,), num_back, dtype=torch.int64)
        idx[tok * num_topk + k] = torch.arange(num_back)
        idx = torch.where(valid.reshape(-1), idx, num_back).view(tokens, num_topk)
        w = torch.where(valid, _cpu(topk_weights).float(), 0.0)
        target = (
            result
            if result.device.type == "cpu"
            else host_empty(tuple(result.shape), torch.bfloat16)
        )
        # Few tokens, K slots each: larger blocks keep the per-op overhead down.
        gather_sum(layout.view(recv, "y"), idx, target, weights=w, rows_per_block=128)
        if target is not result:
            result.copy_(target)

    if return_recv_hook:
        return result, backend.combine_slots.park(slot, exchange, finish, backend.check_usable)
    finish()
    return result, None
