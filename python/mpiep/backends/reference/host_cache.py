"""A cache of large host blocks for the reference backend.

Why: torch's CPU allocator hands every large tensor fresh pages from the kernel, and on
first touch each 4 KiB page costs a fault (plus zeroing). For a 200 MB dispatch that
was more than the MPI exchange itself, several times per call. Blocks handed out here
go back to the cache when the last tensor (or view) using them is freed, and the next
call of the same size reuses their already-mapped pages.

A block is a numpy array; a tensor gets it through ``torch.from_numpy`` of a numpy
view of the block. That view is referenced by the tensor's storage only, so a
``weakref.finalize`` on it fires exactly when no tensor or view uses the block any more.
Finalizers only append to a list (atomic under the GIL); the cache drains that list on
the next allocation, so no lock is needed and a garbage collection inside an allocation
cannot deadlock.
"""

from __future__ import annotations

import math
import os
import weakref

import numpy as np
import torch

MIN_BYTES = 1 << 20  # smaller tensors come from torch directly: their pages are reused anyway
GRANULE = 1 << 21  # block sizes are rounded up to this, so nearby sizes share blocks


def _default_limit() -> int:
    """Idle bytes kept per process (env ``MPIEP_REFERENCE_CACHE_MB``, default 1024)."""
    return int(float(os.environ.get("MPIEP_REFERENCE_CACHE_MB", "1024")) * (1 << 20))


class HostCache:
    def __init__(self, limit_bytes: int | None = None) -> None:
        self.limit = _default_limit() if limit_bytes is None else limit_bytes
        self._idle: list[np.ndarray] = []  # free blocks, most recently freed last
        self._returned: list[np.ndarray] = []  # appended by finalizers

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised CPU tensor, from a cached block when it is large."""
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < MIN_BYTES or self.limit <= 0:
            return torch.empty(shape, dtype=dtype)
        block = self._take(nbytes)
        view = block[:nbytes]  # a new array object: only the tensor's storage holds it
        weakref.finalize(view, self._returned.append, block).atexit = False
        return torch.from_numpy(view).view(dtype).view(shape)

    def idle_bytes(self) -> int:
        self._drain()
        return sum(b.nbytes for b in self._idle)

    def clear(self) -> None:
        self._drain()
        self._idle.clear()

    def _take(self, nbytes: int) -> np.ndarray:
        self._drain()
        # Best fit among blocks no more than twice the size asked for.
        best = None
        for i, block in enumerate(self._idle):
            if nbytes <= block.nbytes <= 2 * nbytes and (
                best is None or block.nbytes < self._idle[best].nbytes
            ):
                best = i
        if best is not None:
            return self._idle.pop(best)
        return np.empty(-(-nbytes // GRANULE) * GRANULE, dtype=np.uint8)

    def _drain(self) -> None:
        while self._returned:
            self._idle.append(self._returned.pop())
        total = sum(b.nbytes for b in self._idle)
        while self._idle and total > self.limit:  # drop the least recently freed
            total -= self._idle.pop(0).nbytes


_CACHE = HostCache()


def host_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor from the process-wide cache."""
    return _CACHE.empty(shape, dtype)


def host_cache() -> HostCache:
    return _CACHE
