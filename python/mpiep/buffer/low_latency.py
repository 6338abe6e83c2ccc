"""What a ``Buffer`` keeps across low-latency calls, and where those calls go.

* Call counts: each dispatch's generation, the same on every rank since the calls are
  collective; counted afresh after ranks were masked (they missed calls meanwhile).
* Handle stamps: which Buffer, which dispatch, how many ranks, which mask epoch; the
  checks of ``low_latency_combine`` read them (``mpiep.handle_checks``).
* Receive-hook tickets (``mpiep.hooks.HookTracker``): the GPU engine's double-buffering
  rules, the same for every backend. A backend with a ``hook_tracker`` (the GPU engine,
  whose buffers are the slots) applies them itself; for the others they are applied here.
* Routing: to the backend, or through the rank mask (``mpiep.shrink``) with
  ``enable_shrink``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mpiep import handle_checks as hc
from mpiep.backends.base import (
    Backend,
    LowLatencyCombineRequest,
    LowLatencyDispatchRequest,
    LowLatencyDispatchResult,
)
from mpiep.comm import Communicator
from mpiep.handles import LowLatencyHandle
from mpiep.hooks import HookTracker
from mpiep.shrink import Shrink

Hook = Callable[[], None]


class LowLatencyCalls:
    """The low-latency state of one Buffer. It holds no reference to the Buffer (a cycle
    would delay ``Buffer.__del__``, which frees communicators)."""

    __slots__ = (
        "backend",
        "backend_hooks",
        "buffer_id",
        "dispatches",
        "epoch",
        "hooks",
        "num_ranks",
        "shrink",
    )

    def __init__(
        self,
        backend: Backend,
        shrink: Shrink | None,
        hooks: HookTracker,
        buffer_id: int,
        num_ranks: int,
    ) -> None:
        self.backend = backend
        self.shrink = shrink
        self.hooks = hooks
        # The backend issues the tickets and binds its hooks to them (``hooks`` is its own).
        self.backend_hooks = getattr(backend, "hook_tracker", None) is hooks
        self.buffer_id = buffer_id
        self.num_ranks = num_ranks
        self.dispatches = 0  # low-latency dispatch calls in this mask epoch
        self.epoch = 0  # the rank mask's epoch those calls ran in

    # -- dispatch -----------------------------------------------------------------------
    def dispatch(self, req: LowLatencyDispatchRequest) -> LowLatencyDispatchResult:
        """Count the call, send it and stamp its handle. Runs on whichever stream the
        Buffer picked."""
        shrink = self.shrink
        epoch = 0 if shrink is None else shrink.mask.epoch
        if epoch != self.epoch:  # ranks masked out meanwhile missed calls: count afresh
            self.epoch, self.dispatches = epoch, 0
        generation = self.dispatches + 1  # counted once sent: a refused call is no call
        if shrink is None:
            result = self.backend.low_latency_dispatch(req)
        else:
            result = shrink.dispatch(self.backend, req)
        self.dispatches = generation
        handle = result.handle
        handle.owner, handle.generation, handle.num_ranks = (
            self.buffer_id,
            generation,
            self.num_ranks,
        )
        handle.mask_epoch = epoch
        return result

    def after_dispatch(
        self, result: LowLatencyDispatchResult, topk_idx: torch.Tensor, keep_topk_copy: bool
    ) -> Hook | None:
        """Record the dispatched ``topk_idx`` (combine checks it; a copy with validation) and
        take the hook slot; returns the hook the caller gets (runs once, not after a clean)."""
        handle = result.handle
        hc.record_dispatched_topk(handle, topk_idx, copy=keep_topk_copy)
        hook = result.hook
        if self.backend_hooks:  # issued and bound by the backend (handle.ticket)
            return hook
        ticket = handle.ticket = self.hooks.issue("dispatch", hook is not None)
        if hook is not None and ticket is not None:
            return self.hooks.wrap(ticket, hook)
        return None

    # -- combine ------------------------------------------------------------------------
    def combine(self, req: LowLatencyCombineRequest) -> tuple[torch.Tensor, Hook | None]:
        """Send the combine to the backend, or through the rank mask."""
        shrink = self.shrink
        if shrink is None:
            return self.backend.low_latency_combine(req)
        return shrink.combine(self.backend, req)

    def after_combine(self, hook: Hook | None) -> Hook | None:
        """Take the combine hook slot; returns the hook the caller gets."""
        if self.backend_hooks:
            return hook
        ticket = self.hooks.issue("combine", hook is not None)
        if ticket is not None and hook is not None:
            return self.hooks.wrap(ticket, hook)
        return hook

    def combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        """The buffer that ``zero_copy`` combine reads (a full-size one while masked)."""
        shrink = self.shrink
        if shrink is not None and shrink.mask.engaged:
            return shrink.combine_buffer(handle)
        return self.backend.get_next_low_latency_combine_buffer(handle)

    # -- reset --------------------------------------------------------------------------
    def clean(self, comm: Communicator, max_tokens: int, hidden: int, num_experts: int) -> None:
        """Reset the buffers (collective over the active ranks) and void every hook."""
        shrink = self.shrink
        if shrink is not None:
            shrink.control(comm)  # raises on a rank masked out
            shrink.clean(self.backend, max_tokens, hidden, num_experts)
        else:
            self.backend.clean_low_latency_buffer(max_tokens, hidden, num_experts)
        if not self.backend_hooks:  # the backend's clean cleaned its own
            self.hooks.clean()
