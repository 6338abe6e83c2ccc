"""Where a normal-mode row travels, for the byte columns of the benchmark.

On several nodes a row reaches its receiver over RDMA (into the forwarder of the
receiver's node, the rank with the source's local index) and then over NVLink; rows of the
receiver's own node go over NVLink only. Per receiving rank r = (node n, local l):

* rdma rows: what r receives over RDMA as a forwarder, from the same-local-index rank of
  every other node: sum over m != n of NC((m, l), n);
* nvlink rows: what other GPUs of its node write into r: rows from the other ranks of its
  node, and rows of other nodes that another local rank forwarded to it.

``M(s, r)`` (rows s sends to r) and ``NC(s, n)`` (tokens s sends to node n) come from every
rank's layout, gathered once.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from mpi4py import MPI


def ranks_per_node(comm: MPI.Comm) -> int:
    """What mpiep will use: MPIEP_RANKS_PER_NODE (virtual nodes), else the shared-memory
    domain (collective)."""
    env = os.environ.get("MPIEP_RANKS_PER_NODE")
    if env:
        return int(env)
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return node.Get_size()
    finally:
        node.Free()


def row_counts(
    comm: MPI.Comm, per_rank: torch.Tensor, per_node: torch.Tensor | None, rpn: int
) -> tuple[int, int]:
    """(rdma rows, nvlink rows) this rank receives in dispatch (combine sends the same back)."""
    R, me = comm.size, comm.rank
    M = np.stack(comm.allgather(per_rank.cpu().numpy().astype(np.int64)))  # [s, r]
    n, loc = me // rpn, me % rpn
    local = range(n * rpn, (n + 1) * rpn)
    nvlink = sum(int(M[s, me]) for s in local if s != me)
    if per_node is None or R == rpn:
        return 0, nvlink
    NC = np.stack(comm.allgather(per_node.cpu().numpy().astype(np.int64)))  # [s, node]
    nodes = R // rpn
    rdma = sum(int(NC[m * rpn + loc, n]) for m in range(nodes) if m != n)
    forwarded = sum(
        int(M[m * rpn + j, me]) for m in range(nodes) if m != n for j in range(rpn) if j != loc
    )
    return rdma, nvlink + forwarded
