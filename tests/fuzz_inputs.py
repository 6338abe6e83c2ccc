"""What the fuzz tests draw, and how every rank turns a drawn example into its own inputs.

Hypothesis draws only small structural parameters (which ranks take part, shapes, dtypes,
routing knobs, a seed); each rank then makes its tensors with numpy from ``(seed, rank)``.
Under MPI every rank runs the same derandomised Hypothesis search and agrees on pass/fail
after every example, so all ranks draw the same sequence of examples.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from mpi4py import MPI

# More examples: MPIEP_FUZZ_EXAMPLES=500 (the default keeps CI within a few minutes on 2 cores).
FUZZ_EXAMPLES = int(os.environ.get("MPIEP_FUZZ_EXAMPLES", "100"))

# Identical behaviour on every rank: no timing-based health checks or deadlines, no
# example database, no shrinking or explaining (their time limits could differ per rank).
FUZZ_SETTINGS = settings(
    max_examples=FUZZ_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    phases=(Phase.explicit, Phase.generate),
    report_multiple_bugs=False,
    print_blob=False,
)

HIDDEN_SIZES = (128, 256, 384, 640, 1024, 2048 + 128)
LL_VARIANTS = {  # name -> (use_fp8, round_scale, use_ue8m0)
    "bf16": (False, False, False),
    "fp8": (True, False, False),
    "fp8_round": (True, True, False),
    "fp8_ue8m0": (True, True, True),
}


@dataclass(frozen=True)
class Example:
    seed: int
    members: tuple[int, ...]  # world ranks of the group, in group-rank order
    hidden: int
    e_local: int
    topk: int
    tokens: tuple[int, ...]  # per group rank
    max_tokens: int  # low latency: num_max_dispatch_tokens_per_rank
    p_hole: float  # probability that a slot is -1
    duplicates: bool  # a token may name an expert in several slots
    skew: int  # -1, or the group rank whose experts get most slots
    variant: str  # normal: "bf16" | "fp8"; low latency: a key of LL_VARIANTS
    alignment: int = 1
    worst: bool = False  # normal: num_worst_tokens = every token of every rank
    nonfinite: bool = False  # a few Inf/NaN values in x

    @property
    def num_ranks(self) -> int:
        return len(self.members)

    @property
    def num_experts(self) -> int:
        return self.e_local * self.num_ranks


@st.composite
def examples(
    draw: st.DrawFn, world_size: int, low_latency: bool, whole_world: bool = False
) -> Example:
    """``whole_world``: the group is every rank in world order (NVSHMEM runs once per
    process, on the first low-latency Buffer's ranks, so the GPU engine cannot follow
    groups that change from example to example)."""
    if whole_world:
        n, members = world_size, tuple(range(world_size))
    else:
        n = draw(st.integers(1, world_size))
        members = tuple(draw(st.permutations(range(world_size)))[:n])
    max_tokens = draw(st.integers(1, 12)) if low_latency else 0
    cap = max_tokens if low_latency else 24
    tokens = tuple(draw(st.one_of(st.just(0), st.integers(1, cap), st.just(cap))) for _ in range(n))
    variants = list(LL_VARIANTS) if low_latency else ["bf16", "fp8"]
    return Example(
        seed=draw(st.integers(0, 2**31 - 1)),
        members=members,
        hidden=draw(st.sampled_from(HIDDEN_SIZES)),
        e_local=draw(st.integers(1, 4)),
        topk=draw(st.integers(1, 8)),
        tokens=tokens,
        max_tokens=max_tokens,
        p_hole=draw(st.sampled_from((0.0, 0.0, 0.2, 0.7, 1.0))),
        duplicates=draw(st.booleans()),
        skew=draw(st.sampled_from((-1, -1, 0, n - 1))),
        variant=draw(st.sampled_from(variants)),
        alignment=1 if low_latency else draw(st.sampled_from((1, 1, 4, 32))),
        worst=False if low_latency else draw(st.booleans()),
        nonfinite=draw(st.sampled_from((False, False, False, True))),
    )


def rank_rng(ex: Example, world_rank: int, stream: int = 0) -> np.random.Generator:
    return np.random.default_rng([ex.seed, world_rank, stream])


def routing(ex: Example, group_rank: int) -> tuple[np.ndarray, np.ndarray]:
    """``(topk_idx int64 [T, K], topk_weights float32 [T, K])`` of one group rank."""
    rng = rank_rng(ex, ex.members[group_rank], 1)
    t, k, e = ex.tokens[group_rank], ex.topk, ex.num_experts
    if ex.skew >= 0:  # most slots to one rank's experts, the rest anywhere
        first = ex.skew * ex.e_local
        pool = np.where(
            rng.random((t, k)) < 0.8,
            first + rng.integers(0, ex.e_local, (t, k)),
            rng.integers(0, e, (t, k)),
        )
    else:
        pool = rng.integers(0, e, (t, k))
    idx = pool.astype(np.int64)
    if not ex.duplicates:  # distinct experts per token where there are enough
        for row in range(t):
            if k <= e:
                idx[row] = rng.permutation(e)[:k] if ex.skew < 0 else _distinct(idx[row], e)
    idx[rng.random((t, k)) < ex.p_hole] = -1
    weights = rng.uniform(0.1, 1.0, (t, k)).astype(np.float32)
    weights[idx < 0] = 0.0
    return np.ascontiguousarray(idx), np.ascontiguousarray(weights)


def _distinct(row: np.ndarray, num_experts: int) -> np.ndarray:
    """``row`` with repeated experts replaced by the next unused ones (keeps the skew)."""
    seen: set[int] = set()
    out = row.copy()
    for i, e in enumerate(row.tolist()):
        while e in seen:
            e = (e + 1) % num_experts
        seen.add(e)
        out[i] = e
    return out


def x_values(ex: Example, group_rank: int) -> np.ndarray:
    """float32 [T, H] with per-token magnitudes, and with ``nonfinite`` a few Inf/NaN."""
    rng = rank_rng(ex, ex.members[group_rank], 2)
    t = ex.tokens[group_rank]
    x = rng.standard_normal((t, ex.hidden)).astype(np.float32)
    x *= rng.uniform(0.01, 8.0, (t, 1)).astype(np.float32)
    if ex.nonfinite and t:
        for value in (np.inf, -np.inf, np.nan):
            x[rng.integers(0, t), rng.integers(0, ex.hidden)] = value
    return x


def split(world: MPI.Comm, ex: Example) -> MPI.Comm:
    """The example's group (collective on ``world``); COMM_NULL on ranks outside it."""
    inside = world.rank in ex.members
    key = ex.members.index(world.rank) if inside else world.rank
    return world.Split(0 if inside else MPI.UNDEFINED, key)
