"""EventOverlap: a handle on work enqueued on mpiep's communication stream."""

from __future__ import annotations

from typing import Any

import torch


class EventOverlap:
    """Wraps the CUDA event recorded after an mpiep call (None on CPU, where calls are
    synchronous), and keeps the tensors that call uses alive until it is waited on.

    ``ev.current_stream_wait()`` makes the current stream wait for the call; used as a
    context manager, ``with ev: ...`` runs the block and then waits, so computation in
    the block overlaps the communication.
    """

    def __init__(
        self, event: torch.cuda.Event | None = None, extra_tensors: tuple[Any, ...] | None = None
    ):
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def __enter__(self) -> EventOverlap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.current_stream_wait()

    def __repr__(self) -> str:
        return f"EventOverlap({'cuda event' if self.event is not None else 'completed'})"
