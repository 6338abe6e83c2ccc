"""The dispatch layout computed with torch ops: who gets which token.

Used by the reference backend, and as the definition the GPU layout kernel is
tested against.
"""

from __future__ import annotations

import torch

from mpiep.backends.base import Layout


def compute_layout(
    topk_idx: torch.Tensor, num_experts: int, num_ranks: int, ranks_per_node: int
) -> Layout:
    tokens = topk_idx.shape[0]
    experts_per_rank = num_experts // num_ranks
    valid = topk_idx >= 0
    num_tokens_per_expert = torch.bincount(topk_idx[valid].long(), minlength=num_experts).to(
        torch.int32
    )
    # Scatter each (token, slot) into its rank's column; slots with -1 go to a spare column.
    dest = torch.where(valid, topk_idx // experts_per_rank, torch.full_like(topk_idx, num_ranks))
    hits = torch.zeros(tokens, num_ranks + 1, dtype=torch.bool, device=topk_idx.device)
    hits.scatter_(1, dest.long(), True)
    is_token_in_rank = hits[:, :num_ranks].contiguous()
    num_tokens_per_rank = is_token_in_rank.sum(0, dtype=torch.int32)
    num_nodes = num_ranks // ranks_per_node
    num_tokens_per_rdma_rank = None
    if num_nodes > 1:
        in_node = is_token_in_rank.view(tokens, num_nodes, ranks_per_node).any(dim=2)
        num_tokens_per_rdma_rank = in_node.sum(0, dtype=torch.int32)
    return Layout(
        num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank
    )
