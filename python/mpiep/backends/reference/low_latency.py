"""Low-latency dispatch and combine of the reference backend.

Dispatch: each (token, slot) pair with an expert is one row, sent in (expert, token, slot)
order. Every rank's per-expert counts travel first in one allgather, so every rank knows
where each source's rows for each local expert land (grouped by source rank inside an
expert, in arrival order) and all ranks refuse the same overflow. The outputs are
``torch.empty``: rows past ``recv_count`` are undefined, as on the GPU, and only
``src_token_idx`` is -1 there (the contract).

Combine: every received row goes back to its source, which sums ``w[t, k] * row`` over the
slots in order (reduce.py). Rows come back in the order the source dispatched them (by
expert, then token and slot); the (token, slot) tags that travel with them are checked
against it.

On CPU tensors both calls move rows in place: one ``Ialltoallw`` whose datatypes read
rows where they are (rows of ``x`` by token id; runs of the expert buffer) and write them
where they belong (runs of ``recv_x``; slot (t, k) of the combine rows), see datatypes.py.
Elsewhere (CUDA tensors, staged on the host once per call) rows are packed with their
tags, exchanged with ``Ialltoallv`` and placed with one indexed copy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from mpi4py import MPI

from mpiep.backends.base import LowLatencyDispatchResult
from mpiep.backends.reference import datatypes as dt
from mpiep.backends.reference.exchange import Exchange, as_numpy
from mpiep.backends.reference.host_cache import host_empty
from mpiep.backends.reference.normal import _check_handles, _cpu, _gather_counts
from mpiep.backends.reference.packing import RowLayout, as_words
from mpiep.backends.reference.reduce import gather_sum, slot_sum
from mpiep.errors import CapacityError
from mpiep.fp8 import pack_ue8m0, per_token_cast_to_fp8, round_scale_to_pow2
from mpiep.handles import LowLatencyHandle

if TYPE_CHECKING:
    from mpiep.backends.reference.backend import ReferenceBackend

IN_PLACE = True  # CPU tensors: rows moved in place by Ialltoallw (tests also run without)


def _group_rows(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows listed group after group (``counts`` flattened, row-major): each row's group
    id and its index inside the group."""
    flat = counts.reshape(-1).to(torch.int64)
    gid = torch.repeat_interleave(torch.arange(flat.numel()), flat)
    first = torch.cumsum(flat, 0) - flat
    return gid, torch.arange(gid.numel()) - first[gid]


def _pairs(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token, slot, expert) of every slot with an expert, in (expert, token, slot) order:
    the order a rank sends its dispatch rows in, and gets its combine rows back in."""
    tokens, num_topk = ids.shape
    token, k = torch.nonzero(ids >= 0, as_tuple=True)
    expert = ids[token, k]
    order = torch.argsort(expert * (tokens * num_topk) + token * num_topk + k)
    return token[order], k[order], expert[order]


def _offsets(rows: list[int]) -> list[int]:
    return [int(v) for v in np.concatenate([[0], np.cumsum(rows)[:-1]])] if rows else []


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
    ids = _cpu(topk_idx)
    bad_id = bool(ids.numel()) and bool((ids >= num_experts).any() or (ids < -1).any())
    slot = backend.dispatch_slots.claim()  # before anything is sent

    token, k, expert = _pairs(torch.where((ids >= num_experts) | (ids < -1), -1, ids))
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
    start = torch.cumsum(counts, 0) - counts  # [src, e]: first row of src's group
    send_rows = per_expert.view(num_ranks, epr).sum(1).tolist()
    recv_rows = counts.sum(1).tolist()

    # What travels: x (or its FP8 cast, done once per token), the scales, (token, slot).
    groups = hidden // 128
    if use_fp8:
        data, scales = per_token_cast_to_fp8(_cpu(x), round_scale=round_scale or use_ue8m0)
        data = data.view(torch.uint8)
    else:
        data, scales = _cpu(x), None
        if return_recv_hook:  # MPI reads the rows until the hook: the caller may reuse x
            data = data.clone()

    def output(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        # CPU: a cached block, whose pages are mapped already (first touch of fresh pages
        # cost more than the exchange); rows past recv_count stay undefined either way.
        if device.type == "cpu":
            return host_empty(shape, dtype)
        return torch.empty(shape, dtype=dtype, device=device)

    recv_x = output((epr, rows_per_expert, hidden), x.dtype if not use_fp8 else torch.uint8)
    recv_scales = None
    if use_fp8:
        width, dtype = ((groups + 3) // 4, torch.int32) if use_ue8m0 else (groups, torch.float32)
        recv_scales = output((epr, rows_per_expert, width), dtype)
    recv_count = torch.empty(epr, dtype=torch.int32, device=device)
    src_token_idx = torch.full((epr, rows_per_expert), -1, dtype=torch.int32, device=device)
    layout_range = torch.empty(epr, num_ranks, 2, dtype=torch.int32, device=device)
    src_slot = torch.empty(epr * rows_per_expert, dtype=torch.int32)
    exchange = backend.exchange("low_latency_dispatch: data")
    move = _dispatch_in_place if device.type == "cpu" and IN_PLACE else _dispatch_staged
    place = move(
        exchange,
        (token, k, data, scales),
        (send_rows, recv_rows, counts, start),
        (recv_x, recv_scales, src_token_idx, src_slot),
        use_ue8m0,
    )

    def finish() -> None:
        backend.wait(exchange)
        place()
        layout_range.copy_(torch.stack([start.t(), counts.t()], dim=2))
        recv_count.copy_(counts.sum(0))
        if stats is not None:
            stats.add_(recv_count.to(stats.device))
        state["received"] = True

    state: dict[str, object] = {"received": False, "src_slot": src_slot}
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
    out_x = recv_x.view(torch.float8_e4m3fn) if use_fp8 else recv_x
    return LowLatencyDispatchResult(out_x, recv_scales, recv_count, handle, hook)


def _destinations(counts: torch.Tensor, start: torch.Tensor, rows_per_expert: int) -> torch.Tensor:
    """Row of each received row (source-major, then expert) in the [E_local * R * M] rows."""
    epr = counts.shape[1]
    gid, within = _group_rows(counts)
    src, e = gid // epr, gid % epr
    return e * rows_per_expert + start[src, e] + within


def _dispatch_in_place(
    exchange: Exchange,
    rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None],
    plan: tuple[list[int], list[int], torch.Tensor, torch.Tensor],
    outputs: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor],
    use_ue8m0: bool,
) -> Callable[[], None]:
    """One Ialltoallw from the rows of ``x`` (picked by token id) straight into runs of the
    outputs; returns what finish() still has to do (UE8M0 packing)."""
    token, k, data, scales = rows
    send_rows, recv_rows, counts, start = plan
    recv_x, recv_scales, src_token_idx, src_slot = outputs
    num_ranks, epr = counts.shape
    rows_per_expert = recv_x.shape[1]
    tok32 = token.to(torch.int32).numpy()
    slot32 = k.to(torch.int32).numpy()
    x_np, out_np = as_numpy(data), as_numpy(recv_x)
    sc_np = as_numpy(scales) if scales is not None else None
    tok_out, slot_out = src_token_idx.numpy().reshape(-1), src_slot.numpy()
    staged = None  # UE8M0: float32 scales land here, packed after the receive
    if scales is not None and use_ue8m0:
        staged = np.empty((sum(recv_rows), scales.shape[1]), dtype=np.float32)
    out_sc = as_numpy(recv_scales) if recv_scales is not None and staged is None else None
    row_x = dt.row_type(data.shape[1] * data.element_size())
    row_sc = dt.row_type(scales.shape[1] * 4) if scales is not None else None
    sends, recvs = [], []
    send_at, recv_at = _offsets(send_rows), _offsets(recv_rows)
    for peer in range(num_ranks):
        picked = token[send_at[peer] : send_at[peer] + send_rows[peer]].numpy()
        parts = [(x_np, dt.picked_rows(row_x, picked))]
        if sc_np is not None:
            parts.append((sc_np, dt.picked_rows(row_sc, picked)))
        parts.append(dt.contiguous(tok32, send_at[peer], send_rows[peer], MPI.INT32_T))
        parts.append(dt.contiguous(slot32, send_at[peer], send_rows[peer], MPI.INT32_T))
        sends.append(dt.peer_type(parts))
        lengths = counts[peer].numpy()
        firsts = (torch.arange(epr) * rows_per_expert + start[peer]).numpy()
        parts = [(out_np, dt.row_runs(row_x, lengths, firsts))]
        if out_sc is not None:
            parts.append((out_sc, dt.row_runs(row_sc, lengths, firsts)))
        elif staged is not None:
            parts.append(dt.contiguous(staged, recv_at[peer], recv_rows[peer], row_sc))
        parts.append((tok_out, dt.row_runs(MPI.INT32_T, lengths, firsts)))
        parts.append((slot_out, dt.row_runs(MPI.INT32_T, lengths, firsts)))
        recvs.append(dt.peer_type(parts))
    for t in (row_x, row_sc):
        if t is not None:
            t.Free()
    exchange.start_alltoallw(sends, recvs, data, scales, tok32, slot32, staged, *outputs)

    def place() -> None:
        if staged is not None and recv_scales is not None:
            dst = _destinations(counts, start, rows_per_expert).numpy()
            packed = pack_ue8m0(round_scale_to_pow2(torch.from_numpy(staged)))
            recv_scales.view(-1, recv_scales.shape[2]).numpy()[dst] = packed.numpy()

    return place


def _dispatch_staged(
    exchange: Exchange,
    rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None],
    plan: tuple[list[int], list[int], torch.Tensor, torch.Tensor],
    outputs: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor],
    use_ue8m0: bool,
) -> Callable[[], None]:
    """Packed rows [x | scales | token, slot] through Ialltoallv, placed afterwards with
    one indexed copy per output (on the outputs' device)."""
    token, k, data, scales = rows
    send_rows, recv_rows, counts, start = plan
    recv_x, recv_scales, src_token_idx, src_slot = outputs
    rows_per_expert = recv_x.shape[1]
    fields = [("x", data.dtype, data.shape[1])]
    if scales is not None:
        fields.append(("scales", torch.float32, scales.shape[1]))
    layout = RowLayout([*fields, ("meta", torch.int32, 2)])
    send = host_empty((token.numel(), layout.row_bytes), torch.uint8)
    torch.index_select(data, 0, token, out=layout.view(send, "x"))
    if scales is not None:
        torch.index_select(scales, 0, token, out=layout.view(send, "scales"))
    meta = layout.view(send, "meta")
    meta[:, 0].copy_(token)
    meta[:, 1].copy_(k)
    recv = host_empty((sum(recv_rows), layout.row_bytes), torch.uint8)
    exchange.start_alltoallv(send, send_rows, recv, recv_rows, layout.row_bytes)

    def place() -> None:
        dst = _destinations(counts, start, rows_per_expert)
        dst_dev = dst.to(recv_x.device)

        def put(out: torch.Tensor, rows: torch.Tensor) -> None:
            target = as_words(out.reshape(out.shape[0] * out.shape[1], -1))
            if out.device.type == "cpu":  # numpy's row scatter is ~2.5x torch's index_copy_
                target.numpy()[dst.numpy()] = as_words(rows).numpy()
            else:
                target.index_copy_(0, dst_dev, as_words(rows).to(out.device))

        put(recv_x, layout.view(recv, "x"))
        if recv_scales is not None:
            sc = layout.view(recv, "scales")
            put(recv_scales, pack_ue8m0(round_scale_to_pow2(sc)) if use_ue8m0 else sc)
        meta_r = layout.view(recv, "meta")
        put(src_token_idx, meta_r[:, :1])
        src_slot.index_copy_(0, dst, meta_r[:, 1])

    return place


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

    ids = _cpu(topk_idx)
    valid = ids >= 0
    token, k, expert = _pairs(ids)  # the order this rank's rows come back in
    back_rows = torch.bincount(expert // epr, minlength=num_ranks)[:num_ranks]
    send_rows = counts.sum(1)
    everyone = _gather_counts(
        backend,
        "low_latency_combine: count exchange",
        (num_ranks, send_rows),
        (num_ranks, back_rows),
    )
    _check_handles(everyone[:, :num_ranks], everyone[:, num_ranks:], "low_latency_combine")
    plan = (send_rows.tolist(), back_rows.tolist(), counts, first)
    yc = _cpu(y).reshape(epr * rows_per_expert, hidden)
    src_idx = _cpu(handle.src_token_idx).reshape(-1)
    src_slot = handle.backend_state["src_slot"]
    assert isinstance(src_slot, torch.Tensor)
    exchange = backend.exchange("low_latency_combine: data")
    # With a hook the call returns before MPI has read the expert rows, which the caller
    # may overwrite (the next layer, the zero-copy buffer): send a packed copy then.
    in_place = device.type == "cpu" and IN_PLACE and not return_recv_hook
    move = _combine_in_place if in_place else _combine_staged
    rows, tags = move(exchange, (yc, src_idx, src_slot), plan, (token, k, tokens, num_topk))
    result = (
        out if out is not None else torch.empty(tokens, hidden, dtype=torch.bfloat16, device=device)
    )

    def finish() -> None:
        backend.wait(exchange)
        back_token, back_k = tags()
        if not (torch.equal(back_token, token) and torch.equal(back_k, k)):
            raise ValueError(
                "low_latency_combine: rows came back for other (token, slot) pairs than this "
                "rank dispatched: topk_idx or the handle differ from the dispatch's"
            )
        w = torch.where(valid, _cpu(topk_weights).float(), 0.0)
        target = (
            result
            if result.device.type == "cpu"
            else host_empty(tuple(result.shape), torch.bfloat16)
        )
        rows(w, target)
        if target is not result:
            result.copy_(target)

    if return_recv_hook:
        return result, backend.combine_slots.park(slot, exchange, finish, backend.check_usable)
    finish()
    return result, None


Rows = Callable[[torch.Tensor, torch.Tensor], None]  # (masked weights, out): the sum
Tags = Callable[[], tuple[torch.Tensor, torch.Tensor]]  # the (token, slot) of each row back


def _combine_send_runs(
    counts: torch.Tensor, first: torch.Tensor, rows_per_expert: int, peer: int
) -> tuple[np.ndarray, np.ndarray]:
    epr = counts.shape[1]
    return counts[peer].numpy(), (torch.arange(epr) * rows_per_expert + first[peer]).numpy()


def _combine_in_place(
    exchange: Exchange,
    expert_side: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    plan: tuple[list[int], list[int], torch.Tensor, torch.Tensor],
    source_side: tuple[torch.Tensor, torch.Tensor, int, int],
) -> tuple[Rows, Tags]:
    """Rows go straight from runs of the expert buffer into slot (t, k) of a [T*K, H]
    array at their source; their tags land in two small arrays for the check."""
    y, src_idx, src_slot = expert_side
    _, back_rows, counts, first = plan
    token, k, tokens, num_topk = source_side
    num_ranks = counts.shape[0]
    rows_per_expert = y.shape[0] // counts.shape[1]
    hidden = y.shape[1]
    slots = host_empty((tokens * num_topk, hidden), torch.bfloat16)
    back_tok = np.empty(sum(back_rows), dtype=np.int32)
    back_k = np.empty(sum(back_rows), dtype=np.int32)
    position = (token * num_topk + k).numpy()
    y_np, slots_np = as_numpy(y), as_numpy(slots)
    idx_np, kk_np = src_idx.numpy(), src_slot.numpy()
    row = dt.row_type(hidden * 2)
    sends, recvs = [], []
    back_at = _offsets(back_rows)
    for peer in range(num_ranks):
        lengths, firsts = _combine_send_runs(counts, first, rows_per_expert, peer)
        sends.append(
            dt.peer_type(
                [
                    (y_np, dt.row_runs(row, lengths, firsts)),
                    (idx_np, dt.row_runs(MPI.INT32_T, lengths, firsts)),
                    (kk_np, dt.row_runs(MPI.INT32_T, lengths, firsts)),
                ]
            )
        )
        at, n = back_at[peer], back_rows[peer]
        recvs.append(
            dt.peer_type(
                [
                    (slots_np, dt.picked_rows(row, position[at : at + n])),
                    dt.contiguous(back_tok, at, n, MPI.INT32_T),
                    dt.contiguous(back_k, at, n, MPI.INT32_T),
                ]
            )
        )
    row.Free()
    exchange.start_alltoallw(sends, recvs, y, src_idx, src_slot, slots, back_tok, back_k)

    def rows(weights: torch.Tensor, out: torch.Tensor) -> None:
        empty = np.setdiff1d(np.arange(tokens * num_topk), position)  # slots without an expert
        if empty.size:
            as_words(slots).numpy()[empty] = 0
        slot_sum(slots.view(tokens, num_topk, hidden), weights, out)

    def tags() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(back_tok).long(), torch.from_numpy(back_k).long()

    return rows, tags


def _combine_staged(
    exchange: Exchange,
    expert_side: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    plan: tuple[list[int], list[int], torch.Tensor, torch.Tensor],
    source_side: tuple[torch.Tensor, torch.Tensor, int, int],
) -> tuple[Rows, Tags]:
    """Packed rows [y | token, slot] through Ialltoallv; the sum gathers them by tag."""
    y, src_idx, src_slot = expert_side
    send_rows, back_rows, counts, first = plan
    token, k, tokens, num_topk = source_side
    rows_per_expert = y.shape[0] // counts.shape[1]
    gid, within = _group_rows(counts)
    src, e = gid // counts.shape[1], gid % counts.shape[1]
    flat = e * rows_per_expert + first[src, e] + within
    layout = RowLayout([("y", torch.bfloat16, y.shape[1]), ("meta", torch.int32, 2)])
    send = host_empty((flat.numel(), layout.row_bytes), torch.uint8)
    torch.index_select(y, 0, flat, out=layout.view(send, "y"))
    meta = layout.view(send, "meta")
    meta[:, 0].copy_(src_idx[flat])
    meta[:, 1].copy_(src_slot[flat])
    num_back = sum(back_rows)
    recv = host_empty((num_back + 1, layout.row_bytes), torch.uint8)
    recv[num_back].zero_()  # the row that slots without an expert point at
    exchange.start_alltoallv(send, send_rows, recv[:num_back], back_rows, layout.row_bytes)

    def tags() -> tuple[torch.Tensor, torch.Tensor]:
        meta_r = layout.view(recv[:num_back], "meta").to(torch.int64)
        return meta_r[:, 0], meta_r[:, 1]

    def rows(weights: torch.Tensor, out: torch.Tensor) -> None:
        idx = torch.full((tokens * num_topk,), num_back, dtype=torch.int64)
        idx[token * num_topk + k] = torch.arange(num_back)
        gather_sum(layout.view(recv, "y"), idx.view(tokens, num_topk), out, weights=weights)

    return rows, tags
