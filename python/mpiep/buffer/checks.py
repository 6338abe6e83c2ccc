"""The argument checks of ``Buffer``'s calls, one function per operation.

Each runs on one rank, raises ``TypeError``/``ValueError``/``RuntimeError`` (or
``CapacityError``) naming the argument, and otherwise returns the call's signature: the
values every rank must agree on. ``Buffer._checked`` runs it and, with validation on,
agrees on the outcome across ranks so that a bad argument fails the call everywhere.

The checks read the Buffer's fixed properties (device, ranks, sizes, its id) and its
``validate`` flag; they change nothing but the low-latency size cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from mpiep import config as cfg
from mpiep import handle_checks as hc
from mpiep import validate as val
from mpiep.backends.base import (
    CombineRequest,
    DispatchRequest,
    LowLatencyCombineRequest,
    LowLatencyDispatchRequest,
)
from mpiep.errors import CapacityError
from mpiep.handles import DispatchHandle

if TYPE_CHECKING:  # type only: the checks take the Buffer whose call they check
    from mpiep.buffer.api import Buffer

BF16 = torch.bfloat16
FP8 = torch.float8_e4m3fn
X_DTYPES = (torch.bfloat16, torch.float8_e4m3fn)

# (name, value) pairs that every rank must have alike (see Communicator.agree).
Signature = tuple[tuple[str, Any], ...]


def get_dispatch_layout(buf: Buffer, topk_idx: torch.Tensor, num_experts: int) -> Signature:
    val.check_num_experts(num_experts, buf.group_size)
    val.check_tensor("topk_idx", topk_idx, torch.int64, 2, buf.device)
    val.check_topk_idx(topk_idx, num_experts, buf.validate)
    return (
        ("op", "get_dispatch_layout"),
        ("num_experts", num_experts),
        ("num_topk", topk_idx.shape[1]),
    )


def get_dispatch_layout_lean(buf: Buffer, topk_idx: Any, num_experts: int) -> None:
    """Without validation on a backend whose ops check their tensors (``native_checks``):
    only what the op cannot see. The same holds for the other ``*_lean`` checks."""
    val.check_num_experts(num_experts, buf.group_size)


def dispatch_lean(buf: Buffer, req: DispatchRequest) -> None:
    data, handle = req.x, req.handle
    val.check_is_tensor("x", data)
    _dispatch_ints(req.expert_alignment, req.num_worst_tokens)
    if handle is not None:
        _cached_dispatch_handle(buf, handle, data, req.num_worst_tokens)
        return
    _require_layout(_layout_tensors(req))


def _layout_tensors(req: DispatchRequest) -> tuple[Any, ...]:
    """A new dispatch's layout tensors and top-k, in ``_LAYOUT_NAMES`` order."""
    lay = req.layout
    assert lay is not None  # Buffer builds one whenever there is no handle
    return (lay.num_tokens_per_rank, lay.is_token_in_rank, lay.num_tokens_per_expert, req.topk_idx)


_LAYOUT_NAMES = ("num_tokens_per_rank", "is_token_in_rank", "num_tokens_per_expert", "topk_idx")


def _require_layout(layout: tuple[Any, ...]) -> None:
    """A dispatch without a handle needs the layout tensors (in ``_LAYOUT_NAMES`` order)."""
    for name, t in zip(_LAYOUT_NAMES, layout, strict=True):
        if t is None:
            raise ValueError(f"dispatch without a handle needs {name} (from get_dispatch_layout)")


def _dispatch_ints(expert_alignment: int, num_worst_tokens: int) -> None:
    if not isinstance(expert_alignment, int) or expert_alignment <= 0:
        raise ValueError(f"expert_alignment must be a positive int, got {expert_alignment!r}")
    if not isinstance(num_worst_tokens, int) or num_worst_tokens < 0:
        raise ValueError(f"num_worst_tokens must be a non-negative int, got {num_worst_tokens!r}")


def _cached_dispatch_handle(
    buf: Buffer, handle: DispatchHandle, data: torch.Tensor, num_worst_tokens: int
) -> None:
    """A cached dispatch's handle: from this Buffer, made for x's shape and padding."""
    hc.check_dispatch_handle(handle, buf._id, buf.group_size)
    tokens, hidden = data.shape[0], data.shape[-1]
    if handle.num_tokens != tokens or handle.hidden != hidden:
        raise ValueError(
            f"cached dispatch: x is [{tokens}, {hidden}] but the handle was made for "
            f"[{handle.num_tokens}, {handle.hidden}]"
        )
    if num_worst_tokens not in (0, handle.num_worst_tokens):
        raise ValueError(
            f"cached dispatch: num_worst_tokens={num_worst_tokens} differs from the "
            f"handle's {handle.num_worst_tokens} (a cached dispatch keeps its shapes)"
        )


def combine_lean(buf: Buffer, req: CombineRequest) -> None:
    x, handle, topk_weights = req.x, req.handle, req.topk_weights
    hc.check_dispatch_handle(handle, buf._id, buf.group_size)
    val.check_is_tensor("x", x)
    rows = handle.num_output_rows
    if tuple(x.shape) != (rows, handle.hidden):
        raise ValueError(
            f"x has shape {tuple(x.shape)}, expected {(rows, handle.hidden)} (the rows of the "
            "handle's dispatch)"
        )
    if topk_weights is not None and (
        not isinstance(topk_weights, torch.Tensor) or topk_weights.shape[0] != rows
    ):
        raise ValueError(f"topk_weights must be a tensor with {rows} rows (the received rows)")


def dispatch(buf: Buffer, req: DispatchRequest) -> Signature:
    """``x`` (split into ``data``, ``scales``), then either the handle (cached mode) or the
    layout and top-k tensors."""
    data, scales, handle, config = req.x, req.x_scales, req.handle, req.config
    topk_idx, topk_weights = req.topk_idx, req.topk_weights
    expert_alignment, num_worst_tokens = req.expert_alignment, req.num_worst_tokens
    device = buf.device
    val.check_tensor("x", data, X_DTYPES, 2, device)
    tokens, hidden = data.shape
    if scales is not None or data.dtype == FP8:
        if data.dtype != FP8:
            raise TypeError(f"FP8 dispatch takes x as float8_e4m3fn, got {data.dtype}")
        if scales is None:
            raise ValueError("FP8 x needs its scales: pass x as (x_e4m3, scales)")
        if hidden % 128:
            raise ValueError(f"FP8 x needs a hidden size that is a multiple of 128, got {hidden}")
        val.check_tensor("x scales", scales, torch.float32, 2, device, (tokens, hidden // 128))
    _dispatch_ints(expert_alignment, num_worst_tokens)
    num_topk = None
    handle_id = None
    if handle is not None:  # cached mode: the handle stands for the layout
        _cached_dispatch_handle(buf, handle, data, num_worst_tokens)
        handle_id = f"dispatch #{handle.generation}"
        num_experts = handle.num_experts
    else:
        _require_layout(_layout_tensors(req))
        assert req.layout is not None and topk_idx is not None
        lay = req.layout
        num_tokens_per_rank, is_token_in_rank = lay.num_tokens_per_rank, lay.is_token_in_rank
        num_tokens_per_expert = lay.num_tokens_per_expert
        num_tokens_per_rdma_rank = lay.num_tokens_per_rdma_rank
        val.check_tensor("topk_idx", topk_idx, torch.int64, 2, device, (tokens, None))
        num_topk = topk_idx.shape[1]
        if topk_weights is not None:
            val.check_tensor(
                "topk_weights", topk_weights, torch.float32, 2, device, (tokens, num_topk)
            )
        num_experts = int(num_tokens_per_expert.shape[0])
        val.check_num_experts(num_experts, buf.group_size)
        val.check_tensor(
            "num_tokens_per_rank", num_tokens_per_rank, torch.int32, 1, device, (buf.group_size,)
        )
        val.check_tensor("num_tokens_per_expert", num_tokens_per_expert, torch.int32, 1, device)
        if num_tokens_per_rdma_rank is not None:
            val.check_tensor(
                "num_tokens_per_rdma_rank",
                num_tokens_per_rdma_rank,
                torch.int32,
                1,
                device,
                (buf.num_nodes,),
            )
        val.check_tensor(
            "is_token_in_rank", is_token_in_rank, torch.bool, 2, device, (tokens, buf.group_size)
        )
        val.check_topk_idx(topk_idx, num_experts, buf.validate)
    if buf.num_nvl_bytes == 0:
        raise CapacityError(
            "normal-mode dispatch needs an NVLink buffer: create the Buffer with num_nvl_bytes > 0"
        )
    return (
        ("op", "dispatch"),
        ("hidden", hidden),
        ("x dtype", str(data.dtype)),
        ("cached", handle is not None),
        ("num_topk", num_topk),
        ("with topk_weights", topk_weights is not None),
        ("num_experts", num_experts),
        ("expert_alignment", expert_alignment),
        ("num_worst_tokens", num_worst_tokens),
        ("config", config),
        ("handle", handle_id),
    )


def combine(buf: Buffer, req: CombineRequest) -> Signature:
    x, handle, topk_weights, biases, config = (
        req.x,
        req.handle,
        req.topk_weights,
        req.bias,
        req.config,
    )
    hc.check_dispatch_handle(handle, buf._id, buf.group_size)
    device = buf.device
    rows = handle.num_output_rows
    val.check_tensor("x", x, BF16, 2, device, (rows, handle.hidden))
    if topk_weights is not None:
        val.check_tensor("topk_weights", topk_weights, torch.float32, 2, device, (rows, None))
    for i, b in enumerate(biases):
        val.check_tensor(f"bias[{i}]", b, BF16, 2, device, (handle.num_tokens, handle.hidden))
    return (
        ("op", "combine"),
        ("hidden", handle.hidden),
        ("with topk_weights", topk_weights is not None),
        ("num_topk", None if topk_weights is None else topk_weights.shape[1]),
        ("num_bias", len(biases)),
        ("config", config),
        ("handle", f"dispatch #{handle.generation}"),
    )


def low_latency_capacity(buf: Buffer, max_tokens: int, hidden: int, num_experts: int) -> None:
    """Low-latency mode is on, and the shape fits the Buffer's ``num_rdma_bytes``."""
    if not buf.low_latency_mode:
        raise ValueError("low-latency calls need Buffer(..., low_latency_mode=True)")
    if hidden % 128:
        raise ValueError(
            f"low-latency mode needs a hidden size that is a multiple of 128, got {hidden}"
        )
    key = (max_tokens, hidden, num_experts)
    if key in buf._ll_fits:  # decode repeats one shape: check its size once
        return
    need = cfg.get_low_latency_rdma_size_hint(max_tokens, hidden, buf.group_size, num_experts)
    if need > buf.num_rdma_bytes:
        raise CapacityError(
            f"num_max_dispatch_tokens_per_rank={max_tokens}, hidden={hidden}, "
            f"num_experts={num_experts} "
            f"need num_rdma_bytes >= {need} (Buffer.get_low_latency_rdma_size_hint), "
            f"but the Buffer has {buf.num_rdma_bytes}"
        )
    buf._ll_fits.add(key)


def low_latency_dispatch(buf: Buffer, req: LowLatencyDispatchRequest) -> Signature:
    x, topk_idx, num_experts = req.x, req.topk_idx, req.num_experts
    max_tokens = req.num_max_dispatch_tokens_per_rank
    cumulative_local_expert_recv_stats = req.cumulative_local_expert_recv_stats
    use_fp8, round_scale, use_ue8m0 = req.use_fp8, req.round_scale, req.use_ue8m0
    return_recv_hook = req.return_recv_hook
    device = buf.device
    val.check_tensor("x", x, BF16, 2, device)
    tokens, hidden = x.shape
    val.check_tensor("topk_idx", topk_idx, torch.int64, 2, device, (tokens, None))
    val.check_num_experts(num_experts, buf.group_size)
    if not isinstance(max_tokens, int) or max_tokens <= 0:
        raise ValueError(
            f"num_max_dispatch_tokens_per_rank must be a positive int, got {max_tokens!r}"
        )
    if tokens > max_tokens:
        raise CapacityError(
            f"x has {tokens} tokens, more than num_max_dispatch_tokens_per_rank={max_tokens}"
        )
    if use_ue8m0 and not use_fp8:
        raise ValueError("use_ue8m0 needs use_fp8=True")
    if cumulative_local_expert_recv_stats is not None:
        val.check_tensor(
            "cumulative_local_expert_recv_stats",
            cumulative_local_expert_recv_stats,
            torch.int32,
            1,
            device,
            (num_experts // buf.group_size,),
        )
    low_latency_capacity(buf, max_tokens, hidden, num_experts)
    val.check_topk_idx(topk_idx, num_experts, buf.validate)
    if buf.validate:
        val.check_pairs_per_expert(topk_idx, num_experts, max_tokens)
    buf._hooks.check_free("dispatch")
    return (
        ("op", "low_latency_dispatch"),
        ("hidden", hidden),
        ("num_topk", topk_idx.shape[1]),
        ("num_max_dispatch_tokens_per_rank", max_tokens),
        ("num_experts", num_experts),
        ("use_fp8", use_fp8),
        ("round_scale", round_scale),
        ("use_ue8m0", use_ue8m0),
        ("return_recv_hook", return_recv_hook),
    )


def low_latency_dispatch_lean(buf: Buffer, req: LowLatencyDispatchRequest) -> None:
    """Without validation on a backend whose op checks its tensors (``native_checks``): only
    what the native op cannot see (the op reads dtypes, shapes and devices; its binding
    cannot take a non-tensor). The decode hot path: no tensor property is read here, and
    a backend that keeps the receive-hook rules itself refuses a taken slot before launching."""
    val.check_is_tensor("x", req.x, " (BF16 [num_tokens, hidden])")
    val.check_is_tensor("topk_idx", req.topk_idx)
    if not buf._ll.backend_hooks:
        buf._hooks.check_free("dispatch")


def low_latency_combine_lean(buf: Buffer, req: LowLatencyCombineRequest, use_logfmt: bool) -> None:
    """As :func:`low_latency_dispatch_lean`, for combine: the handle and hook rules."""
    topk_idx, handle = req.topk_idx, req.handle
    hc.check_low_latency_handle(handle, buf._id, buf.group_size)
    hc.check_received(handle)
    if use_logfmt:
        raise ValueError("use_logfmt is not supported yet")
    val.check_is_tensor("x", req.x, _COMBINE_X_HINT)
    val.check_is_tensor("topk_idx", topk_idx)
    val.check_is_tensor("topk_weights", req.topk_weights)
    if req.out is not None:
        val.check_is_tensor("out", req.out)
    hc.check_dispatched_topk(handle, topk_idx)
    if not buf._ll.backend_hooks:
        buf._hooks.check_free("combine")


# An FP8 dispatch returns (data, scales); its rows go through the experts before combine.
_COMBINE_X_HINT = (
    " (the experts' BF16 outputs [E_local, R * max_tokens, hidden]; an FP8 dispatch's "
    "(data, scales) cannot be combined directly)"
)


def low_latency_combine(buf: Buffer, req: LowLatencyCombineRequest, use_logfmt: bool) -> Signature:
    x, topk_idx, topk_weights, handle = req.x, req.topk_idx, req.topk_weights, req.handle
    zero_copy, return_recv_hook, out = req.zero_copy, req.return_recv_hook, req.out
    num_ranks = buf.group_size
    hc.check_low_latency_handle(handle, buf._id, num_ranks)
    hc.check_received(handle)
    if buf._shrink is not None:
        buf._shrink.check_combinable(handle)
    if use_logfmt:
        raise ValueError("use_logfmt is not supported yet")
    device = buf.device
    e_local = handle.num_experts // num_ranks
    rows = num_ranks * handle.num_max_dispatch_tokens_per_rank
    if not zero_copy:
        val.check_tensor("x", x, BF16, 3, device, (e_local, rows, handle.hidden))
    val.check_tensor("topk_idx", topk_idx, torch.int64, 2, device, (handle.num_tokens, None))
    val.check_tensor("topk_weights", topk_weights, torch.float32, 2, device, tuple(topk_idx.shape))
    hc.check_dispatched_topk(handle, topk_idx)
    if out is not None:
        val.check_tensor("out", out, BF16, 2, device, (handle.num_tokens, handle.hidden))
    low_latency_capacity(
        buf, handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts
    )
    buf._hooks.check_free("combine")
    return (
        ("op", "low_latency_combine"),
        ("hidden", handle.hidden),
        ("num_topk", topk_idx.shape[1]),
        ("zero_copy", zero_copy),
        ("return_recv_hook", return_recv_hook),
        ("handle", f"low_latency_dispatch #{handle.generation}.{handle.mask_epoch}"),
    )
