"""Rank masking in low-latency mode (issue 11): ``Buffer(enable_shrink=True)``.

A rank masked by the caller, or one that stops answering, drops out: low-latency dispatch and
combine go on among the others with its experts absent, and the results equal the oracle's
for the routing with those experts replaced by -1 (and nothing from the masked source).
The mask can be queried, and cleared when every rank takes part again.

Every test runs twice: masked calls through ``mpiep.masked_ll`` (how the reference backend
masks), and through a backend that masks ranks itself, as the GPU kernels do
(``supports_masking``; ``tests/fake_masking_backend.py`` stands in for them on the CPU).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from mpi4py import MPI

import oracle
from conftest import bf16_bits, bf16_tensor, collective_check, gather_arrays, random_bf16
from mpiep.config import get_low_latency_rdma_size_hint
from mpiep.errors import ArgumentMismatchError, PeerTimeoutError
from mpiep.rank_mask import MaskAgreementError

pytestmark = pytest.mark.timeout(180)

HIDDEN, E_LOCAL, TOKENS, MAX_TOKENS, TOPK = 256, 3, 10, 16, 4
TIMEOUT_S = 2.0
GONE = 2  # the rank that is masked or stops answering


class Round:
    """One rank's low-latency inputs, every rank's routing, and the oracle's answers for a
    given set of masked ranks."""

    def __init__(self, comm: MPI.Comm, rng: np.random.Generator) -> None:
        self.comm = comm
        self.num_experts = E_LOCAL * comm.size
        self.idx, self.w = oracle.make_routing(
            rng, TOKENS, TOPK, self.num_experts, comm.size, comm.rank, "holes"
        )
        self.x = random_bf16(rng, TOKENS, HIDDEN)
        self.all_idx = gather_arrays(comm, self.idx)
        self.all_x = gather_arrays(comm, bf16_bits(self.x))

    def without(self, masked: set[int], idx: np.ndarray) -> np.ndarray:
        owner = np.where(idx >= 0, idx // E_LOCAL, -1)
        return np.where(np.isin(owner, list(masked)), -1, idx)

    def want_dispatch(self, masked: set[int]) -> oracle.LowLatencyRecv:
        idx = [
            np.full_like(i, -1) if s in masked else self.without(masked, i)
            for s, i in enumerate(self.all_idx)
        ]
        return oracle.low_latency_dispatch(idx, self.num_experts, self.comm.rank)

    def want_combine(self, masked: set[int]) -> np.ndarray:
        """Expert e returns bf16(x * c[e]) for each row (see ``expert_output``)."""
        c = 0.5 + np.arange(self.num_experts, dtype=np.float32) / self.num_experts
        idx = self.without(masked, self.idx)
        xf = oracle.bf16_to_f32(self.all_x[self.comm.rank])
        rows = oracle.bf16_to_f32(
            oracle.f32_to_bf16(xf[:, None, :] * c[np.maximum(idx, 0)][:, :, None])
        )
        return oracle.low_latency_combine(idx, self.w, rows)

    def expert_output(self, handle: Any) -> torch.Tensor:
        """Row (local expert j, source s, token t) = bf16(x_s[t] * c[e]); never raises."""
        c = 0.5 + np.arange(self.num_experts, dtype=np.float32) / self.num_experts
        rows = self.comm.size * MAX_TOKENS
        y = np.zeros((E_LOCAL, rows, HIDDEN), dtype=np.uint16)
        try:
            layout, src = handle.layout_range.numpy(), handle.src_token_idx.numpy()
            for j in range(E_LOCAL):
                e = self.comm.rank * E_LOCAL + j
                for s in range(self.comm.size):
                    first, n = (int(v) for v in layout[j, s])
                    vals = oracle.bf16_to_f32(self.all_x[s][src[j, first : first + n]])
                    y[j, first : first + n] = oracle.f32_to_bf16(vals * c[e])
        except Exception:
            pass
        return bf16_tensor(y)

    def dispatch(self, buf: Any, **kwargs: Any) -> tuple[Any, ...]:
        return buf.low_latency_dispatch(
            self.x,
            torch.from_numpy(self.idx),
            MAX_TOKENS,
            self.num_experts,
            use_fp8=False,
            **kwargs,
        )

    def combine(self, buf: Any, handle: Any) -> torch.Tensor:
        y = self.expert_output(handle)
        out, _, _ = buf.low_latency_combine(
            y, torch.from_numpy(self.idx), torch.from_numpy(self.w), handle
        )
        return out


def check_dispatch(rnd: Round, masked: set[int], recv_x: Any, count: Any, handle: Any) -> None:
    want = rnd.want_dispatch(masked)
    assert np.array_equal(count.numpy(), want.recv_count), (count, want.recv_count)
    assert np.array_equal(handle.layout_range.numpy(), want.layout_range())
    src, got = handle.src_token_idx.numpy(), bf16_bits(recv_x)
    assert got.shape == (E_LOCAL, rnd.comm.size * MAX_TOKENS, HIDDEN)
    for j in range(E_LOCAL):
        for s in range(rnd.comm.size):
            first, n = (int(v) for v in handle.layout_range[j, s])
            tokens = src[j, first : first + n].astype(np.int64)
            assert np.array_equal(np.sort(tokens), want.groups[j][s]), (j, s)
            assert np.array_equal(got[j, first : first + n], rnd.all_x[s][tokens]), (j, s)


def check_combine(rnd: Round, masked: set[int], out: torch.Tensor) -> None:
    np.testing.assert_allclose(
        oracle.bf16_to_f32(bf16_bits(out)), rnd.want_combine(masked), rtol=2.0**-8, atol=1e-4
    )


@pytest.fixture(autouse=True, params=["masked_ll", "kernel_masking"])
def masking_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which way masked calls run (see the module docstring)."""
    if request.param == "kernel_masking":
        import mpiep.buffer.api as api
        from fake_masking_backend import FakeMaskingBackend

        real = api.make_backend

        def make(choice: str, settings: Any) -> Any:
            return FakeMaskingBackend(real(choice, settings), settings.comm, settings.device)

        monkeypatch.setattr(api, "make_backend", make)
    return str(request.param)


def shrink_buffer(make_buffer: Callable[..., Any], comm: MPI.Comm, validate: bool = True) -> Any:
    rdma = get_low_latency_rdma_size_hint(MAX_TOKENS, HIDDEN, comm.size, E_LOCAL * comm.size)
    return make_buffer(
        num_nvl_bytes=1 << 20,
        num_rdma_bytes=rdma,
        low_latency_mode=True,
        enable_shrink=True,
        timeout_s=TIMEOUT_S,
        validate=validate,
    )


def _raised(call: Callable[[], Any]) -> BaseException | None:
    try:
        call()
    except Exception as exc:  # judged by the caller
        return exc
    return None


# --------------------------------------------------------------------------- by the caller
@pytest.mark.mpi(min_size=3)
def test_mask_by_the_caller_then_clear(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any]
) -> None:
    rnd = Round(comm, rng)
    buf = shrink_buffer(make_buffer, comm)
    status = torch.zeros(comm.size, dtype=torch.int32)
    with collective_check(comm):
        buf.low_latency_update_mask_buffer(GONE, True)  # every rank, GONE included
        buf.low_latency_query_mask_buffer(status)
        assert status.tolist() == [int(r == GONE) for r in range(comm.size)]
        assert buf.masked_ranks == [GONE]
        if comm.rank == GONE:
            err = _raised(lambda: rnd.dispatch(buf))
            assert isinstance(err, RuntimeError) and "masked" in str(err), repr(err)
        else:
            recv_x, count, handle, _, _ = rnd.dispatch(buf)
            check_dispatch(rnd, {GONE}, recv_x, count, handle)
            check_combine(rnd, {GONE}, rnd.combine(buf, handle))
            zero_copy = buf.get_next_low_latency_combine_buffer(handle)
            zero_copy.copy_(rnd.expert_output(handle))
            out, _, _ = buf.low_latency_combine(
                zero_copy,
                torch.from_numpy(rnd.idx),
                torch.from_numpy(rnd.w),
                handle,
                zero_copy=True,
            )
            check_combine(rnd, {GONE}, out)
        buf.low_latency_clean_mask_buffer()  # every rank again: back to all ranks
        assert buf.masked_ranks == []
        recv_x, count, handle, _, _ = rnd.dispatch(buf)
        check_dispatch(rnd, set(), recv_x, count, handle)
        check_combine(rnd, set(), rnd.combine(buf, handle))


@pytest.mark.mpi(min_size=3)
def test_unmask_one_rank(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any]
) -> None:
    rnd = Round(comm, rng)
    buf = shrink_buffer(make_buffer, comm)
    with collective_check(comm):
        buf.low_latency_update_mask_buffer(GONE, True)
        buf.low_latency_update_mask_buffer(GONE, False)  # GONE takes part: it rejoins
        recv_x, count, handle, _, _ = rnd.dispatch(buf)
        check_dispatch(rnd, set(), recv_x, count, handle)
        check_combine(rnd, set(), rnd.combine(buf, handle))


@pytest.mark.mpi(min_size=3)
def test_handle_from_before_an_unmask_is_refused(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any]
) -> None:
    """A dispatch while GONE was masked cannot be combined once GONE is back (it has none of
    its rows): ValueError on those ranks, ArgumentMismatchError on GONE."""
    rnd = Round(comm, rng)
    buf = shrink_buffer(make_buffer, comm)
    with collective_check(comm):
        handle = rnd.dispatch(buf)[2]  # every rank: a handle of all ranks
        buf.low_latency_update_mask_buffer(GONE, True)
        if comm.rank != GONE:
            handle = rnd.dispatch(buf)[2]  # without GONE
        buf.low_latency_update_mask_buffer(GONE, False)
        err = _raised(lambda: rnd.combine(buf, handle))
        if comm.rank == GONE:
            assert isinstance(err, ArgumentMismatchError), repr(err)
        else:
            assert isinstance(err, ValueError) and "masked" in str(err), repr(err)


@pytest.mark.mpi(min_size=3)
def test_conflicting_updates_change_nothing(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any]
) -> None:
    """Ranks ask for different masks: the ones that cannot agree raise, nothing changes."""
    buf = shrink_buffer(make_buffer, comm)
    target = 1 if comm.rank == 0 else comm.size - 1
    with collective_check(comm):
        err = _raised(lambda: buf.low_latency_update_mask_buffer(target, True))
        if comm.rank not in (1, comm.size - 1):  # the two masked ranks only record it
            assert isinstance(err, MaskAgreementError), repr(err)
            assert "could not agree" in str(err) and buf.masked_ranks == [], str(err)


# --------------------------------------------------------------------------- timeouts
def _stop_answering(comm: MPI.Comm, seconds: float) -> None:
    """What a hung rank looks like to its peers: it never calls again (here: for a while)."""
    time.sleep(seconds)


@pytest.mark.mpi(min_size=3)
@pytest.mark.parametrize(
    ("hook", "validate"), [(False, True), (True, True), (False, False)], ids=["sync", "hook", "raw"]
)
def test_rank_that_stops_answering_in_dispatch_is_masked(
    comm: MPI.Comm,
    rng: np.random.Generator,
    make_buffer: Callable[..., Any],
    hook: bool,
    validate: bool,
) -> None:
    """GONE skips the dispatch: the others time out (in the argument agreement, or without
    validation in the data exchange), find it silent, mask it, and their dispatch returns
    what the oracle says without it; later rounds go on without it."""
    rnd, rnd2 = Round(comm, rng), Round(comm, rng)
    buf = shrink_buffer(make_buffer, comm, validate)
    with collective_check(comm):
        if comm.rank == GONE:
            _stop_answering(comm, 0.0)
        else:
            start = time.monotonic()
            recv_x, count, handle, _, receive = rnd.dispatch(buf, return_recv_hook=hook)
            if receive is not None:
                receive()
            elapsed = time.monotonic() - start
            assert buf.masked_ranks == [GONE], buf.masked_ranks
            assert elapsed < 2 * TIMEOUT_S + 3.0, elapsed  # the timeout, the probe, the rerun
            check_dispatch(rnd, {GONE}, recv_x, count, handle)
            check_combine(rnd, {GONE}, rnd.combine(buf, handle))
            recv_x, count, handle, _, _ = rnd2.dispatch(buf)
            check_dispatch(rnd2, {GONE}, recv_x, count, handle)
            check_combine(rnd2, {GONE}, rnd2.combine(buf, handle))
            err = _raised(lambda: buf.get_dispatch_layout(torch.from_numpy(rnd.idx), 6))
            assert isinstance(err, RuntimeError) and "normal mode" in str(err), repr(err)


@pytest.mark.mpi(min_size=3)
def test_rank_that_stops_answering_in_combine_is_masked(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any]
) -> None:
    """GONE dispatches, then skips the combine: the others' combine leaves its experts out."""
    rnd = Round(comm, rng)
    buf = shrink_buffer(make_buffer, comm)
    with collective_check(comm):
        recv_x, count, handle, _, _ = rnd.dispatch(buf)
        check_dispatch(rnd, set(), recv_x, count, handle)
        if comm.rank != GONE:
            check_combine(rnd, {GONE}, rnd.combine(buf, handle))
            assert buf.masked_ranks == [GONE]


@pytest.mark.mpi(min_size=3)
def test_kernel_masking_gets_each_agreed_mask(
    comm: MPI.Comm, make_buffer: Callable[..., Any], masking_path: str
) -> None:
    """A backend that masks ranks itself is told every agreed mask, on every rank that
    records it (the masked rank too), and masked calls never go through mpiep.masked_ll."""
    if masking_path != "kernel_masking":
        pytest.skip("about the kernel-masking path")
    buf = shrink_buffer(make_buffer, comm)
    others = tuple(r for r in range(comm.size) if r != GONE)
    with collective_check(comm):
        assert buf.backend.enabled and buf.backend.changes == []
        buf.low_latency_update_mask_buffer(GONE, True)
        assert buf.backend.changes == [others], buf.backend.changes
        assert buf._shrink.mask.backend is None  # no reference backend of the active ranks
        buf.low_latency_clean_mask_buffer()
        assert buf.backend.changes == [others, tuple(range(comm.size))], buf.backend.changes


def test_no_masking_without_enable_shrink() -> None:
    from mpiep import Buffer

    buf = Buffer(MPI.COMM_SELF, backend="reference", device="cpu")
    assert buf.masked_ranks == []
    with pytest.raises(RuntimeError, match="enable_shrink"):
        buf.low_latency_update_mask_buffer(0, True)
    buf.destroy()
    assert issubclass(MaskAgreementError, PeerTimeoutError)
