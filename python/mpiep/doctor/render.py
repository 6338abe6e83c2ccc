"""The doctor's report as short human-readable text (``mpiep doctor``)."""

from __future__ import annotations

from mpiep.doctor.report import LEVELS, Report


def format_text(report: Report) -> str:
    """Short human-readable report."""
    h, g, n, r, m, lau = (
        report.host,
        report.gpus,
        report.nvshmem,
        report.rdma,
        report.mpi,
        report.launcher,
    )
    out = [
        f"mpiep doctor on {h['hostname']} ({h['platform']}, Python {h['python']}, "
        f"mpiep {h['mpiep']}, {h['cpus']} CPUs)",
        "",
    ]
    out.append(f"GPUs: {g.get('count', 0)}")
    for d in g.get("devices", []):
        out.append(f"  GPU{d['index']} {d['name']} {d['bus_id']}")
    for p in g.get("pairs", []):
        out.append(f"  {p['pair']}: link {p['link']}, P2P read {p['p2p_read']}")
    pkgs = ", ".join(f"{k} {v}" for k, v in n.get("packages", {}).items()) or "no package"
    out.append(f"NVSHMEM: {pkgs}; lib {n.get('lib_dir') or 'not found'}")
    for lib, state in n.get("libraries", {}).items():
        out.append(f"  {lib}: {state}")
    if n.get("libraries"):
        out.append("  ('loads': the object links here; transports open libibverbs etc. at init)")
    out.append(f"RDMA devices: {len(r.get('devices', []))}")
    for d in r.get("devices", []):
        ports = "; ".join(
            f"port {p['number']} {p['state']} {p['link_layer']} {p['rate']}" for p in d["ports"]
        )
        out.append(f"  {d['name']} (NUMA {d['numa_node']}): {ports or 'no ports'}")
    for gpu, nic in r.get("gpu_nic_map", {}).items():
        out.append(f"  GPU{gpu} -> nearest NIC {nic}")
    out.append(
        f"MPI: mpi4py {m.get('mpi4py', 'missing')}; "
        f"{(m.get('library') or m.get('error') or 'no library').splitlines()[0]}"
    )
    if m.get("mpirun"):
        out.append(f"  {m['mpirun']}: {m.get('mpirun_version', '')}")
    s = lau.get("slurm", {})
    slurm = s.get("version") or ("installed" if s.get("srun") else "not installed")
    out.append(
        f"Launcher: running under {lau.get('current')}; Slurm {slurm}; PMI plugins "
        f"{', '.join(s.get('mpi_plugins', [])) or '-'}"
    )
    out.append("Network variables set now:")
    for k, v in report.environment.items():
        out.append(f"  {k}={v}")
    if not report.environment:
        out.append("  (none)")
    out.append("A job from `mpiep slurm` (default profile, normal mode) would get:")
    out.append("  " + " ".join(f"{v['name']}={v['value']}" for v in report.job_env))
    out.append("")
    order = {level: i for i, level in enumerate(LEVELS)}
    findings = sorted(report.findings, key=lambda f: order.get(f.level, len(LEVELS)))
    out.append("What to fix:" if findings else "Nothing to fix.")
    for f in findings:
        out.append(f"  [{f.level}] {f.topic}: {f.message}")
    return "\n".join(out) + "\n"
