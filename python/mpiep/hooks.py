"""The receive-hook rules of low-latency mode, the same for every backend.

They are the GPU engine's double buffering (docs/semantics.md, "Receive hooks"): dispatch
calls use two slots in turn, and so do combine calls; a call whose slot still holds a send
waiting for its hook is refused before anything is sent; a hook runs once; and
``clean_low_latency_buffer`` voids every hook issued before it.

One tracker per Buffer keeps them: the GPU low-latency engine owns it (its slots are its
buffers) and exposes it as ``hook_tracker``; for other backends ``Buffer`` keeps its own.
"""

from __future__ import annotations

from collections.abc import Callable

OPS = ("dispatch", "combine")


class HookTicket:
    """One send phase waiting for its receive hook."""

    __slots__ = ("called", "generation", "op", "slot")

    def __init__(self, op: str, slot: int, generation: int) -> None:
        self.op, self.slot, self.generation = op, slot, generation
        self.called = False


class HookTracker:
    def __init__(self) -> None:
        self.generation = 0  # bumped by clean_low_latency_buffer
        self._next = dict.fromkeys(OPS, 0)
        self._pending: dict[str, list[HookTicket | None]] = {op: [None, None] for op in OPS}

    def check_free(self, op: str) -> None:
        """Raise RuntimeError if the next ``op`` call's slot waits for a hook."""
        slot = self._next[op]
        if self._pending[op][slot] is not None:
            raise RuntimeError(
                f"low_latency_{op}: the two {op} slots hold sends whose receive hooks have "
                f"not been called (slot {slot} is the older one); call that hook first: at "
                f"most two {op} calls with return_recv_hook may wait for their hooks, and "
                "their slots are used in turn"
            )

    def slot(self, op: str) -> int:
        """The slot the next ``op`` call uses (taken or not)."""
        return self._next[op]

    def claim(self, op: str) -> int:
        """The slot the next ``op`` call uses; raises (as :meth:`check_free`) if it is taken."""
        self.check_free(op)
        return self._next[op]

    def issue(self, op: str, with_hook: bool) -> HookTicket | None:
        """Take the next slot (after :meth:`check_free`); a ticket when a hook will follow."""
        slot = self._next[op]
        self._next[op] = slot ^ 1
        if not with_hook:
            return None
        ticket = HookTicket(op, slot, self.generation)
        self._pending[op][slot] = ticket
        return ticket

    def wrap(self, ticket: HookTicket, hook: Callable[[], None]) -> Callable[[], None]:
        """The hook the caller gets: runs ``hook`` once, and not after a clean."""

        def receive() -> None:
            if ticket.called:
                raise RuntimeError(f"this low-latency {ticket.op} receive hook was already called")
            if ticket.generation != self.generation:
                raise RuntimeError(
                    f"this low-latency {ticket.op} receive hook is from before "
                    "clean_low_latency_buffer, which voided it"
                )
            hook()  # a timeout leaves the slot taken, as on the GPU
            ticket.called = True
            self._pending[ticket.op][ticket.slot] = None

        return receive

    def clean(self) -> None:
        self.generation += 1
        self._next = dict.fromkeys(OPS, 0)
        self._pending = {op: [None, None] for op in OPS}
