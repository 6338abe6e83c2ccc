"""The NCCL baseline: ``all_to_all_single`` moving the same bytes as a dispatch.

torch.distributed appears here only, as the yardstick; mpiep itself never uses it.
The process group is bootstrapped from MPI (rank 0's host and a free port).
"""

from __future__ import annotations

import os
import socket

import torch
from mpi4py import MPI

_group_ready: bool | None = None
_failure = ""


def init_nccl(comm: MPI.Comm, device: torch.device) -> str | None:
    """Start the NCCL process group once; returns None, or why it is unavailable."""
    global _group_ready, _failure
    if _group_ready is not None:
        return None if _group_ready else _failure
    try:
        import torch.distributed as dist

        if device.type != "cuda" or not dist.is_nccl_available():
            raise RuntimeError("needs CUDA and NCCL")
        addr = None
        if comm.rank == 0:
            with socket.socket() as s:
                s.bind(("", 0))
                addr = (socket.gethostname(), s.getsockname()[1])
        host, port = comm.bcast(addr, root=0)
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        dist.init_process_group(
            "nccl",
            init_method=f"tcp://{host}:{port}",
            rank=comm.rank,
            world_size=comm.size,
            device_id=device,
        )
        _group_ready = True
        return None
    except Exception as exc:
        _group_ready, _failure = False, f"{type(exc).__name__}: {exc}"
        return _failure


def all_to_all_fn(send_rows: list[int], recv_rows: list[int], row_bytes: int, device: torch.device):
    """A closure doing one all_to_all_single of uint8 rows with these splits."""
    import torch.distributed as dist

    inp = torch.empty(sum(send_rows) * row_bytes, dtype=torch.uint8, device=device)
    out = torch.empty(sum(recv_rows) * row_bytes, dtype=torch.uint8, device=device)
    in_splits = [n * row_bytes for n in send_rows]
    out_splits = [n * row_bytes for n in recv_rows]

    def run() -> None:
        dist.all_to_all_single(out, inp, out_splits, in_splits)

    return run


def shutdown() -> None:
    if _group_ready:
        import torch.distributed as dist

        dist.destroy_process_group()
