"""The GPU low-latency engine's timeout errors, built on the host from what the kernels
recorded (rank, phase, peer, index, seen, expected): what they name, per wait phase."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mpiep.backends.cuda_low_latency import LowLatencyEngine
from mpiep.errors import PeerTimeoutError

ENGINE = SimpleNamespace(comm=SimpleNamespace(size=4), timeout_s=5.0)


def message(phase: int, peer: int = 2) -> str:
    err = LowLatencyEngine._timeout_error(ENGINE, (1, phase, peer, 3, 0, 4))  # type: ignore[arg-type]
    assert isinstance(err, PeerTimeoutError)
    return str(err)


@pytest.mark.parametrize(
    ("phase", "op", "what"),
    [
        (1, "dispatch", "the token count"),
        (2, "dispatch", "token rows"),
        (3, "combine", "expert outputs"),
        (4, "combine", "the start of its combine"),
    ],
)
def test_names_rank_phase_and_peer(phase: int, op: str, what: str) -> None:
    text = message(phase)
    assert text.startswith(f"rank 1/4: low-latency {op} timed out after 5s waiting for {what}")
    assert "from rank 2" in text and text.endswith(
        "clean_low_latency_buffer on every rank to recover"
    )


def test_only_a_combine_waiting_for_rows_names_dropped_pairs() -> None:
    """Without validation a dispatch drops pairs past num_max_dispatch_tokens_per_rank, and
    its combine then waits for their rows until it times out (docs/semantics.md)."""
    assert "dropped (token, slot) pairs past num_max_dispatch_tokens_per_rank" in message(3)
    assert "validate=True" in message(3)
    for phase in (1, 2, 4):
        assert "dropped" not in message(phase)


def test_expert_ranks_when_no_single_peer() -> None:
    assert "from the expert ranks" in message(3, peer=-1)
