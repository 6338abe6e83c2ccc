"""Low-latency rows packed and exchanged with ``Ialltoallv``.

Dispatch of CUDA tensors (staged on the host once per call): rows packed with their tags
``[row | token, slot]``, placed with one indexed copy. Every combine: rows packed by one row
gather, tags beside them, received into one buffer that the fused sum reads in place
(fused.py), so that MPI copies each row once (contiguous buffers go by single-copy shared
memory; the datatypes of an in-place ``Ialltoallw`` made MPI pack and unpack every row, and
the unpacked rows were read once more by the sum). Packing also lets a hooked combine return
before MPI has read the expert rows, which the caller may then overwrite.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from mpiep.backends.reference.exchange import Exchange
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
) -> tuple[Rows, Tags]:
    """Rows packed by one row gather, and their (token, slot) tags beside them, through two
    Ialltoallv of contiguous buffers (MPI copies each row once); the sum reads the received
    rows where they landed, by tag."""
    y, src_idx, src_slot = expert_side
    send_rows, back_rows, counts, first = plan
    token, k, tokens, num_topk = source_side
    rows_per_expert = y.shape[0] // counts.shape[1]
    hidden = y.shape[1]
    gid, within = group_rows(counts)
    src, e = gid // counts.shape[1], gid % counts.shape[1]
    flat_np = e * rows_per_expert + first[src, e] + within
    flat = torch.from_numpy(flat_np)
    num_back = sum(back_rows)
    recv = host_empty((num_back + 1, hidden), torch.bfloat16)
    recv[num_back].zero_()  # the row that slots without an expert point at
    # Rows for other ranks are packed; this rank's own rows go straight to their place in
    # recv (MPI skips them).
    rank = exchange.comm.rank
    mine = offsets(send_rows)[rank], offsets(back_rows)[rank], send_rows[rank]
    send = host_empty((flat.numel(), hidden), torch.bfloat16)
    words, send_words = as_words(y), as_words(send)
    torch.index_select(words, 0, flat[: mine[0]], out=send_words[: mine[0]])
    torch.index_select(words, 0, flat[mine[0] + mine[2] :], out=send_words[mine[0] + mine[2] :])
    own = slice(mine[1], mine[1] + mine[2])
    torch.index_select(words, 0, flat[mine[0] : mine[0] + mine[2]], out=as_words(recv)[own])
    send_tags = torch.from_numpy(
        np.stack([src_idx.numpy()[flat_np], src_slot.numpy()[flat_np]], axis=1).astype(np.int32)
    )
    recv_tags = torch.empty(num_back, 2, dtype=torch.int32)
    exchange.start_alltoallv(send, send_rows, recv[:num_back], back_rows, hidden * 2, True)
    exchange.start_alltoallv(send_tags, send_rows, recv_tags, back_rows, 8)

    def tags() -> tuple[np.ndarray, np.ndarray]:
        back = recv_tags.numpy()
        return back[:, 0], back[:, 1]

    def rows(weights: torch.Tensor, out: torch.Tensor) -> None:
        idx = np.full(tokens * num_topk, num_back, dtype=np.int64)
        idx[token * num_topk + k] = np.arange(num_back)
        gather_sum(recv, torch.from_numpy(idx).view(tokens, num_topk), out, weights=weights)

    return rows, tags
