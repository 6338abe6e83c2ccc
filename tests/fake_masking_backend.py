"""A CPU stand-in for a backend whose kernels mask ranks (``supports_masking``, as the CUDA
backend), so that ``mpiep.shrink``'s native path runs in the CPU suite.

It takes the calls Shrink makes of such a backend (``enable_rank_masking``,
``set_active_ranks`` with the active ranks' communicator, the low-latency calls with full
shapes) and runs the low-latency calls through ``mpiep.masked_ll`` over a reference backend of
the ranks it was last told are active: the same results the GPU kernels give by skipping
masked ranks. ``set_active_ranks`` meets the active ranks in a barrier, as the GPU clean does.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from mpiep import masked_ll
from mpiep.backends.base import LowLatencyCombineRequest, LowLatencyDispatchRequest
from mpiep.backends.reference import ReferenceBackend
from mpiep.comm import Communicator


class _Active:
    """What ``masked_ll`` reads of a mask: the full group, the active ranks, their backend."""

    def __init__(self, full: Communicator, active: list[int], backend: Any) -> None:
        self.full, self.active, self.backend = full, active, backend

    def positions(self, device: torch.device) -> torch.Tensor:
        pos = torch.full((self.full.size,), -1, dtype=torch.int64)
        pos[self.active] = torch.arange(len(self.active))
        return pos.to(device)


class FakeMaskingBackend:
    name = "reference"  # Buffer's defaults (validation on) follow the backend it wraps
    supports_masking = True

    def __init__(self, inner: ReferenceBackend, comm: Communicator, device: torch.device) -> None:
        self.inner, self.full, self.device = inner, comm, device
        self.enabled = False
        self.changes: list[tuple[int, ...]] = []  # every set_active_ranks, for the tests
        self._sub: ReferenceBackend | None = None
        self._active = list(range(comm.size))

    def __getattr__(self, name: str) -> Any:  # normal mode and the rest: the wrapped backend
        return getattr(self.inner, name)

    # -- what Shrink calls ---------------------------------------------------------------
    def enable_rank_masking(self) -> None:
        self.enabled = True

    def set_active_ranks(self, active: list[int], comm: Communicator) -> None:
        assert self.enabled, "set_active_ranks before enable_rank_masking"
        self.changes.append(tuple(active))
        if self._sub is not None:
            self._sub.destroy()
        self._sub, self._active = None, list(active)
        if self.full.rank not in active:
            return  # a rank that leaves only records the mask
        if comm is not self.full:
            self._sub = ReferenceBackend(comm, self.device, 0, 0)
        comm.barrier("fake masking backend: clean among the active ranks")

    def settled_timeout(self) -> None:
        """The reference backend raises its timeouts from the call itself: none recorded."""
        return None

    # -- low-latency calls with full shapes ----------------------------------------------
    def _where(self) -> _Active | None:
        if self._sub is None:
            return None
        return _Active(self.full, self._active, self._sub)

    def low_latency_dispatch(self, req: LowLatencyDispatchRequest) -> Any:
        where = self._where()
        if where is None:
            return self.inner.low_latency_dispatch(req)
        return masked_ll.dispatch(where, req)  # type: ignore[arg-type]

    def low_latency_combine(self, req: LowLatencyCombineRequest) -> Any:
        where = self._where()
        if where is None:
            return self.inner.low_latency_combine(req)
        if req.zero_copy:  # the rows were written into the buffer handed out
            req = replace(req, x=self.get_next_low_latency_combine_buffer(req.handle))
        return masked_ll.combine(where, req)  # type: ignore[arg-type]

    def get_next_low_latency_combine_buffer(self, handle: Any) -> torch.Tensor:
        if self._sub is None:
            return self.inner.get_next_low_latency_combine_buffer(handle)
        shape = (
            handle.num_experts // self.full.size,
            self.full.size * handle.num_max_dispatch_tokens_per_rank,
            handle.hidden,
        )
        buf = getattr(self, "_zero_copy", None)
        if buf is None or tuple(buf.shape) != shape:
            buf = self._zero_copy = torch.zeros(shape, dtype=torch.bfloat16, device=self.device)
        return buf

    def clean_low_latency_buffer(self, *args: Any) -> None:
        (self._sub or self.inner).clean_low_latency_buffer(*args)

    def destroy(self) -> None:
        if self._sub is not None:
            self._sub.destroy()
            self._sub = None
        self.inner.destroy()
