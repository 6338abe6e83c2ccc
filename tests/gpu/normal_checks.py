"""Checks of GPU normal-mode results against the semantics contract, recomputed here from
every rank's gathered inputs (never from what the code under test returned).

Shared by the intranode and internode GPU tests. All functions are pure: callers gather the
inputs with MPI and agree on pass/fail across ranks.
"""

from __future__ import annotations

import numpy as np
import torch


def np_bits(t: torch.Tensor | None) -> np.ndarray | None:
    """A tensor's raw elements as numpy (BF16 as int16, FP8 as uint8)."""
    if t is None:
        return None
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    elif t.dtype == torch.float8_e4m3fn:
        t = t.view(torch.uint8)
    return t.numpy()


def owner_ranks(topk_idx: np.ndarray, experts_per_rank: int) -> np.ndarray:
    """Rank owning each top-k slot, -1 for empty slots."""
    return np.where(topk_idx >= 0, topk_idx // experts_per_rank, -1)


def in_rank_from_inputs(topk_idx: np.ndarray, num_experts: int, num_ranks: int) -> np.ndarray:
    """[T, R] bool: which ranks each token goes to (the contract, from topk_idx alone)."""
    owner = owner_ranks(topk_idx, num_experts // num_ranks)
    return np.stack([(owner == r).any(axis=1) for r in range(num_ranks)], axis=1).reshape(
        topk_idx.shape[0], num_ranks
    )


def expected_dispatch(ins, me: int, num_ranks: int, num_experts: int, K: int, alignment: int):
    """What rank ``me`` must receive: rows by source rank, then source token."""
    E_loc = num_experts // num_ranks
    xs, ss, srcs, ids, ws, per_src = [], [], [], [], [], []
    for x, sc, idx, w in ins:
        owner = owner_ranks(idx, E_loc)
        tok = np.nonzero((owner == me).any(axis=1))[0]
        per_src.append(len(tok))
        xs.append(x[tok])
        ss.append(sc[tok] if sc is not None else None)
        srcs.append(tok.astype(np.int32))
        mine = owner[tok] == me
        ids.append(np.where(mine, idx[tok] - me * E_loc, -1).astype(np.int64))
        ws.append(np.where(mine, w[tok], 0).astype(np.float32))
    exp = {
        "x": np.concatenate(xs),
        "scales": None if ss[0] is None else np.concatenate(ss),
        "src": np.concatenate(srcs),
        "idx": np.concatenate(ids)[:, :K],
        "w": np.concatenate(ws)[:, :K],
        "per_src": np.array(per_src, dtype=np.int32),
    }
    # Per local expert: (token, slot) pairs of every source, from the full top-k.
    all_ids = np.concatenate(ids)
    counts = [int((all_ids == e).sum()) for e in range(E_loc)]
    exp["per_expert"] = [-(-c // alignment) * alignment for c in counts]
    return exp


def check_dispatch(res, exp, K: int, worst: int) -> None:
    n = len(exp["src"])
    rows = worst if worst else n
    assert res.recv_x.shape[0] == rows, f"recv_x rows {res.recv_x.shape[0]} != {rows}"
    got_x = np_bits(res.recv_x)
    assert np.array_equal(got_x[:n], exp["x"]), "recv_x differs (bit-exact)"
    assert not got_x[n:].any(), "recv_x padding must be zero"
    if exp["scales"] is not None:
        got = np_bits(res.recv_x_scales)
        assert np.array_equal(got[:n], exp["scales"]), "recv_x_scales differ"
    else:
        assert res.recv_x_scales is None
    got_src = np_bits(res.handle.recv_src_idx)
    assert np.array_equal(got_src[:n], exp["src"]), "recv_src_idx differs"
    assert (got_src[n:] == -1).all(), "recv_src_idx padding must be -1"
    if K:
        gi, gw = np_bits(res.recv_topk_idx), np_bits(res.recv_topk_weights)
        assert np.array_equal(gi[:n], exp["idx"]), "recv_topk_idx differs"
        assert np.array_equal(gw[:n], exp["w"]), "recv_topk_weights differ"
        assert (gi[n:] == -1).all() and not gw[n:].any(), "top-k padding must be -1 / 0"
    else:
        assert res.recv_topk_idx is None and res.recv_topk_weights is None
    assert np.array_equal(np_bits(res.handle.num_recv_per_src), exp["per_src"]), "num_recv_per_src"
    if worst:
        assert res.num_recv_tokens_per_expert_list == []
        assert res.handle.num_worst_tokens == worst
    else:
        assert res.handle.num_recv_tokens == n
        if K:
            assert res.num_recv_tokens_per_expert_list == exp["per_expert"], (
                f"per-expert counts {res.num_recv_tokens_per_expert_list} != {exp['per_expert']}"
            )


def dequant(x: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    if scales is None:
        return x.float()
    rows, hidden = x.shape
    return (x.float().view(rows, hidden // 128, 128) * scales.unsqueeze(2)).view(rows, hidden)


def expert_output(x: torch.Tensor, scales: torch.Tensor | None, rank: int) -> torch.Tensor:
    """y = bf16((rank + 1) * x): each rank's 'expert' output, reproducible at the source."""
    return (dequant(x, scales) * (rank + 1)).to(torch.bfloat16)


def expected_combine(x, scales, in_rank: torch.Tensor, biases) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 sum over the ranks each token went to, plus biases, and the sum of the
    magnitudes of its terms (for per-element tolerances)."""
    acc = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    mag = torch.zeros_like(acc)
    for r in range(in_rank.shape[1]):
        term = expert_output(x, scales, r).float() * in_rank[:, r : r + 1].float()
        acc += term
        mag += term.abs()
    for b in biases:
        acc += b.float()
        mag += b.float().abs()
    return acc, mag


def close_to_sum(got: torch.Tensor, want: torch.Tensor, mag: torch.Tensor, rel: float, what: str):
    """Per element: |got - want| <= rel * (sum of the terms' magnitudes) + one BF16 step of
    the result + 1e-6. ``rel`` covers the roundings of partial sums a backend makes."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    g = got.float()
    assert torch.isfinite(g).all(), f"{what}: non-finite values"
    tol = rel * mag + 2.0**-8 * want.abs() + 1e-6
    bad = ((g - want).abs() > tol).nonzero()
    if bad.numel():
        at = tuple(bad[0])
        raise AssertionError(
            f"{what}: {bad.shape[0]} elements off, first at {bad[0].tolist()}: "
            f"{g[at].item()} vs {want[at].item()} (tol {tol[at].item()})"
        )
