"""Defect 7 of issue 11: after a PeerTimeoutError the job ends instead of hanging.

Each case runs ``tests/jobs/timeout_job.py`` under its own ``mpirun -n 2``: rank 1 hangs,
rank 0 times out after 1 s. Without the option the job hangs (in MPI_Finalize, or in the
next collective); with ``abort_on_timeout`` or ``MPIEP_ABORT_ON_TIMEOUT=1`` it exits
nonzero within seconds, and rank 0's error is on stderr.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_once

pytestmark = [
    run_once,
    pytest.mark.timeout(120),
    pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs mpirun"),
]

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "tests" / "jobs" / "timeout_job.py"
QUICK_S = 15.0  # 1 s timeout + 2 s grace + start-up of two Python ranks on a busy machine
HANG_CHECK_S = 12.0  # how long the job without the option must still be running


def _job_env(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment without its own MPI identity (pytest may run as an MPI
    singleton), plus the package path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PMI_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "python"), env.get("PYTHONPATH")]))
    env.pop("MPIEP_ABORT_ON_TIMEOUT", None)
    env.update(extra)
    return env


def _run(mode: str, *flags: str, limit_s: float, env: dict[str, str] | None = None):
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", "2"]
    cmd += [sys.executable, str(JOB), mode, *flags]
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        env=_job_env(env or {}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=limit_s)
        return proc.returncode, time.monotonic() - start, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # mpirun and both ranks
        out, _ = proc.communicate()
        return None, time.monotonic() - start, out


@pytest.mark.parametrize(
    ("mode", "flags", "env"),
    [
        ("option", (), {}),
        ("env", (), {"MPIEP_ABORT_ON_TIMEOUT": "1"}),
        ("option", ("--catch",), {}),
    ],
    ids=["option", "env", "caught-then-blocked"],
)
def test_abort_on_timeout_ends_the_job(mode: str, flags: tuple[str, ...], env: dict) -> None:
    rc, elapsed, out = _run(mode, *flags, limit_s=QUICK_S, env=env)
    assert rc is not None, f"the job still ran after {elapsed:.1f}s:\n{out}"
    assert rc != 0, out
    assert "PeerTimeoutError" in out and "rank 0/2" in out, out
    assert "aborting the job" in out, out
    assert "rank 1: done" not in out, out


def test_without_the_option_the_job_hangs() -> None:
    """The control: what the option is for (the job is killed by the test)."""
    rc, elapsed, out = _run("off", limit_s=HANG_CHECK_S)
    assert rc is None, f"the job ended by itself (rc {rc}) after {elapsed:.1f}s:\n{out}"
    assert "rank 0 caught PeerTimeoutError" in out, out
