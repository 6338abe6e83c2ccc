"""``Buffer``: the public entry point, DeepEP's API over an mpi4py communicator.

``from mpiep.buffer import Buffer`` (or ``from mpiep import Buffer``). One job per file:

* ``api.py``: the ``Buffer`` class. Each call checks, agrees, runs on a stream, hands over
  to the backend, and stamps the handle.
* ``checks.py``: the argument checks, one function per operation; each returns the
  signature that ranks agree on.
* ``streams.py``: the communication stream and the events that order it against the caller's.
* ``low_latency.py``: low-latency bookkeeping (call counts, handle stamps, receive-hook
  tickets) and routing through the rank mask.
* ``startup.py``: a new Buffer's device and backend (``BackendSettings``).

The dispatch path: ``Buffer.dispatch`` (api.py) → ``checks.dispatch`` via
``Buffer._checked`` → ``CommStream.run`` (streams.py) → ``backend.dispatch``:
``backends/reference.py`` or ``backends/cuda.py``, a router over ``cuda_intranode.py``,
``cuda_internode.py`` and ``cuda_low_latency.py``.
"""

from mpiep.buffer.api import Buffer

__all__ = ["Buffer"]
