"""Low-latency rows moved in place on CPU tensors: one ``Ialltoallw`` per call whose
datatypes read rows where they are and write them where they belong (datatypes.py).

Dispatch reads rows of ``x`` (or its FP8 cast) by token id and writes per-expert runs of
``recv_x``, the scales, ``src_token_idx`` and the slots; combine reads per-expert runs of
the expert outputs and writes each row into slot (t, k) of a [T*K, H] array at its source.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from mpi4py import MPI

from mpiep.backends.reference import datatypes as dt
from mpiep.backends.reference.exchange import Exchange, as_numpy
from mpiep.backends.reference.fused import slot_sum
from mpiep.backends.reference.host_cache import host_empty
from mpiep.backends.reference.ll_layout import destinations, offsets
from mpiep.backends.reference.packing import as_words
from mpiep.fp8 import pack_ue8m0, round_scale_to_pow2

Rows = Callable[[torch.Tensor, torch.Tensor], None]  # (masked weights, out): the sum
Tags = Callable[[], tuple[torch.Tensor, torch.Tensor]]  # the (token, slot) of each row back


def dispatch_in_place(
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
    send_at, recv_at = offsets(send_rows), offsets(recv_rows)
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
            dst = destinations(counts, start, rows_per_expert).numpy()
            packed = pack_ue8m0(round_scale_to_pow2(torch.from_numpy(staged)))
            recv_scales.view(-1, recv_scales.shape[2]).numpy()[dst] = packed.numpy()

    return place


def _send_runs(
    counts: torch.Tensor, first: torch.Tensor, rows_per_expert: int, peer: int
) -> tuple[np.ndarray, np.ndarray]:
    epr = counts.shape[1]
    return counts[peer].numpy(), (torch.arange(epr) * rows_per_expert + first[peer]).numpy()


def combine_in_place(
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
    back_at = offsets(back_rows)
    for peer in range(num_ranks):
        lengths, firsts = _send_runs(counts, first, rows_per_expert, peer)
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
