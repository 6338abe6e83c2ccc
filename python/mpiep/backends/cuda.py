"""The CUDA backend: normal mode on the intranode kernels, low-latency on NVSHMEM.

A thin router. The engines (``cuda_intranode.IntranodeEngine`` and
``cuda_low_latency.LowLatencyEngine``) hold the buffers and launch the kernels of
``mpiep._C``. Normal mode across several nodes has no GPU kernel yet and runs on
the reference path over the same tensors.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch

from mpiep.backends.reference import ReferenceBackend

if TYPE_CHECKING:
    from mpiep.buffer import Buffer


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
        from mpiep.backends import cuda_intranode, cuda_low_latency  # noqa: F401
    except ImportError as exc:
        return f"the CUDA engines failed to import: {exc}"
    return None


class CudaBackend:
    name = "cuda"

    def __init__(self, buffer: Buffer) -> None:
        from mpiep.backends.cuda_intranode import IntranodeEngine
        from mpiep.backends.cuda_low_latency import LowLatencyEngine

        comm, device = buffer.comm, buffer.device
        self.normal: Any
        if comm.num_nodes > 1:
            warnings.warn(
                "mpiep: normal mode across nodes has no GPU kernel yet; "
                "it runs on the reference path",
                stacklevel=4,
            )
            self.normal = ReferenceBackend(
                comm, device, buffer.num_nvl_bytes, buffer.num_rdma_bytes
            )
        elif buffer.num_nvl_bytes > 0:
            self.normal = IntranodeEngine(comm, device, buffer.num_nvl_bytes, comm.timeout_s)
        else:
            self.normal = ReferenceBackend(comm, device, 0, buffer.num_rdma_bytes)
        self.low_latency: Any = None
        if buffer.low_latency_mode:
            self.low_latency = LowLatencyEngine(
                comm,
                device,
                buffer.num_rdma_bytes,
                buffer.num_qps_per_rank,
                buffer.allow_nvlink_for_low_latency_mode,
                comm.timeout_s,
            )

    def __getattr__(self, name: str) -> Any:
        if name in ("get_dispatch_layout", "dispatch", "combine"):
            return getattr(self.normal, name)
        if name.startswith("low_latency") or name in (
            "get_next_low_latency_combine_buffer",
            "clean_low_latency_buffer",
        ):
            if self.low_latency is None:
                raise ValueError("low-latency calls need Buffer(..., low_latency_mode=True)")
            return getattr(self.low_latency, name)
        raise AttributeError(name)

    def destroy(self) -> None:
        for engine in (self.low_latency, self.normal):
            if engine is not None:
                engine.destroy()
