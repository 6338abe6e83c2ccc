"""The MPI layer: who is where, and the few collectives mpiep needs for control.

MPI carries only bootstrap and control traffic (handles, counts, agreement on
arguments); tensors on the GPU paths move through CUDA IPC or NVSHMEM. Every wait
on peers goes through :meth:`Communicator.wait`, which turns silence into a
:class:`PeerTimeoutError` naming the rank and the phase instead of a hang.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from mpi4py import MPI

from mpiep import faults
from mpiep.errors import ArgumentMismatchError, PeerTimeoutError

DEFAULT_TIMEOUT_S = 20.0
SPIN_S = 2e-4  # how long a wait polls without sleeping
_UNUSABLE = "this communicator is unusable now"
_NOT_CREATED = (
    "the Buffer was not created, and the communicator passed to it holds a duplication "
    "that the missing peers must still join"
)


def default_timeout_s() -> float:
    """Seconds to wait on a peer before giving up (env ``MPIEP_TIMEOUT_S``)."""
    return float(os.environ.get("MPIEP_TIMEOUT_S", DEFAULT_TIMEOUT_S))


class Communicator:
    """An mpi4py communicator plus the node layout derived from it.

    Nodes are found with ``Split_type(COMM_TYPE_SHARED)``. ``ranks_per_node`` (or the
    env ``MPIEP_RANKS_PER_NODE``) overrides that and cuts the ranks into "virtual
    nodes" of consecutive ranks, so that the internode path can run on one host.
    """

    def __init__(
        self,
        comm: MPI.Comm | None = None,
        ranks_per_node: int | None = None,
        timeout_s: float | None = None,
        abort_on_timeout: bool | None = None,
    ) -> None:
        if comm is None:
            comm = MPI.COMM_WORLD
        if not isinstance(comm, MPI.Comm):
            raise TypeError(f"comm must be an mpi4py communicator, got {type(comm).__name__}")
        if comm == MPI.COMM_NULL:
            raise ValueError("comm is MPI.COMM_NULL")
        self.rank: int = comm.Get_rank()
        self.size: int = comm.Get_size()
        self.timeout_s: float = default_timeout_s() if timeout_s is None else float(timeout_s)
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")
        self.abort_on_timeout = faults.abort_requested(abort_on_timeout)
        self._abort_comm = comm  # MPI_Abort goes to the caller's communicator
        # A private duplicate: our control messages never match the caller's. Nonblocking,
        # like every wait on peers here, so that a peer that never comes is a timeout.
        dup, request = comm.Idup()
        self.wait(request, "Buffer(): duplicate the communicator", _NOT_CREATED)
        self.comm: MPI.Comm = dup

        env_rpn = os.environ.get("MPIEP_RANKS_PER_NODE")
        if ranks_per_node is None and env_rpn:
            ranks_per_node = int(env_rpn)
        problem = None
        if ranks_per_node is not None and (ranks_per_node <= 0 or self.size % ranks_per_node):
            problem = (
                f"ranks_per_node={ranks_per_node} must be positive and divide the "
                f"communicator size {self.size}"
            )
        # Split and Split_type block: first make sure (with the timeout) that every rank is
        # here and agrees, then they cannot wait on a missing peer.
        phase = "Buffer(): find the nodes"
        self.agree(("__error__", problem) if problem else ("ranks_per_node", ranks_per_node), phase)
        if problem:
            raise ValueError(problem)
        self.node_comm: MPI.Comm
        if ranks_per_node is not None:
            self.node_comm = self.comm.Split(self.rank // ranks_per_node, self.rank)
            self.virtual_nodes = True
        else:
            self.node_comm = self.comm.Split_type(MPI.COMM_TYPE_SHARED, 0)
            self.virtual_nodes = False
        self.local_rank: int = self.node_comm.Get_rank()
        self.local_size: int = self.node_comm.Get_size()

        # Node ids numbered by their lowest rank; every node must have the same size
        # and hold consecutive ranks, which is how srun and mpirun place ranks by default.
        placement = self.allgather(
            (self.rank - self.local_rank, self.local_size), "Buffer(): node layout"
        )
        leaders = [p[0] for p in placement]
        sizes = [p[1] for p in placement]
        if len(set(sizes)) != 1:
            raise ValueError(
                f"nodes have different rank counts {sorted(set(sizes))}: mpiep needs equal nodes"
            )
        if any(leader != r - r % self.local_size for r, leader in enumerate(leaders)):
            raise ValueError(
                "ranks of a node are not consecutive; launch with block placement "
                "(srun --distribution=block, mpirun --map-by node is not supported)"
            )
        self.node: int = self.rank // self.local_size
        self.num_nodes: int = self.size // self.local_size

    # -- placement -----------------------------------------------------------------
    def select_device(self, num_visible_devices: int) -> int:
        """The CUDA device this rank should use: its local rank, modulo what is visible.

        With one visible device per rank (CUDA_VISIBLE_DEVICES set per task, as srun
        --gpus-per-task does) this is 0.
        """
        if num_visible_devices <= 0:
            raise RuntimeError("no CUDA device is visible")
        if (
            self.local_size > num_visible_devices
            and os.environ.get("MPIEP_ALLOW_GPU_SHARING") != "1"
        ):
            raise RuntimeError(
                f"{self.local_size} ranks on node {self.node} but only {num_visible_devices} "
                "visible GPU(s); set MPIEP_ALLOW_GPU_SHARING=1 to share GPUs (tests only)"
            )
        return self.local_rank % num_visible_devices

    # -- collectives with timeouts -------------------------------------------------
    def wait(self, request: MPI.Request, phase: str, consequence: str = _UNUSABLE) -> None:
        """Complete ``request`` or raise PeerTimeoutError after ``timeout_s``."""
        start = time.monotonic()
        deadline, spin_until = start + self.timeout_s, start + SPIN_S
        sleep = 0.0
        while not request.Test():
            now = time.monotonic()
            if now > deadline:
                raise self.timed_out(
                    PeerTimeoutError(
                        f"rank {self.rank}/{self.size}: no answer from peers within "
                        f"{self.timeout_s:g}s in phase '{phase}' (a peer crashed, hangs, or "
                        f"skipped this call); {consequence}"
                    )
                )
            # Spin briefly (a sleep costs ~100 us of scheduling), then back off: MPI
            # progresses only inside Test().
            if now < spin_until:
                continue
            if sleep:
                time.sleep(sleep)
            sleep = min(max(sleep * 2, 1e-5), 1e-3)

    def timed_out(self, error: PeerTimeoutError) -> PeerTimeoutError:
        """Every PeerTimeoutError passes here before it is raised: with ``abort_on_timeout``
        the job is aborted shortly after (mpiep.faults)."""
        if self.abort_on_timeout:
            faults.arm_abort(self._abort_comm, self.rank, error)
        return error

    def allgather(self, obj: Any, phase: str) -> list[Any]:
        """Allgather of small picklable objects, with the timeout."""
        import pickle

        data = pickle.dumps(obj)
        sizes = self._iallgather_ints([len(data)], phase)
        counts = [s[0] for s in sizes]
        recv = bytearray(sum(counts))
        displs = [sum(counts[:i]) for i in range(self.size)]
        req = self.comm.Iallgatherv(data, [recv, counts, displs, MPI.BYTE])
        self.wait(req, phase)
        return [pickle.loads(bytes(recv[d : d + c])) for d, c in zip(displs, counts, strict=True)]

    def allgather_bytes(self, data: bytes, phase: str) -> list[bytes]:
        """Allgather of opaque byte strings (CUDA IPC handles, NVSHMEM ids)."""
        return self.allgather(bytes(data), phase)

    def bcast_bytes(self, data: bytes | None, root: int, phase: str) -> bytes:
        """Broadcast of an opaque byte string from ``root`` (the NVSHMEM unique id)."""
        return self.allgather(data if self.rank == root else None, phase)[root]

    def barrier(self, phase: str) -> None:
        self.wait(self.comm.Ibarrier(), phase)

    def agree(self, signature: Sequence[Any], what: str) -> None:
        """Check that every rank called ``what`` with the same ``signature``.

        Also carries local validation failures: a rank that passes an exception
        message as ``signature`` makes every rank raise, so that no rank is left
        waiting in the data exchange for a peer that gave up.
        """
        sigs = self.allgather(tuple(signature), f"{what}: argument check")
        failed = [(r, s[1]) for r, s in enumerate(sigs) if s and s[0] == "__error__"]
        if failed:
            if any(rank == self.rank for rank, _ in failed):
                return  # the caller raises its own, more specific, exception
            ranks = ", ".join(str(rank) for rank, _ in failed)
            who = (
                f"rank {ranks} rejected its"
                if len(failed) == 1
                else f"ranks {ranks} rejected their"
            )
            details = "; ".join(f"rank {rank}: {message}" for rank, message in failed[:8])
            more = f"; and {len(failed) - 8} more" if len(failed) > 8 else ""
            raise ArgumentMismatchError(f"{what}: {who} arguments: {details}{more}")
        mine = sigs[self.rank]
        for r, sig in enumerate(sigs):
            if sig != mine:
                diffs = describe_difference(mine, sig)
                raise ArgumentMismatchError(
                    f"{what}: arguments differ across ranks: rank {self.rank} has {diffs[0]} "
                    f"but rank {r} has {diffs[1]}"
                )

    def _iallgather_ints(self, values: list[int], phase: str) -> list[list[int]]:
        import numpy as np

        send = np.asarray(values, dtype=np.int64)
        recv = np.empty((self.size, len(values)), dtype=np.int64)
        self.wait(self.comm.Iallgather(send, recv), phase)
        return recv.tolist()

    def free(self) -> None:
        """Free the communicators (local; safe to call twice, and after MPI_Finalize)."""
        if MPI.Is_finalized():
            return
        for c in (getattr(self, "node_comm", MPI.COMM_NULL), getattr(self, "comm", MPI.COMM_NULL)):
            if c != MPI.COMM_NULL:
                c.Free()

    def __repr__(self) -> str:
        kind = "virtual nodes" if self.virtual_nodes else "nodes"
        return (
            f"Communicator(rank={self.rank}, size={self.size}, local_rank={self.local_rank}, "
            f"local_size={self.local_size}, node={self.node}, {kind}={self.num_nodes})"
        )


def describe_difference(a: Sequence[Any], b: Sequence[Any]) -> tuple[str, str]:
    """The first differing (name, value) pair of two signatures, as text."""
    for x, y in zip(a, b, strict=False):
        if x != y:
            return str(x), str(y)
    return f"{len(a)} fields", f"{len(b)} fields"
