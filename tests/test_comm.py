"""The MPI layer: virtual nodes, argument agreement, and timeouts instead of hangs."""

from __future__ import annotations

import time

import pytest
from mpi4py import MPI

from conftest import collective_check
from mpiep.comm import Communicator
from mpiep.errors import ArgumentMismatchError, PeerTimeoutError

pytestmark = pytest.mark.timeout(120)


def test_error_hierarchy() -> None:
    """Callers can catch the standard exceptions."""
    assert issubclass(PeerTimeoutError, TimeoutError)
    assert issubclass(ArgumentMismatchError, ValueError)


@pytest.mark.mpi(min_size=2)
def test_one_host_is_one_node(comm: MPI.Comm, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MPIEP_RANKS_PER_NODE", raising=False)
    c = Communicator(comm)
    with collective_check(comm):
        assert (c.rank, c.size) == (comm.rank, comm.size)
        assert (c.local_rank, c.local_size) == (comm.rank, comm.size)
        assert (c.node, c.num_nodes) == (0, 1)
    c.free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("ranks_per_node", [1, 2])
def test_virtual_nodes(comm: MPI.Comm, ranks_per_node: int) -> None:
    if comm.size % ranks_per_node:
        pytest.skip("rank count not divisible")
    c = Communicator(comm, ranks_per_node=ranks_per_node)
    with collective_check(comm):
        assert c.local_size == ranks_per_node
        assert c.local_rank == comm.rank % ranks_per_node
        assert c.node == comm.rank // ranks_per_node
        assert c.num_nodes == comm.size // ranks_per_node
        assert c.virtual_nodes
        # The node communicator really holds the ranks of this virtual node.
        members = c.node_comm.allgather(comm.rank)
        assert members == [c.node * ranks_per_node + i for i in range(ranks_per_node)]
    c.free()


@pytest.mark.mpi(min_size=2)
def test_virtual_nodes_from_env(comm: MPI.Comm, monkeypatch: pytest.MonkeyPatch) -> None:
    if comm.size % 2:
        pytest.skip("rank count not even")
    monkeypatch.setenv("MPIEP_RANKS_PER_NODE", "2")
    c = Communicator(comm)
    with collective_check(comm):
        assert (c.local_size, c.num_nodes, c.node) == (2, comm.size // 2, comm.rank // 2)
    c.free()


@pytest.mark.mpi(min_size=2)
def test_ranks_per_node_must_divide(comm: MPI.Comm) -> None:
    bad = comm.size + 1
    with collective_check(comm), pytest.raises(ValueError, match="ranks_per_node"):
        Communicator(comm, ranks_per_node=bad)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(TypeError, match="comm"):
        Communicator("not a communicator")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout_s"):
        Communicator(MPI.COMM_SELF, timeout_s=0)


@pytest.mark.mpi(min_size=2)
def test_allgather_and_barrier(comm: MPI.Comm) -> None:
    c = Communicator(comm, timeout_s=30)
    with collective_check(comm):
        got = c.allgather({"rank": comm.rank, "payload": "x" * comm.rank}, "test allgather")
        assert got == [{"rank": r, "payload": "x" * r} for r in range(comm.size)]
        assert c.allgather_bytes(bytes([comm.rank]) * 3, "bytes") == [
            bytes([r]) * 3 for r in range(comm.size)
        ]
        root = comm.size - 1
        data = b"unique-id" if comm.rank == root else None
        assert c.bcast_bytes(data, root, "bcast") == b"unique-id"
        c.barrier("test barrier")
    c.free()


@pytest.mark.mpi(min_size=2)
def test_agree_same_signature(comm: MPI.Comm) -> None:
    c = Communicator(comm, timeout_s=30)
    with collective_check(comm):
        c.agree(("hidden", 7168, "num_experts", 64), "dispatch")
    c.free()


@pytest.mark.mpi(min_size=2)
def test_agree_detects_mismatch(comm: MPI.Comm) -> None:
    """Rank 1 differs: every rank raises, naming rank 1 (or, on rank 1, a peer) and the call."""
    c = Communicator(comm, timeout_s=30)
    hidden = 4096 if comm.rank == 1 else 7168
    with collective_check(comm):
        with pytest.raises(ArgumentMismatchError) as info:
            c.agree(("hidden", hidden), "dispatch")
        msg = str(info.value)
        assert "dispatch" in msg
        assert "rank 1" in msg if comm.rank != 1 else "rank 0" in msg
        assert "4096" in msg and "7168" in msg
    c.free()


@pytest.mark.mpi(min_size=2)
def test_agree_carries_local_error(comm: MPI.Comm) -> None:
    """A rank that rejected its own arguments makes the others raise, naming it."""
    c = Communicator(comm, timeout_s=30)
    with collective_check(comm):
        if comm.rank == 1:
            c.agree(("__error__", "x must be bfloat16"), "dispatch")  # returns: caller raises
        else:
            with pytest.raises(ArgumentMismatchError) as info:
                c.agree(("hidden", 7168), "dispatch")
            msg = str(info.value)
            assert "rank 1" in msg and "x must be bfloat16" in msg
    c.free()


@pytest.mark.mpi(min_size=2)
def test_peer_timeout_names_rank_and_phase(comm: MPI.Comm) -> None:
    """Rank 1 skips a barrier: the others get PeerTimeoutError after ~timeout_s, no hang.

    Rank 1 joins the barrier late (after the others gave up), so that every posted request
    completes and the test ends cleanly.
    """
    timeout_s = 1.0
    outer = comm.Dup()
    c = Communicator(outer, timeout_s=timeout_s)
    with collective_check(comm):
        if comm.rank == 1:
            time.sleep(3 * timeout_s + 1.0)
            c.comm.Ibarrier().Wait()  # completes the others' abandoned barrier
        else:
            start = time.monotonic()
            with pytest.raises(PeerTimeoutError) as info:
                c.barrier("moe-probe-phase")
            elapsed = time.monotonic() - start
            assert isinstance(info.value, TimeoutError)
            msg = str(info.value)
            assert f"rank {comm.rank}" in msg and "moe-probe-phase" in msg
            assert timeout_s * 0.9 <= elapsed < timeout_s + 2.5, elapsed
    comm.Barrier()
    c.free()
    outer.Free()


@pytest.mark.mpi(min_size=2)
def test_wait_completes_late_request_within_timeout(comm: MPI.Comm) -> None:
    """A peer that is late but within the timeout is not an error."""
    c = Communicator(comm, timeout_s=20.0)
    with collective_check(comm):
        if comm.rank == 1:
            time.sleep(0.5)
        c.wait(c.comm.Ibarrier(), "late but fine")
    c.free()
