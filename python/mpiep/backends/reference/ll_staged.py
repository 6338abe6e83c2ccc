"""Low-latency rows packed with their tags ``[row | token, slot]``, exchanged with
``Ialltoallv`` and placed with one indexed copy: the path of CUDA tensors (staged on the
host once per call) and of hooked combines, whose expert rows the caller may overwrite as
soon as the call returns.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mpiep.backends.reference.exchange import Exchange
from mpiep.backends.reference.fused import gather_sum
from mpiep.backends.reference.host_cache import host_empty
from mpiep.backends.reference.ll_in_place import Rows, Tags
from mpiep.backends.reference.ll_layout import destinations, group_rows
from mpiep.backends.reference.packing import RowLayout, as_words
from mpiep.fp8 import pack_ue8m0, round_scale_to_pow2


def dispatch_staged(
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
        dst = destinations(counts, start, rows_per_expert)
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


def combine_staged(
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
    gid, within = group_rows(counts)
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
