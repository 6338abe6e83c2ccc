"""The test stall switch's host side (``mpiep.stall``): phase names, ``MPIEP_TEST_STALL``,
and that the compiled core uses the same bits (include/mpiep/test_stall.h)."""

from __future__ import annotations

import pytest

from mpiep import stall


def test_names_and_masks() -> None:
    assert stall.parse(None) == 0
    assert stall.parse("") == 0
    assert stall.parse("ll_combine") == stall.PHASES["ll_combine"]
    assert stall.parse("dispatch+combine") == stall.PHASES["dispatch"] | stall.PHASES["combine"]
    assert stall.parse(["ll_dispatch_count", "ll_dispatch_data"]) == 3
    assert stall.parse(4) == 4
    assert stall.LOW_LATENCY & stall.NORMAL == 0
    assert stall.LOW_LATENCY | stall.NORMAL == sum(stall.PHASES.values())


@pytest.mark.parametrize("bad", ["ll_dispach_count", "dispatch+nope", 64, -1])
def test_unknown_phases_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="unknown test stall"):
        stall.parse(bad)  # type: ignore[arg-type]


def test_environment_names_one_rank() -> None:
    env = "1:ll_combine, 2:dispatch+combine,1:ll_dispatch_data"
    assert stall.from_env(0, env) == 0
    assert stall.from_env(1, env) == stall.PHASES["ll_combine"] | stall.PHASES["ll_dispatch_data"]
    assert stall.from_env(2, env) == stall.NORMAL
    assert stall.from_env(3, "") == 0


@pytest.mark.parametrize("bad", ["ll_combine", "one:ll_combine", "1-ll_combine"])
def test_environment_needs_rank_and_phase(bad: str) -> None:
    with pytest.raises(ValueError, match="MPIEP_TEST_STALL"):
        stall.from_env(1, bad)


def test_unset_environment_means_no_stall(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(stall.ENV, raising=False)
    assert stall.from_env(0) == 0
    monkeypatch.setenv(stall.ENV, "0:combine")
    assert stall.from_env(0) == stall.PHASES["combine"]


def test_core_uses_the_same_bits() -> None:
    core = pytest.importorskip("mpiep._C", reason="the compiled core is not built here")
    if not hasattr(core, "TEST_STALL_PHASES"):
        pytest.fail("mpiep._C predates the stall switch: rebuild the core")
    assert dict(core.TEST_STALL_PHASES) == stall.PHASES
