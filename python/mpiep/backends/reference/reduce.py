"""The combine reductions: per token, a float32 sum of received BF16 rows, cast once.

Rows are gathered per block of tokens rather than scattered with ``index_add_``: the
float32 accumulator of a block stays in cache, each received row is read once and each
output row written once (``index_add_`` costs a read-modify-write of a float32 output row
per received row, and a per-row dispatch inside torch). The summation order is fixed:
from 0.0, over the row slots ``j = 0, 1, ...`` of ``idx`` (source ranks in rank order for
normal combine, top-k slots in order for low-latency combine).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

ROWS_PER_BLOCK = 64  # gathered rows per step: 64 x 7168 float32 is 1.8 MB, in L2


def rows_by_token(token: torch.Tensor, num_tokens: int, sentinel: int) -> torch.Tensor:
    """``[T, J]`` int64: for each token, the indices of the rows that belong to it, in
    their order in ``token`` (received rows come in rank order), padded with ``sentinel``.
    ``J`` is the largest number of rows of one token (0 when there are none)."""
    n = token.numel()
    counts = torch.bincount(token, minlength=num_tokens)
    width = int(counts.max()) if n else 0
    idx = torch.full((num_tokens, width), sentinel, dtype=torch.int64)
    if n:
        order = torch.argsort(token, stable=True)
        first = torch.cumsum(counts, 0) - counts
        sorted_token = token[order]
        idx[sorted_token, torch.arange(n) - first[sorted_token]] = order
    return idx


def gather_sum(
    rows: torch.Tensor,
    idx: torch.Tensor,
    out: torch.Tensor,
    weights: torch.Tensor | None = None,
    bias: Sequence[torch.Tensor] = (),
) -> None:
    """``out[t] = bf16(0 + sum_j weights[t, j] * rows[idx[t, j]] + sum(bias)[t])`` in float32.

    ``rows`` ``[N, H]`` BF16 on the CPU (may be a strided view of packed rows) whose row
    ``idx`` points at for missing entries must be zeros; ``weights`` float32 ``[T, J]`` or
    None (all ones); ``out`` ``[T, H]`` BF16 CPU.
    """
    num_tokens, width = idx.shape
    hidden = rows.shape[1]
    block = max(1, ROWS_PER_BLOCK // max(width, 1))
    idx_t = idx.t().contiguous()  # [J, T]: one slot's rows of a block are adjacent
    w_t = weights.t().contiguous() if weights is not None else None
    gathered = torch.empty(width * block, hidden, dtype=rows.dtype)
    as_f32 = torch.empty(width * block, hidden, dtype=torch.float32)
    acc = torch.empty(block, hidden, dtype=torch.float32)
    for start in range(0, num_tokens, block):
        n = min(block, num_tokens - start)
        end = start + n
        a = acc[:n]
        a.zero_()
        if width:
            g = gathered[: width * n]
            torch.index_select(rows, 0, idx_t[:, start:end].reshape(-1), out=g)
            f = as_f32[: width * n]
            f.copy_(g)  # one vectorised cast; a mixed-dtype add_ is 3x slower
            for j in range(width):
                part = f[j * n : (j + 1) * n]
                if w_t is None:
                    a.add_(part)
                else:
                    a.addcmul_(part, w_t[j, start:end].unsqueeze(1))
        for b in bias:
            a.add_(b[start:end])
        out[start:end].copy_(a)
