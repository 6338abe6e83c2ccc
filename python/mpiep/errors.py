"""Exceptions raised by mpiep. All derive from standard ones, so callers can catch either."""


class MpiepError(RuntimeError):
    """Base of mpiep's runtime errors."""


class PeerTimeoutError(TimeoutError):
    """A peer did not answer within the timeout; the message names the rank and phase."""


class ArgumentMismatchError(ValueError):
    """Ranks called the same operation with different arguments, or one rank rejected its own."""


class CapacityError(ValueError):
    """A call needs more buffer than the Buffer was created with."""
