"""NVSHMEM start-up choices (backends/nvshmem_boot.py), without NVSHMEM: the environment
that `mpiep slurm` writes reaches NVSHMEM untouched, and the bootstrap is chosen the same
way on every rank."""

from __future__ import annotations

from typing import Any

import pytest

from mpiep.backends import nvshmem_boot as nb


class FakeComm:
    """allgather over `size` ranks that all report what `reports` says."""

    def __init__(self, reports: list[tuple[bool, str]]) -> None:
        self.reports = reports
        self.calls = 0

    def allgather(self, obj: Any, phase: str) -> list[Any]:
        self.calls += 1
        return list(self.reports)


def test_job_network_settings_reach_nvshmem(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the Slurm profiles export (service level, traffic class, IBGDA, QPs) is kept;
    only what the job left unset gets mpiep's default; NVLS is always off."""
    for var in ("NVSHMEM_IB_ENABLE_IBGDA", "NVSHMEM_IBGDA_NUM_RC_PER_PE", "NVSHMEM_QP_DEPTH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NVSHMEM_IB_SL", "3")
    monkeypatch.setenv("NVSHMEM_IB_TRAFFIC_CLASS", "106")
    monkeypatch.setenv("NVSHMEM_IB_ENABLE_IBGDA", "0")
    monkeypatch.setenv("NVSHMEM_DISABLE_NVLS", "0")
    nb.configure_nvshmem_env(num_qps_per_rank=9)
    import os

    assert os.environ["NVSHMEM_IB_SL"] == "3"
    assert os.environ["NVSHMEM_IB_TRAFFIC_CLASS"] == "106"
    assert os.environ["NVSHMEM_IB_ENABLE_IBGDA"] == "0"  # the job's choice wins
    assert os.environ["NVSHMEM_IBGDA_NUM_RC_PER_PE"] == "9"
    assert os.environ["NVSHMEM_QP_DEPTH"] == "1024"
    assert os.environ["NVSHMEM_DISABLE_NVLS"] == "1"  # never NVLink SHARP on shared hosts


def test_uid_is_the_default_and_asks_nobody(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MPIEP_NVSHMEM_BOOTSTRAP", raising=False)
    comm = FakeComm([(False, "x")])
    assert nb.choose_bootstrap(comm, None) == "uid"  # type: ignore[arg-type]
    assert comm.calls == 0


def test_mpi_when_the_plugin_loads_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nb, "mpi_plugin_loads", lambda: (True, "/x/nvshmem_bootstrap_mpi.so.3"))
    comm = FakeComm([(True, "a"), (True, "b")])
    assert nb.choose_bootstrap(comm, "mpi") == "mpi"  # type: ignore[arg-type]
    assert nb.choose_bootstrap(comm, "auto") == "mpi"  # type: ignore[arg-type]


def test_one_rank_without_the_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    """'auto' falls back to uid on every rank; 'mpi' refuses on every rank, naming the rank."""
    monkeypatch.setattr(nb, "mpi_plugin_loads", lambda: (True, "ok"))
    comm = FakeComm([(True, "ok"), (False, "libmpi.so.40: cannot open shared object file")])
    assert nb.choose_bootstrap(comm, "auto") == "uid"  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match=r"rank 1: libmpi\.so\.40"):
        nb.choose_bootstrap(comm, "mpi")  # type: ignore[arg-type]


def test_env_and_bad_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nb, "mpi_plugin_loads", lambda: (True, "ok"))
    monkeypatch.setenv("MPIEP_NVSHMEM_BOOTSTRAP", "mpi")
    assert nb.choose_bootstrap(FakeComm([(True, "ok")]), None) == "mpi"  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nvshmem_bootstrap"):
        nb.choose_bootstrap(FakeComm([]), "pmix")  # type: ignore[arg-type]


def test_plugin_probe_reports_a_reason() -> None:
    ok, why = nb.mpi_plugin_loads()
    assert isinstance(ok, bool) and why
