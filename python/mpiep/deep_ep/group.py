"""From a torch ``ProcessGroup`` to the matching mpi4py communicator.

mpiep bootstraps through MPI, so a DeepEP-style ``Buffer(group, ...)`` needs the MPI
communicator whose ranks are the group's processes, in the group's order. That is
``MPI.COMM_WORLD.Create_group`` over the group's global ranks, and it is only right when
torch's global ranks are MPI's world ranks: the job was launched by ``mpirun``/``srun`` and
``torch.distributed`` was initialised with ``rank = MPI.COMM_WORLD.rank`` and
``world_size = MPI.COMM_WORLD.size``. That is checked on every member, and the members
agree on the outcome over the torch group itself before any MPI call among them, because
MPI cannot be trusted to connect these processes until the check has passed (and a member
left out of ``Create_group`` would leave the others waiting in it forever).

torch.distributed is imported here only, lazily, and used only to read the group and for
that one agreement; it carries none of mpiep's traffic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mpiep.errors import MpiepError

if TYPE_CHECKING:
    from mpi4py import MPI

LAUNCH_HINT = (
    "mpiep.deep_ep maps a torch ProcessGroup onto MPI, which needs torch's global ranks to be "
    "MPI's world ranks: launch with mpirun or srun (one process per GPU) and initialise "
    "torch.distributed with rank=MPI.COMM_WORLD.rank and world_size=MPI.COMM_WORLD.size "
    "(e.g. RANK=$OMPI_COMM_WORLD_RANK or $SLURM_PROCID, WORLD_SIZE=$OMPI_COMM_WORLD_SIZE or "
    "$SLURM_NTASKS). torchrun and torch.multiprocessing start MPI singletons, which cannot "
    "be matched; there, or for any other layout, pass an mpi4py communicator instead: "
    "Buffer(comm=...)."
)


class ProcessGroupMismatchError(MpiepError):
    """The torch process group cannot be matched with MPI ranks (see ``LAUNCH_HINT``)."""


def describe_mismatch(
    torch_rank: int, torch_world_size: int, mpi_rank: int, mpi_world_size: int
) -> str | None:
    """What is wrong with this process's torch/MPI identity, or None if they match."""
    problems = []
    if torch_world_size != mpi_world_size:
        problems.append(f"torch world size {torch_world_size} != MPI world size {mpi_world_size}")
    if torch_rank != mpi_rank:
        problems.append(f"torch rank {torch_rank} != MPI rank {mpi_rank}")
    return "; ".join(problems) or None


def mismatch_message(reports: list[tuple[int, int, str | None]]) -> str | None:
    """The error message from every member's ``(torch rank, MPI rank, problem)``, or None."""
    bad = [(t, m, p) for t, m, p in reports if p]
    if not bad:
        return None
    shown = "; ".join(f"[torch rank {t} / MPI rank {m}: {p}]" for t, m, p in bad[:4])
    more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
    return (
        f"cannot match the torch process group with MPI: {len(bad)} of {len(reports)} "
        f"members disagree {shown}{more}. {LAUNCH_HINT}"
    )


def is_process_group(obj: Any) -> bool:
    """True for a torch ``ProcessGroup`` (without importing torch.distributed otherwise)."""
    try:
        import torch.distributed as dist
    except ImportError:  # torch without distributed support
        return False
    return dist.is_available() and isinstance(obj, dist.ProcessGroup)


def comm_from_process_group(group: Any) -> MPI.Comm:
    """A new MPI communicator over the processes of ``group``, ranked as in ``group``.

    Collective over the members of ``group`` (only). The caller frees the communicator.
    Raises ``ProcessGroupMismatchError`` on every member when torch and MPI ranks differ on
    any member.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError(
            "Buffer(group, ...) needs an initialised torch.distributed; call "
            "torch.distributed.init_process_group first, or pass an mpi4py communicator "
            "as Buffer(comm=...)"
        )
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            "group must be a torch.distributed.ProcessGroup of which this process is a member "
            f"(got {group!r}); non-members do not create the Buffer"
        )
    ranks = [int(r) for r in dist.get_process_group_ranks(group)]
    torch_rank = dist.get_rank()
    if torch_rank not in ranks:
        raise ValueError(f"torch rank {torch_rank} is not a member of the group {ranks}")

    from mpi4py import MPI

    world = MPI.COMM_WORLD
    problem = describe_mismatch(torch_rank, dist.get_world_size(), world.rank, world.size)
    # Agree over the torch group: every member raises together, none waits in MPI.
    reports: list[Any] = [None] * len(ranks)
    dist.all_gather_object(reports, (torch_rank, world.rank, problem), group=group)
    message = mismatch_message(reports)
    if message is not None:
        raise ProcessGroupMismatchError(message)

    mpi_group = world.Get_group().Incl(ranks)
    try:
        comm = world.Create_group(mpi_group)
    finally:
        mpi_group.Free()
    # With matching ranks these hold by construction; check that MPI sees the same order.
    seen = comm.allgather(torch_rank)
    if seen != ranks or comm.rank != dist.get_rank(group):
        comm.Free()
        raise ProcessGroupMismatchError(
            f"the MPI communicator built from the group orders its ranks {seen}, the group "
            f"{ranks}. {LAUNCH_HINT}"
        )
    return comm
