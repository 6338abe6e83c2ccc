"""The compiled parts, loaded once: ``mpiep._C`` (kernels and runtime, torch-free) and
``mpiep._ops`` (the torch op layer: one native call per operation).

``_ops`` raises mpiep's own exception classes for the core's errors: a peer timeout becomes
:class:`~mpiep.errors.PeerTimeoutError`, a receive over the buffer :class:`CapacityError`.
"""

from __future__ import annotations

from functools import cache
from typing import Any

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
    return _ops
