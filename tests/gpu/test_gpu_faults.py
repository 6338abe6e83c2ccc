"""GPU kernels under a peer that stops answering (issue 11): the test stall switch
(``mpiep.stall``) makes rank ``STALLER`` withhold its part of one phase, and every other rank
must raise ``PeerTimeoutError`` naming itself and the phase within ``timeout_s + 1 s``.

* Low latency, each phase (dispatch counts, dispatch rows, combine): the error names the
  silent rank too; ``clean_low_latency_buffer`` on every rank recovers, and a correct round
  follows (checked against tests/oracle.py).
* Normal mode, intranode and internode (virtual nodes), dispatch and combine: the ranks that
  timed out refuse every further call of that Buffer at once (``PeerTimeoutError``, "unusable
  now"), as docs/semantics.md says; the ranks then destroy it and a new Buffer gives correct
  results (checked against tests/gpu/normal_checks.py).

Run under mpirun with 2-4 ranks (scripts/gpu_check.sh; ranks may share a GPU through MPS).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
MPI = pytest.importorskip("mpi4py.MPI")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import normal_checks as nc  # noqa: E402
from gpu_common import core_has, dispatch_layout, gpu_marks  # noqa: E402
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

from mpiep import Buffer  # noqa: E402
from mpiep.config import get_internode_rdma_size_hint, get_normal_buffer_size_hint  # noqa: E402
from mpiep.errors import PeerTimeoutError  # noqa: E402

HAVE_CORE = core_has("TEST_STALL_PHASES")

pytestmark = gpu_marks(2, HAVE_CORE, "the stall switch", timeout=240)

STALLER = 1
SLACK_S = 1.0  # the contract: the error comes within timeout_s + 1 s
LL_PHASES = {  # stall phase -> (call, what the message says was awaited)
    "ll_dispatch_count": ("dispatch", "the token count"),
    "ll_dispatch_data": ("dispatch", "token rows"),
    "ll_combine": ("combine", "expert outputs"),
}


def check_timeout(err: BaseException | None, elapsed: float, words: tuple[str, ...]) -> list[str]:
    """What a rank that waited on the staller must have seen."""
    me = COMM.rank
    if not isinstance(err, PeerTimeoutError):
        return [f"expected PeerTimeoutError, got {err!r}"]
    msg, problems = str(err), []
    for word in (f"rank {me}", *words):
        if word not in msg:
            problems.append(f"{word!r} not in: {msg}")
    if elapsed > TIMEOUT_S + SLACK_S:
        problems.append(f"took {elapsed:.2f}s > timeout {TIMEOUT_S}s + {SLACK_S}s")
    return problems


# --------------------------------------------------------------------------- low latency
@pytest.mark.parametrize("phase", list(LL_PHASES))
def test_low_latency_stall_names_rank_and_phase_then_clean_recovers(phase: str) -> None:
    call, awaited = LL_PHASES[phase]
    me = COMM.rank
    buf = ll_buffer()
    try:
        dev = buf.device
        rnd = LLRound(11, T, H, K, experts(), M, dev, reach=STALLER)
        agree(attempt(lambda: rnd.full_round(buf, set())))  # warm: no first-call costs below
        if me == STALLER:
            buf.backend.set_test_stall(phase)
        err: BaseException | None = None
        start = time.monotonic()
        recv_x, _, handle = rnd.dispatch(buf)
        if call == "combine":
            torch.cuda.synchronize()  # the dispatch is complete everywhere
            start = time.monotonic()
            rnd.combine(buf, recv_x, handle)
        torch.cuda.synchronize()  # the others' kernels gave up after timeout_s
        if me != STALLER:
            try:  # the recorded timeout is raised before anything launches
                rnd.dispatch(buf)
            except Exception as exc:  # judged below
                err = exc
        elapsed = time.monotonic() - start
        buf.backend.set_test_stall(0)
        problems = [] if me == STALLER else check_timeout(err, elapsed, (call, awaited))
        if me != STALLER and f"from rank {STALLER}" not in str(err):
            problems.append(f"the silent rank {STALLER} is not named: {err}")
        agree(problems)
        buf.clean_low_latency_buffer(M, H, experts())  # every rank: the documented recovery
        after = LLRound(12, T, H, K, experts(), M, dev)
        agree(attempt(lambda: after.full_round(buf, set())))
        agree(attempt(lambda: after.full_round(buf, set(), hook=True)))
    finally:
        buf.destroy()


# --------------------------------------------------------------------------- normal mode
def layouts() -> list[tuple[str, int | None]]:
    """(mode, ranks per node): one node, and virtual nodes of 2 ranks (1 with 2 ranks)."""
    R = COMM.size
    return [("intranode", None), ("internode", 2 if R % 2 == 0 and R >= 4 else 1)]


def normal_buffer(ranks_per_node: int | None) -> Buffer:
    nvl = get_normal_buffer_size_hint(128, H, COMM.size, K)
    rdma = 0
    if ranks_per_node is not None:
        rdma = get_internode_rdma_size_hint(128, H, COMM.size, ranks_per_node, K)
    return Buffer(
        COMM,
        num_nvl_bytes=nvl,
        num_rdma_bytes=rdma,
        backend="cuda",
        ranks_per_node=ranks_per_node,
        timeout_s=TIMEOUT_S,
        validate=False,
    )


class NormalRound:
    """Normal-mode inputs of this rank, and the two calls."""

    def __init__(self, seed: int, device: torch.device) -> None:
        R, me = COMM.size, COMM.rank
        E = 8 * R
        g = torch.Generator().manual_seed(seed * 131 + me)
        self.E = E
        self.x = torch.randn(T, H, generator=g).to(torch.bfloat16).to(device)
        idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
        if STALLER * (E // R) not in idx[0]:  # every rank sends to, and hears from, the staller
            idx[0, 0] = STALLER * (E // R)
        self.idx = idx.to(device)
        self.w = torch.rand(T, K, generator=g).to(device)

    def dispatch(self, buf: Buffer) -> tuple:
        layout = dispatch_layout(buf, self.idx, self.E, self.w)
        recv_x, _, _, _, handle, _ = buf.dispatch(self.x, **layout)
        return recv_x, handle

    def combine(self, buf: Buffer, recv_x: torch.Tensor, handle) -> torch.Tensor:
        out, _, _ = buf.combine(nc.expert_output(recv_x, None, COMM.rank), handle)
        return out

    def check(self, recv_x: torch.Tensor, out: torch.Tensor) -> None:
        """Dispatch bit-exact; combine within the per-node BF16 roundings (semantics.md)."""
        me, R = COMM.rank, COMM.size
        ins = COMM.allgather((nc.np_bits(self.x), None, nc.np_bits(self.idx), nc.np_bits(self.w)))
        exp = nc.expected_dispatch(ins, me, R, self.E, K, 1)
        assert np.array_equal(nc.np_bits(recv_x), exp["x"]), "recv_x differs"
        in_rank = torch.from_numpy(nc.in_rank_from_inputs(nc.np_bits(self.idx), self.E, R))
        want, mag = nc.expected_combine(self.x, None, in_rank.to(self.x.device), ())
        nc.close_to_sum(out, want, mag, 2.0**-7, "combined x")

    def full_round(self, buf: Buffer) -> None:
        recv_x, handle = self.dispatch(buf)
        out = self.combine(buf, recv_x, handle)
        torch.cuda.synchronize()
        self.check(recv_x, out)


def direct_peer(rank: int, ranks_per_node: int | None) -> bool:
    """Whether `rank`'s kernel waits on the staller at its start barrier (the same node, or
    internode the same local index): those name the staller; others time out further on."""
    if ranks_per_node is None:
        return True
    L = ranks_per_node
    return rank // L == STALLER // L or rank % L == STALLER % L


@pytest.mark.parametrize("layout", range(2), ids=["intranode", "internode"])
@pytest.mark.parametrize("phase", ["dispatch", "combine"])
def test_normal_mode_stall_times_out_then_buffer_refuses(layout: int, phase: str) -> None:
    mode, rpn = layouts()[layout]
    me = COMM.rank
    buf = normal_buffer(rpn)
    dev = buf.device
    try:
        rnd = NormalRound(21, dev)
        agree(attempt(lambda: rnd.full_round(buf)))  # warm, and correct before the fault
        if me == STALLER:
            buf.backend.set_test_stall(phase)
        err: BaseException | None = None
        start = time.monotonic()
        recv_x, handle = rnd.dispatch(buf)
        if phase == "combine":
            torch.cuda.synchronize()
            start = time.monotonic()
            rnd.combine(buf, recv_x, handle)
        torch.cuda.synchronize()  # the others' kernels gave up after timeout_s
        if me != STALLER:
            try:  # the kernel's error record is raised by the next call, before it launches
                rnd.dispatch(buf)
            except Exception as exc:  # judged below
                err = exc
        elapsed = time.monotonic() - start
        problems: list[str] = []
        if me != STALLER:
            # The phase: "<mode> <phase> start barrier" on ranks that wait for the staller to
            # start, or a later wait of the same call ("... receive", "..., forwarder ...").
            problems += check_timeout(err, elapsed, (f"{mode} {phase}", "unusable"))
            if direct_peer(me, rpn) and f"waiting for rank {STALLER}" not in str(err):
                problems.append(f"the silent rank {STALLER} is not named: {err}")
            # Refused from now on, at once: the engine stays unusable.
            again = time.monotonic()
            refused = attempt(lambda: rnd.dispatch(buf))
            if not refused or "PeerTimeoutError" not in refused[0]:
                problems.append(f"a later call was not refused: {refused}")
            if time.monotonic() - again > 0.5:
                problems.append("the refusal waited instead of raising at once")
        agree(problems)
    finally:
        buf.destroy()  # every rank: the documented way out is a new Buffer
    fresh = normal_buffer(rpn)
    try:
        after = NormalRound(22, fresh.device)
        agree(attempt(lambda: after.full_round(fresh)))
    finally:
        fresh.destroy()
