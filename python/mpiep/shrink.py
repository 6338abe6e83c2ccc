"""``Buffer(enable_shrink=True)``: low-latency calls go on when ranks fail.

The glue between ``Buffer`` and the mask (``mpiep.rank_mask``): it picks where each
low-latency call runs, and when a call times out it finds and masks the ranks that stopped
answering and runs the call again among the others, so that the call returns as if the failed
ranks' experts were absent (DeepEP V1's shrink mode). A receive hook that times out does the
same and fills the tensors the call returned.

Where masked calls run:

* a backend whose kernels mask ranks (``supports_masking``: the CUDA backend) runs every call
  itself; each agreed mask goes to its device words (``set_active_ranks``). Its kernels also
  mask a silent peer on their own when a wait times out, so that call, and the ones after it,
  return the survivors' data without any host involvement. The timeout is recorded; the
  agreement and a clean among the survivors run at the second combine after it
  (``settled_timeout``), where every survivor is sure to see it: a host that acted as soon as
  it saw the record would stop launching while peers that had not seen it yet go on, and
  their kernels would mask it in turn;
* any other backend runs masked calls through ``mpiep.masked_ll`` (a reference backend over
  the active ranks' communicator, GPU tensors included).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from mpiep import masked_ll
from mpiep.backends.base import (
    Backend,
    LowLatencyCombineRequest,
    LowLatencyDispatchRequest,
    LowLatencyDispatchResult,
)
from mpiep.comm import Communicator
from mpiep.errors import PeerTimeoutError
from mpiep.handles import LowLatencyHandle
from mpiep.rank_mask import RankMask


class Shrink:
    def __init__(
        self,
        comm: Communicator,
        device: torch.device,
        nvl: int,
        rdma: int,
        backend: Backend | None = None,
    ) -> None:
        # The backend's kernels mask ranks themselves, or None: mpiep.masked_ll does.
        self.native: Any = backend if getattr(backend, "supports_masking", False) else None
        self.mask = RankMask(
            comm,
            device,
            nvl,
            rdma,
            reference=self.native is None,
            on_change=None if self.native is None else self._to_device,
        )
        if self.native is not None:
            self.native.enable_rank_masking()
        self._combine_buffer: torch.Tensor | None = None
        self.last_recovery: str = ""  # what the last timeout masked (for logs and tests)

    def _to_device(self, active: list[int], comm: Communicator | None) -> None:
        """An agreed mask for the kernels (a clean among the active ranks comes with it)."""
        self.native.set_active_ranks(active, comm if comm is not None else self.mask.full)

    # -- which communicator ------------------------------------------------------------
    def control(self, full: Communicator) -> Communicator:
        """The communicator low-latency calls agree on; RuntimeError on a masked rank."""
        me = self.mask.full.rank
        if me not in self.mask.active:
            raise RuntimeError(
                f"rank {me} is masked out of low-latency mode (low_latency_query_mask_buffer); "
                "the other ranks go on without it"
            )
        return self.mask.comm if self.mask.comm is not None else full

    def check_normal_mode(self) -> None:
        if self.mask.poisoned:
            raise RuntimeError(
                "normal mode is unusable on this Buffer: a low-latency call timed out and left "
                f"a collective unfinished on its communicator ({self.mask.poisoned}); ranks "
                f"{self.mask.masked} are masked and low-latency calls go on without them"
            )

    # -- calls ------------------------------------------------------------------------
    def dispatch(
        self, backend: Backend, req: LowLatencyDispatchRequest
    ) -> LowLatencyDispatchResult:
        """``backend.low_latency_dispatch(req)``, masked when needed, recovering once."""
        self.mask.calls += 1

        def masked(r: LowLatencyDispatchRequest) -> LowLatencyDispatchResult:
            if self.native is None:
                return masked_ll.dispatch(self.mask, r)
            result = backend.low_latency_dispatch(r)
            # Which ranks took part: a rank unmasked later has none of this call's rows.
            result.handle.backend_state["active"] = tuple(self.mask.active)
            return result

        result = self._run(lambda: backend.low_latency_dispatch(req), lambda: masked(req))
        if result.hook is not None:
            sync = replace(req, return_recv_hook=False)
            result.hook = self._recovering(
                result.hook, lambda: _fill_dispatch(result, masked(sync))
            )
        return result

    def combine(
        self, backend: Backend, req: LowLatencyCombineRequest
    ) -> tuple[torch.Tensor, Callable[[], None] | None]:
        self.mask.calls += 1
        if self.native is not None:
            settled = self.native.settled_timeout()
            if settled is not None:  # every survivor is here with it: agree, clean, go on
                self.recover(settled)
        if req.zero_copy and self.native is None:  # the rows are in a buffer: read them there
            handle = req.handle
            x = (
                self.combine_buffer(handle)
                if self.mask.engaged
                else backend_buffer(backend, handle)
            )
            req = replace(req, x=x)

        def masked(hook: bool) -> tuple[torch.Tensor, Callable[[], None] | None]:
            r = replace(req, return_recv_hook=hook)
            if self.native is None:
                return masked_ll.combine(self.mask, r)
            return backend.low_latency_combine(r)

        combined, hook = self._run(
            lambda: backend.low_latency_combine(req), lambda: masked(req.return_recv_hook)
        )
        if hook is not None:
            hook = self._recovering(hook, lambda: combined.copy_(masked(False)[0]))
        return combined, hook

    def check_combinable(self, handle: LowLatencyHandle) -> None:
        masked_ll.check_combinable(handle, self.mask)

    def combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        """While masked: the full-size buffer that ``zero_copy`` combine reads."""
        if self.native is not None:  # the kernels keep the full shapes: their own buffer
            return backend_buffer(self.native, handle)
        shape = (
            handle.num_experts // self.mask.full.size,
            self.mask.full.size * handle.num_max_dispatch_tokens_per_rank,
            handle.hidden,
        )
        buf = self._combine_buffer
        if buf is None or tuple(buf.shape) != shape:
            buf = torch.zeros(shape, dtype=torch.bfloat16, device=self.mask.device)
            self._combine_buffer = buf
        return buf

    def clean(self, backend: Backend, *args: Any) -> None:
        if self.mask.backend is not None:
            self.mask.backend.clean_low_latency_buffer(*args)
        else:  # the Buffer's backend (with native masking: among the active ranks)
            backend.clean_low_latency_buffer(*args)
        if self._combine_buffer is not None:
            self._combine_buffer.zero_()

    # -- recovery ------------------------------------------------------------------------
    def _run(self, full: Callable[[], Any], masked: Callable[[], Any]) -> Any:
        try:
            return masked() if self.mask.engaged else full()
        except PeerTimeoutError as exc:
            self.recover(exc)
            return masked()

    def _recovering(self, hook: Callable[[], None], again: Callable[[], Any]) -> Callable[[], None]:
        def receive() -> None:
            try:
                hook()
            except PeerTimeoutError as exc:
                self.recover(exc)
                again()

        return receive

    def recover(self, error: PeerTimeoutError) -> None:
        """Mask the ranks that stopped answering (agreed among the others), or raise."""
        newly = self.mask.recover(error)
        self.last_recovery = f"masked ranks {newly} after: {error}"

    def free(self) -> None:
        self.mask.free()
        self._combine_buffer = None


def backend_buffer(backend: Any, handle: LowLatencyHandle) -> torch.Tensor:
    return backend.get_next_low_latency_combine_buffer(handle)


def _fill_dispatch(into: LowLatencyDispatchResult, fresh: LowLatencyDispatchResult) -> None:
    """Copy a re-run dispatch into the tensors (and handle) the caller already holds."""
    into.recv_x.copy_(fresh.recv_x)
    if into.recv_x_scales is not None and fresh.recv_x_scales is not None:
        into.recv_x_scales.copy_(fresh.recv_x_scales)
    into.recv_count.copy_(fresh.recv_count)
    into.handle.src_token_idx.copy_(fresh.handle.src_token_idx)
    into.handle.layout_range.copy_(fresh.handle.layout_range)
    into.handle.backend_state = fresh.handle.backend_state
    # The handle's rows are received now: its receive ticket is settled (a backend that
    # issued it never gets to, since its own receive gave up and the clean voided it).
    if into.handle.ticket is not None:
        into.handle.ticket.called = True
