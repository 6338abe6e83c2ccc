"""Defect 3 of issue 11: handles are checked before combine, with a precise error on every rank.

A handle remembers the Buffer that made it, the call (a per-Buffer dispatch count, the same on
every rank), the rank count, and in low-latency mode the dispatched ``topk_idx`` and whether
its receive hook ran. Misuse raises ``ValueError``/``TypeError`` on the rank that made it and
``ArgumentMismatchError`` on the others, before any data moves; the Buffer stays usable.
Also the receive-hook rules (docs/semantics.md), the same on every backend.
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
from mpiep.config import get_low_latency_rdma_size_hint
from mpiep.errors import ArgumentMismatchError

pytestmark = pytest.mark.timeout(120)

BAD = 1
HIDDEN, E_LOCAL, TOKENS, LL_MAX = 256, 4, 6, 8


def _capture(call: Callable[[], Any]) -> BaseException | None:
    try:
        call()
    except Exception as err:  # checked by the callers
        return err
    return None


def _routing(rng: np.random.Generator, comm: MPI.Comm, tokens: int = TOKENS) -> tuple[Any, Any]:
    idx, w = oracle.make_routing(rng, tokens, 2, E_LOCAL * comm.size, comm.size, comm.rank)
    return torch.from_numpy(idx), torch.from_numpy(w)


def _dispatch(buf: Any, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> tuple[Any, ...]:
    num_experts = E_LOCAL * buf.group_size
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, num_experts)
    return buf.dispatch(
        x,
        num_tokens_per_rank=per_rank,
        num_tokens_per_rdma_rank=per_rdma,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=idx,
        topk_weights=w,
    )


def _ll_buffer(make_buffer: Callable[..., Any], comm: MPI.Comm) -> Any:
    hint = get_low_latency_rdma_size_hint(LL_MAX, HIDDEN, comm.size, E_LOCAL * comm.size)
    return make_buffer(num_nvl_bytes=0, num_rdma_bytes=hint, low_latency_mode=True)


def _expect_own_or_mismatch(
    comm: MPI.Comm, err: BaseException | None, bad: bool, words: tuple[str, ...]
) -> None:
    """The rank that misused the handle: its own ValueError/TypeError naming ``words``;
    the others: ArgumentMismatchError naming that rank."""
    if bad:
        assert isinstance(err, (TypeError, ValueError)), repr(err)
        assert not isinstance(err, ArgumentMismatchError), repr(err)
        assert all(w in str(err) for w in words), str(err)
    else:
        assert isinstance(err, ArgumentMismatchError), repr(err)
        assert f"rank {BAD}" in str(err), str(err)


def _ll_works(buf: Any, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> None:
    """The buffer still dispatches and combines (sum of weights for y = ones)."""
    num_experts = E_LOCAL * buf.group_size
    recv_x, _, handle, _, _ = buf.low_latency_dispatch(x, idx, LL_MAX, num_experts, use_fp8=False)
    ones = torch.ones_like(recv_x)
    out, _, _ = buf.low_latency_combine(ones, idx, w, handle)
    want = torch.where(idx >= 0, w, torch.zeros_like(w)).sum(1)
    assert torch.allclose(out[:, 0].float(), want, rtol=1e-2), (out[:, 0], want)


# --------------------------------------------------------------------------- normal mode
@pytest.mark.mpi(min_size=2)
def test_combine_with_handle_of_another_buffer(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any]
) -> None:
    idx, w = _routing(rng, comm)
    x = random_bf16(rng, TOKENS, HIDDEN)
    buf_a, buf_b = make_buffer(), make_buffer()
    with collective_check(comm):
        recv_x, _, _, _, handle_b, _ = _dispatch(buf_b, x, idx, w)
        err = _capture(lambda: buf_a.combine(recv_x, handle_b))
        assert isinstance(err, ValueError), repr(err)
        assert "another Buffer" in str(err), str(err)
        combined, _, _ = buf_b.combine(recv_x, handle_b)  # the right buffer accepts it
        assert combined.shape == x.shape


@pytest.mark.mpi(min_size=2)
def test_combine_with_handles_of_different_dispatches(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any]
) -> None:
    """Rank 1 combines with the handle of the first dispatch, the others with the second's
    (shapes fit on every rank): every rank raises, naming the handle, and nothing moves."""
    idx1, w1 = _routing(rng, comm)
    idx2, w2 = _routing(rng, comm)
    x = random_bf16(rng, TOKENS, HIDDEN)
    buf = make_buffer()
    with collective_check(comm):
        y1, _, _, _, h1, _ = _dispatch(buf, x, idx1, w1)
        y2, _, _, _, h2, _ = _dispatch(buf, x, idx2, w2)
        y, h = (y1, h1) if comm.rank == BAD else (y2, h2)
        err = _capture(lambda: buf.combine(y, h))
        assert isinstance(err, ArgumentMismatchError), repr(err)
        assert "handle" in str(err), str(err)
        combined, _, _ = buf.combine(y1, h1)  # an older handle, on every rank: fine
        want = oracle.layout(idx1.numpy(), E_LOCAL * comm.size, comm.size).is_token_in_rank
        got = combined.float() / x.float()
        np.testing.assert_allclose(got.numpy(), np.repeat(want.sum(1)[:, None], HIDDEN, 1), 2e-2)


@pytest.mark.mpi(min_size=2)
def test_cached_dispatch_with_handles_of_different_dispatches(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any]
) -> None:
    idx1, w1 = _routing(rng, comm)
    idx2, w2 = _routing(rng, comm)
    x = random_bf16(rng, TOKENS, HIDDEN)
    buf = make_buffer()
    with collective_check(comm):
        h1 = _dispatch(buf, x, idx1, w1)[4]
        h2 = _dispatch(buf, x, idx2, w2)[4]
        err = _capture(lambda: buf.dispatch(x, handle=h1 if comm.rank == BAD else h2))
        assert isinstance(err, ArgumentMismatchError), repr(err)
        assert "handle" in str(err), str(err)


@pytest.mark.mpi(min_size=2)
def test_combine_with_a_handle_of_a_destroyed_buffer(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any]
) -> None:
    idx, w = _routing(rng, comm)
    x = random_bf16(rng, TOKENS, HIDDEN)
    old, new = make_buffer(), make_buffer()
    with collective_check(comm):
        recv_x, _, _, _, handle, _ = _dispatch(old, x, idx, w)
        old.destroy()
        err = _capture(lambda: new.combine(recv_x, handle))
        assert isinstance(err, ValueError) and "another Buffer" in str(err), repr(err)


# --------------------------------------------------------------------------- low latency
@pytest.mark.mpi(min_size=2)
def test_ll_combine_with_a_stale_handle(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any]
) -> None:
    """The first dispatch's handle with the second dispatch's topk_idx (same shape): every
    rank raises its own ValueError naming topk_idx."""
    idx1, w1 = _routing(rng, comm)
    idx2, w2 = _routing(rng, comm)
    x = random_bf16(rng, TOKENS, HIDDEN)
    buf = _ll_buffer(make_buffer, comm)
    num_experts = E_LOCAL * comm.size
    with collective_check(comm):
        recv1, _, h1, _, _ = buf.low_latency_dispatch(x, idx1, LL_MAX, num_experts, use_fp8=False)
        buf.low_latency_dispatch(x, idx2, LL_MAX, num_experts, use_fp8=False)
        err = _capture(lambda: buf.low_latency_combine(recv1, idx2, w2, h1))
        assert isinstance(err, ValueError), repr(err)
        assert not isinstance(err, ArgumentMismatchError), repr(err)
        assert "topk_idx" in str(err), str(err)
        _ll_works(buf, x, idx1, w1)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("how", ["other-tensor", "changed-in-place", "other-shape"])
def test_ll_combine_with_other_topk_idx_on_one_rank(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any], how: str
) -> None:
    idx, w = _routing(rng, comm)
    x = random_bf16(rng, TOKENS, HIDDEN)
    buf = _ll_buffer(make_buffer, comm)
    num_experts = E_LOCAL * comm.size
    with collective_check(comm):
        recv_x, _, handle, _, _ = buf.low_latency_dispatch(
            x, idx, LL_MAX, num_experts, use_fp8=False
        )
        combine_idx, combine_w = idx, w
        if comm.rank == BAD:
            if how == "other-tensor":
                combine_idx = idx.clone()
                combine_idx[0, 0] = (int(idx[0, 0]) + 1) % num_experts
            elif how == "changed-in-place":
                idx[0, 0] = (int(idx[0, 0]) + 1) % num_experts
            else:
                combine_idx, combine_w = idx[:-1].contiguous(), w[:-1].contiguous()
        err = _capture(lambda: buf.low_latency_combine(recv_x, combine_idx, combine_w, handle))
        _expect_own_or_mismatch(comm, err, comm.rank == BAD, ("topk_idx",))
        good_idx, good_w = _routing(rng, comm)
        _ll_works(buf, x, good_idx, good_w)


@pytest.mark.mpi(min_size=2)
def test_ll_combine_with_an_equal_copy_of_topk_idx(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any]
) -> None:
    """A different tensor with the dispatched values is accepted."""
    idx, w = _routing(rng, comm)
    x = random_bf16(rng, TOKENS, HIDDEN)
    buf = _ll_buffer(make_buffer, comm)
    num_experts = E_LOCAL * comm.size
    with collective_check(comm):
        recv_x, _, handle, _, _ = buf.low_latency_dispatch(
            x, idx, LL_MAX, num_experts, use_fp8=False
        )
        out, _, _ = buf.low_latency_combine(torch.ones_like(recv_x), idx.clone(), w, handle)
        want = torch.where(idx >= 0, w, torch.zeros_like(w)).sum(1)
        assert torch.allclose(out[:, 0].float(), want, rtol=1e-2)


@pytest.mark.mpi(min_size=2)
def test_ll_combine_with_handle_of_another_buffer(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any]
) -> None:
    idx, w = _routing(rng, comm)
    x = random_bf16(rng, TOKENS, HIDDEN)
    buf_a, buf_b = _ll_buffer(make_buffer, comm), _ll_buffer(make_buffer, comm)
    num_experts = E_LOCAL * comm.size
    with collective_check(comm):
        recv_x, _, handle, _, _ = buf_b.low_latency_dispatch(
            x, idx, LL_MAX, num_experts, use_fp8=False
        )
        err = _capture(lambda: buf_a.low_latency_combine(recv_x, idx, w, handle))
        assert isinstance(err, ValueError) and "another Buffer" in str(err), repr(err)
        err = _capture(lambda: buf_a.get_next_low_latency_combine_buffer(handle))
        assert isinstance(err, ValueError) and "another Buffer" in str(err), repr(err)
        _ll_works(buf_a, x, idx, w)


@pytest.mark.mpi(min_size=2)
def test_ll_combine_with_handles_of_different_dispatches(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any]
) -> None:
    """Each rank passes a consistent (handle, topk_idx) pair, but rank 1 that of the first
    dispatch: every rank raises ArgumentMismatchError naming the handle."""
    idx1, w1 = _routing(rng, comm)
    idx2, w2 = _routing(rng, comm)
    x = random_bf16(rng, TOKENS, HIDDEN)
    buf = _ll_buffer(make_buffer, comm)
    num_experts = E_LOCAL * comm.size
    with collective_check(comm):
        r1, _, h1, _, _ = buf.low_latency_dispatch(x, idx1, LL_MAX, num_experts, use_fp8=False)
        r2, _, h2, _, _ = buf.low_latency_dispatch(x, idx2, LL_MAX, num_experts, use_fp8=False)
        args = (r1, idx1, w1, h1) if comm.rank == BAD else (r2, idx2, w2, h2)
        err = _capture(lambda: buf.low_latency_combine(*args))
        assert isinstance(err, ArgumentMismatchError), repr(err)
        assert "handle" in str(err), str(err)


@pytest.mark.mpi(min_size=2)
def test_ll_combine_before_the_receive_hook(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any]
) -> None:
    idx, w = _routing(rng, comm)
    x = random_bf16(rng, TOKENS, HIDDEN)
    buf = _ll_buffer(make_buffer, comm)
    num_experts = E_LOCAL * comm.size
    with collective_check(comm):
        recv_x, _, handle, _, hook = buf.low_latency_dispatch(
            x, idx, LL_MAX, num_experts, use_fp8=False, return_recv_hook=True
        )
        err = _capture(lambda: buf.low_latency_combine(recv_x, idx, w, handle))
        assert isinstance(err, ValueError) and "hook" in str(err), repr(err)
        hook()
        out, _, _ = buf.low_latency_combine(torch.ones_like(recv_x), idx, w, handle)
        want = torch.where(idx >= 0, w, torch.zeros_like(w)).sum(1)
        assert torch.allclose(out[:, 0].float(), want, rtol=1e-2)


# --------------------------------------------------------------------------- hook rules
@pytest.mark.mpi(min_size=2)
def test_hook_rules(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any]
) -> None:
    """A hook runs once; a third send while two of its kind wait for hooks is refused before
    anything is sent; hooks from before clean_low_latency_buffer are void (docs/semantics.md)."""
    idx, w = _routing(rng, comm)
    x = random_bf16(rng, TOKENS, HIDDEN)
    buf = _ll_buffer(make_buffer, comm)
    num_experts = E_LOCAL * comm.size

    def send() -> Any:
        return buf.low_latency_dispatch(
            x, idx, LL_MAX, num_experts, use_fp8=False, return_recv_hook=True
        )

    with collective_check(comm):
        first, second = send(), send()
        err = _capture(send)
        assert isinstance(err, RuntimeError) and "hook" in str(err), repr(err)
        second[4]()  # the second's hook first: the third send would reuse the first's buffer
        err = _capture(send)
        assert isinstance(err, RuntimeError) and "hook" in str(err), repr(err)
        first[4]()
        err = _capture(first[4])
        assert isinstance(err, RuntimeError) and "already called" in str(err), repr(err)
        third = send()
        buf.clean_low_latency_buffer(LL_MAX, HIDDEN, num_experts)
        err = _capture(third[4])
        assert isinstance(err, RuntimeError) and "clean_low_latency_buffer" in str(err), repr(err)
        _ll_works(buf, x, idx, w)
