"""``ReferenceBackend``: the backend object that ``Buffer`` calls.

It owns every exchange in flight (through ``Exchange`` and the hook slots) and the
backend's health: after an exchange fails (a peer timed out), MPI may still write into
that exchange's buffers, which stay alive in the graveyard, and every later call raises
instead of running on a communicator in an unknown state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mpiep.backends.base import (
    CombineRequest,
    DispatchRequest,
    DispatchResult,
    Layout,
    LowLatencyCombineRequest,
    LowLatencyDispatchRequest,
    LowLatencyDispatchResult,
)
from mpiep.backends.layout import compute_layout
from mpiep.backends.reference import low_latency, normal
from mpiep.backends.reference.exchange import Exchange
from mpiep.backends.reference.hooks import HookSlots
from mpiep.backends.reference.host_cache import host_cache
from mpiep.comm import Communicator
from mpiep.errors import MpiepError
from mpiep.handles import LowLatencyHandle


class ReferenceBackend:
    """Backend over MPI. ``num_nvl_bytes``/``num_rdma_bytes`` bound what a call may move,
    exactly as the GPU buffers would, so that capacity errors appear in the same places."""

    name = "reference"
    native_checks = False

    def __init__(
        self, comm: Communicator, device: torch.device, num_nvl_bytes: int, num_rdma_bytes: int
    ) -> None:
        self.comm = comm
        self.device = device
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self._ll_combine_buffer: torch.Tensor | None = None
        self.dispatch_slots = HookSlots("dispatch")
        self.combine_slots = HookSlots("combine")
        self._failure: str | None = None

    # -- exchanges and health ------------------------------------------------------------
    def check_usable(self) -> None:
        if self._failure is not None:
            raise MpiepError(
                f"rank {self.comm.rank}/{self.comm.size}: this Buffer is unusable: an earlier "
                f"exchange timed out or failed ({self._failure}). MPI may still write into that "
                "exchange's buffers, which are kept alive; create a new Buffer on a healthy "
                "communicator, or abort the job"
            )

    def exchange(self, phase: str) -> Exchange:
        self.check_usable()
        return Exchange(self.comm, phase)

    def wait(self, exchange: Exchange) -> None:
        """Complete ``exchange``; a failure makes this backend unusable."""
        try:
            exchange.wait()
        except BaseException as exc:
            self._failure = f"phase '{exchange.phase}': {type(exc).__name__}: {exc}"
            raise

    # -- layout ------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int) -> Layout:
        self.check_usable()
        return compute_layout(topk_idx, num_experts, self.comm.size, self.comm.local_size)

    # -- normal mode -------------------------------------------------------------------
    def dispatch(self, req: DispatchRequest) -> DispatchResult:
        self.check_usable()
        return normal.dispatch(self, req)

    def combine(self, req: CombineRequest) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.check_usable()
        return normal.combine(self, req)

    # -- low-latency mode --------------------------------------------------------------
    def low_latency_dispatch(self, req: LowLatencyDispatchRequest) -> LowLatencyDispatchResult:
        self.check_usable()
        return low_latency.dispatch(self, req)

    def low_latency_combine(
        self, req: LowLatencyCombineRequest
    ) -> tuple[torch.Tensor, Callable[[], None] | None]:
        self.check_usable()
        buffer = self._ll_combine_buffer
        y = buffer if req.zero_copy and buffer is not None else req.x
        return low_latency.combine(self, req, y)

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        self.check_usable()
        experts_per_rank = handle.num_experts // self.comm.size
        shape = (
            experts_per_rank,
            self.comm.size * handle.num_max_dispatch_tokens_per_rank,
            handle.hidden,
        )
        if self._ll_combine_buffer is None or tuple(self._ll_combine_buffer.shape) != shape:
            self._ll_combine_buffer = torch.zeros(shape, dtype=torch.bfloat16, device=self.device)
        return self._ll_combine_buffer

    def clean_low_latency_buffer(
        self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int
    ) -> None:
        """Complete the receives of uncalled hooks, void those hooks, zero the combine
        buffer, then a barrier (collective)."""
        self.check_usable()
        self.dispatch_slots.drain(self.wait)
        self.combine_slots.drain(self.wait)
        if self._ll_combine_buffer is not None:
            self._ll_combine_buffer.zero_()
        barrier = self.exchange("clean_low_latency_buffer")
        barrier.start(self.comm.comm.Ibarrier())
        self.wait(barrier)

    def destroy(self) -> None:
        self._ll_combine_buffer = None
        host_cache().clear()  # idle blocks only; tensors in use keep theirs
