"""Low-latency rounds for the GPU fault tests: inputs, the calls, and checks against the
plain-numpy oracle (tests/oracle.py) with some ranks masked.

``LLRound(..., reach=g)`` routes every rank's token 0 to an expert of rank ``g`` and makes rank
``g`` send a row to every rank, so that when ``g`` withholds any part of a call, every other
rank waits on it (and must time out, or mask it). Expectations are recomputed from every
rank's gathered inputs, never from the code under test: a masked rank's experts are absent
(its slots count as -1) and nothing arrives from it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import agree  # noqa: F401  (re-exported: the fault and masking tests)

import oracle
from mpiep import Buffer, get_low_latency_rdma_size_hint

COMM = MPI.COMM_WORLD
# The fault and masking tests' low-latency shape: max tokens, hidden, top-k, tokens.
M, H, K, T = 64, 2048, 8, 48
TIMEOUT_S = 3.0


def experts() -> int:
    return 8 * COMM.size


def ll_buffer(enable_shrink: bool = False) -> Buffer:
    """A low-latency Buffer of that shape on the CUDA backend with a short peer timeout."""
    heap = get_low_latency_rdma_size_hint(M, H, COMM.size, experts())
    return Buffer(
        COMM,
        num_rdma_bytes=heap,
        low_latency_mode=True,
        backend="cuda",
        timeout_s=TIMEOUT_S,
        validate=False,
        enable_shrink=enable_shrink,
    )


def attempt(fn: Any) -> list[str]:
    """Run ``fn``; its exception (an assertion or an error) as a problem list."""
    try:
        fn()
    except Exception as exc:  # reported collectively by agree()
        return [f"{type(exc).__name__}: {exc}"]
    return []


class LLRound:
    """One low-latency round: this rank's inputs, everyone's routing, the oracle's answers."""

    def __init__(
        self,
        seed: int,
        tokens: int,
        hidden: int,
        topk: int,
        num_experts: int,
        max_tokens: int,
        device: torch.device,
        reach: int | None = None,
    ) -> None:
        R, me = COMM.size, COMM.rank
        self.E, self.EL, self.H, self.M, self.R = (
            num_experts,
            num_experts // R,
            hidden,
            max_tokens,
            R,
        )
        rng = np.random.default_rng(seed * 7919 + me)
        idx, w = oracle.make_routing(rng, tokens, topk, num_experts, R, me, "holes")
        if reach is not None:
            self._route_to(idx, w, 0, reach * self.EL)  # every rank waits on `reach`
            if me == reach:  # and `reach` sends a row to every rank
                for r in range(R):
                    self._route_to(idx, w, r + 1, r * self.EL)
        x = rng.standard_normal((idx.shape[0], hidden)).astype(np.float32)
        x *= rng.uniform(0.1, 4.0, (idx.shape[0], 1)).astype(np.float32)
        self.bits = oracle.f32_to_bf16(x)
        self.idx, self.w = idx, w
        self.all_idx = COMM.allgather(idx)
        self.all_bits = COMM.allgather(self.bits)
        self.factor = (1.0 + 0.01 * np.arange(num_experts)).astype(np.float32)
        self.device = device
        # This rank's experts' factors, on the device once (no host copy inside a graph capture).
        mine = self.factor[me * self.EL : (me + 1) * self.EL]
        self.local_factor = torch.from_numpy(mine.copy()).to(device)
        self.x = torch.from_numpy(self.bits.view(np.int16).copy()).view(torch.bfloat16).to(device)
        self.topk = torch.from_numpy(idx).to(device)
        self.weights = torch.from_numpy(w).to(device)

    @staticmethod
    def _route_to(idx: np.ndarray, w: np.ndarray, t: int, expert: int) -> None:
        """Token t's slot 0 goes to `expert` (unless one of its slots already does)."""
        if t < idx.shape[0] and expert not in idx[t]:
            idx[t, 0] = expert
            w[t, 0] = 0.5

    # -- the calls ------------------------------------------------------------------------
    def dispatch(self, buf: Any, hook: bool = False) -> tuple[Any, ...]:
        recv_x, count, handle, _, receive = buf.low_latency_dispatch(
            self.x, self.topk, self.M, self.E, use_fp8=False, return_recv_hook=hook
        )
        if receive is not None:
            receive()
        return recv_x, count, handle

    def expert_output(self, recv_x: torch.Tensor) -> torch.Tensor:
        """y[e, row] = bf16(x_row * factor[global expert e]), on the device (rows past the
        count are whatever recv_x holds there; combine never reads them)."""
        return (recv_x.float() * self.local_factor[:, None, None]).to(torch.bfloat16)

    def combine(self, buf: Any, recv_x: torch.Tensor, handle: Any, hook: bool = False) -> Any:
        out, _, receive = buf.low_latency_combine(
            self.expert_output(recv_x), self.topk, self.weights, handle, return_recv_hook=hook
        )
        if receive is not None:
            receive()
        return out

    # -- the oracle -------------------------------------------------------------------------
    def without(self, masked: set[int], idx: np.ndarray) -> np.ndarray:
        owner = np.where(idx >= 0, idx // self.EL, -1)
        return np.where(np.isin(owner, sorted(masked)), -1, idx)

    def check_dispatch(
        self, recv_x: torch.Tensor, count: torch.Tensor, handle: Any, masked: set[int]
    ) -> None:
        """Rows of every active source, none of a masked one (any order inside a group)."""
        idx = [
            np.full_like(i, -1) if s in masked else self.without(masked, i)
            for s, i in enumerate(self.all_idx)
        ]
        want = oracle.low_latency_dispatch(idx, self.E, COMM.rank)
        got_count = count.cpu().numpy()
        assert np.array_equal(got_count, want.recv_count), (
            f"recv_count {got_count} != {want.recv_count}"
        )
        layout = handle.layout_range.cpu().numpy()
        assert np.array_equal(layout, want.layout_range()), "layout_range differs"
        src = handle.src_token_idx.cpu().numpy()
        rows = recv_x.view(torch.int16).cpu().numpy().view(np.uint16)
        for j in range(self.EL):
            assert np.all(src[j, got_count[j] :] == -1), f"expert {j}: src_token_idx past count"
            for s in range(self.R):
                first, n = (int(v) for v in layout[j, s])
                tokens = src[j, first : first + n].astype(np.int64)
                assert np.array_equal(np.sort(tokens), want.groups[j][s]), f"expert {j} src {s}"
                assert np.array_equal(rows[j, first : first + n], self.all_bits[s][tokens]), (
                    f"expert {j} source {s}: rows differ"
                )

    def check_combine(self, out: torch.Tensor, masked: set[int]) -> None:
        """Per element within half a BF16 step of the float32 sum over the active experts."""
        idx = self.without(masked, self.idx)
        xf = oracle.bf16_to_f32(self.bits).reshape(self.bits.shape)
        rows = oracle.bf16_to_f32(
            oracle.f32_to_bf16(xf[:, None, :] * self.factor[np.maximum(idx, 0)][:, :, None])
        ).reshape(idx.shape[0], idx.shape[1], self.H)
        want = oracle.low_latency_combine(idx, self.w, rows)
        got = out.float().cpu().numpy()
        assert got.shape == want.shape, f"combine shape {got.shape} != {want.shape}"
        tol = 2.0**-8 * np.abs(want) + 1e-30
        bad = np.argwhere(~(np.abs(got - want) <= tol))
        assert bad.size == 0, (
            f"combine: {len(bad)} elements off, first at {bad[0].tolist()}: "
            f"{got[tuple(bad[0])]} vs {want[tuple(bad[0])]}"
        )

    def full_round(self, buf: Any, masked: set[int], hook: bool = False) -> None:
        """Dispatch and combine, then both checks (call on every active rank)."""
        recv_x, count, handle = self.dispatch(buf, hook)
        out = self.combine(buf, recv_x, handle, hook)
        torch.cuda.synchronize()
        self.check_dispatch(recv_x, count, handle, masked)
        self.check_combine(out, masked)
