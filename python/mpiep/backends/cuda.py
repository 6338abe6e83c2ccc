"""The CUDA backend: a router over the GPU engines of ``mpiep._C``.

* normal mode, one node: ``cuda_intranode.IntranodeEngine`` (CUDA IPC);
* normal mode, several (possibly virtual) nodes: ``cuda_internode.InternodeEngine``
  (NVLink + NVSHMEM RDMA with forwarding);
* low-latency mode: ``cuda_low_latency.LowLatencyEngine`` (NVSHMEM).

No call falls back to the reference backend: a mode the Buffer was not sized for raises
a clear error instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from mpiep import stall
from mpiep.backends.base import (
    BackendSettings,
    CombineRequest,
    DispatchRequest,
    DispatchResult,
    Layout,
    LowLatencyCombineRequest,
    LowLatencyDispatchRequest,
    LowLatencyDispatchResult,
)
from mpiep.errors import CapacityError, PeerTimeoutError
from mpiep.handles import LowLatencyHandle
from mpiep.hooks import HookTracker

if TYPE_CHECKING:  # type only: importing mpiep.comm starts MPI
    from mpiep.comm import Communicator


def unavailable_reason(device: torch.device) -> str | None:
    """Why the CUDA backend cannot run here, or None when it can."""
    if device.type != "cuda":
        return "no CUDA device"
    try:
        from mpiep import _C  # noqa: F401
    except ImportError as exc:
        return (
            f"the compiled core mpiep._C is not built ({exc}); "
            "reinstall with nvcc and NVSHMEM present"
        )
    try:
        from mpiep.backends import native

        native.ops()
    except ImportError as exc:
        return (
            f"the torch op layer mpiep._ops does not load ({exc}); it is built for the torch "
            "present at install time: reinstall mpiep after changing torch"
        )
    try:
        from mpiep.backends import cuda_internode, cuda_intranode, cuda_low_latency  # noqa: F401
    except ImportError as exc:
        return f"the CUDA engines failed to import: {exc}"
    return None


class CudaBackend:
    name = "cuda"
    native_checks = True  # mpiep._ops checks the low-latency tensors (src/ops/low_latency_ops.cpp)

    def __init__(self, settings: BackendSettings) -> None:
        from mpiep.backends.cuda_internode import InternodeEngine
        from mpiep.backends.cuda_intranode import IntranodeEngine
        from mpiep.backends.cuda_low_latency import LowLatencyEngine

        s = settings
        comm, device = s.comm, s.device
        self.comm = comm
        self.device = device
        internode = comm.num_nodes > 1
        use_normal = s.num_nvl_bytes > 0 and (not internode or s.num_rdma_bytes > 0)
        # Everything this Buffer takes from the NVSHMEM heap, sized at NVSHMEM's first init.
        heap = s.num_rdma_bytes * (int(internode and use_normal) + int(s.low_latency_mode))
        self.normal: Any = None
        self.normal_missing = (
            "normal-mode dispatch needs an NVLink buffer: create the Buffer with num_nvl_bytes > 0"
            if s.num_nvl_bytes <= 0
            else "normal mode across nodes needs an RDMA buffer too: create the Buffer with "
            "num_rdma_bytes > 0 (mpiep.config.get_internode_rdma_size_hint)"
        )
        if use_normal and internode:
            self.normal = InternodeEngine(
                comm,
                device,
                s.num_nvl_bytes,
                s.num_rdma_bytes,
                comm.timeout_s,
                s.num_qps_per_rank,
                heap_bytes=heap,
                nvshmem_bootstrap=s.nvshmem_bootstrap,
            )
        elif use_normal:
            self.normal = IntranodeEngine(comm, device, s.num_nvl_bytes, comm.timeout_s)
        self.low_latency: Any = None
        if s.low_latency_mode:
            self.low_latency = LowLatencyEngine(
                comm,
                device,
                s.num_rdma_bytes,
                s.num_qps_per_rank,
                s.allow_nvlink_for_low_latency_mode,
                comm.timeout_s,
                heap_bytes=heap,
                nvshmem_bootstrap=s.nvshmem_bootstrap,
            )
        self._bind_low_latency()

    def _bind_low_latency(self) -> None:
        """Decode calls go straight to the engine (one Python call layer less per call)."""
        if self.low_latency is not None:
            self.low_latency_dispatch = self.low_latency.low_latency_dispatch  # type: ignore[method-assign]
            self.low_latency_combine = self.low_latency.low_latency_combine  # type: ignore[method-assign]

    def use_comm_stream(self, stream: torch.cuda.Stream) -> None:
        """Normal-mode ops run on the Buffer's comm stream, ordered inside each op."""
        if self.normal is not None:
            self.normal.use_comm_stream(stream)

    # -- routing -------------------------------------------------------------------------
    def _normal(self) -> Any:
        if self.normal is None:
            raise CapacityError(self.normal_missing)
        return self.normal

    def _ll(self) -> Any:
        if self.low_latency is None:
            raise ValueError("low-latency calls need Buffer(..., low_latency_mode=True)")
        return self.low_latency

    # -- normal mode ---------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int) -> Layout:
        if self.normal is not None:
            return self.normal.get_dispatch_layout(topk_idx, num_experts)
        # The layout needs no buffers: compute it without a normal-mode engine.
        from mpiep.backends import native

        return Layout(
            *native.ops().layout(topk_idx, num_experts, self.comm.size, self.comm.local_size, 0)
        )

    def dispatch(self, req: DispatchRequest) -> DispatchResult:
        return self._normal().dispatch(req)

    def combine(self, req: CombineRequest) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._normal().combine(req)

    # -- low-latency mode ----------------------------------------------------------------
    # (bound straight to the engine's methods when it exists: _bind_low_latency)
    def low_latency_dispatch(self, req: LowLatencyDispatchRequest) -> LowLatencyDispatchResult:
        return self._ll().low_latency_dispatch(req)

    def low_latency_combine(
        self, req: LowLatencyCombineRequest
    ) -> tuple[torch.Tensor, Callable[[], None] | None]:
        return self._ll().low_latency_combine(req)

    @property
    def hook_tracker(self) -> HookTracker | None:
        """The low-latency engine keeps the receive-hook rules itself (its buffers are the
        slots): ``Buffer`` uses this tracker instead of its own."""
        return None if self.low_latency is None else self.low_latency.hooks

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        return self._ll().get_next_low_latency_combine_buffer(handle)

    def clean_low_latency_buffer(
        self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int
    ) -> None:
        self._ll().clean_low_latency_buffer(num_max_dispatch_tokens_per_rank, hidden, num_experts)

    # -- rank masking (mpiep.shrink) and the test stall ------------------------------------
    @property
    def supports_masking(self) -> bool:
        """The low-latency kernels mask ranks themselves (``mpiep.shrink`` routes to them)."""
        return self.low_latency is not None and bool(self.low_latency.supports_masking)

    def enable_rank_masking(self) -> None:
        self._ll().enable_masking()

    def set_active_ranks(self, active: list[int], comm: Communicator) -> None:
        """Collective over ``comm`` (the active ranks') on the ranks in ``active``."""
        self._ll().set_active(active, comm)

    def settled_timeout(self) -> PeerTimeoutError | None:
        """At a combine's entry: a timeout the kernels recorded (and masked the silent rank
        for), once every survivor has it (LowLatencyEngine.settled_timeout)."""
        return self._ll().settled_timeout()

    def set_test_stall(self, phases: str | int | None) -> None:
        """Tests only (``mpiep.stall``): this rank withholds its part of the given phases
        (``"ll_dispatch_count"``, ``"dispatch+combine"``...; ``0`` or ``""``: none)."""
        bits = stall.parse(phases)
        for engine in (self.low_latency, self.normal):
            if engine is not None:
                engine.set_test_stall(bits)

    def destroy(self) -> None:
        for engine in (self.low_latency, self.normal):
            if engine is not None:
                engine.destroy()
