"""The soak loops: every iteration is checked on the device (no host sync); the flags of the
last ``check_every`` iterations are read back and reported together."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from mpi4py import MPI

from mpiep.soak.data import Shape, SoakSet, coefficients, make_set, signature

NUM_SETS = 4  # input sets used in turn: routing changes from one iteration to the next
CHECKS = ("dispatch", "combine")


@dataclass
class Result:
    mode: str
    shape: Shape
    iterations: int = 0
    seconds: float = 0.0
    mismatches: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CHECKS, 0))
    first_bad: list[str] = field(default_factory=list)  # up to 10, "iteration N: what"

    @property
    def ok(self) -> bool:
        return not any(self.mismatches.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "shape": vars(self.shape),
            "iterations": self.iterations,
            "seconds": self.seconds,
            "us_per_iteration": 1e6 * self.seconds / max(self.iterations, 1),
            "mismatches": self.mismatches,
            "first_bad": self.first_bad,
        }


class _Flags:
    """Per-iteration mismatch flags on the device, read every ``check_every`` iterations."""

    def __init__(self, result: Result, check_every: int, device: torch.device) -> None:
        self.result, self.every = result, check_every
        self.flags = torch.zeros(check_every, len(CHECKS), dtype=torch.bool, device=device)
        self.base = 0

    def set(self, i: int, check: str, bad: torch.Tensor) -> None:
        self.flags[i - self.base, CHECKS.index(check)] |= bad

    def flush(self, upto: int) -> None:
        host = self.flags[: upto - self.base].cpu()
        for j, row in enumerate(host.tolist()):
            for check, bad in zip(CHECKS, row, strict=True):
                if bad:
                    self.result.mismatches[check] += 1
                    if len(self.result.first_bad) < 10:
                        self.result.first_bad.append(f"iteration {self.base + j}: {check}")
        self.flags.zero_()
        self.base = upto


def _loop(
    result: Result,
    iterations: int,
    check_every: int,
    device: torch.device,
    step: Any,
    comm: MPI.Comm,
) -> Result:
    flags = _Flags(result, check_every, device)
    comm.Barrier()
    start = time.perf_counter()
    for i in range(iterations):
        step(i, flags)
        if i + 1 - flags.base == check_every or i + 1 == iterations:
            flags.flush(i + 1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    result.seconds = time.perf_counter() - start
    result.iterations = iterations
    return result


def soak_normal(
    comm: MPI.Comm, buf: Any, shape: Shape, iterations: int, check_every: int, inject: int | None
) -> Result:
    device = buf.device
    coeff = coefficients(shape.hidden, device)
    sets = [make_set(comm, s, shape, coeff, device) for s in range(NUM_SETS)]

    def step(i: int, flags: _Flags) -> None:
        s: SoakSet = sets[i % NUM_SETS]
        per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(
            s.topk_idx, shape.experts
        )
        recv_x, _, _, _, handle, _ = buf.dispatch(
            s.x,
            num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=s.topk_idx,
            topk_weights=s.topk_weights,
        )
        if inject == i and recv_x.numel():  # test-only: one flipped bit must be reported
            recv_x.view(torch.int16).view(-1)[0] ^= 1
        if recv_x.shape[0] != s.normal_recv_sig.shape[0]:
            flags.set(i, "dispatch", torch.ones((), dtype=torch.bool, device=device))
            return
        flags.set(i, "dispatch", (signature(recv_x, coeff) != s.normal_recv_sig).any())
        combined, _, _ = buf.combine(recv_x, handle)
        bad = (combined.view(torch.int16) != s.normal_combined.view(torch.int16)).any()
        flags.set(i, "combine", bad)

    return _loop(Result("normal", shape), iterations, check_every, device, step, comm)


def soak_low_latency(
    comm: MPI.Comm, buf: Any, shape: Shape, iterations: int, check_every: int, inject: int | None
) -> Result:
    device = buf.device
    coeff = coefficients(shape.hidden, device)
    sets = [make_set(comm, s, shape, coeff, device) for s in range(NUM_SETS)]
    rows = torch.arange(comm.size * shape.tokens, device=device)

    def step(i: int, flags: _Flags) -> None:
        s: SoakSet = sets[i % NUM_SETS]
        recv_x, count, handle, _, _ = buf.low_latency_dispatch(
            s.x, s.topk_idx, shape.tokens, shape.experts, use_fp8=False
        )
        if inject == i and int(count.sum()):  # test-only: a flipped bit in a received row
            e = int((count > 0).nonzero()[0, 0])
            recv_x[e, 0].view(torch.int16)[0] ^= 1
        valid = rows[None, :] < count[:, None]
        sig = torch.where(valid, signature(recv_x, coeff), 0).sum(1)
        bad = (count != s.ll_recv_count).any() | (sig != s.ll_expert_sig).any()
        flags.set(i, "dispatch", bad)
        combined, _, _ = buf.low_latency_combine(recv_x, s.topk_idx, s.topk_weights, handle)
        bad = (combined.view(torch.int16) != s.ll_combined.view(torch.int16)).any()
        flags.set(i, "combine", bad)

    return _loop(Result("low-latency", shape), iterations, check_every, device, step, comm)
