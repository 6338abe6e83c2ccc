"""The reference backend: torch + MPI on CPU tensors (CUDA tensors are staged once per call).

It implements the semantics contract (docs/semantics.md) and is the oracle the GPU kernels
are tested against, so its code stays direct; it is also the embedded default where no GPU
kernels exist, so each call is a few vectorised torch operations around nonblocking
``Ialltoallv`` exchanges.

- ``backend.py``: ``ReferenceBackend``, the object ``Buffer`` calls; health after failures.
- ``normal.py``, ``low_latency.py``: the two modes; ``ll_in_place.py``, ``ll_staged.py``,
  ``ll_layout.py``: how low-latency rows move; ``datatypes.py``: MPI derived datatypes.
- ``exchange.py``: nonblocking MPI exchanges that own their buffers until MPI is done.
- ``hooks.py``: receive hooks with the GPU engine's rules.
- ``packing.py``: aligned packed rows; ``reduce.py``: the combine sums (pure torch, the
  definition); ``fused.py``: where the sums and the FP8 cast run, the op layer's fused CPU
  loops or torch; ``host_cache.py``: reuse of large host blocks (fresh pages are expensive).
"""

from mpiep.backends.reference.backend import ReferenceBackend

__all__ = ["ReferenceBackend"]
