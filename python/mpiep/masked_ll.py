"""Low-latency dispatch and combine while some ranks are masked (see ``mpiep.rank_mask``).

The calls run on a backend over the active ranks' communicator with the experts renumbered
(masked ranks' experts become -1, the others are numbered by their owner's rank among the
active ones), and the results are spread back to the full shapes: ``[E/R, R*M, ...]`` with
every masked source holding zero rows. A full-size handle is all that combine needs: its
columns of the active ranks make the handle of the smaller group. Any backend can run this
way; until the GPU kernels mask ranks natively, GPU tensors go through the reference path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from mpiep.backends.base import (
    LowLatencyCombineRequest,
    LowLatencyDispatchRequest,
    LowLatencyDispatchResult,
)
from mpiep.handles import LowLatencyHandle
from mpiep.rank_mask import RankMask


def renumber(topk_idx: torch.Tensor, mask: RankMask, experts_per_rank: int) -> torch.Tensor:
    """Expert ids as the active ranks' group numbers them; -1 for masked ranks' experts."""
    pos = mask.positions(topk_idx.device)
    owner = topk_idx.clamp(min=0) // experts_per_rank
    new = pos[owner] * experts_per_rank + topk_idx.clamp(min=0) % experts_per_rank
    return torch.where((topk_idx >= 0) & (pos[owner] >= 0), new, -1).contiguous()


def dispatch(mask: RankMask, req: LowLatencyDispatchRequest) -> LowLatencyDispatchResult:
    x, num_experts, max_tokens = req.x, req.num_experts, req.num_max_dispatch_tokens_per_rank
    num_ranks, active = mask.full.size, mask.active
    e_local = num_experts // num_ranks
    sub = mask.backend.low_latency_dispatch(  # type: ignore[union-attr]
        replace(
            req,
            topk_idx=renumber(req.topk_idx, mask, e_local),
            num_experts=e_local * len(active),
        )
    )
    rows, sub_rows = num_ranks * max_tokens, len(active) * max_tokens
    recv_x = _with_rows(sub.recv_x, rows)
    scales = None if sub.recv_x_scales is None else _with_rows(sub.recv_x_scales, rows)
    src = torch.full((e_local, rows), -1, dtype=torch.int32, device=sub.recv_count.device)
    layout = torch.zeros((e_local, num_ranks, 2), dtype=torch.int32, device=src.device)

    def spread() -> None:
        recv_x[:, :sub_rows] = sub.recv_x
        if scales is not None:
            scales[:, :sub_rows] = sub.recv_x_scales
        src[:, :sub_rows] = sub.handle.src_token_idx
        counts = torch.zeros((e_local, num_ranks), dtype=torch.int32, device=src.device)
        counts[:, active] = sub.handle.layout_range[:, :, 1].to(src.device)
        layout[:, :, 1] = counts
        layout[:, :, 0] = (torch.cumsum(counts, 1) - counts).to(torch.int32)

    hook: Callable[[], None] | None = None
    if sub.hook is not None:
        hook = _then(sub.hook, spread)
    else:
        spread()
    handle = LowLatencyHandle(
        num_max_dispatch_tokens_per_rank=max_tokens,
        hidden=x.shape[1],
        num_experts=num_experts,
        src_token_idx=src,
        layout_range=layout,
        num_tokens=x.shape[0],
        # The smaller group's own state (the reference backend keeps its receive flag and
        # source slots there): combine hands it back to that backend.
        backend_state={"active": tuple(active), "sub_state": sub.handle.backend_state},
    )
    return LowLatencyDispatchResult(recv_x, scales, sub.recv_count, handle, hook)


def combine(
    mask: RankMask, req: LowLatencyCombineRequest
) -> tuple[torch.Tensor, Callable[[], None] | None]:
    """``req.x`` is full-size ``[E/R, R*M, H]`` (zero_copy's buffer already read in); the rows
    of masked sources are not sent back."""
    x, handle = req.x, req.handle
    active = mask.active
    e_local = handle.num_experts // mask.full.size
    src, state = handle.src_token_idx, handle.backend_state
    if "sub_state" in state:
        # The dispatch ran masked: the active sources' rows are packed first (its spread)
        # and the smaller group's backend kept its own state for them.
        sub_rows = len(active) * handle.num_max_dispatch_tokens_per_rank
        x, src = x[:, :sub_rows].contiguous(), src[:, :sub_rows].contiguous()
        state = state["sub_state"]
    # Else the dispatch ran on every rank: full-size rows and state; the active sources'
    # ranges of the layout say where their rows are.
    sub_handle = LowLatencyHandle(
        num_max_dispatch_tokens_per_rank=handle.num_max_dispatch_tokens_per_rank,
        hidden=handle.hidden,
        num_experts=e_local * len(active),
        src_token_idx=src,
        layout_range=handle.layout_range[:, active].contiguous(),
        num_tokens=handle.num_tokens,
        backend_state=state,
    )
    return mask.backend.low_latency_combine(  # type: ignore[union-attr]
        replace(
            req,
            x=x,
            topk_idx=renumber(req.topk_idx, mask, e_local),
            handle=sub_handle,
            zero_copy=False,
        )
    )


def check_combinable(handle: LowLatencyHandle, mask: RankMask) -> None:
    """A handle can be combined while the active ranks are those of its dispatch or fewer
    (a rank unmasked since has no rows of it)."""
    dispatched: Any = handle.backend_state.get("active")
    if dispatched is None:
        dispatched = range(mask.full.size)
    back = sorted(set(mask.active) - set(dispatched))
    if back:
        raise ValueError(
            f"handle: its low_latency_dispatch ran while ranks {back} were masked and they "
            "are active now; dispatch again before combining"
        )


def _with_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Zeros shaped like ``t`` but with ``rows`` rows per expert."""
    return torch.zeros((t.shape[0], rows, *t.shape[2:]), dtype=t.dtype, device=t.device)


def _then(first: Callable[[], None], second: Callable[[], None]) -> Callable[[], None]:
    def both() -> None:
        first()
        second()

    return both
