"""``mpiep doctor``: check this node for what an mpiep job needs and say what to fix.

Probes GPUs and their NVLink/P2P topology, the NVSHMEM install and which of its transports
load, RDMA devices and ports, the MPI library and launcher, and the network variables a job
has or would get. Every probe tolerates a missing tool; the command exits 0 with a report on a
machine with no GPU, HCA, NVSHMEM or Slurm.
"""

from __future__ import annotations

import argparse
import ctypes.util
import dataclasses
import glob
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpiep import network_env as ne
from mpiep.slurm.profiles import DEFAULT_PROFILE, JobNetwork, get_profile

# Variables the report shows when they are set in the current environment.
NETWORK_VAR_PREFIXES = ("NVSHMEM_", "NCCL_IB_", "NCCL_NVLS", "UCX_", "OMPI_MCA_", "MPIEP_")

_MPI_PROBE = """
import json, importlib.metadata as md
out = {}
try:
    out["mpi4py"] = md.version("mpi4py")
    import mpi4py
    mpi4py.rc.initialize = False
    mpi4py.rc.finalize = False
    from mpi4py import MPI
    out["library"] = MPI.Get_library_version().strip()
    out["standard"] = "%d.%d" % MPI.Get_version()
except Exception as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
"""

_LOAD_PROBE = """
import ctypes, json, sys
out = {}
for path in sys.argv[1:]:
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL if "nvshmem_host" in path else ctypes.RTLD_LOCAL)
        out[path] = "loads"
    except OSError as exc:
        out[path] = str(exc).splitlines()[0][-160:]
print(json.dumps(out))
"""


@dataclass
class Finding:
    """One line of advice: level is 'fix', 'warn' or 'info'."""

    level: str
    topic: str
    message: str


@dataclass
class Report:
    """Everything the doctor found; ``findings`` says what to do about it."""

    host: dict[str, Any] = field(default_factory=dict)
    gpus: dict[str, Any] = field(default_factory=dict)
    nvshmem: dict[str, Any] = field(default_factory=dict)
    rdma: dict[str, Any] = field(default_factory=dict)
    mpi: dict[str, Any] = field(default_factory=dict)
    launcher: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)
    job_env: list[dict[str, str]] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    def add(self, level: str, topic: str, message: str) -> None:
        """Record a finding."""
        self.findings.append(Finding(level, topic, message))


def _python_json(code: str, args: list[str] | None = None, timeout: float = 30.0) -> dict:
    rc, out = ne.run_cmd([sys.executable, "-c", code, *(args or [])], timeout=timeout)
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                break
    return {"error": out.splitlines()[-1] if out else f"probe exited {rc}"}


def parse_topo_matrix(text: str) -> tuple[list[str], dict[tuple[str, str], str]]:
    """Parse ``nvidia-smi topo -m``/``-p2p r`` output: (GPU labels, {(a, b): link})."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        return [], {}
    header = lines[0].split()
    cols = []
    for tok in header:
        if re.fullmatch(r"GPU\d+", tok):
            cols.append(tok)
        elif cols:
            break
    links: dict[tuple[str, str], str] = {}
    for ln in lines[1:]:
        toks = ln.split()
        if not toks or not re.fullmatch(r"GPU\d+", toks[0]):
            continue
        for col, val in zip(cols, toks[1 : 1 + len(cols)], strict=False):
            links[(toks[0], col)] = val
    return cols, links


def probe_gpus(report: Report, sys_root: str) -> None:
    """GPU list and pairwise NVLink / P2P status."""
    gpus = ne.gpus(sys_root)
    report.gpus = {"count": len(gpus), "devices": [dataclasses.asdict(g) for g in gpus]}
    if not gpus:
        report.add(
            "info",
            "gpu",
            "no NVIDIA GPU visible (nvidia-smi absent or failing): only the reference backend "
            "runs here; CUDA kernels and NVSHMEM need a GPU node",
        )
        return
    rc, topo = ne.run_cmd(["nvidia-smi", "topo", "-m"])
    labels, links = parse_topo_matrix(topo) if rc == 0 else ([], {})
    rc, p2p = ne.run_cmd(["nvidia-smi", "topo", "-p2p", "r"])
    _, p2p_links = parse_topo_matrix(p2p) if rc == 0 else ([], {})
    pairs = []
    for i, a in enumerate(labels):
        for b in labels[i + 1 :]:
            pairs.append(
                {
                    "pair": f"{a}-{b}",
                    "link": links.get((a, b), "?"),
                    "p2p_read": p2p_links.get((a, b), "?"),
                }
            )
    report.gpus["pairs"] = pairs
    no_nvlink = [p["pair"] for p in pairs if not p["link"].startswith("NV")]
    no_p2p = [p["pair"] for p in pairs if p["p2p_read"] not in ("OK", "?")]
    if no_p2p:
        report.add(
            "warn",
            "gpu",
            f"P2P reads not available between {', '.join(no_p2p[:6])}: intranode "
            "NVSHMEM/IPC traffic will not work there; check the driver, IOMMU and ACS settings",
        )
    elif no_nvlink:
        report.add(
            "info",
            "gpu",
            f"no NVLink between {', '.join(no_nvlink[:6])}: intranode traffic goes over PCIe",
        )


def _nvshmem_lib_dir() -> tuple[str, str]:
    """(lib dir, where it came from)."""
    for var in ("NVSHMEM_DIR", "NVSHMEM_HOME"):
        root = os.environ.get(var)
        if root and Path(root, "lib").is_dir():
            return str(Path(root, "lib")), var
    try:
        spec = importlib.util.find_spec("nvidia.nvshmem")
    except (ImportError, ValueError):
        spec = None
    if spec and spec.submodule_search_locations:
        lib = Path(next(iter(spec.submodule_search_locations)), "lib")
        if lib.is_dir():
            return str(lib), "pip wheel"
    return "", ""


def probe_nvshmem(report: Report) -> None:
    """NVSHMEM version, and which host/bootstrap/transport libraries load here."""
    versions = {}
    for dist in ("nvidia-nvshmem-cu13", "nvidia-nvshmem-cu12", "nvidia-nvshmem"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    lib, source = _nvshmem_lib_dir()
    report.nvshmem = {"packages": versions, "lib_dir": lib, "source": source}
    if not lib:
        report.add(
            "info",
            "nvshmem",
            "NVSHMEM not found: `pip install nvidia-nvshmem-cu13` or set "
            "NVSHMEM_DIR; without it only intranode IPC and the reference backend are available",
        )
        return
    files = sorted(
        glob.glob(os.path.join(lib, "libnvshmem_host.so*"))
        + glob.glob(os.path.join(lib, "nvshmem_bootstrap_*.so*"))
        + glob.glob(os.path.join(lib, "nvshmem_transport_*.so*"))
    )
    loaded = _python_json(_LOAD_PROBE, files) if files else {}
    status = {os.path.basename(k): v for k, v in loaded.items() if k != "error"}
    report.nvshmem["libraries"] = status
    host = next((v for k, v in status.items() if k.startswith("libnvshmem_host")), "missing")
    if host != "loads":
        report.add(
            "info",
            "nvshmem",
            f"libnvshmem_host does not load here ({host}); expected on a "
            "machine without the CUDA driver (no libcuda.so.1)",
        )
    for name in ("nvshmem_transport_ibgda", "nvshmem_transport_ibrc"):
        state = next((v for k, v in status.items() if k.startswith(name)), None)
        if state and state != "loads":
            report.add(
                "info",
                "nvshmem",
                f"{name} does not load ({state}): internode transport needs "
                "rdma-core (libibverbs, libmlx5) on the node",
            )


def probe_rdma(report: Report, sys_root: str) -> None:
    """RDMA devices, ports, link layers, GPU->NIC proximity, RoCE congestion control."""
    devices = ne.ib_devices(sys_root)
    report.rdma = {
        "devices": [dataclasses.asdict(d) for d in devices],
        "ibv_devinfo": bool(shutil.which("ibv_devinfo")),
        "gpu_nic_map": {str(k): v for k, v in ne.gpu_nic_map(sys_root).items()},
    }
    if not devices:
        report.add(
            "info",
            "rdma",
            "no RDMA device in /sys/class/infiniband: internode mpiep traffic "
            "needs InfiniBand or RoCE HCAs; single-node jobs use NVLink/PCIe P2P",
        )
        return
    libs = {name: bool(ctypes.util.find_library(name)) for name in ("ibverbs", "mlx5")}
    report.rdma["libraries"] = libs
    missing = [f"lib{k}" for k, v in libs.items() if not v]
    if missing:
        report.add(
            "fix",
            "rdma",
            f"{', '.join(missing)} not found: NVSHMEM's IBRC/IBGDA transports "
            "need rdma-core (apt install libibverbs1 ibverbs-providers, or MLNX_OFED/DOCA)",
        )
    active = [d for d in devices if d.active_ports()]
    if not active:
        report.add("warn", "rdma", "no RDMA port is ACTIVE: check cables, `ibstat` and the SM")
    layers = {p.link_layer for d in devices for p in d.ports}
    if "Ethernet" in layers:
        report.add(
            "info",
            "rdma",
            "RoCE ports: NVSHMEM_IB_SL becomes the Ethernet priority; set "
            "the traffic class with --traffic-class (NVSHMEM_IB_TRAFFIC_CLASS, NCCL_IB_TC)",
        )
        ecn = {}
        for path in glob.glob(os.path.join(sys_root, "class/net/*/ecn/roce_rp/enable/*")):
            iface = Path(path).parts[-5]
            if Path(path).read_text().strip() == "1":
                ecn.setdefault(iface, []).append(int(Path(path).name))
        report.rdma["roce_congestion_control_priorities"] = ecn
    if "InfiniBand" in layers:
        report.add(
            "info",
            "rdma",
            "SL-to-VL mapping and per-SL adaptive routing are subnet-manager "
            "settings the host cannot read without SMP queries (smpquery sl2vl); check that "
            "the profile's SLs match what your fabric admins configured",
        )


def probe_mpi(report: Report) -> None:
    """mpi4py and the MPI library it loads (without initialising MPI), mpirun version."""
    info = _python_json(_MPI_PROBE)
    mpirun = shutil.which("mpirun") or shutil.which("mpiexec")
    if mpirun:
        rc, out = ne.run_cmd([mpirun, "--version"], timeout=10)
        info["mpirun"] = mpirun
        info["mpirun_version"] = out.splitlines()[0] if out else f"exit {rc}"
    report.mpi = info
    if "mpi4py" not in info:
        report.add("fix", "mpi", "mpi4py is not installed: `pip install mpi4py` (mpiep needs it)")
    elif "error" in info:
        report.add("fix", "mpi", f"mpi4py cannot load its MPI library: {info['error']}")
    lib = info.get("library", "")
    if lib and "Open MPI" not in lib:
        report.add(
            "info",
            "mpi",
            "not Open MPI: NVSHMEM's MPI bootstrap plugin links libmpi.so.40 "
            "and will not load; mpiep falls back to the unique-id bootstrap over mpi4py",
        )


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


def collect(
    sys_root: str = "/sys",
    env: dict[str, str] | None = None,
    mode: str = "normal",
    profile: str = DEFAULT_PROFILE,
) -> Report:
    """Run every probe and return the report."""
    env = dict(os.environ if env is None else env)
    report = Report()
    try:
        mpiep_version = importlib.metadata.version("mpiep")
    except importlib.metadata.PackageNotFoundError:
        mpiep_version = "not installed (source tree)"
    report.host = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "mpiep": mpiep_version,
        "cpus": os.cpu_count(),
    }
    probe_gpus(report, sys_root)
    probe_nvshmem(report)
    probe_rdma(report, sys_root)
    probe_mpi(report)
    probe_launcher(report, env)
    check_environment(report, env, mode, profile)
    return report


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
    order = {"fix": 0, "warn": 1, "info": 2}
    findings = sorted(report.findings, key=lambda f: order.get(f.level, 3))
    out.append("What to fix:" if findings else "Nothing to fix.")
    for f in findings:
        out.append(f"  [{f.level}] {f.topic}: {f.message}")
    return "\n".join(out) + "\n"


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--mode",
        choices=("normal", "low-latency"),
        default="normal",
        help="mode for the 'job would get' section",
    )
    p.add_argument("--profile", default=DEFAULT_PROFILE, help="profile for that section")
    p.add_argument("--sys-root", default="/sys", help=argparse.SUPPRESS)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``doctor`` subcommand to the ``mpiep`` command line."""
    p = subparsers.add_parser(
        "doctor",
        help="check this node for GPUs, NVSHMEM, NICs, MPI and launcher",
        description=__doc__.splitlines()[0],
    )
    _add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the report; always 0 unless the options are bad."""
    try:
        report = collect(sys_root=args.sys_root, mode=args.mode, profile=args.profile)
    except ValueError as exc:
        print(f"mpiep doctor: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(dataclasses.asdict(report), indent=2, sort_keys=True))
    else:
        sys.stdout.write(format_text(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m mpiep.doctor``."""
    parser = argparse.ArgumentParser(prog="mpiep doctor", description=__doc__.splitlines()[0])
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
