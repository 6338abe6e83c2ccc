"""Benchmark inputs that every rank can regenerate for any peer, so results are
checked against a local recomputation without moving the inputs around."""

from __future__ import annotations

import torch


def token_rows(src_rank: torch.Tensor, token: torch.Tensor, hidden: int) -> torch.Tensor:
    """bf16 rows [N, hidden] for (source rank, token id) pairs.

    Values are multiples of 1/64 in (-2, 2): exact in bf16, so sums of up to 8 copies
    in float32 are exact too and combine can be checked bit for bit.
    """
    c = torch.arange(hidden, dtype=torch.int64, device=token.device)
    code = (src_rank.long().unsqueeze(1) * 131 + token.long().unsqueeze(1) * 71 + c * 17) % 255
    return ((code - 127).float() / 64).to(torch.bfloat16)


def make_x(rank: int, tokens: int, hidden: int, device: torch.device) -> torch.Tensor:
    token = torch.arange(tokens, device=device)
    return token_rows(torch.full_like(token, rank), token, hidden)


def make_routing(
    rank: int, tokens: int, experts: int, topk: int, device: torch.device, seed: int = 1234
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random distinct experts per token (as a gate's top-k gives) and positive weights."""
    g = torch.Generator().manual_seed(seed + rank)
    scores = torch.rand(tokens, experts, generator=g)
    topk_idx = scores.topk(topk, dim=1).indices.to(torch.int64)
    weights = torch.rand(tokens, topk, generator=g) + 0.1
    return topk_idx.to(device), weights.to(device)
