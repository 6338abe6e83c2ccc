"""Faults of the reference backend (issue 11, defects 1 and 2) and the receive-hook rules.

- Defect 1: a rank that receives exactly one row must not crash (packed fields were viewed
  at unaligned offsets).
- Defect 2: buffers that MPI may still write into stay alive: after a ``PeerTimeoutError``
  (the late peer's data arrives later) and when a low-latency receive hook is dropped. Each
  test allocates numpy arrays filled with a pattern right where freed buffers would be
  reused, lets MPI progress, and checks the pattern.
- Hooks follow the GPU engine's rules: a hook runs once, at most two calls per op may wait
  for their hooks (a further call raises before sending), ``clean_low_latency_buffer``
  completes and voids older hooks.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from mpi4py import MPI

import oracle
from conftest import all_ranks_ok, bf16_bits, collective_check, gather_arrays, random_bf16
from test_dispatch_combine import layout_dispatch
from test_low_latency import (
    MAX_TOKENS,
    LLCase,
    check_ll_dispatch,
    combine_input,
    combine_oracle,
    ll_buffer,
    make_ll_case,
    run_ll_combine,
    run_ll_dispatch,
)

pytestmark = pytest.mark.timeout(180)

TIMEOUT_S = 1.5  # library timeout of the fault tests
LATE_S = 3.5  # how late the late rank is


@pytest.fixture
def pair(comm: MPI.Comm) -> Iterator[MPI.Comm | None]:
    """The first two ranks of COMM_WORLD (None elsewhere)."""
    sub = comm.Split(0 if comm.rank < 2 else MPI.UNDEFINED, comm.rank)
    try:
        yield None if sub == MPI.COMM_NULL else sub
    finally:
        if sub != MPI.COMM_NULL:
            sub.Free()


# --------------------------------------------------------------------------- defect 1
@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("route", ["own", "other"])
def test_one_row_receivers(
    pair: MPI.Comm | None, make_buffer: Callable[..., Any], fp8: bool, route: str
) -> None:
    """Two ranks, E=2, one token each: every rank receives exactly one row (issue 11 #1)."""
    if pair is None:
        pytest.skip("rank outside the pair")
    rank = pair.rank
    hidden = 256 if fp8 else 128
    expert = rank if route == "own" else 1 - rank
    idx = np.array([[expert]], dtype=np.int64)
    w = np.array([[0.75]], dtype=np.float32)
    ones = torch.ones(1, hidden, dtype=torch.bfloat16)
    x: Any = ones
    x_np = {"x": bf16_bits(ones)}
    if fp8:
        q = torch.ones(1, hidden).to(torch.float8_e4m3fn)
        s = torch.full((1, hidden // 128), 0.5, dtype=torch.float32)
        x = (q, s)
        x_np = {"x": q.view(torch.uint8).numpy().copy(), "scales": s.numpy().copy()}
    all_idx, all_w = gather_arrays(pair, idx), gather_arrays(pair, w)
    all_x = pair.allgather(x_np)
    want = oracle.normal_dispatch(all_idx, all_w, 2, rank)
    buf = make_buffer(pair)
    with collective_check(pair):
        recv_x, recv_idx, recv_w, counts, handle, _ = layout_dispatch(buf, x, idx, w, 2)
        y = torch.full((want.num_rows, hidden), 2.0, dtype=torch.bfloat16)
        combined, combined_w, _ = buf.combine(y, handle, topk_weights=recv_w)
        assert want.num_rows == 1
        got_x = recv_x[0] if fp8 else recv_x
        if fp8:
            assert np.array_equal(
                got_x.view(torch.uint8).numpy(), want.rows([d["x"] for d in all_x])
            )
            assert np.array_equal(recv_x[1].numpy(), want.rows([d["scales"] for d in all_x]))
        else:
            assert np.array_equal(bf16_bits(got_x), want.rows([d["x"] for d in all_x]))
        assert np.array_equal(recv_idx.numpy(), want.topk_idx)
        assert want.topk_weights is not None
        assert np.array_equal(recv_w.numpy(), want.topk_weights)
        assert counts == want.num_recv_tokens_per_expert
        assert combined.float().numpy().tolist() == [[2.0] * hidden]
        assert combined_w is not None and combined_w.numpy().tolist() == [[0.75]]


@pytest.mark.mpi(min_size=2)
def test_every_rank_receives_one_row(comm: MPI.Comm, make_buffer: Callable[..., Any]) -> None:
    """All ranks, one expert each, one token each sent to the next rank."""
    num_ranks, rank = comm.size, comm.rank
    idx = np.array([[(rank + 1) % num_ranks]], dtype=np.int64)
    w = np.ones((1, 1), dtype=np.float32)
    x = torch.full((1, 128), float(rank + 1), dtype=torch.bfloat16)
    buf = make_buffer()
    with collective_check(comm):
        recv_x, recv_idx, _, _, handle, _ = layout_dispatch(buf, x, idx, w, num_ranks)
        combined, _, _ = buf.combine(recv_x, handle)
        src = (rank - 1) % num_ranks
        assert recv_x.float().numpy().tolist() == [[float(src + 1)] * 128]
        assert recv_idx.numpy().tolist() == [[0]]
        assert torch.equal(combined, x)


# --------------------------------------------------------------------------- memory checks
class Canaries:
    """numpy arrays of many small sizes filled with a pattern: freed buffers that MPI
    still writes into are likely to be handed out again as one of these."""

    def __init__(self, sizes: list[int], copies: int = 40) -> None:
        self.arrays = [np.full(n, 0xA5, dtype=np.uint8) for n in sizes for _ in range(copies)]

    def intact(self) -> bool:
        return all(bool(np.all(a == 0xA5)) for a in self.arrays)


def progress(group: MPI.Comm, seconds: float) -> None:
    """Let MPI progress (and late messages land) for a while, in step with the peers."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        group.Iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG)
        time.sleep(0.01)
    req = group.Ibarrier()
    end = time.monotonic() + 60
    while not req.Test():
        if time.monotonic() > end:
            raise TimeoutError("peers did not reach the barrier after the fault")
        time.sleep(0.001)


def small_sizes(hidden: int, tokens: int, extra: int = 256) -> list[int]:
    """Byte sizes around those of the library's small send/receive arrays."""
    base = [8, 16, 32, 64, 128, 256, 512]
    return base + [n * (hidden * 2 + k) for n in range(1, tokens + 1) for k in (0, 16, 32, extra)]


# --------------------------------------------------------------------------- defect 2
@pytest.mark.mpi(min_size=2)
def test_late_peer_in_count_phase(pair: MPI.Comm | None, make_buffer: Callable[..., Any]) -> None:
    """Rank 1 arrives late: rank 0 times out, rank 1 then times out in the data phase. The
    late data lands in buffers that are still alive; both Buffers refuse further calls."""
    if pair is None:
        pytest.skip("rank outside the pair")
    from mpiep.errors import PeerTimeoutError

    rank, hidden = pair.rank, 128
    idx = np.array([[0], [1], [1]], dtype=np.int64)
    w = np.ones((3, 1), dtype=np.float32)
    x = torch.ones(3, hidden, dtype=torch.bfloat16)
    buf = make_buffer(pair, validate=False, timeout_s=TIMEOUT_S)
    topk = torch.from_numpy(idx)
    layout = buf.get_dispatch_layout(topk, 2)
    outcome = "returned"
    if rank == 1:
        time.sleep(LATE_S)
    started = time.monotonic()
    try:
        buf.dispatch(
            x,
            num_tokens_per_rank=layout[0],
            num_tokens_per_rdma_rank=layout[1],
            is_token_in_rank=layout[3],
            num_tokens_per_expert=layout[2],
            topk_idx=topk,
            topk_weights=torch.from_numpy(w),
        )
    except PeerTimeoutError as exc:
        outcome = f"timeout: {exc}"
    elapsed = time.monotonic() - started
    gc.collect()
    canaries = Canaries(small_sizes(hidden, 3))
    progress(pair, 1.0)
    refused = ""
    try:
        buf.get_dispatch_layout(topk, 2)
    except RuntimeError as exc:
        refused = str(exc)
    ok = (
        outcome.startswith("timeout")
        and elapsed < TIMEOUT_S + 2.5
        and canaries.intact()
        and "unusable" in refused
        and "timed out" in refused
    )
    assert all_ranks_ok(ok, pair), (rank, outcome, elapsed, refused, canaries.intact())
    phase = "count" if rank == 0 else "data"
    assert phase in outcome, outcome


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("mode", ["normal", "low-latency"])
def test_late_peer_in_data_phase(
    pair: MPI.Comm | None,
    make_buffer: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
) -> None:
    """Rank 1 starts the data exchange late: rank 0 times out in the data phase; rank 1's
    rows arrive afterwards into rank 0's receive buffers, which must still be alive."""
    if pair is None:
        pytest.skip("rank outside the pair")
    from mpiep import Buffer
    from mpiep.backends.reference import exchange
    from mpiep.backends.reference.backend import ReferenceBackend
    from mpiep.errors import PeerTimeoutError

    rank, hidden = pair.rank, 128
    if rank == 1:
        original = ReferenceBackend.exchange

        def late_exchange(self: Any, phase: str) -> Any:
            if "data" in phase:  # rank 1 starts every data exchange late
                time.sleep(LATE_S)
            return original(self, phase)

        monkeypatch.setattr(ReferenceBackend, "exchange", late_exchange)
    idx = np.array([[0], [1], [1], [0]], dtype=np.int64)
    w = np.ones((4, 1), dtype=np.float32)
    x = torch.ones(4, hidden, dtype=torch.bfloat16)
    if mode == "normal":
        buf = make_buffer(pair, validate=False, timeout_s=TIMEOUT_S)
    else:
        rdma = Buffer.get_low_latency_rdma_size_hint(4, hidden, 2, 2)
        buf = make_buffer(
            pair,
            validate=False,
            timeout_s=TIMEOUT_S,
            num_nvl_bytes=0,
            num_rdma_bytes=rdma,
            low_latency_mode=True,
        )
    buried_before = len(exchange.graveyard())
    outcome = "returned"
    try:
        if mode == "normal":
            layout_dispatch(buf, x, idx, w, 2)
        else:
            buf.low_latency_dispatch(x, torch.from_numpy(idx), 4, 2, use_fp8=False)
    except PeerTimeoutError as exc:
        outcome = f"timeout: {exc}"
    gc.collect()
    canaries = Canaries(small_sizes(hidden, 8))
    progress(pair, 1.0)
    buried = len(exchange.graveyard()) - buried_before
    monkeypatch.undo()
    ok = canaries.intact() and (outcome.startswith("timeout") == (rank == 0))
    if rank == 0:
        ok = ok and "data" in outcome and buried == 1
    assert all_ranks_ok(ok, pair), (rank, outcome, buried, canaries.intact())


# --------------------------------------------------------------------------- receive hooks
def _hook_case(comm: MPI.Comm, rng: np.random.Generator, tokens: int = 6, hidden: int = 128) -> Any:
    return make_ll_case(comm, rng, hidden, 2, "random", e_local=2, base_tokens=tokens)


@pytest.mark.mpi(min_size=2)
def test_dropped_hook_keeps_buffers_alive(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any]
) -> None:
    """A dispatch hook dropped uncalled: later calls progress its receive, which must land
    in live memory; the buffer slot stays taken until clean_low_latency_buffer."""
    case = _hook_case(comm, rng)
    buf = ll_buffer(make_buffer, case)
    with collective_check(comm):
        *_, hook = run_ll_dispatch(buf, case, "bf16", return_recv_hook=True)
        del hook
        gc.collect()
        canaries = Canaries(small_sizes(case.hidden, 2 * MAX_TOKENS // 8))
        recv_x, recv_count, handle, _, _ = run_ll_dispatch(buf, case, "bf16")  # other slot
        progress(comm, 0.3)
        intact_after_next_call = canaries.intact()
        # The dropped hook still holds the first slot: a third call is refused before sending.
        with pytest.raises(RuntimeError, match="receive hooks"):
            run_ll_dispatch(buf, case, "bf16")
        buf.clean_low_latency_buffer(MAX_TOKENS, case.hidden, case.num_experts)
        recv_x2, recv_count2, handle2, _, _ = run_ll_dispatch(buf, case, "fp8")
        y = combine_input(case, handle2)
        combined, _, _ = run_ll_combine(buf, case, y, handle2)
        assert intact_after_next_call and canaries.intact()
        check_ll_dispatch(case, "bf16", recv_x, recv_count, handle)
        check_ll_dispatch(case, "fp8", recv_x2, recv_count2, handle2)
        np.testing.assert_allclose(
            combined.float().numpy(), combine_oracle(case), rtol=2.0**-8, atol=1e-4
        )


@pytest.mark.mpi(min_size=2)
def test_hook_rules(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any]
) -> None:
    """Two pending hooks per op at most; a hook runs once; hooks older than a clean are void."""
    case = _hook_case(comm, rng)
    buf = ll_buffer(make_buffer, case)
    with collective_check(comm):
        first = run_ll_dispatch(buf, case, "bf16", return_recv_hook=True)
        second = run_ll_dispatch(buf, case, "fp8", return_recv_hook=True)
        with pytest.raises(RuntimeError, match="receive hooks"):
            run_ll_dispatch(buf, case, "bf16", return_recv_hook=True)
        second[4]()
        first[4]()
        with pytest.raises(RuntimeError, match="already called"):
            first[4]()
        check_ll_dispatch(case, "bf16", *first[:3])
        check_ll_dispatch(case, "fp8", *second[:3])
        # combine hooks: the same rules, counted separately from dispatch
        y = combine_input(case, first[2])
        out1, _, chook1 = run_ll_combine(buf, case, y, first[2], return_recv_hook=True)
        out2, _, chook2 = run_ll_combine(buf, case, y, first[2], return_recv_hook=True)
        with pytest.raises(RuntimeError, match="receive hooks"):
            run_ll_combine(buf, case, y, first[2])
        chook1()
        chook2()
        want = combine_oracle(case)
        for out in (out1, out2):
            np.testing.assert_allclose(out.float().numpy(), want, rtol=2.0**-8, atol=1e-4)
        # a hook from before clean_low_latency_buffer is void
        stale = run_ll_dispatch(buf, case, "bf16", return_recv_hook=True)
        buf.clean_low_latency_buffer(MAX_TOKENS, case.hidden, case.num_experts)
        with pytest.raises(RuntimeError, match="clean_low_latency_buffer"):
            stale[4]()
        again = run_ll_dispatch(buf, case, "bf16")
        check_ll_dispatch(case, "bf16", *again[:3])


@pytest.mark.mpi(min_size=2)
def test_inputs_reusable_once_a_hooked_call_returns(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any]
) -> None:
    """With return_recv_hook the call returns before the receive: overwriting x (dispatch)
    or the expert outputs (combine) before the hook must not change what arrives. Rows of
    7168 go by MPI's rendezvous protocol: read from the sender's memory late."""
    case = _hook_case(comm, rng, tokens=16, hidden=7168)
    buf = ll_buffer(make_buffer, case)
    x_saved = case.x.clone()
    with collective_check(comm):
        recv_x, recv_count, handle, _, hook = run_ll_dispatch(
            buf, case, "bf16", return_recv_hook=True
        )
        case.x.fill_(-7.0)  # the caller reuses its input buffer
        hook()
        case.x.copy_(x_saved)
        y = combine_input(case, handle)
        combined, _, chook = run_ll_combine(buf, case, y, handle, return_recv_hook=True)
        y.fill_(1000.0)  # ... and its expert output buffer
        chook()
        check_ll_dispatch(case, "bf16", recv_x, recv_count, handle)
        np.testing.assert_allclose(
            combined.float().numpy(), combine_oracle(case), rtol=2.0**-8, atol=1e-4
        )


@pytest.mark.mpi(min_size=2)
def test_combine_before_dispatch_hook_is_refused(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any]
) -> None:
    """A handle whose receive hook has not run holds no routing yet: combine refuses it."""
    case = _hook_case(comm, rng)
    buf = ll_buffer(make_buffer, case)
    with collective_check(comm):
        *_, handle, _, hook = run_ll_dispatch(buf, case, "bf16", return_recv_hook=True)
        y = torch.zeros(case.e_local, comm.size * MAX_TOKENS, case.hidden, dtype=torch.bfloat16)
        # Buffer refuses it first, on every rank (handle checks); the backend would too.
        with pytest.raises(ValueError, match="receive hook has not run"):
            run_ll_combine(buf, case, y, handle)
        hook()
        combined, _, _ = run_ll_combine(buf, case, combine_input(case, handle), handle)
        np.testing.assert_allclose(
            combined.float().numpy(), combine_oracle(case), rtol=2.0**-8, atol=1e-4
        )


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("mode", ["bf16", "fp8"])
def test_low_latency_one_row(
    pair: MPI.Comm | None, rng: np.random.Generator, make_buffer: Callable[..., Any], mode: str
) -> None:
    """Low-latency mode with one token and one slot per rank (one-row receives)."""
    if pair is None:
        pytest.skip("rank outside the pair")
    rank = pair.rank
    idx = np.array([[1 - rank]], dtype=np.int64)
    x = random_bf16(rng, 1, 256)
    all_idx = gather_arrays(pair, idx)
    all_x = gather_arrays(pair, bf16_bits(x))
    want = oracle.low_latency_dispatch(all_idx, 2, rank)
    case = LLCase(pair, 256, 2, idx, np.float32([[0.5]]), x, all_x, want)
    buf = ll_buffer(make_buffer, case)
    with collective_check(pair):
        recv_x, recv_count, handle, _, _ = run_ll_dispatch(buf, case, mode)
        combined, _, _ = run_ll_combine(buf, case, combine_input(case, handle), handle)
        check_ll_dispatch(case, mode, recv_x, recv_count, handle)
        np.testing.assert_allclose(
            combined.float().numpy(), combine_oracle(case), rtol=2.0**-8, atol=1e-4
        )


# --------------------------------------------------------------------------- bad input, no hang
@pytest.mark.mpi(min_size=2)
def test_bad_expert_id_without_validation(
    pair: MPI.Comm | None, make_buffer: Callable[..., Any]
) -> None:
    """validate=False skips the argument agreement; an expert id out of range on one rank
    still fails low-latency dispatch on every rank, naming that rank, before data moves."""
    if pair is None:
        pytest.skip("rank outside the pair")
    from mpiep import Buffer

    rdma = Buffer.get_low_latency_rdma_size_hint(4, 128, 2, 4)
    buf = make_buffer(
        pair, validate=False, num_nvl_bytes=0, num_rdma_bytes=rdma, low_latency_mode=True
    )
    idx = torch.tensor([[0], [1]], dtype=torch.int64)
    if pair.rank == 0:
        idx[1, 0] = 4  # E = 4: out of range
    x = torch.ones(2, 128, dtype=torch.bfloat16)
    message = ""
    try:
        buf.low_latency_dispatch(x, idx, 4, 4, use_fp8=False)
    except ValueError as exc:
        message = str(exc)
    assert all_ranks_ok("rank 0" in message and "expert ids" in message, pair), message
    # the Buffer is still usable afterwards
    with collective_check(pair):
        _, count, *_ = buf.low_latency_dispatch(
            x, torch.tensor([[0], [1]], dtype=torch.int64), 4, 4, use_fp8=False
        )
        assert count.tolist() == [2, 2] if pair.rank == 0 else count.tolist() == [0, 0]


@pytest.mark.mpi(min_size=2)
def test_low_latency_expert_overflow(
    pair: MPI.Comm | None, make_buffer: Callable[..., Any]
) -> None:
    """A token naming one expert in every slot can overflow that expert's R * M rows:
    CapacityError on every rank, not corruption."""
    if pair is None:
        pytest.skip("rank outside the pair")
    from mpiep import Buffer
    from mpiep.errors import CapacityError

    rdma = Buffer.get_low_latency_rdma_size_hint(2, 128, 2, 2)
    buf = make_buffer(
        pair, validate=False, num_nvl_bytes=0, num_rdma_bytes=rdma, low_latency_mode=True
    )
    idx = torch.zeros(2, 3, dtype=torch.int64)  # 2 tokens x 3 slots, all expert 0
    x = torch.ones(2, 128, dtype=torch.bfloat16)
    message = ""
    try:
        buf.low_latency_dispatch(x, idx, 2, 2, use_fp8=False)
    except CapacityError as exc:
        message = str(exc)
    assert all_ranks_ok("expert 0" in message, pair), message


@pytest.mark.mpi(min_size=2)
def test_combine_with_handles_of_different_dispatches(
    pair: MPI.Comm | None, make_buffer: Callable[..., Any]
) -> None:
    """Ranks passing handles of different dispatches to combine: a ValueError on every
    rank (the row counts do not match), never a hang or a raw MPI error."""
    if pair is None:
        pytest.skip("rank outside the pair")
    buf = make_buffer(pair, validate=False)
    x = torch.ones(3, 128, dtype=torch.bfloat16)
    w = np.ones((3, 1), dtype=np.float32)
    first = layout_dispatch(buf, x, np.array([[0], [1], [1]]), w, 2)
    second = layout_dispatch(buf, x, np.array([[1], [1], [1]]), w, 2)
    handle = first[4] if pair.rank == 0 else second[4]
    y = torch.ones(handle.num_recv_tokens, 128, dtype=torch.bfloat16)
    message = ""
    try:
        buf.combine(y, handle)
    except ValueError as exc:
        message = str(exc)
    assert all_ranks_ok("different dispatches" in message, pair), message
