"""NVSHMEM: where it is installed, which of its libraries load, and which bootstrap works."""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os
from pathlib import Path

from mpiep.backends import nvshmem_boot
from mpiep.doctor.probes.child import python_json
from mpiep.doctor.report import Report

# Loads each library given on the command line; run in a child so that a library that
# crashes or pollutes the process on load leaves the doctor alone.
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
    loaded = python_json(_LOAD_PROBE, files) if files else {}
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


def probe_nvshmem_bootstrap(report: Report, env: dict[str, str]) -> None:
    """Which NVSHMEM bootstrap a Buffer can use here: the unique id broadcast over MPI
    always; NVSHMEM's MPI plugin where it loads against this MPI (Open MPI only)."""
    # In this process: the plugin only links libmpi (no MPI_Init), as in Buffer's own check.
    ok, detail = nvshmem_boot.mpi_plugin_loads()
    requested = env.get("MPIEP_NVSHMEM_BOOTSTRAP", "uid")
    report.nvshmem["bootstrap"] = {
        "uid": {"available": True, "detail": "unique id broadcast over MPI"},
        "mpi": {"available": ok, "detail": detail},
        "requested": requested,
    }
    mpi = "available" if ok else "unavailable"
    message = (
        "NVSHMEM bootstrap: 'uid' (unique id over MPI) always; 'mpi' (NVSHMEM's MPI plugin, "
        f"no extra sockets) {mpi}: {detail}"
    )
    if ok:
        message += "; set MPIEP_NVSHMEM_BOOTSTRAP=mpi or Buffer(nvshmem_bootstrap='mpi')"
    report.add("info", "nvshmem", message)
    if requested not in nvshmem_boot.BOOTSTRAPS:
        report.add(
            "fix",
            "nvshmem",
            f"MPIEP_NVSHMEM_BOOTSTRAP={requested} is not one of {nvshmem_boot.BOOTSTRAPS}: "
            "GPU Buffers will not start",
        )
    elif requested == "mpi" and not ok:
        report.add(
            "fix",
            "nvshmem",
            "MPIEP_NVSHMEM_BOOTSTRAP=mpi but NVSHMEM's MPI plugin is unavailable: GPU Buffers "
            "will not start; use 'uid' or 'auto'",
        )
