"""Ending the job after a ``PeerTimeoutError``: ``abort_on_timeout``, ``MPIEP_ABORT_ON_TIMEOUT=1``.

A rank that timed out cannot finish cleanly: ``MPI_Finalize`` waits for every rank, and a
peer that hangs never arrives, so the job would hang until its allocation ends. With the
option on, the rank reports the error on stderr at once, raises it as usual (callers may
log, save, clean up), and calls ``MPI_Abort`` at interpreter exit or ``ABORT_GRACE_S``
seconds later, whichever comes first. The grace period also lets the peers that time out
in the same call report their own errors before the job is torn down.
"""

from __future__ import annotations

import atexit
import functools
import os
import sys
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from mpi4py import MPI

from mpiep.errors import PeerTimeoutError

ABORT_GRACE_S = 2.0
ABORT_ERRORCODE = 124  # what `timeout` returns; mpirun and srun pass it on

_armed = False


def abort_requested(option: bool | None) -> bool:
    """The Buffer option, else the environment (``MPIEP_ABORT_ON_TIMEOUT=1``)."""
    if option is not None:
        return bool(option)
    return os.environ.get("MPIEP_ABORT_ON_TIMEOUT", "0") == "1"


def arm_abort(comm: MPI.Comm, rank: int, error: BaseException) -> None:
    """Report ``error`` now and abort the job after the grace period or at exit."""
    global _armed
    if getattr(error, "_mpiep_abort_armed", False):
        return
    error._mpiep_abort_armed = True  # type: ignore[attr-defined]
    sys.stderr.write(
        f"mpiep: {type(error).__name__}: {error}\n"
        f"mpiep: rank {rank}: aborting the job within {ABORT_GRACE_S:g}s "
        "(abort_on_timeout / MPIEP_ABORT_ON_TIMEOUT=1)\n"
    )
    sys.stderr.flush()
    if _armed:
        return
    _armed = True

    def abort() -> None:
        sys.stderr.flush()
        try:
            comm.Abort(ABORT_ERRORCODE)
        finally:  # Abort does not return; if MPI is gone already, end the process anyway
            os._exit(ABORT_ERRORCODE)

    timer = threading.Timer(ABORT_GRACE_S, abort)
    timer.daemon = True
    timer.start()
    atexit.register(abort)  # runs before mpi4py's MPI_Finalize


def guard(call: Callable[..., Any], on_timeout: Callable[[PeerTimeoutError], object]) -> Callable:
    """``call`` with ``on_timeout`` run on any PeerTimeoutError it raises (then re-raised)."""

    @functools.wraps(call)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except PeerTimeoutError as exc:
            on_timeout(exc)
            raise

    return guarded


def guard_methods(obj: object, names: Sequence[str], on_timeout: Callable) -> None:
    """Shadow ``obj``'s methods ``names`` with guarded ones (only Buffers that asked for the
    abort pay for the extra call). A weak reference keeps ``obj`` free of a cycle."""
    ref = weakref.ref(obj)
    for name in names:
        func = getattr(type(obj), name)

        def bound(*args: Any, __func: Callable = func, **kwargs: Any) -> Any:
            return __func(ref(), *args, **kwargs)

        setattr(obj, name, guard(functools.wraps(func)(bound), on_timeout))
