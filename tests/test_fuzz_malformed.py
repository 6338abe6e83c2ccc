"""Fuzzing malformed inputs (issue 11): wrong dtypes, huge or negative expert ids, tensors on
the wrong device, too many tokens, and wrong handles, on any subset of the ranks of a group.

Every rank that passed a bad argument raises its own ``TypeError``/``ValueError``/
``CapacityError`` naming it; every other rank ``ArgumentMismatchError`` naming the bad ranks;
nothing is sent, and the Buffer then completes a correct round. (NaN/Inf values are not
malformed: tests/test_fuzz.py sends them through and checks the documented results.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from mpi4py import MPI

import oracle
from conftest import bf16_tensor
from fuzz_checks import TIMEOUT_S, run_example
from fuzz_inputs import FUZZ_SETTINGS, Example, routing, x_values
from mpiep.errors import ArgumentMismatchError, CapacityError

pytestmark = [pytest.mark.timeout(1800), pytest.mark.usefixtures("same_draws_on_every_rank")]

MAX_TOKENS = 8
# kind -> (low latency?, the error of a bad rank, words its message must hold)
KINDS: dict[str, tuple[bool, type, str]] = {
    "x-float32": (False, TypeError, "x"),
    "topk_idx-int32": (False, TypeError, "topk_idx"),
    "topk_idx-huge": (False, ValueError, "topk_idx"),
    "topk_idx-below-minus-one": (False, ValueError, "topk_idx"),
    "x-on-meta-device": (False, ValueError, "x is on meta"),
    "combine-handle-of-another-buffer": (False, ValueError, "another Buffer"),
    "ll-x-float32": (True, TypeError, "x"),
    "ll-topk_idx-huge": (True, ValueError, "topk_idx"),
    "ll-too-many-tokens": (True, CapacityError, "num_max_dispatch_tokens_per_rank"),
    "ll-topk_idx-on-meta-device": (True, ValueError, "topk_idx is on meta"),
    "ll-combine-other-topk_idx": (True, ValueError, "topk_idx"),
    "ll-combine-handle-of-another-buffer": (True, ValueError, "another Buffer"),
}
HUGE_IDS = (2**31, 2**40, 2**63 - 1)


@dataclass(frozen=True)
class Bad:
    ex: Example
    kind: str
    bad: tuple[bool, ...]  # per group rank
    value: int  # the huge id (or the negative one)


@st.composite
def bad_examples(draw: st.DrawFn, world_size: int) -> Bad:
    n = draw(st.integers(2, world_size))
    members = tuple(draw(st.permutations(range(world_size)))[:n])
    bad = tuple(draw(st.lists(st.booleans(), min_size=n, max_size=n).filter(any)))
    kind = draw(st.sampled_from(sorted(KINDS)))
    e_local = draw(st.integers(1, 3))
    ex = Example(
        seed=draw(st.integers(0, 2**31 - 1)),
        members=members,
        hidden=draw(st.sampled_from((128, 256, 512))),
        e_local=e_local,
        topk=draw(st.integers(1, min(4, e_local * n))),  # distinct experts: only bad args fail
        tokens=tuple(draw(st.integers(1, MAX_TOKENS)) for _ in range(n)),
        max_tokens=MAX_TOKENS,
        p_hole=0.2,
        duplicates=False,
        skew=-1,
        variant="bf16",
    )
    value = draw(st.sampled_from(HUGE_IDS)) if "huge" in kind else -2 - draw(st.integers(0, 9))
    return Bad(ex, kind, bad, value)


def _raised(call: Callable[[], Any]) -> BaseException | None:
    try:
        call()
    except Exception as exc:  # judged by the caller
        return exc
    return None


def _corrupt(b: Bad, idx: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    kind = b.kind.removeprefix("ll-")
    if kind == "x-float32":
        return idx, x.float()
    if kind == "topk_idx-int32":
        return idx.to(torch.int32), x
    if kind in ("topk_idx-huge", "topk_idx-below-minus-one"):
        idx = idx.clone()
        idx[0, 0] = b.value
        return idx, x
    if kind == "x-on-meta-device":
        return idx, torch.empty(x.shape, dtype=x.dtype, device="meta")
    if kind == "topk_idx-on-meta-device":
        return torch.empty(idx.shape, dtype=idx.dtype, device="meta"), x
    if kind == "too-many-tokens":  # rows repeated up to num_max_dispatch_tokens_per_rank + 1
        rows = torch.arange(MAX_TOKENS + 1) % idx.shape[0]
        return idx[rows].contiguous(), x[rows].contiguous()
    return idx, x


def check_bad(group: MPI.Comm, b: Bad) -> list[str]:
    from mpiep import Buffer, get_low_latency_rdma_size_hint

    ex, r = b.ex, group.rank
    low_latency, kind_error, words = KINDS[b.kind]
    idx_np, w_np = routing(ex, r)
    idx, w = torch.from_numpy(idx_np), torch.from_numpy(w_np)
    x = bf16_tensor(oracle.f32_to_bf16(x_values(ex, r)))
    kwargs: dict[str, Any] = {"backend": "reference", "device": "cpu", "timeout_s": TIMEOUT_S}
    if low_latency:
        rdma = get_low_latency_rdma_size_hint(MAX_TOKENS, ex.hidden, group.size, ex.num_experts)
        kwargs.update(num_rdma_bytes=rdma, low_latency_mode=True)
    else:
        kwargs.update(num_nvl_bytes=64 << 20)
    buf, other = Buffer(group, **kwargs), Buffer(group, **kwargs)
    try:
        err = _attempt(b, buf, other, idx, w, x, b.bad[r])
        good = _good_round(buf, ex, idx, w, x, low_latency)
    finally:
        buf.destroy()
        other.destroy()
    problems = [] if good else ["the Buffer did not complete a correct round afterwards"]
    if b.bad[r]:
        if not isinstance(err, kind_error) or isinstance(err, ArgumentMismatchError):
            problems.append(f"{b.kind}: expected {kind_error.__name__}, got {err!r}")
        elif words not in str(err):
            problems.append(f"{b.kind}: the message lacks {words!r}: {err}")
    else:
        if not isinstance(err, ArgumentMismatchError):
            problems.append(f"{b.kind}: expected ArgumentMismatchError, got {err!r}")
        else:
            named = [f"rank {k}" in str(err) for k, bad in enumerate(b.bad) if bad]
            if not all(named):
                problems.append(f"{b.kind}: not every bad rank is named: {err}")
    return problems


def _attempt(
    b: Bad, buf: Any, other: Any, idx: torch.Tensor, w: torch.Tensor, x: torch.Tensor, bad: bool
) -> BaseException | None:
    """The call with this rank's (maybe bad) arguments; every rank makes the same calls."""
    e, kind = b.ex.num_experts, b.kind
    if kind.endswith("handle-of-another-buffer") or kind == "ll-combine-other-topk_idx":
        if kind.startswith("ll-"):
            recv, _, h, _, _ = buf.low_latency_dispatch(x, idx, MAX_TOKENS, e, use_fp8=False)
            _, _, h_other, _, _ = other.low_latency_dispatch(x, idx, MAX_TOKENS, e, use_fp8=False)
            cidx = idx
            if bad and kind == "ll-combine-other-topk_idx":
                cidx = idx.clone()
                cidx[0, 0] = (int(idx[0, 0]) + 1) % e
            handle = h_other if bad and "another" in kind else h
            return _raised(lambda: buf.low_latency_combine(recv, cidx, w, handle))
        recv, _, _, _, h = _layout_dispatch(buf, x, idx, w, e)[:5]
        h_other = _layout_dispatch(other, x, idx, w, e)[4]
        return _raised(lambda: buf.combine(recv, h_other if bad else h))
    if bad:
        idx, x = _corrupt(b, idx, x)
    if kind.startswith("ll-"):
        return _raised(lambda: buf.low_latency_dispatch(x, idx, MAX_TOKENS, e, use_fp8=False))
    if kind.startswith("topk_idx"):
        return _raised(lambda: buf.get_dispatch_layout(idx, e))
    layout = buf.get_dispatch_layout(idx if idx.dtype == torch.int64 else idx.long(), e)
    per_rank, per_rdma, per_expert, in_rank, _ = layout
    return _raised(
        lambda: buf.dispatch(
            x,
            num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=idx,
            topk_weights=w,
        )
    )


def _layout_dispatch(buf: Any, x: Any, idx: torch.Tensor, w: torch.Tensor, e: int) -> tuple:
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, e)
    return buf.dispatch(
        x,
        num_tokens_per_rank=per_rank,
        num_tokens_per_rdma_rank=per_rdma,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=idx,
        topk_weights=w,
    )


def _good_round(
    buf: Any, ex: Example, idx: torch.Tensor, w: torch.Tensor, x: torch.Tensor, low_latency: bool
) -> bool:
    """combine(ones) gives back what the routing alone says (ranks or weights per token)."""
    e = ex.num_experts
    if low_latency:
        recv, _, handle, _, _ = buf.low_latency_dispatch(x, idx, MAX_TOKENS, e, use_fp8=False)
        out, _, _ = buf.low_latency_combine(torch.ones_like(recv), idx, w, handle)
        want = torch.where(idx >= 0, w, torch.zeros_like(w)).sum(1)
        return bool(torch.allclose(out[:, 0].float(), want, rtol=2**-7))
    recv, _, _, _, handle, _ = _layout_dispatch(buf, x, idx, w, e)
    out, _, _ = buf.combine(torch.ones_like(recv), handle)
    owner = torch.where(idx >= 0, idx // ex.e_local, -1)
    ranks = torch.stack([(owner == k).any(1) for k in range(ex.num_ranks)], 1).sum(1)
    return bool(torch.equal(out[:, 0].float(), ranks.float()))


@pytest.mark.mpi(min_size=2)
def test_fuzz_malformed_inputs(comm: MPI.Comm) -> None:
    @FUZZ_SETTINGS
    @given(b=bad_examples(comm.size))
    def one(b: Bad) -> None:
        run_example(comm, b.ex, lambda group, _: check_bad(group, b))

    one()
