"""get_dispatch_layout of the reference backend against the numpy oracle."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from mpi4py import MPI

import oracle
from conftest import collective_check

pytestmark = pytest.mark.timeout(120)

E_LOCAL = 8


def _check_layout(buf: Any, topk_idx: np.ndarray, num_experts: int, want: oracle.Layout) -> None:
    from mpiep import EventOverlap

    per_rank, per_rdma, per_expert, in_rank, event = buf.get_dispatch_layout(
        torch.from_numpy(topk_idx), num_experts
    )
    num_ranks = buf.group_size
    assert per_rank.dtype == torch.int32 and tuple(per_rank.shape) == (num_ranks,)
    assert per_expert.dtype == torch.int32 and tuple(per_expert.shape) == (num_experts,)
    assert in_rank.dtype == torch.bool and tuple(in_rank.shape) == (topk_idx.shape[0], num_ranks)
    assert isinstance(event, EventOverlap)
    assert np.array_equal(per_rank.numpy(), want.num_tokens_per_rank)
    assert np.array_equal(per_expert.numpy(), want.num_tokens_per_expert)
    assert np.array_equal(in_rank.numpy(), want.is_token_in_rank)
    if want.num_tokens_per_rdma_rank is None:
        assert per_rdma is None
    else:
        assert per_rdma is not None and per_rdma.dtype == torch.int32
        assert np.array_equal(per_rdma.numpy(), want.num_tokens_per_rdma_rank)


def test_oracle_layout_by_hand() -> None:
    """The oracle on a hand-made case: 2 ranks x 2 experts, 4 tokens, top-2."""
    idx = np.array([[0, 1], [2, -1], [1, 3], [-1, -1]], dtype=np.int64)
    got = oracle.layout(idx, num_experts=4, num_ranks=2)
    assert got.num_tokens_per_rank.tolist() == [2, 2]
    assert got.num_tokens_per_expert.tolist() == [1, 2, 1, 1]
    assert got.is_token_in_rank.tolist() == [[1, 0], [0, 1], [1, 1], [0, 0]]
    assert got.num_tokens_per_rdma_rank is None
    nodes = oracle.layout(idx, num_experts=4, num_ranks=2, ranks_per_node=1)
    assert nodes.num_tokens_per_rdma_rank is not None
    assert nodes.num_tokens_per_rdma_rank.tolist() == [2, 2]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("pattern", oracle.ROUTING_PATTERNS)
@pytest.mark.parametrize("num_topk", [1, 4, 8])
def test_layout_patterns(
    comm: MPI.Comm,
    rng: np.random.Generator,
    make_buffer: Callable[..., Any],
    pattern: str,
    num_topk: int,
) -> None:
    buf = make_buffer()
    num_experts = E_LOCAL * comm.size
    idx, _ = oracle.make_routing(rng, 37, num_topk, num_experts, comm.size, comm.rank, pattern)
    want = oracle.layout(idx, num_experts, comm.size)
    with collective_check(comm):
        assert buf.group_size == comm.size and buf.rank == comm.rank
        _check_layout(buf, idx, num_experts, want)


@pytest.mark.mpi(min_size=2)
def test_layout_rank_counts(
    ep_comm: MPI.Comm | None, rng: np.random.Generator, make_buffer: Callable[..., Any]
) -> None:
    """2, 3 and 4 ranks (sub-communicators of COMM_WORLD)."""
    if ep_comm is None:
        pytest.skip("rank outside the sub-communicator")
    buf = make_buffer(ep_comm)
    num_experts = E_LOCAL * ep_comm.size
    idx, _ = oracle.make_routing(rng, 29, 4, num_experts, ep_comm.size, ep_comm.rank, "holes")
    want = oracle.layout(idx, num_experts, ep_comm.size)
    with collective_check(ep_comm):
        assert buf.group_size == ep_comm.size and buf.rank == ep_comm.rank
        _check_layout(buf, idx, num_experts, want)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("ranks_per_node", [1, 2, 4])
def test_layout_virtual_nodes(
    comm: MPI.Comm,
    rng: np.random.Generator,
    make_buffer: Callable[..., Any],
    ranks_per_node: int,
) -> None:
    """With a ranks_per_node override, num_tokens_per_rdma_rank counts tokens per node."""
    if comm.size % ranks_per_node:
        pytest.skip("ranks_per_node does not divide the rank count")
    buf = make_buffer(ranks_per_node=ranks_per_node)
    num_experts = E_LOCAL * comm.size
    idx, _ = oracle.make_routing(rng, 41, 4, num_experts, comm.size, comm.rank, "holes")
    want = oracle.layout(idx, num_experts, comm.size, ranks_per_node=ranks_per_node)
    with collective_check(comm):
        _check_layout(buf, idx, num_experts, want)


@pytest.mark.mpi(min_size=2)
def test_layout_counts_agree_with_peers(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any]
) -> None:
    """The per-expert counts summed over ranks equal what the owners see in topk_idx."""
    buf = make_buffer()
    num_experts = E_LOCAL * comm.size
    idx, _ = oracle.make_routing(rng, 23, 8, num_experts, comm.size, comm.rank, "random")
    _, _, per_expert, _, _ = buf.get_dispatch_layout(torch.from_numpy(idx), num_experts)
    total = np.zeros(num_experts, np.int64)
    comm.Allreduce(per_expert.numpy().astype(np.int64), total)
    all_idx = comm.allgather(idx)
    with collective_check(comm):
        flat = np.concatenate([i.ravel() for i in all_idx]) + 1
        want = np.bincount(flat, minlength=1 + num_experts)
        assert np.array_equal(total, want[1:])
