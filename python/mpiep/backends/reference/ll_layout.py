"""Where low-latency rows go: the pair order, row groups and their destinations."""

from __future__ import annotations

import numpy as np
import torch


def group_rows(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows listed group after group (``counts`` flattened, row-major): each row's group
    id and its index inside the group."""
    flat = counts.reshape(-1).to(torch.int64)
    gid = torch.repeat_interleave(torch.arange(flat.numel()), flat)
    first = torch.cumsum(flat, 0) - flat
    return gid, torch.arange(gid.numel()) - first[gid]


def pairs(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token, slot, expert) of every slot with an expert, in (expert, token, slot) order:
    the order a rank sends its dispatch rows in, and gets its combine rows back in."""
    tokens, num_topk = ids.shape
    token, k = torch.nonzero(ids >= 0, as_tuple=True)
    expert = ids[token, k]
    order = torch.argsort(expert * (tokens * num_topk) + token * num_topk + k)
    return token[order], k[order], expert[order]


def offsets(rows: list[int]) -> list[int]:
    return [int(v) for v in np.concatenate([[0], np.cumsum(rows)[:-1]])] if rows else []


def destinations(counts: torch.Tensor, start: torch.Tensor, rows_per_expert: int) -> torch.Tensor:
    """Row of each received row (source-major, then expert) in the [E_local * R * M] rows."""
    epr = counts.shape[1]
    gid, within = group_rows(counts)
    src, e = gid // epr, gid % epr
    return e * rows_per_expert + start[src, e] + within


def run_rows(lengths: torch.Tensor, firsts: torch.Tensor) -> torch.Tensor:
    """Rows of consecutive runs, run after run: ``lengths[i]`` rows from row ``firsts[i]``."""
    lengths = lengths.to(torch.int64)
    run = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    begin = torch.cumsum(lengths, 0) - lengths
    return firsts.to(torch.int64)[run] + torch.arange(run.numel()) - begin[run]
