"""Fuzzing (issue 11): random routings, shapes, dtypes and rank counts, every backend that
runs here, compared with the independent numpy oracle in normal and low-latency mode.

Drawn: groups of 1..R ranks of COMM_WORLD in any order; hidden sizes from 128 to 2176; 1-4
experts per rank; top-1..8; 0..24 tokens per rank (0..max in low latency); holes (-1),
duplicate experts in a token, skew towards one rank; BF16, FP8, FP8 with rounded or UE8M0
scales; expert alignment and num_worst_tokens; a few Inf/NaN values in x and in the expert
outputs. ``MPIEP_FUZZ_EXAMPLES`` sets the examples per test (default 100).
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from mpi4py import MPI

from fuzz_checks import check_low_latency, check_normal, normal_recv_all, run_example
from fuzz_inputs import FUZZ_SETTINGS, Example, examples

pytestmark = [pytest.mark.timeout(1800), pytest.mark.usefixtures("same_draws_on_every_rank")]


def _backends() -> list[str]:
    import torch

    from mpiep.backends import cuda

    names = ["reference"]
    if torch.cuda.is_available() and cuda.unavailable_reason(torch.device("cuda", 0)) is None:
        names.append("cuda")
    return names


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("backend", _backends())
def test_fuzz_normal_mode(comm: MPI.Comm, backend: str) -> None:
    @FUZZ_SETTINGS
    @given(ex=examples(comm.size, low_latency=False))
    def one(ex: Example) -> None:
        if any(recv.num_rows == 1 for recv in normal_recv_all(ex)):
            event("a one-row receiver (issue 11 defect 1)")
        run_example(comm, ex, lambda group, e: check_normal(group, e, backend))

    one()


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("backend", _backends())
def test_fuzz_low_latency_mode(comm: MPI.Comm, backend: str) -> None:
    @FUZZ_SETTINGS
    @given(ex=examples(comm.size, low_latency=True, whole_world=backend == "cuda"))
    def one(ex: Example) -> None:
        run_example(comm, ex, lambda group, e: check_low_latency(group, e, backend))

    one()


@pytest.mark.mpi(min_size=2)
def test_every_rank_draws_the_same_examples(comm: MPI.Comm) -> None:
    """The harness's premise, after rank 0 alone imported a local module: Hypothesis mixes
    constants from the source of such modules into its draws (read at its next draw; not
    from test folders, hence a module in a temporary folder)."""
    drawn: list[int] = []

    @FUZZ_SETTINGS
    @given(st.integers(0, 2**31 - 1))
    def one(value: int) -> None:
        drawn.append(value)

    with tempfile.TemporaryDirectory() as folder:
        if comm.rank == 0:
            source = Path(folder) / "odd_constants.py"
            source.write_text("ODD = (987_654_321, 123_456_789, 2_000_000_011, 31_415_926)\n")
            spec = importlib.util.spec_from_file_location("odd_constants", source)
            assert spec is not None and spec.loader is not None
            sys.modules["odd_constants"] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(sys.modules["odd_constants"])
        try:
            one()
        finally:
            sys.modules.pop("odd_constants", None)
    everyone = comm.allgather(drawn)
    assert all(d == everyone[0] for d in everyone), "ranks drew different examples"
