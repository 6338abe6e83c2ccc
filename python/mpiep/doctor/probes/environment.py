"""Network variables: those set now, those a job from ``mpiep slurm`` would get, and the
inconsistencies between them."""

from __future__ import annotations

import dataclasses

from mpiep.doctor.report import Report
from mpiep.slurm.profiles import JobNetwork, get_profile

# Variables the report shows when they are set in the current environment.
NETWORK_VAR_PREFIXES = ("NVSHMEM_", "NCCL_IB_", "NCCL_NVLS", "UCX_", "OMPI_MCA_", "MPIEP_")


def check_environment(report: Report, env: dict[str, str], mode: str, profile: str) -> None:
    """Network variables set now, what a job would get, and inconsistencies between them."""
    current = {k: v for k, v in sorted(env.items()) if k.startswith(NETWORK_VAR_PREFIXES)}
    report.environment = current
    net = JobNetwork(profile=get_profile(profile), mode=mode)
    report.job_env = [dataclasses.asdict(v) for v in net.env()]
    in_job = bool(env.get("MPIEP_MODE") or env.get("SLURM_JOB_ID"))
    if env.get("NVSHMEM_DISABLE_NVLS") != "1":
        report.add(
            "fix" if in_job else "info",
            "env",
            "jobs must run with NVSHMEM_DISABLE_NVLS=1 (mpiep does not use NVLink SHARP); "
            "scripts from `mpiep slurm` set it",
        )
    if env.get("NCCL_NVLS_ENABLE") not in (None, "0"):
        report.add("warn", "env", "NCCL_NVLS_ENABLE is on: mpiep jobs run with NCCL_NVLS_ENABLE=0")
    for var in ("NVSHMEM_IB_SL", "NCCL_IB_SL", "UCX_IB_SL"):
        val = env.get(var)
        if val is not None and val != "auto" and not (val.isdigit() and 0 <= int(val) <= 15):
            report.add("fix", "env", f"{var}={val} is not an InfiniBand SL (0..15)")
    mapping_on = env.get("NVSHMEM_ENABLE_NIC_PE_MAPPING", "0")[:1] in ("1", "y", "Y", "t", "T")
    if env.get("NVSHMEM_HCA_LIST") and not mapping_on:
        report.add(
            "fix", "env", "NVSHMEM_HCA_LIST is ignored unless NVSHMEM_ENABLE_NIC_PE_MAPPING=1"
        )
    adaptive = {s for s in env.get("MPIEP_NET_ADAPTIVE_SLS", "").split(",") if s.isdigit()}
    if env.get("MPIEP_MODE") == "normal" and env.get("NVSHMEM_IB_SL") in adaptive:
        report.add(
            "fix",
            "env",
            f"normal mode on adaptively routed SL {env['NVSHMEM_IB_SL']}: "
            "move it to a static SL (see mpiep slurm --list-profiles)",
        )
    sl_ep, sl_other = env.get("NVSHMEM_IB_SL"), env.get("NCCL_IB_SL")
    if (
        sl_ep is not None
        and sl_ep == sl_other
        and env.get("MPIEP_NET_PROFILE", "").startswith("isolated")
    ):
        report.add("warn", "env", f"NVSHMEM and NCCL share SL {sl_ep} under an isolating profile")
