"""The combine reductions: per token, a float32 sum of received BF16 rows, cast once.

Rows are gathered per small block of tokens rather than scattered with ``index_add_``:
each received row is read from memory once, the float32 accumulator of a block stays in
cache, and each output row is written once (``index_add_`` costs a read-modify-write of a
float32 output row per received row, and a per-row dispatch inside torch). With ranks
sharing cores, small blocks win clearly: 32 rows of 7168 per block took half the CPU time
of 512. The summation order is fixed: the first slot's row, then slots ``j = 1, 2, ...`` in
turn (source ranks in rank order for normal combine, top-k slots in order for low-latency
combine); starting from that row rather than from 0.0 can only change the sign of a zero.
A weighted term is ``acc.addcmul_(row, w)``, one fused multiply-add on AVX2/AVX-512 CPUs.

This is the definition; where the op layer is built, fused.py runs the same sums in one
pass per token (src/ops/reference_cpu_ops.cpp) with the same bits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

ROWS_PER_BLOCK = 32


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
    rows_per_block: int = ROWS_PER_BLOCK,
) -> None:
    """``out[t] = bf16(sum_j weights[t, j] * rows[idx[t, j]] + sum(bias)[t])`` in float32.

    ``rows`` ``[N, H]`` BF16 on the CPU (may be a strided view of packed rows) whose row
    ``idx`` points at for missing entries must be zeros; ``weights`` float32 ``[T, J]`` or
    None (all ones); ``out`` ``[T, H]`` BF16 CPU.
    """
    num_tokens, width = idx.shape
    hidden = rows.shape[1]
    if width == 0 or num_tokens == 0:
        out.zero_()
        for b in bias:
            out.add_(b)
        return
    block = min(max(1, rows_per_block // width), num_tokens)
    full = num_tokens // block  # blocks of exactly ``block`` tokens; a shorter one may follow
    gathered = torch.empty(width * block, hidden, dtype=rows.dtype)
    acc = torch.empty(block, hidden, dtype=torch.float32)
    # What each block needs is cut once (one C++ call each) rather than sliced per block,
    # so that the Python work per block is a handful of op calls.
    head = full * block
    selections = idx[:head].view(full, block, width).transpose(1, 2).reshape(full, -1).unbind(0)
    targets = out[:head].view(full, block, hidden).unbind(0)
    bias_blocks = [b[:head].view(full, block, hidden).unbind(0) for b in bias]
    w_blocks: Sequence[torch.Tensor | None] = [None] * full
    if weights is not None:
        w_blocks = weights[:head].view(full, block, width, 1).transpose(1, 2).unbind(0)
    parts = gathered.view(width, block, hidden).unbind(0)
    for k in range(full):
        _block_sum(rows, selections[k], gathered, parts, acc, w_blocks[k])
        for bb in bias_blocks:
            acc.add_(bb[k])
        targets[k].copy_(acc)
    if head < num_tokens:  # the last, shorter block, with views of its own
        n = num_tokens - head
        g, a = gathered[: width * n], acc[:n]
        w = None if weights is None else weights[head:].t().unsqueeze(2)
        _block_sum(rows, idx[head:].t().reshape(-1), g, g.view(width, n, hidden).unbind(0), a, w)
        for b in bias:
            a.add_(b[head:])
        out[head:].copy_(a)


def _block_sum(
    rows: torch.Tensor,
    sel: torch.Tensor,
    gathered: torch.Tensor,
    parts: Sequence[torch.Tensor],
    acc: torch.Tensor,
    weights: torch.Tensor | None,
) -> None:
    """``acc = sum_j weights[j] * rows[sel[j]]`` for one block, slot after slot. BF16
    operands are widened inside each op: measured faster than widening the block first
    and adding in float32, or than ``torch.sum`` over the slots."""
    torch.index_select(rows, 0, sel, out=gathered)
    if weights is None:
        acc.copy_(parts[0])
        for j in range(1, len(parts)):
            acc.add_(parts[j])
    else:
        ws = weights.unbind(0)
        torch.mul(parts[0], ws[0], out=acc)
        for j in range(1, len(parts)):
            acc.addcmul_(parts[j], ws[j])
