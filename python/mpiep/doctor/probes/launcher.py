"""Slurm's tools and PMI plugins, and the launcher this process runs under."""

from __future__ import annotations

import re
import shutil
from typing import Any

from mpiep import network_env as ne
from mpiep.doctor.report import Report


def probe_launcher(report: Report, env: dict[str, str]) -> None:
    """Slurm tools, PMI plugins, and the launcher this process runs under."""
    slurm: dict[str, Any] = {"srun": shutil.which("srun"), "sbatch": shutil.which("sbatch")}
    if slurm["srun"]:
        rc, out = ne.run_cmd(["srun", "--version"], timeout=10)
        slurm["version"] = out.splitlines()[0] if rc == 0 and out else ""
        if rc != 0:
            slurm["version"] = "installed, no configuration reachable"
            report.add(
                "info",
                "slurm",
                "srun finds no slurm.conf (no /etc/slurm/slurm.conf, SLURM_CONF "
                "or DNS SRV record): run where jobs are submitted, or export SLURM_CONF",
            )
        rc, out = ne.run_cmd(["srun", "--mpi=list"], timeout=10)
        plugins = re.findall(r"^\s*(pmix\S*|pmi2|pmi|none|cray_shasta)\s*$", out, re.M)
        versions = re.findall(r"pmix_v\d+", out)
        slurm["mpi_plugins"] = sorted(set(plugins + versions)) if rc == 0 else []
        if rc == 0 and not any(p.startswith("pmix") or p == "pmi2" for p in plugins):
            report.add(
                "warn",
                "slurm",
                "srun has neither PMIx nor PMI-2: use `mpiep slurm --launcher mpirun`",
            )
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        current = "srun"
    elif "OMPI_COMM_WORLD_SIZE" in env:
        current = "mpirun (Open MPI)"
    elif "PMI_RANK" in env or "MPI_LOCALRANKID" in env:
        current = "mpiexec (Hydra)"
    else:
        current = "none"
    report.launcher = {"slurm": slurm, "current": current, "job_id": env.get("SLURM_JOB_ID", "")}
