"""The compiled parts, loaded once: ``mpiep._C`` (kernels and runtime, torch-free) and
``mpiep._ops`` (the torch op layer: one native call per operation).

Eager calls go to ``_ops``'s pybind entries; while torch.compile traces, :func:`pick` gives
the same entries through the torch custom ops ``torch.ops.mpiep.*`` (``torch_ops``).

``_ops`` raises mpiep's own exception classes for the core's errors: a peer timeout becomes
:class:`~mpiep.errors.PeerTimeoutError`, a receive over the buffer :class:`CapacityError`.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch

from mpiep.errors import CapacityError, PeerTimeoutError


@cache
def core() -> Any:
    from mpiep import _C  # type: ignore[attr-defined]

    return _C


@cache
def ops() -> Any:
    import torch  # noqa: F401  (libtorch must be loaded before the op layer)

    from mpiep import _ops  # type: ignore[attr-defined]

    _ops.set_error_types(PeerTimeoutError, CapacityError)
    from mpiep.backends import torch_ops  # noqa: F401  (fake implementations of the custom ops)

    return _ops


def pick(module: Any = None) -> Any:
    """The op layer's entries: ``module`` (the pybind module of :func:`ops`, which it
    defaults to) in eager mode, the same entries through ``torch.ops.mpiep`` while
    torch.compile traces (graph nodes instead of graph breaks)."""
    if torch.compiler.is_compiling():
        from mpiep.backends.torch_ops import COMPILED

        return COMPILED
    return ops() if module is None else module


def sequence(device: torch.device) -> torch.Tensor:
    """Create (once) the sequence tensor the custom ops of ``device`` mutate (torch_ops):
    engines call it when they are built, outside torch.compile."""
    from mpiep.backends.torch_ops import sequence as make

    return make(device)
