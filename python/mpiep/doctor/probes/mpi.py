"""The MPI library mpi4py loads, and the ``mpirun`` on PATH."""

from __future__ import annotations

import shutil

from mpiep import network_env as ne
from mpiep.doctor.probes.child import python_json
from mpiep.doctor.report import Report

# Run in a child, with MPI left uninitialised: the doctor must not take a rank's MPI
# identity when it runs inside a job step.
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


def probe_mpi(report: Report) -> None:
    """mpi4py and the MPI library it loads (without initialising MPI), mpirun version."""
    info = python_json(_MPI_PROBE)
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
