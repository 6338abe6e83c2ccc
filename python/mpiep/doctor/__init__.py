"""``mpiep doctor``: check this node for what an mpiep job needs and say what to fix.

Probes GPUs and their NVLink/P2P topology, the NVSHMEM install and which of its transports
load, RDMA devices and ports, the MPI library and launcher, and the network variables a job
has or would get. Every probe tolerates a missing tool; the command exits 0 with a report on a
machine with no GPU, HCA, NVSHMEM or Slurm.

* ``probes/``: one module per subsystem (host, gpu, nvshmem, rdma, mpi, launcher,
  environment); each fills its part of the report and adds findings.
* ``report.py``: the report model (``Report``, ``Finding``) and its JSON form.
* ``render.py``: the text form.
* ``cli.py``: ``collect`` (every probe, in order) and the command line.
"""

from mpiep.doctor.cli import collect, main, register, run
from mpiep.doctor.probes.environment import NETWORK_VAR_PREFIXES, check_environment
from mpiep.doctor.probes.gpu import parse_topo_matrix, probe_gpus
from mpiep.doctor.probes.host import probe_host
from mpiep.doctor.probes.launcher import probe_launcher
from mpiep.doctor.probes.mpi import probe_mpi
from mpiep.doctor.probes.nvshmem import probe_nvshmem, probe_nvshmem_bootstrap
from mpiep.doctor.probes.rdma import probe_rdma
from mpiep.doctor.render import format_text
from mpiep.doctor.report import Finding, Report, to_json

__all__ = [
    "NETWORK_VAR_PREFIXES",
    "Finding",
    "Report",
    "check_environment",
    "collect",
    "format_text",
    "main",
    "parse_topo_matrix",
    "probe_gpus",
    "probe_host",
    "probe_launcher",
    "probe_mpi",
    "probe_nvshmem",
    "probe_nvshmem_bootstrap",
    "probe_rdma",
    "register",
    "run",
    "to_json",
]
