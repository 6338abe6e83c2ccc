"""The main job end to end: `mpiep bench` under mpirun, and the CLI's help texts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def run(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    # This process may be an MPI singleton already (conftest imports mpi4py): its
    # OMPI_*/PMIX_* variables would make a child mpirun think it runs inside a job.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PRTE_"))}
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)


def test_help_texts() -> None:
    top = run([sys.executable, "-m", "mpiep", "--help"])
    assert top.returncode == 0
    for command in ("bench", "tune", "slurm", "doctor"):
        assert command in top.stdout
    bench = run([sys.executable, "-m", "mpiep", "bench", "--help"])
    assert bench.returncode == 0 and "--json" in bench.stdout and "NCCL" in bench.stdout


@pytest.mark.timeout(300)
def test_bench_quick_on_two_ranks(tmp_path: Path) -> None:
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("no mpirun")
    out = tmp_path / "bench.json"
    proc = run(
        [
            mpirun,
            "--allow-run-as-root",
            "--oversubscribe",
            "-n",
            "2",
            sys.executable,
            "-m",
            "mpiep",
            "bench",
            "--quick",
            "--backend",
            "reference",
            "--json",
            str(out),
        ],
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "normal dispatch bf16" in proc.stdout and "low-latency combine bf16" in proc.stdout
    result = json.loads(out.read_text())
    assert result["ranks"] == 2
    rows = result["rows"]
    assert len(rows) == 6
    assert all(r["check"] == "ok" for r in rows), [r["check"] for r in rows]
    assert all(r["time"]["median_us"] > 0 and r["logical_gbps"] > 0 for r in rows)
    # CPU runs time a raw MPI Alltoallv of each case's rows alongside (the floor)
    assert all(r["extra"]["floor_us"] > 0 for r in rows), [r["extra"] for r in rows]
    assert "MPI floor" in proc.stdout and "x floor" in proc.stdout


def test_table_units() -> None:
    from mpiep.bench.report import format_gbps, format_time

    assert format_time(12.345) == "12.3 us"
    assert format_time(999.0) == "999 us"
    assert format_time(1234.0) == "1.23 ms"
    assert format_time(168_295.3) == "168 ms"
    assert format_time(1_132_931.6) == "1.13 s"
    assert format_time(0.0) == "-"
    assert format_gbps(0.3) == "0.300"  # two significant figures at least
    assert format_gbps(0.0123) == "0.0123"
    assert format_gbps(42.0) == "42.0"
    assert format_gbps(230.4) == "230"
