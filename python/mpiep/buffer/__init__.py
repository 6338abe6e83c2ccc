"""``Buffer``: the public entry point, DeepEP's API over an mpi4py communicator.

``from mpiep.buffer import Buffer`` (or ``from mpiep import Buffer``).
"""

from mpiep.buffer.api import Buffer

__all__ = ["Buffer"]
