"""Rank masking inside the GPU low-latency kernels (issue 11; docs/RELIABILITY.md "On the
GPU"): ``Buffer(enable_shrink=True)`` on the CUDA backend masks ranks in its kernels.

* A rank that stops answering (the test stall switch: it withholds its dispatch counts, its
  dispatch rows or its combine rows, then goes quiet): the others' kernels time out, mask it
  themselves and finish, so the call returns the oracle's result with that rank's experts
  absent, and so do the next ones; the survivors agree (``RankMask.recover``) and clean among
  themselves at the second combine after the failure, and go on.
* A rank masked by the caller: dispatch and combine among the others, the mask query, and
  the clear (every rank back, a correct round).
* The device mask is read by every launch: a CUDA graph captured with every rank active
  replays correctly with a rank masked, and again after it is unmasked.

Expectations come from tests/oracle.py via tests/gpu/ll_rounds.py. Run under mpirun with 3 or
4 ranks (several may share a GPU through CUDA MPS): scripts/gpu_check.sh.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
MPI = pytest.importorskip("mpi4py.MPI")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_calls import ll_combine, ll_dispatch  # noqa: E402
from gpu_common import core_has, gpu_marks  # noqa: E402
from ll_rounds import (  # noqa: E402
    COMM,
    TIMEOUT_S,
    H,
    K,
    LLRound,
    M,
    T,
    agree,
    attempt,
    experts,
    ll_buffer,
)

from mpiep import Buffer, get_low_latency_rdma_size_hint  # noqa: E402

HAVE_CORE = core_has("LowLatencyContext", "LowLatencyContext.set_active")

# Two survivors at least: one alone cannot agree.
pytestmark = gpu_marks(3, HAVE_CORE, "rank masking", timeout=300)


GONE = 1  # the rank that stops answering, or is masked


def new_round(seed: int, buf: Buffer, reach: int | None = None) -> LLRound:
    return LLRound(seed, T, H, K, experts(), M, buf.device, reach=reach)


def device_mask(buf: Buffer) -> list[int]:
    """The kernels' words (1 = active), read back from the device."""
    return list(buf.backend.low_latency.ctx.active)


# --------------------------------------------------------------------------- stops answering
@pytest.mark.parametrize("hook", [False, True], ids=["sync", "hook"])
@pytest.mark.parametrize("phase", ["ll_dispatch_count", "ll_dispatch_data", "ll_combine"])
def test_rank_that_stops_answering_is_masked_by_the_kernels(phase: str, hook: bool) -> None:
    """Round 0 warms up. In round 1 GONE withholds its part of `phase` and goes quiet. The
    survivors' kernels time out, mask GONE and return its absence already in round 1 (and the
    device words show it). Rounds 2 and 3 go on without waiting for it; the host agreement
    runs at the second combine after round 1's (round 3's: every survivor recorded the
    timeout in round 1, and round 1's combine has completed everywhere by then), after which
    GONE is masked on the host too; round 4 is as fast as round 2."""
    me = COMM.rank
    buf = ll_buffer(enable_shrink=True)
    try:
        assert buf.backend.supports_masking
        warm = new_round(31, buf)
        agree(attempt(lambda: warm.full_round(buf, set(), hook)))
        rnd = new_round(32, buf, reach=GONE)
        # Made now on every rank (LLRound gathers over COMM_WORLD, which GONE leaves soon).
        later = [new_round(seed, buf) for seed in (33, 34, 35)]
        if me == GONE:  # it does its part of nothing more after this round
            buf.backend.set_test_stall(phase)
        problems: list[str] = []
        start = time.monotonic()
        recv_x, count, handle = rnd.dispatch(buf, hook)
        torch.cuda.synchronize()
        if phase == "ll_combine":
            problems += attempt(lambda: rnd.check_dispatch(recv_x, count, handle, set()))
            start = time.monotonic()
        if me != GONE or phase == "ll_combine":
            out = rnd.combine(buf, recv_x, handle, hook)
            torch.cuda.synchronize()
        elapsed = time.monotonic() - start
        if me != GONE:
            # Round 1 already returned the survivors' data: the kernels masked GONE.
            if phase != "ll_combine":
                problems += attempt(lambda: rnd.check_dispatch(recv_x, count, handle, {GONE}))
            problems += attempt(lambda: rnd.check_combine(out, {GONE}))
            words = device_mask(buf)
            if words != [int(r != GONE) for r in range(COMM.size)]:
                problems.append(f"device mask {words}: the kernels did not mask rank {GONE}")
            if elapsed > TIMEOUT_S + 1.0:
                problems.append(f"the timed-out call took {elapsed:.2f}s")
            if buf.masked_ranks:
                problems.append(f"agreed before every survivor could know: {buf.masked_ranks}")
            problems += attempt(lambda: survivors_go_on(buf, later, hook))
        # GONE stays away until the survivors are done (the barrier inside agree()).
        agree(problems)
    finally:
        buf.destroy()


def survivors_go_on(buf: Buffer, later: list[LLRound], hook: bool) -> None:
    """On the survivors only (no collective of COMM_WORLD here: GONE is not in them)."""
    times = []
    for i, rnd in enumerate(later):
        t0 = time.monotonic()
        rnd.full_round(buf, {GONE}, hook)
        times.append(time.monotonic() - t0)
        want = [GONE] if i >= 1 else []  # agreed in the combine of round 3 (later[1])
        assert buf.masked_ranks == want, f"round {i + 2}: masked {buf.masked_ranks}, want {want}"
    assert times[0] < TIMEOUT_S and times[2] < TIMEOUT_S, f"rounds waited: {times}"
    # The agreement's probe waits timeout_s for GONE; the rest is quick.
    assert TIMEOUT_S <= times[1] < 2 * TIMEOUT_S + 3.0, f"the agreement round took {times[1]}"
    assert f"masked ranks [{GONE}]" in buf._shrink.last_recovery, buf._shrink.last_recovery
    status = torch.full((COMM.size,), -1, dtype=torch.int32, device=buf.device)
    buf.low_latency_query_mask_buffer(status)
    assert status.tolist() == [int(r == GONE) for r in range(COMM.size)], status.tolist()
    assert device_mask(buf) == [int(r != GONE) for r in range(COMM.size)], device_mask(buf)


# --------------------------------------------------------------------------- by the caller
def test_mask_by_the_caller_query_and_clear() -> None:
    me = COMM.rank
    buf = ll_buffer(enable_shrink=True)
    try:
        rnd = new_round(41, buf, reach=GONE)
        agree(attempt(lambda: rnd.full_round(buf, set())))
        buf.low_latency_update_mask_buffer(GONE, True)  # every rank, GONE included
        problems: list[str] = []
        status = torch.zeros(COMM.size, dtype=torch.int32)
        buf.low_latency_query_mask_buffer(status)
        if status.tolist() != [int(r == GONE) for r in range(COMM.size)]:
            problems.append(f"query: {status.tolist()}")
        if me == GONE:
            err = attempt(lambda: rnd.dispatch(buf))
            if not err or "masked" not in err[0]:
                problems.append(f"a masked rank's call was not refused: {err}")
        else:
            start = time.monotonic()
            problems += attempt(lambda: rnd.full_round(buf, {GONE}))
            problems += attempt(lambda: rnd.full_round(buf, {GONE}, hook=True))
            if time.monotonic() - start > TIMEOUT_S:
                problems.append("the masked round waited on the masked rank")
            if device_mask(buf) != [int(r != GONE) for r in range(COMM.size)]:
                problems.append(f"device mask {device_mask(buf)}")
        agree(problems)
        buf.low_latency_clean_mask_buffer()  # every rank again: all back
        agree([] if buf.masked_ranks == [] else [f"masked after clear: {buf.masked_ranks}"])
        back = new_round(42, buf, reach=GONE)
        agree(attempt(lambda: back.full_round(buf, set())))
        agree(attempt(lambda: back.full_round(buf, set(), hook=True)))
    finally:
        buf.destroy()


# --------------------------------------------------------------------------- CUDA graphs
def test_cuda_graph_follows_the_device_mask() -> None:
    """Captured once with every rank active; replayed with GONE masked (on the others), then
    with every rank back: the launches read the mask words each time."""
    from mpiep.backends.cuda_low_latency import LowLatencyEngine
    from mpiep.comm import Communicator

    me, R, E = COMM.rank, COMM.size, experts()
    full = Communicator(COMM, timeout_s=TIMEOUT_S)
    device = torch.device("cuda", full.select_device(torch.cuda.device_count()))
    torch.cuda.set_device(device)
    heap = get_low_latency_rdma_size_hint(M, H, R, E)
    eng = LowLatencyEngine(full, device, heap, 12, True, TIMEOUT_S)
    eng.enable_masking()
    side = Communicator(COMM.Split(0 if me != GONE else 1, me), timeout_s=TIMEOUT_S)
    rnd = new_round(51, eng, reach=GONE)

    def step():
        d = ll_dispatch(eng, rnd.x, rnd.topk, M, E, False, False, False, None, False)
        out, _ = ll_combine(
            eng, rnd.expert_output(d.recv_x), rnd.topk, rnd.weights, d.handle, False, None, False
        )
        return d, out

    def check(d, out, masked: set[int]) -> None:
        rnd.check_dispatch(d.recv_x, d.recv_count, d.handle, masked)
        rnd.check_combine(out, masked)

    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            step()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        COMM.Barrier()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            d, out = step()
        for masked in (set(), {GONE}, set()):
            mine = [r for r in range(R) if r not in masked]
            eng.set_active(mine, full if not masked else side)  # cleans among the active
            COMM.Barrier()
            problems: list[str] = []
            if me not in masked:
                graph.replay()
                torch.cuda.synchronize()
                eng.check()
                problems = attempt(lambda m=masked: check(d, out, m))
            agree(problems)
        del graph
    finally:
        eng.destroy()
        side.free()
        full.free()
