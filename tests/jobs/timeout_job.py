"""A 2-rank job in which rank 1 hangs and rank 0 times out (run by tests/test_abort.py).

    mpirun -n 2 python tests/jobs/timeout_job.py {option|env|off} [--catch]

Rank 1 never calls (it sleeps, as a hung process would). Rank 0's call raises
PeerTimeoutError after 1 s. ``option``: Buffer(abort_on_timeout=True); ``env``: the same
through MPIEP_ABORT_ON_TIMEOUT=1 (set by the caller); ``off``: neither. With ``--catch``
rank 0 catches the error and goes on into a collective that cannot complete either.
"""

from __future__ import annotations

import sys
import time

import torch
from mpi4py import MPI

from mpiep import Buffer

HANG_S = 60.0  # rank 1's "hang"; the test kills the job long before

mode, catch = sys.argv[1], "--catch" in sys.argv
comm = MPI.COMM_WORLD
kwargs = {"abort_on_timeout": True} if mode == "option" else {}
buf = Buffer(
    comm, num_nvl_bytes=1 << 20, backend="reference", device="cpu", timeout_s=1.0, **kwargs
)
print(f"rank {comm.rank}: buffer ready", flush=True)
if comm.rank == 1:
    time.sleep(HANG_S)
else:
    idx = torch.zeros(4, 1, dtype=torch.int64)
    try:
        buf.get_dispatch_layout(idx, 2)
    except TimeoutError as exc:
        print(f"rank 0 caught {type(exc).__name__}", flush=True)
        if not catch:
            raise
        comm.Barrier()  # never completes: rank 1 hangs
print(f"rank {comm.rank}: done", flush=True)
