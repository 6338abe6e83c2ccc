"""Soak inputs, and what every call must return, recomputed from the inputs alone.

Rows are multiples of 1/64 in (-2, 2) and weights powers of two, so every combine is exact in
float32 and the expected results are bit-exact whatever the summation order. Rows are
compared through signatures: a row's signature is the sum of its 16-bit patterns times odd
per-channel coefficients (int64, wrapping), so any single changed element changes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from mpi4py import MPI


@dataclass(frozen=True)
class Shape:
    tokens: int
    hidden: int
    topk: int
    experts: int


def token_rows(src: torch.Tensor, token: torch.Tensor, hidden: int, salt: int) -> torch.Tensor:
    """bf16 [N, hidden] rows of (source rank, token) pairs; ``salt`` varies them per set."""
    c = torch.arange(hidden, dtype=torch.int64, device=token.device)
    code = (src.long()[:, None] * 131 + token.long()[:, None] * 71 + c * 17 + salt * 29) % 255
    return ((code - 127).float() / 64).to(torch.bfloat16)


def coefficients(hidden: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(4242)
    return (torch.randint(0, 2**31, (hidden,), generator=g, dtype=torch.int64) * 2 + 1).to(device)


def signature(rows: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
    """int64 [..., N] signatures of 2-byte rows [..., N, H] (bf16)."""
    return (rows.contiguous().view(torch.int16).long() * coeff).sum(-1)


def routing(
    rank: int, set_index: int, shape: Shape, num_ranks: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct experts per token with ~10% holes; weights in {1, 1/2, 1/4, 1/8}."""
    g = torch.Generator().manual_seed(1_000_003 * set_index + rank)
    scores = torch.rand(shape.tokens, shape.experts, generator=g)
    idx = scores.topk(shape.topk, dim=1).indices.to(torch.int64)
    idx[torch.rand(idx.shape, generator=g) < 0.1] = -1
    w = torch.pow(2.0, -torch.randint(0, 4, idx.shape, generator=g).float())
    w[idx < 0] = 0.0
    return idx.to(device), w.to(device)


@dataclass
class SoakSet:
    """One input set of this rank and its expected results."""

    x: torch.Tensor  # [T, H] bf16
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    normal_recv_sig: torch.Tensor  # [N] signatures of the rows this rank receives, in order
    normal_combined: torch.Tensor  # [T, H] bf16: x * (ranks the token went to)
    ll_recv_count: torch.Tensor  # [E_local] int32
    ll_expert_sig: torch.Tensor  # [E_local] int64: sum of the signatures of each expert's rows
    ll_combined: torch.Tensor  # [T, H] bf16: x * (sum of the weights of valid slots)


def make_set(
    comm: MPI.Comm, set_index: int, shape: Shape, coeff: torch.Tensor, device: torch.device
) -> SoakSet:
    """Collective: the routing of every rank is gathered once, here, not during the soak."""
    rank, num_ranks = comm.rank, comm.size
    e_local = shape.experts // num_ranks
    idx, w = routing(rank, set_index, shape, num_ranks, device)
    tok = torch.arange(shape.tokens, device=device)
    x = token_rows(torch.full_like(tok, rank), tok, shape.hidden, set_index)
    everyone = torch.from_numpy(_allgather(comm, idx.cpu().numpy())).to(device)  # [R, T, K]
    owner = torch.where(everyone >= 0, everyone // e_local, -1)

    # Normal: each token once to every rank owning one of its experts, by source then token.
    src, token = torch.nonzero((owner == rank).any(-1), as_tuple=True)
    normal_sig = signature(token_rows(src, token, shape.hidden, set_index), coeff)
    mine = owner[rank]
    count = torch.stack([(mine == r).any(1) for r in range(num_ranks)], 1).sum(1)
    normal_combined = (x.float() * count[:, None].float()).to(torch.bfloat16)

    # Low latency: one row per (token, slot); order inside a source's group unspecified.
    src_k, token_k, slot_k = torch.nonzero(owner == rank, as_tuple=True)
    local = everyone[src_k, token_k, slot_k] - rank * e_local
    sig = signature(token_rows(src_k, token_k, shape.hidden, set_index), coeff)
    ll_count = torch.bincount(local, minlength=e_local).to(torch.int32)
    ll_sig = torch.zeros(e_local, dtype=torch.int64, device=device).index_add_(0, local, sig)
    weight_sum = torch.where(idx >= 0, w, torch.zeros_like(w)).sum(1)
    ll_combined = (x.float() * weight_sum[:, None]).to(torch.bfloat16)
    return SoakSet(x, idx, w, normal_sig, normal_combined, ll_count, ll_sig, ll_combined)


def _allgather(comm: MPI.Comm, arr):  # type: ignore[no-untyped-def]
    import numpy as np

    return np.stack(comm.allgather(arr))
