"""What a new ``Buffer`` runs on: its device and its backend."""

from __future__ import annotations

import warnings

import torch

from mpiep.backends.base import Backend, BackendSettings
from mpiep.comm import Communicator

BACKENDS = ("auto", "cuda", "reference")


def pick_device(comm: Communicator, device: str | torch.device | None) -> torch.device:
    """``device`` as given (a bare "cuda" gets the local rank's GPU), else the local rank's
    GPU where CUDA is available, else the CPU. Makes a CUDA device the current one."""
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", comm.select_device(torch.cuda.device_count()))
    elif torch.cuda.is_available():
        device = torch.device("cuda", comm.select_device(torch.cuda.device_count()))
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def make_backend(choice: str, settings: BackendSettings) -> Backend:
    """The backend for ``Buffer(backend=choice)``: "auto" takes the CUDA engines when they
    can run on the device, else the reference (with a warning on a CUDA device)."""
    from mpiep.backends.reference import ReferenceBackend

    s = settings
    if choice == "reference" or (choice == "auto" and s.device.type != "cuda"):
        return ReferenceBackend(s.comm, s.device, s.num_nvl_bytes, s.num_rdma_bytes)
    from mpiep.backends import cuda

    reason = cuda.unavailable_reason(s.device)
    if reason is None:
        return cuda.CudaBackend(s)
    if choice == "cuda":
        raise RuntimeError(f"backend='cuda' is not available: {reason}")
    # stacklevel: make_backend <- Buffer.__init__ <- the caller's Buffer(...)
    warnings.warn(f"mpiep: using the reference backend: {reason}", stacklevel=3)
    return ReferenceBackend(s.comm, s.device, s.num_nvl_bytes, s.num_rdma_bytes)
