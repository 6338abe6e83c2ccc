"""DeepEP's handle tuples, carrying mpiep's handles.

DeepEP hands callers plain tuples of its kernels' bookkeeping tensors, and some callers
unpack or index them. mpiep's handles (``mpiep.handles``) hold different bookkeeping, so the
compat layer returns a ``tuple`` subclass with DeepEP's length and element order: elements
mpiep can give the same meaning are filled in, those that exist only for DeepEP's ring-buffer
kernels (channel prefix matrices, ``send_head``, internode metadata) are None. The mpiep handle
rides along as ``.mpiep_handle``; that is what ``combine`` and cached ``dispatch`` use.
"""

from __future__ import annotations

from typing import Any, SupportsIndex, overload

import torch

from mpiep.handles import DispatchHandle, LowLatencyHandle

# Positions in DeepEP's intranode handle
# (rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx,
#  is_token_in_rank, send_head).
INTRANODE_LEN = 6
INTRANODE_RECV_SRC_IDX = 3
INTRANODE_IS_TOKEN_IN_RANK = 4
# DeepEP's internode handle (is_token_in_rank, rdma_channel_prefix_matrix,
# gbl_channel_prefix_matrix, recv_rdma_channel_prefix_matrix, recv_rdma_rank_prefix_sum,
# recv_gbl_channel_prefix_matrix, recv_gbl_rank_prefix_sum, recv_src_meta, send_rdma_head,
# send_nvl_head).
INTERNODE_LEN = 10
INTERNODE_IS_TOKEN_IN_RANK = 0


class DispatchHandleTuple(tuple):
    """The handle of a normal-mode ``dispatch``, in DeepEP's tuple form.

    One node: ``(None, None, None, recv_src_idx, is_token_in_rank, None)``, DeepEP's intranode
    order, where ``recv_src_idx`` [N] int32 is the source token id of each received row and
    ``is_token_in_rank`` [T, R] bool is the dispatch's own. Several nodes: DeepEP's
    10-element internode order with ``is_token_in_rank`` first and None elsewhere.
    """

    mpiep_handle: DispatchHandle

    def __new__(cls, handle: DispatchHandle, num_nodes: int = 1) -> DispatchHandleTuple:
        items: list[Any]
        if num_nodes > 1:
            items = [None] * INTERNODE_LEN
            items[INTERNODE_IS_TOKEN_IN_RANK] = handle.is_token_in_rank
        else:
            items = [None] * INTRANODE_LEN
            items[INTRANODE_RECV_SRC_IDX] = handle.recv_src_idx
            items[INTRANODE_IS_TOKEN_IN_RANK] = handle.is_token_in_rank
        obj = super().__new__(cls, items)
        obj.mpiep_handle = handle
        return obj

    def __reduce__(self) -> Any:
        return (type(self), (self.mpiep_handle, 2 if len(self) == INTERNODE_LEN else 1))


class LowLatencyHandleTuple(tuple):
    """The handle of ``low_latency_dispatch`` in DeepEP's form:
    ``(src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden, num_experts)``.

    ``src_info`` [E_local, R * M] int32 is the source token id of each received row (-1 past
    the count). ``layout_range`` [E_local, R] int64 packs, as DeepEP does, the row count of
    each source rank's group in the low 32 bits and its first row in the high 32 bits. It is
    packed from mpiep's (first row, count) pairs on each access, not at dispatch: callers that
    never look at it skip the device op, and an access after a receive hook sees the hook's
    result (as DeepEP's tensor, written in place by the hook, would).
    """

    mpiep_handle: LowLatencyHandle

    def __new__(cls, handle: LowLatencyHandle) -> LowLatencyHandleTuple:
        obj = super().__new__(
            cls,
            (
                handle.src_token_idx,
                None,  # placeholder: layout_range is packed lazily, see _item()
                handle.num_max_dispatch_tokens_per_rank,
                handle.hidden,
                handle.num_experts,
            ),
        )
        obj.mpiep_handle = handle
        return obj

    def _item(self, i: int) -> Any:
        if i == 1:
            return pack_layout_range(self.mpiep_handle.layout_range)
        return tuple.__getitem__(self, i)

    @overload
    def __getitem__(self, index: SupportsIndex) -> Any: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[Any, ...]: ...
    def __getitem__(self, index: SupportsIndex | slice) -> Any:
        if isinstance(index, slice):
            return tuple(self._item(i) for i in range(len(self))[index])
        i = range(len(self))[index]  # normalises negatives, raises IndexError
        return self._item(i)

    def __iter__(self) -> Any:
        return (self._item(i) for i in range(len(self)))

    def __repr__(self) -> str:
        h = self.mpiep_handle
        return (
            f"LowLatencyHandleTuple(num_max_dispatch_tokens_per_rank="
            f"{h.num_max_dispatch_tokens_per_rank}, hidden={h.hidden}, "
            f"num_experts={h.num_experts})"
        )

    def __reduce__(self) -> Any:
        return (type(self), (self.mpiep_handle,))


def pack_layout_range(layout_range: torch.Tensor) -> torch.Tensor:
    """mpiep's [E_local, R, 2] int32 (first row, count) -> DeepEP's [E_local, R] int64
    ``count | first_row << 32``."""
    begin = layout_range[..., 0].to(torch.int64)
    count = layout_range[..., 1].to(torch.int64)
    return (begin << 32) | count


def unwrap_dispatch_handle(handle: Any) -> DispatchHandle:
    """The mpiep handle inside what a caller passes as ``handle`` to combine/cached dispatch."""
    if isinstance(handle, DispatchHandleTuple):
        return handle.mpiep_handle
    if isinstance(handle, DispatchHandle):
        return handle
    raise TypeError(
        "handle must be the one mpiep.deep_ep.Buffer.dispatch returned, got "
        f"{type(handle).__name__} (handles of the real deep_ep cannot be mixed in)"
    )


def unwrap_low_latency_handle(handle: Any) -> LowLatencyHandle:
    if isinstance(handle, LowLatencyHandleTuple):
        return handle.mpiep_handle
    if isinstance(handle, LowLatencyHandle):
        return handle
    raise TypeError(
        "handle must be the one mpiep.deep_ep.Buffer.low_latency_dispatch returned, got "
        f"{type(handle).__name__} (handles of the real deep_ep cannot be mixed in)"
    )
