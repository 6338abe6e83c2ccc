"""A rendered job really runs under Slurm: sbatch -> srun --mpi=pmix -> mpi4py ranks.

The session fixture uses a reachable Slurm (``sbatch``/``sinfo`` answer) or starts a
one-node one with scripts/slurm_up.sh (root; installs slurm-wlm + munge with apt-get when
missing) and stops it again at the end. Where neither works the tests skip with the reason;
set MPIEP_REQUIRE_SLURM=1 (CI) to make that a failure instead. They run once, never per rank:
under ``mpirun ... pytest --with-mpi`` they skip themselves.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mpiep.slurm.profiles import get_profile
from mpiep.slurm.render import JobSpec, render

ROOT = Path(__file__).resolve().parents[1]
JOB_DEADLINE_S = 150.0
_LAUNCHER_VARS = ("OMPI_", "PMIX_", "PMI_", "ORTE_", "OPAL_", "SLURM_", "HYDRA_", "MPI_LOCAL")
pytestmark = pytest.mark.timeout(1200)  # the first use may apt-get install Slurm


def _world_size() -> int:
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"):
        if os.environ.get(var, "1").isdigit() and int(os.environ.get(var, "1")) > 1:
            return int(os.environ[var])
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized():
        return int(mpi.COMM_WORLD.Get_size())
    return 1


def _unavailable(reason: str) -> None:
    if os.environ.get("MPIEP_REQUIRE_SLURM") == "1":
        pytest.fail(f"Slurm required (MPIEP_REQUIRE_SLURM=1) but {reason}")
    pytest.skip(reason)


def _env(extra: dict[str, str]) -> dict[str, str]:
    keep = ("SLURM_CONF",)  # where the controller is; job/step variables are dropped
    env = {k: v for k, v in os.environ.items() if k in keep or not k.startswith(_LAUNCHER_VARS)}
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "python"), env.get("PYTHONPATH")]))
    return env


def _sinfo_ok(env: dict[str, str]) -> bool:
    if not shutil.which("sbatch") or not shutil.which("sinfo"):
        return False
    try:
        proc = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20, env=env
        )
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0 and bool(re.search(r"idle|mix|alloc", proc.stdout))


@pytest.fixture(scope="session")
def slurm_env() -> Iterator[dict[str, str]]:
    """Environment whose sbatch/squeue reach a Slurm with at least one usable node."""
    if _world_size() > 1:
        pytest.skip("real-Slurm tests run once from plain pytest, not on every MPI rank")
    env = _env({})
    if _sinfo_ok(env):
        yield env
        return
    if os.geteuid() != 0 and not shutil.which("slurmctld"):
        _unavailable("no reachable Slurm, Slurm not installed, and not root to install it")
    state = Path(os.environ.get("MPIEP_SLURM_DIR", "/tmp/mpiep-slurm"))
    try:
        up = subprocess.run(
            ["bash", str(ROOT / "scripts" / "slurm_up.sh")],
            capture_output=True, text=True, timeout=900, env={**env, "MPIEP_SLURM_DIR": str(state)},
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        _unavailable("scripts/slurm_up.sh did not finish within 900 s")
    if up.returncode != 0:
        _unavailable(f"scripts/slurm_up.sh failed ({up.returncode}): {up.stderr.strip()[-400:]}")
    started = _env({"SLURM_CONF": str(state / "slurm.conf"), "MPIEP_SLURM_DIR": str(state)})
    if not _sinfo_ok(started):
        _unavailable("scripts/slurm_up.sh succeeded but sinfo shows no usable node")
    if "already running" in up.stderr:  # someone else's daemons: leave them running
        yield started
        return
    try:
        yield started
    finally:
        subprocess.run(
            ["bash", str(ROOT / "scripts" / "slurm_down.sh")],
            capture_output=True, text=True, timeout=60, env=started,
        )  # fmt: skip


def _wait(job_id: str, env: dict[str, str], deadline_s: float) -> None:
    """Poll squeue until the job has left the queue; scancel and fail at the deadline."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        q = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%T"],
            capture_output=True, text=True, timeout=20, env=env,
        )  # fmt: skip
        if q.returncode == 0 and not q.stdout.strip():
            return
        if q.returncode != 0 and "Invalid job id" in q.stderr:
            return
        time.sleep(1.0)
    subprocess.run(["scancel", job_id], capture_output=True, timeout=20, env=env)
    pytest.fail(f"job {job_id} still queued/running after {deadline_s:.0f} s (cancelled)")


def _job_state(job_id: str, env: dict[str, str]) -> str:
    proc = subprocess.run(
        ["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=20, env=env
    )
    m = re.search(r"JobState=(\S+).*?ExitCode=(\S+)", proc.stdout, re.S)
    return f"{m.group(1)} {m.group(2)}" if m else "unknown"


def _submit(spec: JobSpec, workdir: Path, env: dict[str, str]) -> tuple[str, str, Path]:
    """sbatch the rendered spec from ``workdir``; wait; (job id, main output, log dir)."""
    script = workdir / "job.sbatch"
    script.write_text(render(spec))
    sub = subprocess.run(
        ["sbatch", "--parsable", str(script)],
        capture_output=True, text=True, timeout=60, cwd=workdir, env=env,
    )  # fmt: skip
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip().split(";")[0]
    _wait(job_id, env, JOB_DEADLINE_S)
    out_file = workdir / f"{spec.name}-{job_id}.out"
    for _ in range(20):  # the output file can trail the end of the job slightly
        if out_file.exists():
            break
        time.sleep(0.5)
    main_out = out_file.read_text() if out_file.exists() else ""
    return job_id, main_out, workdir / "mpiep-logs" / job_id


RANKS = 2
HELLO = (
    'python -c "import os; from mpi4py import MPI; c = MPI.COMM_WORLD; '
    'print(f\'rank {c.rank} of {c.size} sl={os.environ[\\"NVSHMEM_IB_SL\\"]} '
    'nvls={os.environ[\\"NVSHMEM_DISABLE_NVLS\\"]} local={os.environ[\\"LOCAL_RANK\\"]}\')"'
)


def test_rendered_job_runs_every_rank(slurm_env: dict[str, str], tmp_path: Path) -> None:
    spec = JobSpec(
        gpus=RANKS,
        gpus_per_node=RANKS,
        mode="normal",
        network=get_profile("isolated-static"),
        gpu_request="none",
        time="5",
        job_name=f"mpiep-test-{uuid.uuid4().hex[:6]}",
        payload=HELLO,
    )
    job_id, main_out, logs = _submit(spec, tmp_path, slurm_env)
    state = _job_state(job_id, slurm_env)
    assert "mpiep: 1 node(s), per-rank logs in mpiep-logs/" in main_out, (state, main_out)
    for rank in range(RANKS):
        line = f"rank {rank} of {RANKS} sl=1 nvls=1 local={rank}"
        assert f"{rank}: {line}" in main_out, (state, main_out)  # srun --label prefix
        log = (logs / f"rank-{rank:05d}.log").read_text()
        assert line in log and f"mpiep: rank {rank} local_rank {rank}" in log
    assert state in ("COMPLETED 0:0", "unknown"), state


def test_bench_payload_under_slurm(slurm_env: dict[str, str], tmp_path: Path) -> None:
    probe = subprocess.run(
        [sys.executable, "-m", "mpiep", "bench", "--help"],
        capture_output=True, text=True, timeout=120, env=slurm_env,
    )  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"`python -m mpiep bench --help` fails here: {probe.stderr.strip()[-200:]}")
    payload = "python -m mpiep bench"
    if "--backend" in probe.stdout:
        payload += " --backend reference"
    if "--quick" in probe.stdout:
        payload += " --quick"
    spec = JobSpec(
        gpus=RANKS,
        gpus_per_node=RANKS,
        gpu_request="none",
        time="5",
        job_name=f"mpiep-bench-{uuid.uuid4().hex[:6]}",
        payload=payload,
    )
    job_id, main_out, logs = _submit(spec, tmp_path, slurm_env)
    state = _job_state(job_id, slurm_env)
    assert state in ("COMPLETED 0:0", "unknown"), (state, main_out[-2000:])
    for rank in range(RANKS):
        assert (logs / f"rank-{rank:05d}.log").exists()
    assert re.search(r"^0: .*\S", main_out, re.M), main_out[-2000:]
