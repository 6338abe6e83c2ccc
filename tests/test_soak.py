"""``mpiep soak`` under mpirun: clean runs pass, and one flipped bit is found and reported."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_once

pytestmark = [
    run_once,
    pytest.mark.timeout(300),
    pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs mpirun"),
]
ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--tokens", "16", "--hidden", "256", "--experts-per-rank", "4", "--backend", "reference"]


def soak(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PRTE_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "python"), env.get("PYTHONPATH")]))
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", "2"]
    cmd += [sys.executable, "-m", "mpiep", "soak", *SMALL, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)


def test_soak_clean_run(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    proc = soak("--iters", "12", "--check-every", "5", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "soak: OK" in proc.stdout
    result = json.loads(out.read_text())
    assert result["ok"] and result["ranks"] == 2
    for rank in result["ranks_results"]:
        assert [m["mode"] for m in rank] == ["normal", "low-latency"]
        for mode in rank:
            assert mode["iterations"] == 12
            assert mode["mismatches"] == {"dispatch": 0, "combine": 0}


def test_soak_reports_a_corrupted_iteration() -> None:
    proc = soak("--iters", "7", "--check-every", "3", "--inject-fault", "4")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "MISMATCHES" in proc.stdout
    assert "iteration 4: dispatch" in proc.stdout, proc.stdout
    assert "iteration 3" not in proc.stdout and "iteration 5" not in proc.stdout, proc.stdout
