"""mpiep: expert-parallel (MoE) all-to-all for MPI-launched GPU clusters.

``Buffer`` is the entry point (DeepEP's API over an mpi4py communicator). Without
GPUs everything runs on the reference backend (torch + MPI); with GPUs and the
compiled core, on CUDA kernels over CUDA IPC and NVSHMEM.
"""

from mpiep.buffer import Buffer
from mpiep.config import Config, get_low_latency_rdma_size_hint, get_normal_buffer_size_hint
from mpiep.errors import ArgumentMismatchError, CapacityError, MpiepError, PeerTimeoutError
from mpiep.event import EventOverlap

__version__ = "0.1.0"

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
