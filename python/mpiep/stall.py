"""Test-only stall switch: make one GPU rank skip its part of a kernel, so that its peers must
time out (issue 11: ``PeerTimeoutError`` naming rank and phase, rank masking).

A stalled rank still runs its own side of the call (it receives what the others send), but
withholds what the phase sends to its peers:

=====================  ======================================================================
``ll_dispatch_count``  low-latency dispatch: no token counts (and so no rows) to peers
``ll_dispatch_data``   low-latency dispatch: the counts, but no rows to peers
``ll_combine``         low-latency combine: no rows back to peers
``dispatch``           normal mode: the dispatch data kernel is not launched (notify runs)
``combine``            normal mode: the combine kernel is not launched
=====================  ======================================================================

Set it per Buffer with ``buffer.backend.set_test_stall("ll_combine")`` (CUDA backend; ``""`` or
``0`` turns it off), or for whole runs with ``MPIEP_TEST_STALL=<rank>:<phase>[+<phase>]``
(several ``rank:phases`` separated by ``,``), read when an engine is created. It costs nothing
when off: the plain kernels run, and the normal-mode switch is a host-side branch.
The values mirror ``include/mpiep/test_stall.h`` (``mpiep._C.TEST_STALL_PHASES``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

PHASES: dict[str, int] = {
    "ll_dispatch_count": 1,
    "ll_dispatch_data": 2,
    "ll_combine": 4,
    "dispatch": 8,
    "combine": 16,
}
LOW_LATENCY = PHASES["ll_dispatch_count"] | PHASES["ll_dispatch_data"] | PHASES["ll_combine"]
NORMAL = PHASES["dispatch"] | PHASES["combine"]
ENV = "MPIEP_TEST_STALL"


def parse(phases: str | Iterable[str] | int | None) -> int:
    """Phase names (``"a+b"``, or a list) or a bit mask -> the bit mask."""
    if phases is None:
        return 0
    if isinstance(phases, int):
        if phases & ~(LOW_LATENCY | NORMAL) or phases < 0:
            raise ValueError(f"unknown test stall bits {phases:#x}")
        return phases
    names = phases.split("+") if isinstance(phases, str) else list(phases)
    bits = 0
    for name in (n.strip() for n in names):
        if not name:
            continue
        if name not in PHASES:
            raise ValueError(f"unknown test stall phase {name!r}; known: {', '.join(PHASES)}")
        bits |= PHASES[name]
    return bits


def from_env(rank: int, env: str | None = None) -> int:
    """This rank's stall bits from ``MPIEP_TEST_STALL`` (0 when unset or for another rank)."""
    spec = os.environ.get(ENV, "") if env is None else env
    bits = 0
    for item in filter(None, (part.strip() for part in spec.split(","))):
        who, sep, phases = item.partition(":")
        if not sep or not who.strip().isdigit():
            raise ValueError(f"{ENV}={spec!r}: expected <rank>:<phase>[+<phase>], got {item!r}")
        if int(who) == rank:
            bits |= parse(phases)
    return bits
