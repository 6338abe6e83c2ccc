"""``ReferenceBackend``: the backend object that ``Buffer`` calls.

It owns every exchange in flight (through ``Exchange`` and the hook slots) and the
backend's health: after an exchange fails (a peer timed out), MPI may still write into
that exchange's buffers, which stay alive in the graveyard, and every later call raises
instead of running on a communicator in an unknown state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mpiep.backends.base import DispatchResult, Layout, LowLatencyDispatchResult
from mpiep.backends.layout import compute_layout
from mpiep.backends.reference import low_latency, normal
from mpiep.backends.reference.exchange import Exchange
from mpiep.backends.reference.hooks import HookSlots
from mpiep.backends.reference.host_cache import host_cache
from mpiep.comm import Communicator
from mpiep.config import Config
from mpiep.errors import MpiepError
from mpiep.handles import DispatchHandle, LowLatencyHandle


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
    def dispatch(
        self,
        x: torch.Tensor,
        x_scales: torch.Tensor | None,
        topk_idx: torch.Tensor | None,
        topk_weights: torch.Tensor | None,
        layout: Layout | None,
        handle: DispatchHandle | None,
        num_experts: int,
        expert_alignment: int,
        num_worst_tokens: int,
        config: Config,
    ) -> DispatchResult:
        self.check_usable()
        return normal.dispatch(
            self,
            x,
            x_scales,
            topk_idx,
            topk_weights,
            layout,
            handle,
            num_experts,
            expert_alignment,
            num_worst_tokens,
        )

    def combine(
        self,
        x: torch.Tensor,
        handle: DispatchHandle,
        topk_weights: torch.Tensor | None,
        bias: tuple[torch.Tensor, ...],
        config: Config,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.check_usable()
        return normal.combine(self, x, handle, topk_weights, bias)

    # -- low-latency mode --------------------------------------------------------------
    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        use_fp8: bool,
        round_scale: bool,
        use_ue8m0: bool,
        cumulative_local_expert_recv_stats: torch.Tensor | None,
        return_recv_hook: bool,
    ) -> LowLatencyDispatchResult:
        self.check_usable()
        return low_latency.dispatch(
            self,
            x,
            topk_idx,
            num_max_dispatch_tokens_per_rank,
            num_experts,
            use_fp8,
            round_scale,
            use_ue8m0,
            cumulative_local_expert_recv_stats,
            return_recv_hook,
        )

    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: LowLatencyHandle,
        zero_copy: bool,
        out: torch.Tensor | None,
        return_recv_hook: bool,
    ) -> tuple[torch.Tensor, Callable[[], None] | None]:
        self.check_usable()
        y = self._ll_combine_buffer if zero_copy and self._ll_combine_buffer is not None else x
        return low_latency.combine(self, y, topk_idx, topk_weights, handle, out, return_recv_hook)

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
