"""DeepEP's ``EventHandle`` and ``EventOverlap`` (``deep_ep.utils``), over torch CUDA events.

DeepEP's ``EventHandle`` is a C++ object that records a CUDA event on the current stream
when constructed; ``EventOverlap(event, extra_tensors)`` wraps one. Here both are plain
Python over ``torch.cuda.Event``. Where no CUDA work can be pending (CPU tensors, the
reference backend, CUDA never initialised in this process) an ``EventHandle`` holds no event
and waiting on it returns at once, so that DeepEP-style code with ``async_finish=True``
runs unchanged on CPUs.
"""

from __future__ import annotations

from typing import Any

import torch

from mpiep.event import EventOverlap as _MpiepEventOverlap


def _cuda_active() -> bool:
    # Without an initialised CUDA context nothing can be queued on a stream yet.
    return torch.cuda.is_available() and torch.cuda.is_initialized()


class EventHandle:
    """A CUDA event recorded on the current stream when the handle is created.

    ``event`` is the ``torch.cuda.Event`` (None where no CUDA work can be pending).
    """

    def __init__(self) -> None:
        self.event: torch.cuda.Event | None = None
        if _cuda_active():
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream())
            self.event = event

    @classmethod
    def from_cuda_event(cls, event: torch.cuda.Event | None) -> EventHandle:
        """Wrap an event that was recorded elsewhere (mpiep's own calls)."""
        handle = cls.__new__(cls)
        handle.event = event
        return handle

    def current_stream_wait(self) -> None:
        """Make ``torch.cuda.current_stream()`` wait for the event."""
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def __repr__(self) -> str:
        return f"EventHandle({'cuda event' if self.event is not None else 'completed'})"


class EventOverlap:
    """DeepEP's ``EventOverlap(event: EventHandle | None, extra_tensors)``.

    ``current_stream_wait()`` makes the current stream wait for the event; ``with ev: ...``
    runs the block, then waits. ``extra_tensors`` are kept alive until then (DeepEP's
    CUDA-graph-friendly substitute for ``record_stream``). Unlike DeepEP,
    ``current_stream_wait()`` on an event-less overlap returns instead of asserting: calls
    on CPUs are synchronous and have no event.
    """

    def __init__(
        self, event: EventHandle | None = None, extra_tensors: tuple[Any, ...] | None = None
    ) -> None:
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        if self.event is not None:
            self.event.current_stream_wait()

    def __enter__(self) -> EventOverlap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.current_stream_wait()

    def __repr__(self) -> str:
        return f"EventOverlap({self.event!r})"


def to_mpiep_event(previous_event: Any) -> _MpiepEventOverlap | None:
    """The ``previous_event`` argument of a compat call, as mpiep's ``Buffer`` takes it.

    Accepts this module's ``EventOverlap``, mpiep's own ``EventOverlap``, or None.
    """
    if previous_event is None:
        return None
    if isinstance(previous_event, _MpiepEventOverlap):
        return previous_event
    if isinstance(previous_event, EventOverlap):
        inner = previous_event.event
        if inner is not None and not isinstance(inner, EventHandle):
            raise TypeError(
                "previous_event: EventOverlap.event must be an EventHandle, "
                f"got {type(inner).__name__}"
            )
        return _MpiepEventOverlap(
            None if inner is None else inner.event, previous_event.extra_tensors
        )
    raise TypeError(
        f"previous_event must be an EventOverlap (or None), got {type(previous_event).__name__}"
    )


def from_mpiep_event(event: _MpiepEventOverlap) -> EventOverlap:
    """mpiep's returned ``EventOverlap`` in DeepEP's form (event inside an ``EventHandle``)."""
    inner = None if event.event is None else EventHandle.from_cuda_event(event.event)
    return EventOverlap(inner, event.extra_tensors)
