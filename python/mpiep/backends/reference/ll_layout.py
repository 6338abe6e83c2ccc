"""Where low-latency rows go: the pair order, row groups and their destinations.

Index bookkeeping in numpy: these arrays have a few hundred to a few thousand entries, where
a numpy call costs about a microsecond and a torch call several (ranks share cores, so every
microsecond of one rank delays the others).
"""

from __future__ import annotations

from itertools import accumulate

import numpy as np


def group_rows(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows listed group after group (``counts`` flattened, row-major): each row's group
    id and its index inside the group."""
    flat = np.asarray(counts, dtype=np.int64).reshape(-1)
    gid = np.repeat(np.arange(flat.size), flat)
    first = np.cumsum(flat) - flat
    return gid, np.arange(gid.size) - first[gid]


def pairs(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(token, slot, expert) of every slot with an expert, in (expert, token, slot) order:
    the order a rank sends its dispatch rows in, and gets its combine rows back in."""
    token, k = np.nonzero(ids >= 0)  # row-major: (token, slot) order
    expert = ids[token, k]
    order = np.argsort(expert, kind="stable")  # stable: (token, slot) order inside an expert
    return token[order], k[order], expert[order]


def offsets(rows: list[int]) -> list[int]:
    """Where each of consecutive blocks of ``rows`` rows starts."""
    return [0, *accumulate(rows)][: len(rows)]


def destinations(counts: np.ndarray, start: np.ndarray, rows_per_expert: int) -> np.ndarray:
    """Row of each received row (source-major, then expert) in the [E_local * R * M] rows."""
    epr = counts.shape[1]
    gid, within = group_rows(counts)
    src, e = gid // epr, gid % epr
    return e * rows_per_expert + start[src, e] + within
