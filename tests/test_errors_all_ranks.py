"""Defect 4 of issue 11: every rank that rejects its own arguments raises its own error.

Ranks whose arguments were fine raise ``ArgumentMismatchError`` naming every failing rank.
Before the fix only the lowest failing rank kept its ``TypeError``/``CapacityError``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from mpi4py import MPI

import oracle
from conftest import collective_check, random_bf16
from mpiep.comm import Communicator
from mpiep.config import get_low_latency_rdma_size_hint
from mpiep.errors import ArgumentMismatchError, CapacityError

pytestmark = pytest.mark.timeout(120)

HIDDEN, E_LOCAL, TOKENS, LL_MAX = 256, 4, 6, 8


def _capture(call: Callable[[], Any]) -> BaseException | None:
    try:
        call()
    except Exception as err:  # checked by the caller
        return err
    return None


def _bad_ranks(size: int) -> list[int]:
    """Ranks 1.. (every rank but 0) on 2 ranks; ranks 1 and 2 on more."""
    return [1] if size == 2 else [1, 2]


@pytest.mark.mpi(min_size=2)
def test_agree_each_failing_rank_keeps_its_error(comm: MPI.Comm) -> None:
    c = Communicator(comm, timeout_s=30)
    bad = _bad_ranks(comm.size)
    sig = ("__error__", f"TypeError: x on rank {comm.rank}") if comm.rank in bad else ("h", 1)
    with collective_check(comm):
        err = _capture(lambda: c.agree(sig, "dispatch"))
        if comm.rank in bad:
            assert err is None, repr(err)  # the caller raises its own exception
        else:
            assert isinstance(err, ArgumentMismatchError), repr(err)
            for r in bad:
                assert f"rank {r}" in str(err) and f"x on rank {r}" in str(err), str(err)
    c.free()


@pytest.mark.mpi(min_size=2)
def test_same_bad_dtype_on_every_rank(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any]
) -> None:
    """float32 x on every rank: every rank raises TypeError naming x."""
    num_experts = E_LOCAL * comm.size
    idx, w = oracle.make_routing(rng, TOKENS, 2, num_experts, comm.size, comm.rank)
    topk_idx = torch.from_numpy(idx)
    buf = make_buffer()
    with collective_check(comm):
        per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, num_experts)
        x = random_bf16(rng, TOKENS, HIDDEN).float()
        err = _capture(
            lambda: buf.dispatch(
                x,
                num_tokens_per_rank=per_rank,
                num_tokens_per_rdma_rank=per_rdma,
                is_token_in_rank=in_rank,
                num_tokens_per_expert=per_expert,
                topk_idx=topk_idx,
                topk_weights=torch.from_numpy(w),
            )
        )
        assert isinstance(err, TypeError) and "x" in str(err), repr(err)


@pytest.mark.mpi(min_size=2)
def test_several_ranks_over_capacity(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any]
) -> None:
    """Several ranks pass more tokens than the buffer holds: each of them raises
    CapacityError; the others ArgumentMismatchError naming all of them."""
    num_experts = E_LOCAL * comm.size
    bad = _bad_ranks(comm.size)
    tokens = LL_MAX + 1 if comm.rank in bad else LL_MAX
    idx, _ = oracle.make_routing(rng, tokens, 2, num_experts, comm.size, comm.rank)
    x = random_bf16(rng, tokens, HIDDEN)
    hint = get_low_latency_rdma_size_hint(LL_MAX, HIDDEN, comm.size, num_experts)
    buf = make_buffer(num_nvl_bytes=0, num_rdma_bytes=hint, low_latency_mode=True)
    with collective_check(comm):
        err = _capture(
            lambda: buf.low_latency_dispatch(x, torch.from_numpy(idx), LL_MAX, num_experts)
        )
        if comm.rank in bad:
            assert isinstance(err, CapacityError), repr(err)
            assert not isinstance(err, ArgumentMismatchError), repr(err)
        else:
            assert isinstance(err, ArgumentMismatchError), repr(err)
            for r in bad:
                assert f"rank {r}" in str(err), str(err)
