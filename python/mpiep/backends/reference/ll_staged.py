"""Low-latency rows exchanged into one contiguous buffer per call.

Dispatch of CUDA tensors (staged on the host once per call): rows packed with their tags
``[row | token, slot]``, exchanged with ``Ialltoallv`` and placed with one indexed copy.
Every combine: rows received into one contiguous buffer at their source, which the fused
sum reads in place (fused.py): no unpacking pass. Measured on 4 ranks x 2 cores against the
in-place ``Ialltoallw`` into slot (t, k) of a [T*K, H] array that the sum then read again:
20% less time, and sending from per-expert runs of the expert rows (a datatype per peer)
beat packing them first by another 8%.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from mpiep.backends.reference import datatypes as dt
from mpiep.backends.reference.exchange import Exchange, as_numpy
from mpiep.backends.reference.fused import gather_sum
from mpiep.backends.reference.host_cache import host_empty
from mpiep.backends.reference.ll_layout import destinations, group_rows, offsets
from mpiep.backends.reference.packing import RowLayout, as_words
from mpiep.fp8 import pack_ue8m0, round_scale_to_pow2

Rows = Callable[[torch.Tensor, torch.Tensor], None]  # (masked weights, out): the sum
Tags = Callable[[], tuple[np.ndarray, np.ndarray]]  # the (token, slot) of each row back


def dispatch_staged(
    exchange: Exchange,
    rows: tuple[np.ndarray, np.ndarray, torch.Tensor, torch.Tensor | None],
    plan: tuple[list[int], list[int], np.ndarray, np.ndarray],
    outputs: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor],
    use_ue8m0: bool,
) -> Callable[[], None]:
    """Packed rows [x | scales | token, slot] through Ialltoallv, placed afterwards with
    one indexed copy per output (on the outputs' device)."""
    token_np, k, data, scales = rows
    token = torch.from_numpy(token_np)
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
    meta[:, 1].copy_(torch.from_numpy(k))
    recv = host_empty((sum(recv_rows), layout.row_bytes), torch.uint8)
    exchange.start_alltoallv(send, send_rows, recv, recv_rows, layout.row_bytes)

    def place() -> None:
        dst_np = destinations(counts, start, rows_per_expert)
        dst = torch.from_numpy(dst_np)
        dst_dev = dst.to(recv_x.device)

        def put(out: torch.Tensor, rows: torch.Tensor) -> None:
            target = as_words(out.reshape(out.shape[0] * out.shape[1], -1))
            if out.device.type == "cpu":  # numpy's row scatter is ~2.5x torch's index_copy_
                target.numpy()[dst_np] = as_words(rows).numpy()
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


def combine_staged(
    exchange: Exchange,
    expert_side: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    plan: tuple[list[int], list[int], np.ndarray, np.ndarray],
    source_side: tuple[np.ndarray, np.ndarray, int, int],
    pack: bool,
) -> tuple[Rows, Tags]:
    """Each rank's rows land in one contiguous buffer at their source, in the order it
    dispatched them, and their (token, slot) tags beside them; the sum reads them there.

    The expert rows go out where they are (per-expert runs, one datatype per peer), or,
    with ``pack``, from a packed copy: a hooked call returns before MPI has read them, and
    the caller may overwrite them then (the next layer, the zero-copy buffer). This rank's
    own rows skip MPI."""
    y, src_idx, src_slot = expert_side
    send_rows, back_rows, counts, first = plan
    token, k, tokens, num_topk = source_side
    num_ranks, epr = counts.shape
    rows_per_expert = y.shape[0] // epr
    hidden = y.shape[1]
    runs = np.arange(epr) * rows_per_expert + first  # [peer, e]: first row of each run
    gid, within = group_rows(counts)
    flat_np = runs.reshape(-1)[gid] + within  # every row to send, peer after peer
    flat = torch.from_numpy(flat_np)
    num_back = sum(back_rows)
    recv = host_empty((num_back + 1, hidden), torch.bfloat16)
    recv[num_back].zero_()  # the row that slots without an expert point at
    rank = exchange.comm.rank
    send_at, back_at = offsets(send_rows), offsets(back_rows)
    words = as_words(y)
    mine = flat[send_at[rank] : send_at[rank] + send_rows[rank]]
    own = slice(back_at[rank], back_at[rank] + back_rows[rank])
    torch.index_select(words, 0, mine, out=as_words(recv)[own])
    if pack:
        send = host_empty((flat.numel(), hidden), torch.bfloat16)
        out = as_words(send)
        before, after = send_at[rank], send_at[rank] + send_rows[rank]
        torch.index_select(words, 0, flat[:before], out=out[:before])
        torch.index_select(words, 0, flat[after:], out=out[after:])
        exchange.start_alltoallv(send, send_rows, recv[:num_back], back_rows, hidden * 2, True)
    else:
        row = dt.row_type(hidden * 2)
        y_np, recv_np = as_numpy(y), as_numpy(recv).reshape(num_back + 1, hidden * 2)
        sends, recvs = [], []
        for peer in range(num_ranks):
            if peer == rank:
                sends.append(dt.peer_type([]))
                recvs.append(dt.peer_type([]))
                continue
            sends.append(dt.peer_type([(y_np, dt.row_runs(row, counts[peer], runs[peer]))]))
            block = dt.contiguous(recv_np, back_at[peer], back_rows[peer], row)
            recvs.append(dt.peer_type([block]))
        row.Free()
        exchange.start_alltoallw(sends, recvs, y, recv)
    send_tags = torch.from_numpy(
        np.stack([src_idx.numpy()[flat_np], src_slot.numpy()[flat_np]], axis=1).astype(np.int32)
    )
    recv_tags = torch.empty(num_back, 2, dtype=torch.int32)
    exchange.start_alltoallv(send_tags, send_rows, recv_tags, back_rows, 8)

    def tags() -> tuple[np.ndarray, np.ndarray]:
        back = recv_tags.numpy()
        return back[:, 0], back[:, 1]

    def rows(weights: torch.Tensor, out: torch.Tensor) -> None:
        idx = np.full(tokens * num_topk, num_back, dtype=np.int64)
        idx[token * num_topk + k] = np.arange(num_back)
        gather_sum(recv, torch.from_numpy(idx).view(tokens, num_topk), out, weights=weights)

    return rows, tags
