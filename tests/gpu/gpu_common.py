"""What the GPU test files share: the marks that run them only where a GPU and the compiled
core are, pass/fail agreed across ranks (an assertion that fails on one rank alone would
leave the others waiting in the next collective), and a plain dispatch's layout arguments."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch")
MPI = pytest.importorskip("mpi4py.MPI")


def core_has(*names: str) -> bool:
    """mpiep._C is built here and has every attribute in ``names`` ("Class.attr" looks into
    a class)."""
    try:
        from mpiep import _C  # type: ignore[attr-defined]
    except ImportError:
        return False
    for name in names:
        obj: Any = _C
        for part in name.split("."):
            if not hasattr(obj, part):
                return False
            obj = getattr(obj, part)
    return True


def gpu_marks(
    min_ranks: int,
    have_core: bool,
    missing: str,
    timeout: int | None = None,
    extra: tuple[Any, ...] = (),
) -> list[Any]:
    """A GPU test module's ``pytestmark``: GPU-marked, run under mpirun on at least
    ``min_ranks`` ranks, skipped without CUDA or without the core ("mpiep._C without
    {missing}"), with an optional timeout and extra marks."""
    marks = [
        pytest.mark.gpu,
        pytest.mark.mpi(min_size=min_ranks),
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        pytest.mark.skipif(not have_core, reason=f"mpiep._C without {missing}"),
        *extra,
    ]
    if timeout is not None:
        marks.append(pytest.mark.timeout(timeout))
    return marks


def agree(problems: list[str]) -> None:
    """Assert on every rank at once that no rank found a problem (none is left waiting)."""
    everyone = MPI.COMM_WORLD.allgather(problems[:4])
    bad = {r: p for r, p in enumerate(everyone) if p}
    assert not bad, bad


def agree_ok(ok: bool, msg: str) -> None:
    """Assert on every rank that every rank passed; failures carry every rank's message."""
    results = MPI.COMM_WORLD.allgather((bool(ok), msg))
    bad = [f"rank {r}: {m}" for r, (o, m) in enumerate(results) if not o]
    assert not bad, "; ".join(bad)


def run_checked(fn: Callable[[], Any]) -> None:
    """Run ``fn`` on every rank and agree on the outcome (with each failure's traceback)."""
    try:
        fn()
        ok, msg = True, ""
    except Exception as exc:  # reported collectively below
        ok, msg = False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"
    agree_ok(ok, msg)


def dispatch_layout(buf: Any, topk_idx: Any, num_experts: int, topk_weights: Any) -> dict:
    """``Buffer.dispatch``'s keyword arguments for a dispatch without a handle: the layout
    from ``buf.get_dispatch_layout`` and the top-k."""
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, num_experts)
    return dict(
        num_tokens_per_rank=per_rank,
        num_tokens_per_rdma_rank=per_rdma,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=topk_idx,
        topk_weights=topk_weights,
    )
