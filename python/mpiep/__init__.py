"""mpiep: expert-parallel (MoE) all-to-all for MPI-launched GPU clusters.

``Buffer`` is the entry point (DeepEP's API over an mpi4py communicator). Without
GPUs everything runs on the reference backend (torch + MPI); with GPUs and the
compiled core, on CUDA kernels over CUDA IPC and NVSHMEM.

Importing ``mpiep`` starts neither MPI nor torch: the names below load on first use,
so that tools run inside a job step before its payload (``mpiep doctor``, the Slurm
helpers) do not take the rank's MPI identity.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "Buffer": "mpiep.buffer",
    "Config": "mpiep.config",
    "EventOverlap": "mpiep.event",
    "get_low_latency_rdma_size_hint": "mpiep.config",
    "get_normal_buffer_size_hint": "mpiep.config",
    "ArgumentMismatchError": "mpiep.errors",
    "CapacityError": "mpiep.errors",
    "MpiepError": "mpiep.errors",
    "PeerTimeoutError": "mpiep.errors",
}

__all__ = [
    "ArgumentMismatchError",
    "Buffer",
    "CapacityError",
    "Config",
    "EventOverlap",
    "MpiepError",
    "PeerTimeoutError",
    "__version__",
    "get_low_latency_rdma_size_hint",
    "get_normal_buffer_size_hint",
]

if TYPE_CHECKING:
    from mpiep.buffer import Buffer
    from mpiep.config import Config, get_low_latency_rdma_size_hint, get_normal_buffer_size_hint
    from mpiep.errors import ArgumentMismatchError, CapacityError, MpiepError, PeerTimeoutError
    from mpiep.event import EventOverlap


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mpiep' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
