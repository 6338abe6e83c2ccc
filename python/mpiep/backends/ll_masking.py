"""Rank masking in the GPU low-latency kernels: the device side of ``Buffer(enable_shrink=True)``.

``LowLatencyMasking`` holds, for one ``LowLatencyEngine``, the host copy of the active ranks
and the communicator of those ranks. The context's device words (``[R]`` int32, 1 = takes part)
are read by every launch, so CUDA graphs follow mask changes; the kernels skip masked ranks
(no counts or rows to them, no waits on them, their experts' slots add 0 in combine), and a
wait that times out masks its peer there so that the call finishes without it. The host then
agrees on the survivors (``mpiep.rank_mask``) and sets the words here.

Cleaning cannot use NVSHMEM's barrier while a PE is gone: every active rank completes its puts
(a device-side quiet), meets the others in an MPI barrier over the active ranks, zeroes its
signals and timeout state, puts back the agreed mask (kernels may have masked peers on their
own), and meets them again before anyone sends.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mpiep.comm import Communicator


class LowLatencyMasking:
    def __init__(self, ctx: Any, comm: Communicator, device: torch.device) -> None:
        self.ctx = ctx
        self.device = device
        self.rank, self.num_ranks = comm.rank, comm.size
        self.active: list[int] = list(range(comm.size))
        self.comm = comm  # the active ranks' communicator: the barriers of clean
        ctx.enable_masking()
        ctx.set_active([1] * comm.size)

    def words(self) -> list[int]:
        return [int(r in self.active) for r in range(self.num_ranks)]

    def set_active(self, active: Sequence[int], comm: Communicator) -> bool:
        """Record the agreed active ranks and their communicator, and set the device words.
        Returns whether this rank takes part (then the caller cleans, collectively over
        ``comm``)."""
        self.active = sorted(active)
        self.comm = comm
        self.ctx.set_active(self.words())
        return self.rank in self.active

    def clean(self) -> None:
        """Zero this rank's signals and timeout state; collective over the active ranks."""
        torch.cuda.synchronize(self.device)
        self.ctx.quiet()
        self.comm.barrier("clean_low_latency_buffer: the active ranks' sends finished")
        self.ctx.reset_signals()
        self.ctx.set_active(self.words())
        self.comm.barrier("clean_low_latency_buffer: the active ranks' signals reset")
