"""``mpiep.deep_ep``: DeepEP V1's Python API on mpiep, so MoE code switches with one import.

    import mpiep.deep_ep as deep_ep          # was: import deep_ep
    buffer = deep_ep.Buffer(group, num_nvl_bytes, num_rdma_bytes)   # a torch ProcessGroup

Launch with ``mpirun``/``srun`` and initialise ``torch.distributed`` with MPI's ranks (see
:mod:`mpiep.deep_ep.group`). For code whose ``import deep_ep`` lives in a library you do
not edit (Megatron-LM, SGLang, vLLM), call :func:`install_as_deep_ep` before that library
is imported. What is and is not compatible: docs/deep_ep_compat.md.

Importing this package imports torch but neither mpi4py nor torch.distributed.
"""

from __future__ import annotations

import sys
from types import ModuleType

from mpiep.deep_ep import buffer, utils
from mpiep.deep_ep.buffer import Buffer, Config, topk_idx_t
from mpiep.deep_ep.group import ProcessGroupMismatchError
from mpiep.deep_ep.handles import DispatchHandleTuple, LowLatencyHandleTuple
from mpiep.deep_ep.utils import EventHandle, EventOverlap

__all__ = [
    "Buffer",
    "Config",
    "DispatchHandleTuple",
    "EventHandle",
    "EventOverlap",
    "LowLatencyHandleTuple",
    "ProcessGroupMismatchError",
    "install_as_deep_ep",
    "topk_idx_t",
]


def install_as_deep_ep() -> ModuleType:
    """Make ``import deep_ep`` (and ``deep_ep.utils``, ``deep_ep.buffer``) resolve to this
    package, for libraries that import DeepEP themselves. Call it before they import it.

    Refuses (RuntimeError) when another ``deep_ep`` is already imported: objects of the two
    cannot be mixed. Returns this package.
    """
    this = sys.modules[__name__]
    present = sys.modules.get("deep_ep")
    if present is not None and present is not this:
        raise RuntimeError(
            f"a different deep_ep is already imported ({getattr(present, '__file__', present)}); "
            "call mpiep.deep_ep.install_as_deep_ep() before anything imports deep_ep"
        )
    sys.modules["deep_ep"] = this
    sys.modules["deep_ep.utils"] = utils
    sys.modules["deep_ep.buffer"] = buffer
    return this
