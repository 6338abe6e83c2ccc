"""Checks of the handles that ``combine``, cached ``dispatch`` and ``low_latency_combine`` take.

``Buffer`` stamps each handle with its own id and a per-Buffer call count (the same number on
every rank, since dispatch is collective). The local checks here are cheap (no device sync,
no communication) and raise ``TypeError``/``ValueError``; ``Buffer`` puts the call count into
the signature that ranks agree on when it validates, so ranks combining handles of different
dispatches all fail together instead of exchanging mismatched data.
"""

from __future__ import annotations

import itertools

import torch

from mpiep.handles import DispatchHandle, LowLatencyHandle

_buffer_ids = itertools.count(1)


def new_buffer_id() -> int:
    """A process-unique Buffer id (never 0, which marks an unstamped handle)."""
    return next(_buffer_ids)


def _check_owner(handle: DispatchHandle | LowLatencyHandle, buffer_id: int, num_ranks: int) -> None:
    if handle.owner != buffer_id:
        raise ValueError(
            "handle comes from another Buffer (or one destroyed since): pass the handle that "
            "this Buffer's dispatch returned"
        )
    if handle.num_ranks != num_ranks:
        raise ValueError(f"handle is for {handle.num_ranks} ranks, this Buffer has {num_ranks}")


def check_dispatch_handle(handle: object, buffer_id: int, num_ranks: int) -> DispatchHandle:
    if not isinstance(handle, DispatchHandle):
        raise TypeError(f"handle must come from Buffer.dispatch, got {type(handle).__name__}")
    _check_owner(handle, buffer_id, num_ranks)
    return handle


def check_low_latency_handle(handle: object, buffer_id: int, num_ranks: int) -> LowLatencyHandle:
    if not isinstance(handle, LowLatencyHandle):
        raise TypeError(f"handle must come from low_latency_dispatch, got {type(handle).__name__}")
    _check_owner(handle, buffer_id, num_ranks)
    return handle


def check_received(handle: LowLatencyHandle) -> None:
    """The dispatch's receive must be complete before its rows are combined."""
    ticket = handle.ticket
    if ticket is not None and not ticket.called:
        raise ValueError(
            "handle: its low_latency_dispatch was issued with return_recv_hook=True and the "
            "receive hook has not run; call hook() before low_latency_combine (a hook voided "
            "by clean_low_latency_buffer leaves the handle unusable)"
        )


def check_dispatched_topk(handle: LowLatencyHandle, topk_idx: torch.Tensor) -> None:
    """``topk_idx`` must be the one dispatched with ``handle``: its shape always; its values
    when it is another tensor (or changed in place) and the Buffer kept a copy (validation)."""
    ref = handle.topk_idx
    if ref is None or (topk_idx is ref and topk_idx._version == handle.topk_version):
        return  # the decode loop's case, first: the very tensor, unchanged
    if tuple(topk_idx.shape) != tuple(ref.shape):
        raise ValueError(
            f"topk_idx has shape {tuple(topk_idx.shape)} but the handle's low_latency_dispatch "
            f"had {tuple(ref.shape)}: pass the topk_idx that was dispatched with this handle"
        )
    copy = handle.topk_copy
    if copy is not None and not torch.equal(topk_idx, copy.to(topk_idx.device)):
        bad = (topk_idx != copy.to(topk_idx.device)).nonzero()[0].tolist()
        raise ValueError(
            f"topk_idx differs from the one dispatched with this handle (first at {bad}): "
            "pass the topk_idx given to low_latency_dispatch, or a handle of a dispatch of it"
        )


def record_dispatched_topk(handle: LowLatencyHandle, topk_idx: torch.Tensor, copy: bool) -> None:
    handle.topk_idx = topk_idx
    handle.topk_version = topk_idx._version
    handle.topk_copy = topk_idx.clone() if copy else None
