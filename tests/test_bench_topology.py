"""The benchmark's RDMA / NVLink row counts (bench/topology.py) against a token-by-token
walk of the internode path: a row to another node goes once over RDMA to that node's
forwarder (the rank with the source's local index), which passes it over NVLink to every
other rank of its node that needs it."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from mpiep.bench.topology import row_counts


class FakeComm:
    def __init__(self, rank: int, size: int, per_rank_of: list, per_node_of: list) -> None:
        self.rank, self.size = rank, size
        self._data = {"rank": per_rank_of, "node": per_node_of}
        self._calls = 0

    def allgather(self, obj: Any) -> list:
        key = "rank" if self._calls == 0 else "node"
        self._calls += 1
        return self._data[key]


def walk(in_rank: list[np.ndarray], rpn: int) -> tuple[list[int], list[int]]:
    """(rdma rows, nvlink rows) per receiving rank, token by token."""
    R = len(in_rank)
    rdma, nvlink = [0] * R, [0] * R
    for s, rows in enumerate(in_rank):
        for t in range(rows.shape[0]):
            dests = np.nonzero(rows[t])[0]
            for node in {int(d) // rpn for d in dests}:
                mine = [int(d) for d in dests if int(d) // rpn == node]
                if node == s // rpn:
                    for d in mine:
                        nvlink[d] += d != s
                    continue
                fwd = node * rpn + s % rpn
                rdma[fwd] += 1
                for d in mine:
                    nvlink[d] += d != fwd
    return rdma, nvlink


@pytest.mark.parametrize("ranks,rpn,seed", [(4, 2, 0), (8, 2, 1), (8, 4, 2), (6, 3, 3), (4, 4, 4)])
def test_row_counts_follow_the_path(ranks: int, rpn: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    in_rank = [rng.random((int(rng.integers(0, 40)), ranks)) < 0.35 for _ in range(ranks)]
    nodes = ranks // rpn
    per_rank = [r.sum(0).astype(np.int64) for r in in_rank]
    per_node = [r.reshape(r.shape[0], nodes, rpn).any(2).sum(0).astype(np.int64) for r in in_rank]
    want_rdma, want_nvl = walk(in_rank, rpn)
    for me in range(ranks):
        comm = FakeComm(me, ranks, per_rank, per_node)
        got = row_counts(
            comm,  # type: ignore[arg-type]
            torch.from_numpy(per_rank[me]),
            torch.from_numpy(per_node[me]) if nodes > 1 else None,
            rpn,
        )
        assert got == (want_rdma[me], want_nvl[me]), f"rank {me}"
