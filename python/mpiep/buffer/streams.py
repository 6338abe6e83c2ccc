"""Where a ``Buffer`` call's work runs: mpiep's communication stream, ordered against the
caller's stream with events.

Normal-mode calls always go through :meth:`CommStream.run`; low-latency calls only with
``async_finish`` (synchronous ones run on the current stream, as in DeepEP, so that they can
be captured in a CUDA graph together with the surrounding compute). On CPU tensors every
call is synchronous and :class:`HostOrder` just runs it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from mpiep.event import EventOverlap

# What a call hands back for the caller to keep alive: its output tensors (None allowed).
Outputs = Callable[[Any], Sequence[torch.Tensor | None]]


class CommStream:
    """The communication stream of one Buffer on a CUDA device."""

    __slots__ = ("_hop_in", "_hop_out", "ops_hop", "stream")

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device)
        # True once the backend's normal-mode ops hop to this stream and back themselves
        # (native StreamHop, Backend.use_comm_stream): a synchronous call without an event
        # then needs no Python stream switch and no events.
        self.ops_hop = False
        # Two events reused by every synchronous hop: a new event per call cost more than
        # the launch it orders.
        self._hop_in = torch.cuda.Event()
        self._hop_out = torch.cuda.Event()

    def run(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        previous_event: EventOverlap | None,
        async_finish: bool,
        allocate_on_comm_stream: bool,
        inputs: Sequence[torch.Tensor | None],
        outputs: Outputs,
    ) -> tuple[Any, EventOverlap]:
        """Run ``fn(*args)`` on the communication stream after ``previous_event`` (or the
        current stream), then either make the current stream wait (sync) or return an event
        that keeps ``inputs`` and the outputs alive (``async_finish``)."""
        if allocate_on_comm_stream and previous_event is None:
            raise ValueError("allocate_on_comm_stream=True needs previous_event")
        if self.ops_hop and previous_event is None and not async_finish:
            return fn(*args), EventOverlap(None)
        stream = self.stream
        compute = torch.cuda.current_stream()
        if previous_event is not None and previous_event.event is not None:
            stream.wait_event(previous_event.event)
        else:
            self._hop_in.record(compute)
            stream.wait_event(self._hop_in)
        with torch.cuda.stream(stream):
            result = fn(*args)
        if not async_finish:
            self._hop_out.record(stream)
            compute.wait_event(self._hop_out)
            if not allocate_on_comm_stream:
                for t in outputs(result):
                    if isinstance(t, torch.Tensor):
                        t.record_stream(compute)
            return result, EventOverlap(None)
        tensors = [t for t in (*inputs, *outputs(result)) if isinstance(t, torch.Tensor)]
        event = torch.cuda.Event()
        event.record(stream)
        # The caching allocator must not reuse these before the comm stream is done.
        for t in tensors:
            t.record_stream(stream)
        if allocate_on_comm_stream:
            for t in tensors:
                t.record_stream(compute)
        return result, EventOverlap(event, tuple(tensors))


class HostOrder:
    """CPU tensors: no stream to order against; the call runs now and its event is empty."""

    __slots__ = ()
    stream = None

    def run(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        previous_event: EventOverlap | None,
        async_finish: bool,
        allocate_on_comm_stream: bool,
        inputs: Sequence[torch.Tensor | None],
        outputs: Outputs,
    ) -> tuple[Any, EventOverlap]:
        return fn(*args), EventOverlap(None)


def for_device(device: torch.device) -> CommStream | HostOrder:
    """A communication stream on CUDA devices, else the synchronous host order."""
    return CommStream(device) if device.type == "cuda" else HostOrder()
