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

How rows move: dispatch rows of CPU tensors in place, by one ``Ialltoallw``
(ll_in_place.py), those of CUDA tensors (staged on the host once per call) packed with their
tags through ``Ialltoallv``; combine rows into one contiguous buffer at their source, which
the fused sum reads in place (ll_staged.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from mpiep.backends.base import (
    LowLatencyCombineRequest,
    LowLatencyDispatchRequest,
    LowLatencyDispatchResult,
)
from mpiep.backends.reference.fused import cast_to_fp8
from mpiep.backends.reference.host_cache import host_empty
from mpiep.backends.reference.ll_in_place import dispatch_in_place
from mpiep.backends.reference.ll_layout import pairs
from mpiep.backends.reference.ll_staged import combine_staged, dispatch_staged
from mpiep.backends.reference.normal import check_handles, gather_counts, on_cpu, start_counts
from mpiep.errors import CapacityError
from mpiep.handles import LowLatencyHandle

if TYPE_CHECKING:
    from mpiep.backends.reference.backend import ReferenceBackend

IN_PLACE = True  # CPU dispatch rows moved in place by Ialltoallw (tests also run without)


def dispatch(backend: ReferenceBackend, req: LowLatencyDispatchRequest) -> LowLatencyDispatchResult:
    x, topk_idx, num_experts = req.x, req.topk_idx, req.num_experts
    max_tokens, stats = req.num_max_dispatch_tokens_per_rank, req.cumulative_local_expert_recv_stats
    use_fp8, round_scale, use_ue8m0 = req.use_fp8, req.round_scale, req.use_ue8m0
    return_recv_hook = req.return_recv_hook
    comm, device = backend.comm, backend.device
    num_ranks, rank = comm.size, comm.rank
    epr = num_experts // num_ranks
    rows_per_expert = num_ranks * max_tokens
    tokens, hidden = x.shape
    ids = on_cpu(topk_idx).numpy()
    bad = (ids >= num_experts) | (ids < -1)
    bad_id = bool(bad.any())
    slot = backend.dispatch_slots.claim()  # before anything is sent

    token, k, expert = pairs(np.where(bad, -1, ids) if bad_id else ids)
    per_expert = np.bincount(expert, minlength=num_experts)
    counting, everyone = start_counts(
        backend,
        "low_latency_dispatch: count exchange",
        (num_experts, per_expert),
        (1, np.array([int(bad_id)])),
    )
    # While the counts travel: the FP8 cast, done once per token.
    if use_fp8:
        data, scales = cast_to_fp8(on_cpu(x), round_scale=round_scale or use_ue8m0)
        data = data.view(torch.uint8)
    else:
        data, scales = on_cpu(x), None
        if return_recv_hook:  # MPI reads the rows until the hook: the caller may reuse x
            data = data.clone()
    backend.wait(counting)
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
    counts = everyone[:, rank * epr : (rank + 1) * epr]  # [src, e]
    start = np.cumsum(counts, 0) - counts  # [src, e]: first row of src's group
    send_rows = per_expert.reshape(num_ranks, epr).sum(1).tolist()
    recv_rows = counts.sum(1).tolist()

    groups = hidden // 128

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
    move = dispatch_in_place if device.type == "cpu" and IN_PLACE else dispatch_staged
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
        layout_range.copy_(torch.from_numpy(np.stack([start.T, counts.T], axis=2)))
        recv_count.copy_(torch.from_numpy(counts.sum(0)))
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


def combine(
    backend: ReferenceBackend, req: LowLatencyCombineRequest, y: torch.Tensor
) -> tuple[torch.Tensor, Callable[[], None] | None]:
    """``y``: the rows to combine (``req.x``, or the backend's buffer with zero_copy)."""
    topk_idx, topk_weights, handle = req.topk_idx, req.topk_weights, req.handle
    out, return_recv_hook = req.out, req.return_recv_hook
    comm, device = backend.comm, backend.device
    num_ranks = comm.size
    epr = handle.num_experts // num_ranks
    # Rows per expert as the dispatch laid them out: R * M, or the full group's when a
    # masked combine (masked_ll.py) sends a full-size handle's rows over fewer ranks.
    rows_per_expert = int(y.shape[1])
    hidden = handle.hidden
    tokens, num_topk = topk_idx.shape
    if not handle.backend_state.get("received", False):
        raise RuntimeError(
            "low_latency_combine: the dispatch of this handle has not received its rows yet; "
            "call its receive hook first"
        )
    ranges = on_cpu(handle.layout_range).numpy().astype(np.int64)
    first, counts = ranges[:, :, 0].T, ranges[:, :, 1].T  # [src, e]
    if (counts < 0).any() or (first < 0).any() or (first + counts > rows_per_expert).any():
        raise ValueError("low_latency_combine: the handle's layout_range is corrupt")
    slot = backend.combine_slots.claim()  # before anything is sent

    ids = on_cpu(topk_idx).numpy()
    valid = ids >= 0
    token, k, expert = pairs(ids)  # the order this rank's rows come back in
    back_rows = np.bincount(expert // epr, minlength=num_ranks)[:num_ranks]
    send_rows = counts.sum(1)
    everyone = gather_counts(
        backend,
        "low_latency_combine: count exchange",
        (num_ranks, send_rows),
        (num_ranks, back_rows),
    )
    check_handles(everyone[:, :num_ranks], everyone[:, num_ranks:], "low_latency_combine")
    plan = (send_rows.tolist(), back_rows.tolist(), counts, first)
    yc = on_cpu(y).reshape(epr * rows_per_expert, hidden)
    src_idx = on_cpu(handle.src_token_idx).reshape(-1)
    src_slot = handle.backend_state["src_slot"]
    assert isinstance(src_slot, torch.Tensor)
    exchange = backend.exchange("low_latency_combine: data")
    # A hooked call returns before MPI has read the expert rows, which the caller may then
    # overwrite: they go from a copy (CUDA rows were copied to the host already).
    pack = return_recv_hook and device.type == "cpu"
    rows, tags = combine_staged(
        exchange, (yc, src_idx, src_slot), plan, (token, k, tokens, num_topk), pack
    )
    result = (
        out if out is not None else torch.empty(tokens, hidden, dtype=torch.bfloat16, device=device)
    )

    def finish() -> None:
        backend.wait(exchange)
        back_token, back_k = tags()
        if not (np.array_equal(back_token, token) and np.array_equal(back_k, k)):
            raise ValueError(
                "low_latency_combine: rows came back for other (token, slot) pairs than this "
                "rank dispatched: topk_idx or the handle differ from the dispatch's"
            )
        w = torch.where(torch.from_numpy(valid), on_cpu(topk_weights).float(), 0.0)
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
