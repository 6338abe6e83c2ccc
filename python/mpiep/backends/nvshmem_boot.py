"""NVSHMEM start-up over MPI, shared by the low-latency and internode engines.

One initialisation per process, as a collective of the Buffer's communicator. Two
bootstraps, chosen with ``Buffer(nvshmem_bootstrap=...)`` or ``MPIEP_NVSHMEM_BOOTSTRAP``:

* ``"uid"`` (default): rank 0 creates NVSHMEM's unique id and the MPI layer broadcasts it
  (``Communicator.bcast_bytes``). Works with any MPI; NVSHMEM opens TCP sockets of its own.
* ``"mpi"``: NVSHMEM's own MPI bootstrap plugin (``nvshmem_bootstrap_mpi.so.3`` from the
  wheel) on the communicator itself: no sockets of NVSHMEM's. The wheel's plugin is built
  against Open MPI (``libmpi.so.40``), so it loads only under Open MPI.
* ``"auto"``: ``"mpi"`` where the plugin loads on every rank, else ``"uid"``.
"""

from __future__ import annotations

import ctypes
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # type only: mpiep.comm starts MPI, and `mpiep doctor` imports this module
    from mpiep.comm import Communicator

BOOTSTRAPS = ("uid", "mpi", "auto")


def core():  # type: ignore[no-untyped-def]
    from mpiep import _C  # type: ignore[attr-defined]

    if not hasattr(_C, "nvshmem_init"):
        raise RuntimeError("mpiep._C was built without NVSHMEM")
    return _C


def configure_nvshmem_env(num_qps_per_rank: int) -> None:
    """NVSHMEM reads its environment at init: set it before the first engine starts.

    NVLink SHARP (NVLS) is always off (it can take shared hosts' GPUs out of service);
    multi-node NVLink is off unless ``MPIEP_ENABLE_MNNVL=1``. The rest are defaults the user
    (or the environment ``mpiep slurm`` writes: service levels, traffic class, NICs) may
    override: IBGDA on, ``num_qps_per_rank`` RC QPs per peer, QP depth 1024 (it must exceed
    2 x (max tokens + 1) work requests in flight).
    """
    os.environ["NVSHMEM_DISABLE_NVLS"] = "1"
    if os.environ.get("MPIEP_ENABLE_MNNVL") != "1":
        os.environ["NVSHMEM_DISABLE_MNNVL"] = "1"
    os.environ.setdefault("NVSHMEM_IB_ENABLE_IBGDA", "1")
    os.environ.setdefault("NVSHMEM_IBGDA_NUM_RC_PER_PE", str(num_qps_per_rank))
    os.environ.setdefault("NVSHMEM_QP_DEPTH", "1024")
    os.environ.setdefault("NVSHMEM_MAX_TEAMS", "7")


def mpi_plugin_path() -> str | None:
    """The wheel's (or NVSHMEM_DIR's) MPI bootstrap plugin, if present."""
    dirs = []
    if os.environ.get("NVSHMEM_DIR"):
        dirs.append(os.path.join(os.environ["NVSHMEM_DIR"], "lib"))
    try:
        import nvidia.nvshmem as wheel  # type: ignore[import-not-found]

        dirs += [os.path.join(p, "lib") for p in wheel.__path__]
    except ImportError:
        pass
    for d in dirs:
        path = os.path.join(d, "nvshmem_bootstrap_mpi.so.3")
        if os.path.exists(path):
            return path
    return None


def mpi_plugin_loads() -> tuple[bool, str]:
    """Whether NVSHMEM's MPI bootstrap plugin loads in this process, and why not."""
    path = os.environ.get("NVSHMEM_BOOTSTRAP_MPI_PLUGIN") or mpi_plugin_path()
    if path is None:
        return False, "nvshmem_bootstrap_mpi.so.3 not found"
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
    except OSError as exc:
        return False, f"{os.path.basename(path)} does not load: {exc}"
    return True, path


def choose_bootstrap(comm: Communicator, requested: str | None) -> str:
    """The bootstrap every rank will use (collective when it must ask the others)."""
    choice = requested or os.environ.get("MPIEP_NVSHMEM_BOOTSTRAP", "uid")
    if choice not in BOOTSTRAPS:
        raise ValueError(f"nvshmem_bootstrap must be one of {BOOTSTRAPS}, got {choice!r}")
    if choice == "uid":
        return "uid"
    ok, why = mpi_plugin_loads()
    everyone = comm.allgather((ok, why), "NVSHMEM bootstrap: MPI plugin check")
    bad = [(r, w) for r, (o, w) in enumerate(everyone) if not o]
    if not bad:
        return "mpi"
    if choice == "mpi":
        rank, why = bad[0]
        raise RuntimeError(
            f"nvshmem_bootstrap='mpi': NVSHMEM's MPI bootstrap plugin cannot be used on rank "
            f"{rank}: {why}; use 'uid' (MPIEP_NVSHMEM_BOOTSTRAP=uid) with this MPI"
        )
    return "uid"


def init_nvshmem(
    comm: Communicator,
    device_index: int,
    heap_bytes: int,
    num_qps_per_rank: int,
    bootstrap: str | None = None,
) -> str:
    """Initialise NVSHMEM on every rank of ``comm`` (collective; once per process).

    Returns the bootstrap used. ``heap_bytes`` is what this process will allocate from the
    symmetric heap; NVSHMEM sizes its heap at the first initialisation only.
    """
    c = core()
    if c.nvshmem_initialized():
        if c.nvshmem_my_pe() != comm.rank or c.nvshmem_n_pes() != comm.size:
            raise RuntimeError(
                f"NVSHMEM already runs as PE {c.nvshmem_my_pe()} of {c.nvshmem_n_pes()} in "
                f"this process; a Buffer on rank {comm.rank} of {comm.size} cannot reuse it"
            )
        return str(c.nvshmem_bootstrap())
    configure_nvshmem_env(num_qps_per_rank)
    how = choose_bootstrap(comm, bootstrap)
    if how == "mpi":
        from mpi4py import MPI

        plugin = mpi_plugin_path()
        if plugin and "NVSHMEM_BOOTSTRAP_MPI_PLUGIN" not in os.environ:
            os.environ["NVSHMEM_BOOTSTRAP_MPI_PLUGIN"] = plugin  # dlopen'ed by name otherwise

        c.nvshmem_init_mpi(MPI._handleof(comm.comm), comm.rank, comm.size, device_index, heap_bytes)
        return how
    uid: bytes | None = None
    error = ""
    if comm.rank == 0:
        try:
            uid = bytes(c.nvshmem_get_unique_id())
        except Exception as exc:  # told to every rank below, so none waits in init
            error = str(exc)
            uid = b""
    uid = comm.bcast_bytes(uid, 0, "NVSHMEM unique id")
    if not uid:
        raise RuntimeError(f"rank 0 could not create an NVSHMEM unique id: {error or 'see rank 0'}")
    c.nvshmem_init(uid, comm.rank, comm.size, device_index, heap_bytes)
    return how


def finalize_nvshmem() -> None:
    """Finalise NVSHMEM in this process (collective); engines must be destroyed first."""
    c = core()
    if c.nvshmem_initialized():
        c.nvshmem_finalize()
