"""An independent plain-numpy recomputation of mpiep's semantics contract (DESIGN.md section 2).

Nothing here imports torch or mpiep: the tests compare the library against these functions.
Conventions: BF16 tensors travel as ``uint16`` bit patterns, FP8 e4m3fn tensors as ``uint8``
bytes, everything else as plain numpy dtypes. "All ranks" arguments are lists indexed by rank
(what ``comm.allgather`` returns).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FP8_BLOCK = 128  # channels per FP8 scale
E4M3_MAX = 448.0
SCALE_MIN = np.float32(1e-4)  # amax clamp of the FP8 scale

ROUTING_PATTERNS = ("random", "skewed", "holes", "zero_tokens", "all_masked")


# --------------------------------------------------------------------------- BF16 bits
def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """BF16 bit patterns (uint16/int16) to float32 values (exact)."""
    b = np.ascontiguousarray(bits).view(np.uint16).astype(np.uint32)
    return (b << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 to BF16 bit patterns (uint16), rounding to nearest even; NaN stays NaN."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    out = rounded.astype(np.uint16)
    nan = np.isnan(x)
    out[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return out


# --------------------------------------------------------------------------- FP8 e4m3fn
def e4m3_round(x: np.ndarray) -> np.ndarray:
    """Round float32 values to the nearest e4m3fn value (ties to even), saturating at 448."""
    x = np.asarray(x, dtype=np.float32).astype(np.float64)
    a = np.abs(x)
    _, p = np.frexp(a)  # a = m * 2**p, m in [0.5, 1): floor(log2 a) = p - 1
    exp = np.maximum(p - 1, -6)  # below 2**-6 the subnormal quantum 2**-9 applies
    quantum = np.ldexp(1.0, exp - 3)
    q = np.round(a / quantum) * quantum  # np.round rounds half to even
    q = np.minimum(q, E4M3_MAX)
    return np.copysign(q, x).astype(np.float32)


def e4m3_encode(values: np.ndarray) -> np.ndarray:
    """Bytes of float32 values that are exactly representable in e4m3fn (see e4m3_round),
    or NaN."""
    v = np.asarray(values, dtype=np.float32).astype(np.float64)
    nan = np.isnan(v)
    v = np.where(nan, 0.0, v)
    sign = np.signbit(v).astype(np.uint8) << 7
    a = np.abs(v)
    _, p = np.frexp(a)
    e = p - 1
    normal = a >= 2.0**-6
    biased = np.where(normal, e + 7, 0)
    mant = np.where(normal, (a / np.ldexp(1.0, e) - 1.0) * 8.0, a / 2.0**-9)
    if not np.all(mant == np.round(mant)) or np.any(mant >= 8) or np.any(biased > 15):
        raise ValueError("e4m3_encode: a value is not representable in e4m3fn")
    out = (sign | (biased.astype(np.uint8) << 3) | mant.astype(np.uint8)).astype(np.uint8)
    out[nan] = 0x7F  # NaN (its sign is not specified: compare decoded values)
    return out


def e4m3_decode(b: np.ndarray) -> np.ndarray:
    """float32 values of e4m3fn bytes (0x7f/0xff are NaN)."""
    b = np.asarray(b, dtype=np.uint8).astype(np.int64)
    sign = np.where(b & 0x80, -1.0, 1.0)
    e = (b >> 3) & 0xF
    m = b & 0x7
    val = np.where(e == 0, m * 2.0**-9, (1.0 + m / 8.0) * np.ldexp(1.0, e - 7))
    val = np.where((e == 15) & (m == 7), np.nan, val)
    return (sign * val).astype(np.float32)


def fp8_scales(x: np.ndarray, round_scale: bool = False) -> np.ndarray:
    """Per token, per 128 channels: max(amax, 1e-4) / 448 in float32, optionally 2**ceil(log2)."""
    t, h = x.shape
    if h % FP8_BLOCK:
        raise ValueError(f"hidden {h} is not a multiple of {FP8_BLOCK}")
    blocks = np.abs(np.asarray(x, dtype=np.float32)).reshape(t, h // FP8_BLOCK, FP8_BLOCK)
    amax = blocks.max(axis=2) if t else np.zeros((0, h // FP8_BLOCK), np.float32)
    scale = np.maximum(amax, SCALE_MIN) / np.float32(E4M3_MAX)
    scale = scale.astype(np.float32)
    if round_scale:
        m, p = np.frexp(scale)  # exact: a power of two stays, anything else goes up
        scale = np.where(m == 0.5, scale, np.ldexp(np.float32(1.0), p)).astype(np.float32)
        scale[~np.isfinite(m)] = np.inf  # an Inf or NaN amax: the block is lost either way
    return scale


def per_token_cast_to_fp8(
    x: np.ndarray, round_scale: bool = False, use_ue8m0: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """FP8 quantisation of float32 ``x`` [T, H] -> (e4m3 bytes [T, H], scales).

    Scales are float32 [T, H/128], or with ``use_ue8m0`` int32 [T, ceil(H/512)] of packed UE8M0
    exponents (``use_ue8m0`` implies power-of-two scales).
    """
    x = np.asarray(x, dtype=np.float32)
    t = x.shape[0]
    scale = fp8_scales(x, round_scale or use_ue8m0)
    expanded = np.repeat(scale, FP8_BLOCK, axis=1) if t else np.zeros_like(x)
    with np.errstate(invalid="ignore"):  # inf / inf in a block with an Inf: NaN, as documented
        q = e4m3_encode(e4m3_round(x / expanded))
    if use_ue8m0:
        return q, pack_ue8m0(scale)
    return q, scale


def pack_ue8m0(scale: np.ndarray) -> np.ndarray:
    """Power-of-two float32 scales [T, G] -> int32 [T, ceil(G/4)]: byte j of int i is group
    4i+j; the bytes past group G-1 are 0."""
    t, g = scale.shape
    exps = ((np.ascontiguousarray(scale, dtype=np.float32).view(np.uint32) >> 23) & 0xFF).astype(
        np.uint32
    )
    words = (g + 3) // 4
    exps = np.concatenate([exps, np.zeros((t, 4 * words - g), np.uint32)], axis=1)
    e = exps.reshape(t, words, 4)
    packed = e[..., 0] | (e[..., 1] << 8) | (e[..., 2] << 16) | (e[..., 3] << 24)
    return packed.astype(np.uint32).view(np.int32)


def unpack_ue8m0(packed: np.ndarray, groups: int | None = None) -> np.ndarray:
    """int32 [T, ceil(G/4)] of UE8M0 exponents -> float32 scales [T, G] (G: 4 per word
    unless ``groups`` says)."""
    u = np.ascontiguousarray(packed).view(np.uint32)
    e = np.stack([(u >> (8 * j)) & 0xFF for j in range(4)], axis=-1).reshape(u.shape[0], -1)
    return (e[:, :groups].astype(np.uint32) << 23).view(np.float32)


def per_token_cast_back(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Dequantise e4m3 bytes [T, H] with float32 scales [T, H/128] -> BF16 bits [T, H]."""
    vals = e4m3_decode(q)
    expanded = np.repeat(np.asarray(scale, dtype=np.float32), FP8_BLOCK, axis=1)
    return f32_to_bf16(vals * expanded)


# --------------------------------------------------------------------------- float32 sums
def f32_add(acc: np.ndarray, term: np.ndarray) -> np.ndarray:
    """float32 ``acc + term`` rounded once, to nearest even: one step of the combine sums.

    ``term`` is float64 and exact (a float32 weight times a BF16 value needs 32 bits), so
    this is a fused multiply-add. The float64 sum ``s`` is rounded again to float32, which is
    right except where ``s`` lies exactly halfway between two float32 values and the float64
    rounding hid which side the exact sum is on: TwoSum gives that error, and the tie goes
    towards it.
    """
    a = np.asarray(acc, dtype=np.float32).astype(np.float64)
    p = np.asarray(term, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        s = a + p
        bp = s - a
        err = (a - (s - bp)) + (p - bp)  # a + p == s + err exactly
        r = s.astype(np.float32)
        towards = np.where(s > r.astype(np.float64), np.float32(np.inf), np.float32(-np.inf))
        other = np.nextafter(r, towards)
        halfway = (s != r) & (s == (r.astype(np.float64) + other.astype(np.float64)) / 2)
        beyond = np.sign(err) == np.sign(other.astype(np.float64) - r.astype(np.float64))
    return np.where(halfway & (err != 0) & beyond, other, r).astype(np.float32)


def gather_sum(
    rows: np.ndarray,
    idx: np.ndarray,
    weights: np.ndarray | None = None,
    bias: list[np.ndarray] | None = None,
) -> np.ndarray:
    """BF16 bits [T, H] of the combine sums, float32 step by step: per token, the row of the
    first slot times its weight, then ``+ w[t, j] * rows[idx[t, j]]`` for j = 1, 2, ... each
    rounded once (f32_add), then the biases, then one rounding to BF16. ``rows`` BF16 bits
    [N, H]; ``idx`` [T, J]; ``weights`` float32 [T, J] or None (ones); ``bias`` BF16 bits
    [T, H] each. Without slots (J == 0) the biases are added one by one in BF16."""
    t, j = idx.shape
    vals = bf16_to_f32(rows)
    biases = [bf16_to_f32(b) for b in bias or []]
    if j == 0 or t == 0:
        out = np.zeros((t, rows.shape[1]), dtype=np.uint16)
        for b in biases:
            out = f32_to_bf16(f32_add(bf16_to_f32(out), b))
        return out
    w = np.ones((t, j), np.float32) if weights is None else np.asarray(weights, np.float32)
    acc = (vals[idx[:, 0]].astype(np.float64) * w[:, :1]).astype(np.float32)
    for k in range(1, j):
        acc = f32_add(acc, vals[idx[:, k]].astype(np.float64) * w[:, k : k + 1])
    for b in biases:
        acc = f32_add(acc, b)
    return f32_to_bf16(acc)


# --------------------------------------------------------------------------- routing inputs
def make_routing(
    rng: np.random.Generator,
    num_tokens: int,
    num_topk: int,
    num_experts: int,
    num_ranks: int,
    rank: int,
    pattern: str = "random",
) -> tuple[np.ndarray, np.ndarray]:
    """Random top-k routing ``(topk_idx int64 [T, K], topk_weights float32 [T, K])``.

    Experts of one token are distinct. Patterns: ``random``; ``skewed`` (every token to
    rank 0's experts); ``holes`` (~20% of the slots -1); ``zero_tokens`` (the last rank has
    no tokens); ``all_masked`` (every slot -1 on every rank).
    """
    if pattern not in ROUTING_PATTERNS:
        raise ValueError(f"unknown routing pattern {pattern}")
    if pattern == "zero_tokens" and rank == num_ranks - 1:
        num_tokens = 0
    pool = num_experts // num_ranks if pattern == "skewed" else num_experts
    if num_topk > pool:
        raise ValueError(f"top-{num_topk} needs at least {num_topk} experts, pattern has {pool}")
    idx = np.argsort(rng.random((num_tokens, pool)), axis=1)[:, :num_topk].astype(np.int64)
    weights = rng.uniform(0.1, 1.0, (num_tokens, num_topk)).astype(np.float32)
    if pattern == "holes":
        idx[rng.random(idx.shape) < 0.2] = -1
    elif pattern == "all_masked":
        idx[:] = -1
    weights[idx < 0] = 0.0
    return np.ascontiguousarray(idx), np.ascontiguousarray(weights)


# --------------------------------------------------------------------------- layout
def experts_per_rank(num_experts: int, num_ranks: int) -> int:
    if num_experts % num_ranks:
        raise ValueError(f"{num_experts} experts cannot be split over {num_ranks} ranks")
    return num_experts // num_ranks


def owner_rank(topk_idx: np.ndarray, num_experts: int, num_ranks: int) -> np.ndarray:
    """Rank owning each expert slot, -1 for -1 slots."""
    e_local = experts_per_rank(num_experts, num_ranks)
    return np.where(topk_idx >= 0, topk_idx // e_local, -1)


@dataclass
class Layout:
    num_tokens_per_rank: np.ndarray  # [R] int32
    num_tokens_per_rdma_rank: np.ndarray | None  # [nodes] int32, None on one node
    num_tokens_per_expert: np.ndarray  # [E] int32
    is_token_in_rank: np.ndarray  # [T, R] bool


def layout(
    topk_idx: np.ndarray, num_experts: int, num_ranks: int, ranks_per_node: int | None = None
) -> Layout:
    """``get_dispatch_layout`` of one rank, computed token by token."""
    t, k = topk_idx.shape
    in_rank = np.zeros((t, num_ranks), dtype=bool)
    per_expert = np.zeros(num_experts, dtype=np.int64)
    e_local = experts_per_rank(num_experts, num_ranks)
    for token in range(t):
        for slot in range(k):
            e = int(topk_idx[token, slot])
            if e >= 0:
                in_rank[token, e // e_local] = True
                per_expert[e] += 1
    per_rdma = None
    rpn = num_ranks if ranks_per_node is None else ranks_per_node
    num_nodes = num_ranks // rpn
    if num_nodes > 1:
        in_node = in_rank.reshape(t, num_nodes, rpn).any(axis=2)
        per_rdma = in_node.sum(axis=0).astype(np.int32)
    return Layout(
        num_tokens_per_rank=in_rank.sum(axis=0).astype(np.int32),
        num_tokens_per_rdma_rank=per_rdma,
        num_tokens_per_expert=per_expert.astype(np.int32),
        is_token_in_rank=in_rank,
    )


# --------------------------------------------------------------------------- normal mode
def align_up(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


@dataclass
class NormalRecv:
    """What one rank receives in a normal dispatch (rows in contract order)."""

    src_rank: np.ndarray  # [N] int64
    src_token: np.ndarray  # [N] int64
    topk_idx: np.ndarray  # [N, K] int64, local ids or -1
    topk_weights: np.ndarray | None  # [N, K] float32, 0 where -1
    num_recv_per_src: np.ndarray  # [R] int64
    num_recv_tokens_per_expert: list[int]  # per local expert, padded to the alignment

    @property
    def num_rows(self) -> int:
        return int(self.src_rank.shape[0])

    def rows(self, per_rank: list[np.ndarray]) -> np.ndarray:
        """Pick the received rows out of every rank's per-token array (x, scales, ...)."""
        if self.num_rows == 0:
            ref = per_rank[0]
            return np.zeros((0, *ref.shape[1:]), dtype=ref.dtype)
        return np.stack(
            [per_rank[s][t] for s, t in zip(self.src_rank, self.src_token, strict=True)]
        )


def normal_dispatch(
    topk_idx_all: list[np.ndarray],
    topk_weights_all: list[np.ndarray] | None,
    num_experts: int,
    rank: int,
    expert_alignment: int = 1,
) -> NormalRecv:
    """Rows that ``rank`` receives: by source rank, then source token; each token once."""
    num_ranks = len(topk_idx_all)
    e_local = experts_per_rank(num_experts, num_ranks)
    first, last = rank * e_local, (rank + 1) * e_local
    src_rank, src_token, idx_rows, w_rows = [], [], [], []
    per_src = np.zeros(num_ranks, dtype=np.int64)
    num_topk = topk_idx_all[0].shape[1]
    for s in range(num_ranks):
        idx = topk_idx_all[s]
        for t in range(idx.shape[0]):
            mine = [(first <= int(e) < last) for e in idx[t]]
            if not any(mine):
                continue
            src_rank.append(s)
            src_token.append(t)
            idx_rows.append(
                [int(e) - first if m else -1 for e, m in zip(idx[t], mine, strict=True)]
            )
            if topk_weights_all is not None:
                w = topk_weights_all[s][t]
                w_rows.append([float(w[k]) if mine[k] else 0.0 for k in range(len(mine))])
            per_src[s] += 1
    n = len(src_rank)
    recv_idx = np.asarray(idx_rows, dtype=np.int64).reshape(n, num_topk)
    # (token, slot) pairs: a token naming an expert in two slots counts twice (semantics.md)
    counts = [int((recv_idx == j).sum()) for j in range(e_local)]
    return NormalRecv(
        src_rank=np.asarray(src_rank, dtype=np.int64),
        src_token=np.asarray(src_token, dtype=np.int64),
        topk_idx=recv_idx,
        topk_weights=(
            None
            if topk_weights_all is None
            else np.asarray(w_rows, dtype=np.float32).reshape(n, num_topk)
        ),
        num_recv_per_src=per_src,
        num_recv_tokens_per_expert=[align_up(c, expert_alignment) for c in counts],
    )


def normal_combine(
    rank: int,
    num_tokens: int,
    recv_all: list[NormalRecv],
    y_all: list[np.ndarray],
    bias: list[np.ndarray] | None = None,
) -> np.ndarray:
    """float32 [T, D] sum, for each token of ``rank``, of the rows every receiver sends back.

    ``y_all[r]`` is receiver r's float32 array (its first ``recv_all[r].num_rows`` rows are
    the real ones); ``bias`` float32 [T, D] arrays are added at the end.
    """
    width = y_all[0].shape[1:]
    out = np.zeros((num_tokens, *width), dtype=np.float64)
    for r, recv in enumerate(recv_all):
        for row in np.nonzero(recv.src_rank == rank)[0]:
            out[recv.src_token[row]] += y_all[r][row]
    for b in bias or []:
        out += b
    return out.astype(np.float32)


# --------------------------------------------------------------------------- low latency
@dataclass
class LowLatencyRecv:
    """What one rank receives in a low-latency dispatch."""

    groups: list[list[np.ndarray]]  # [local expert][source rank] -> sorted source token ids
    recv_count: np.ndarray  # [E_local] int32

    def layout_range(self) -> np.ndarray:
        """[E_local, R, 2] int32 (first row, count) of each source rank's group."""
        e_local = len(self.groups)
        num_ranks = len(self.groups[0]) if e_local else 0
        out = np.zeros((e_local, num_ranks, 2), dtype=np.int32)
        for j, per_src in enumerate(self.groups):
            start = 0
            for s, tokens in enumerate(per_src):
                out[j, s] = (start, len(tokens))
                start += len(tokens)
        return out


def low_latency_dispatch(
    topk_idx_all: list[np.ndarray], num_experts: int, rank: int
) -> LowLatencyRecv:
    """Each (token, k) pair with an expert of ``rank`` is one row (no dedup)."""
    num_ranks = len(topk_idx_all)
    e_local = experts_per_rank(num_experts, num_ranks)
    groups: list[list[np.ndarray]] = []
    for j in range(e_local):
        e = rank * e_local + j
        per_src = []
        for s in range(num_ranks):
            tok, _ = np.nonzero(topk_idx_all[s] == e)
            per_src.append(np.sort(tok).astype(np.int64))
        groups.append(per_src)
    counts = np.asarray([sum(len(g) for g in per_src) for per_src in groups], dtype=np.int32)
    return LowLatencyRecv(groups=groups, recv_count=counts)


def low_latency_combine(
    topk_idx: np.ndarray, topk_weights: np.ndarray, expert_rows: np.ndarray
) -> np.ndarray:
    """float32 [T, H]: sum over k with topk_idx >= 0 of weight * expert_rows[t, k].

    ``expert_rows`` float32 [T, K, H] holds, for each (token, slot), the row that the
    expert's rank returns for it.
    """
    w = np.where(topk_idx >= 0, topk_weights, 0.0).astype(np.float64)
    valid = (topk_idx >= 0)[..., None]
    rows = np.where(valid, expert_rows.astype(np.float64), 0.0)
    return np.einsum("tk,tkh->th", w, rows).astype(np.float32)
