"""The MPI floor: a raw mpi4py ``Alltoallv`` of the same bytes as a benchmark case.

On CPUs this is what the reference backend's data exchange cannot beat: the same rows
between the same ranks, from and into preallocated numpy arrays, with nothing else. Each
case's row reports it and the ratio to it, as the GPU tables have their NCCL row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from mpi4py import MPI


def _displacements(counts: Sequence[int]) -> list[int]:
    return [int(v) for v in np.concatenate([[0], np.cumsum(counts)[:-1]])] if counts else []


def alltoallv_fn(
    comm: MPI.Comm, send_rows: Sequence[int], recv_rows: Sequence[int], row_bytes: int
) -> Callable[[], None]:
    """A closure doing one blocking ``Alltoallv`` of ``row_bytes``-byte rows."""
    row = MPI.BYTE.Create_contiguous(row_bytes).Commit()  # counts in rows: no int32 overflow
    send = np.ones(sum(send_rows) * row_bytes, dtype=np.uint8)
    recv = np.empty(sum(recv_rows) * row_bytes, dtype=np.uint8)
    sc, rc = [int(n) for n in send_rows], [int(n) for n in recv_rows]
    sd, rd = _displacements(sc), _displacements(rc)

    def run() -> None:
        comm.Alltoallv([send, (sc, sd), row], [recv, (rc, rd), row])

    return run


def rows_to(t: torch.Tensor | Sequence[int]) -> list[int]:
    return [int(v) for v in (t.cpu().tolist() if isinstance(t, torch.Tensor) else t)]
