"""Receive hooks of the low-latency calls, with the GPU engine's rules.

The GPU engine (``cuda_low_latency.py``) alternates two buffers per op; a buffer whose
receive hook has not been called cannot take another call. The reference backend has no
such buffers, but keeps the same bookkeeping so that both backends accept and refuse the
same call sequences:

- a call claims the next of two slots and raises ``RuntimeError`` before sending anything
  if that slot still waits for its hook (so at most two calls per op wait for hooks);
- a hook runs once; calling it again raises;
- ``clean_low_latency_buffer`` completes the receives of uncalled hooks (the peers did
  send: the data has to land somewhere) and voids those hooks.

The slot, not the hook, owns the in-flight exchange: a hook dropped without being called
leaves its receive buffers alive until the slot is drained (issue 11, defect 2).
"""

from __future__ import annotations

from collections.abc import Callable

from mpiep.backends.reference.exchange import Exchange


class HookSlots:
    def __init__(self, op: str) -> None:
        self.op = op
        self.next = 0
        self.pending: list[Exchange | None] = [None, None]
        self.generation = 0  # bumped by drain(): older hooks are void

    def claim(self) -> int:
        """The slot of the next call; raises if it still holds a call waiting for its hook."""
        slot = self.next
        if self.pending[slot] is not None:
            raise RuntimeError(
                f"low-latency {self.op}: both buffers hold {self.op} calls whose receive hooks "
                f"have not been called (buffer {slot} is the older); call that hook before the "
                f"next {self.op} (at most two {self.op} calls with return_recv_hook may wait "
                "for their hooks)"
            )
        self.next ^= 1
        return slot

    def park(
        self,
        slot: int,
        exchange: Exchange,
        finish: Callable[[], None],
        check_usable: Callable[[], None],
    ) -> Callable[[], None]:
        """Keep ``exchange`` in ``slot`` and return the hook that completes it."""
        self.pending[slot] = exchange
        generation = self.generation
        called = False

        def hook() -> None:
            nonlocal called
            if called:
                raise RuntimeError(f"this low-latency {self.op} receive hook was already called")
            if generation != self.generation:
                raise RuntimeError(
                    f"this low-latency {self.op} receive hook is from before "
                    "clean_low_latency_buffer"
                )
            check_usable()
            called = True
            self.pending[slot] = None
            finish()

        return hook

    def drain(self, wait: Callable[[Exchange], None]) -> None:
        """Complete the receives of uncalled hooks, void every older hook, reset the slots."""
        for exchange in self.pending:
            if exchange is not None:
                wait(exchange)
        self.pending = [None, None]
        self.next = 0
        self.generation += 1
