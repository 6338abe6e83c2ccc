"""The reference backend's fused CPU kernels (mpiep._ops, src/ops/reference_cpu_ops.cpp)
give the bits of the pure-torch code they replace (reduce.py, mpiep.fp8) and of the numpy
oracle, on seeded random inputs: padded slots, repeated rows, zero and one tokens, NaN and
Inf, several hidden sizes; and fused.py falls back to torch where they do not apply."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest
import torch

import oracle
from conftest import bf16_bits, bf16_tensor, fp8_bytes, run_once

# Single-process (no MPI): once from plain pytest, not again on every rank of the MPI run.
pytestmark = [pytest.mark.timeout(300), run_once]

HIDDEN = [128, 256, 7168, 72]  # 72: not a multiple of the 8 or 16 channels of a vector
FP8_HIDDEN = [128, 256, 640, 7168]  # 640: five blocks, so the last UE8M0 word is partial
# torch's addcmul_ is a fused multiply-add on AVX2/AVX-512 CPUs, as the fused loops are;
# its baseline ("DEFAULT") build rounds the product first, so there the weighted sums of the
# torch path are only held to the oracle's tolerance.
TORCH_ADDCMUL_IS_FMA = torch.backends.cpu.get_cpu_capability() != "DEFAULT"


@pytest.fixture(scope="module")
def ops():
    from mpiep.backends.reference import fused

    module = fused.native()
    if module is None:
        if (
            os.environ.get("MPIEP_EXPECT_CORE") == "1"
            and os.environ.get("MPIEP_REFERENCE_FUSED", "1") != "0"
        ):
            pytest.fail("mpiep._ops is expected here but has no fused reference kernels")
        pytest.skip("mpiep._ops is not built here (the reference backend uses torch)")
    return module


@pytest.fixture
def torch_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """fused.py as on a machine without the op layer."""
    from mpiep.backends.reference import fused

    monkeypatch.setattr(fused, "native", lambda: None)
    yield


# --------------------------------------------------------------------------- inputs
def _bf16_rows(rng: np.random.Generator, n: int, hidden: int) -> np.ndarray:
    """BF16 bits [n, hidden]: magnitudes over 1e-3..1e3 per row, some exact zeros, and a few
    arbitrary finite bit patterns (subnormals, huge values)."""
    mag = 10.0 ** rng.uniform(-3, 3, (n, 1))
    vals = (rng.standard_normal((n, hidden)) * mag).astype(np.float32)
    vals[rng.random((n, hidden)) < 0.02] = 0.0
    bits = oracle.f32_to_bf16(vals)
    wild = rng.integers(0, 1 << 16, (n, hidden), dtype=np.uint16)
    wild[(wild & 0x7F80) == 0x7F80] &= 0x3FFF  # keep them finite
    wild[(wild & 0x7F80) > 0x4F00] &= 0x4EFF  # and below 2^31, so that sums do not overflow
    pick = rng.random((n, hidden)) < 0.01
    bits[pick] = wild[pick]
    return bits


def _routing(
    rng: np.random.Generator, tokens: int, width: int, num_rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """idx [T, J] into rows [0, num_rows] (num_rows: the zero row of padded slots), with
    repeats, and float32 weights (0 for padded slots, as the backend passes them)."""
    idx = rng.integers(0, max(num_rows, 1), (tokens, width))
    idx[rng.random((tokens, width)) < 0.25] = num_rows  # a slot without a row
    if tokens and width > 1:
        idx[0, 1] = idx[0, 0]  # the same row twice in one token
    w = rng.uniform(-1.0, 1.0, (tokens, width)).astype(np.float32)
    w[idx == num_rows] = 0.0
    return idx.astype(np.int64), w


def _same_bf16(got: torch.Tensor, want: np.ndarray) -> None:
    """Bit-identical BF16, except that NaNs only need to be NaNs (their payload bits differ
    between torch's own CPU paths)."""
    g = bf16_bits(got)
    g_nan = (g & 0x7FFF) > 0x7F80
    w_nan = (want & 0x7FFF) > 0x7F80
    assert np.array_equal(g_nan, w_nan), np.argwhere(g_nan != w_nan)[:5]
    diff = np.argwhere((g != want) & ~g_nan)
    assert diff.size == 0, (diff[:5], g[tuple(diff[0])], want[tuple(diff[0])])


CASES = [
    # (tokens, width, num_rows, weighted, biases)
    (64, 4, 200, False, 0),
    (64, 4, 200, True, 0),
    (33, 8, 100, True, 0),
    (17, 3, 40, False, 2),
    (1, 1, 1, True, 0),
    (1, 5, 3, False, 1),
    (0, 3, 10, True, 0),
    (9, 0, 0, False, 0),
    (9, 0, 0, False, 2),
]


@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize(("tokens", "width", "num_rows", "weighted", "biases"), CASES)
def test_gather_sum_matches_torch_and_oracle(
    ops, hidden: int, tokens: int, width: int, num_rows: int, weighted: bool, biases: int
) -> None:
    from mpiep.backends.reference import reduce

    rng = np.random.default_rng([hidden, tokens, width, num_rows, int(weighted), biases])
    bits = _bf16_rows(rng, num_rows + 1, hidden)
    bits[num_rows] = 0  # the row that padded slots point at
    idx, w = _routing(rng, tokens, width, num_rows)
    bias = [_bf16_rows(rng, tokens, hidden) for _ in range(biases)]
    rows, idx_t = bf16_tensor(bits), torch.from_numpy(idx)
    w_t = torch.from_numpy(w) if weighted else None
    bias_t = [bf16_tensor(b) for b in bias]

    fused_out = torch.empty(tokens, hidden, dtype=torch.bfloat16)
    ops.reference_gather_sum(rows, idx_t, fused_out, w_t, bias_t)
    _same_bf16(fused_out, oracle.gather_sum(bits, idx, w if weighted else None, bias))

    torch_out = torch.empty_like(fused_out)
    reduce.gather_sum(rows, idx_t, torch_out, weights=w_t, bias=bias_t)
    if weighted and width > 1 and not TORCH_ADDCMUL_IS_FMA:
        np.testing.assert_allclose(torch_out.float(), fused_out.float(), rtol=2.0**-7, atol=1e-30)
    else:
        _same_bf16(torch_out, bf16_bits(fused_out))


@pytest.mark.parametrize("hidden", [128, 7168])
def test_gather_sum_reads_strided_rows(ops, hidden: int) -> None:
    """Rows that are a field of packed rows (ll_staged.py: [row | tags]) and an output that
    is a slice of a wider tensor."""
    rng = np.random.default_rng(hidden)
    bits = _bf16_rows(rng, 50, hidden)
    packed = torch.zeros(50, hidden + 8, dtype=torch.bfloat16)
    packed[:, :hidden] = bf16_tensor(bits)
    idx, w = _routing(rng, 20, 8, 49)
    wide = torch.zeros(20, hidden + 16, dtype=torch.bfloat16)
    out = wide[:, 8 : 8 + hidden]
    ops.reference_gather_sum(
        packed[:, :hidden], torch.from_numpy(idx), out, torch.from_numpy(w), []
    )
    _same_bf16(out, oracle.gather_sum(bits, idx, w))
    assert torch.all(wide[:, :8] == 0) and torch.all(wide[:, 8 + hidden :] == 0)


@pytest.mark.parametrize("weighted", [False, True])
def test_gather_sum_non_finite_rows(ops, weighted: bool) -> None:
    """NaN and Inf move through the sums like any other value (Inf - Inf gives NaN), as on
    the torch path."""
    from mpiep.backends.reference import reduce

    rng = np.random.default_rng(11)
    hidden = 256
    bits = _bf16_rows(rng, 30, hidden)
    for r, c, v in [
        (0, 0, 0x7F80),
        (1, 0, 0xFF80),
        (2, 5, 0x7FC0),
        (3, 9, 0xFFC1),
        (4, 200, 0x7F80),
    ]:
        bits[r, c] = v
    idx = rng.integers(0, 30, (40, 6)).astype(np.int64)
    idx[:5, :2] = [[0, 1], [0, 2], [3, 4], [0, 0], [4, 1]]
    w = rng.uniform(0.1, 1.0, (40, 6)).astype(np.float32) if weighted else None
    rows, idx_t = bf16_tensor(bits), torch.from_numpy(idx)
    w_t = None if w is None else torch.from_numpy(w)
    fused_out = torch.empty(40, hidden, dtype=torch.bfloat16)
    ops.reference_gather_sum(rows, idx_t, fused_out, w_t, [])
    torch_out = torch.empty_like(fused_out)
    reduce.gather_sum(rows, idx_t, torch_out, weights=w_t)
    assert torch.isnan(fused_out.float()).any() and torch.isinf(fused_out.float()).any()
    if weighted and not TORCH_ADDCMUL_IS_FMA:
        assert torch.equal(torch.isnan(torch_out), torch.isnan(fused_out))
    else:
        _same_bf16(torch_out, bf16_bits(fused_out))
    with np.errstate(invalid="ignore", over="ignore"):
        want = oracle.gather_sum(bits, idx, w)
    _same_bf16(fused_out, want)


def test_gather_sum_refuses_bad_arguments(ops) -> None:
    rows = torch.zeros(4, 128, dtype=torch.bfloat16)
    out = torch.empty(2, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="outside"):
        ops.reference_gather_sum(rows, torch.tensor([[0, 4], [1, 2]]), out, None, [])
    with pytest.raises(ValueError, match="idx must have dtype"):
        ops.reference_gather_sum(rows, torch.zeros(2, 2, dtype=torch.int32), out, None, [])
    with pytest.raises(ValueError, match="out must be"):
        ops.reference_gather_sum(rows, torch.zeros(3, 2, dtype=torch.int64), out, None, [])
    with pytest.raises(ValueError, match="rows must have dtype"):
        ops.reference_gather_sum(rows.float(), torch.zeros(2, 2, dtype=torch.int64), out, None, [])


@pytest.mark.parametrize("hidden", [128, 7168])
@pytest.mark.parametrize(("tokens", "topk"), [(0, 8), (1, 1), (128, 8), (5, 0)])
def test_low_latency_combine_sum(ops, hidden: int, tokens: int, topk: int) -> None:
    """Low-latency combine's sum as ll_staged.py calls it: received rows in arrival order
    plus a zero row, idx[t, k] the row of pair (t, k), weights 0 where there is none."""
    from mpiep.backends.reference import fused, reduce

    rng = np.random.default_rng([hidden, tokens, topk])
    has = rng.random((tokens, topk)) >= 0.2
    num_back = int(has.sum())
    bits = _bf16_rows(rng, num_back + 1, hidden)
    bits[num_back] = 0
    idx = np.full((tokens, topk), num_back, dtype=np.int64)
    idx[has] = rng.permutation(num_back)
    w = np.where(has, rng.uniform(0.0, 1.0, (tokens, topk)), 0.0).astype(np.float32)
    rows, idx_t, w_t = bf16_tensor(bits), torch.from_numpy(idx), torch.from_numpy(w)
    fused_out = torch.full((tokens, hidden), 7.0, dtype=torch.bfloat16)
    fused.gather_sum(rows, idx_t, fused_out, weights=w_t)
    _same_bf16(fused_out, oracle.gather_sum(bits, idx, w))
    torch_out = torch.full((tokens, hidden), 7.0, dtype=torch.bfloat16)
    reduce.gather_sum(rows, idx_t, torch_out, weights=w_t)
    if TORCH_ADDCMUL_IS_FMA or topk < 2:
        _same_bf16(torch_out, bf16_bits(fused_out))


# --------------------------------------------------------------------------- FP8 cast
def _fp8_inputs(seed: int, tokens: int, hidden: int) -> np.ndarray:
    """float32 [T, H]: per-block magnitudes from 1e-6 to 1e4, an all-zero block, tiny and
    negative-zero values, and values on e4m3 rounding ties once scaled."""
    rng = np.random.default_rng(seed)
    groups = hidden // 128
    mag = 10.0 ** rng.uniform(-6, 4, (tokens, groups, 1))
    x = (rng.standard_normal((tokens, groups, 128)) * mag).astype(np.float32)
    if tokens:
        x[0, 0] = 0.0
        x[-1, -1, :4] = [1e-30, -1e-30, 3e-5, -0.0]
        if groups > 1:  # amax 448: the scale is exactly 1, so these are e4m3 ties
            x[0, 1, :6] = [448.0, 2.0**-10 * 3, 2.0**-9 * 5, 1.0625 * 2, 13.0, -9.0]
    return x.reshape(tokens, hidden)


def _same_fp8(got: tuple[torch.Tensor, torch.Tensor], want: tuple[np.ndarray, np.ndarray]) -> None:
    """e4m3 bytes and scales identical, NaN for NaN (a NaN's sign and payload aside)."""
    q, s = fp8_bytes(got[0]), got[1].contiguous().numpy()
    wq, ws = want
    q_nan, wq_nan = (q & 0x7F) == 0x7F, (wq & 0x7F) == 0x7F
    assert np.array_equal(q_nan, wq_nan) and np.array_equal(q[~q_nan], wq[~wq_nan])
    if s.dtype == np.float32:
        assert np.array_equal(np.isnan(s), np.isnan(ws))
        assert np.array_equal(s[~np.isnan(s)], ws[~np.isnan(ws)])
    else:
        assert np.array_equal(s, ws)


MODES = [(False, False), (True, False), (True, True), (False, True)]


@pytest.mark.parametrize("hidden", FP8_HIDDEN)
@pytest.mark.parametrize("tokens", [0, 1, 17])
@pytest.mark.parametrize(("round_scale", "use_ue8m0"), MODES)
def test_cast_matches_torch_and_oracle(
    ops, hidden: int, tokens: int, round_scale: bool, use_ue8m0: bool
) -> None:
    from mpiep import fp8

    x32 = _fp8_inputs(hidden + tokens, tokens, hidden)
    x = bf16_tensor(oracle.f32_to_bf16(x32))
    got = ops.reference_cast_to_fp8(x, round_scale, use_ue8m0)
    assert got[0].dtype == torch.float8_e4m3fn and tuple(got[0].shape) == (tokens, hidden)
    want_shape = (tokens, -(-hidden // 512)) if use_ue8m0 else (tokens, hidden // 128)
    assert tuple(got[1].shape) == want_shape
    ref = oracle.per_token_cast_to_fp8(oracle.bf16_to_f32(bf16_bits(x)), round_scale, use_ue8m0)
    _same_fp8(got, ref)
    q, s = fp8.per_token_cast_to_fp8(x, round_scale, use_ue8m0)
    _same_fp8(got, (fp8_bytes(q), s.contiguous().numpy()))
    # float32 input, straight
    got32 = ops.reference_cast_to_fp8(torch.from_numpy(x32), round_scale, use_ue8m0)
    _same_fp8(got32, oracle.per_token_cast_to_fp8(x32, round_scale, use_ue8m0))


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize(("round_scale", "use_ue8m0"), MODES)
def test_cast_non_finite_blocks(ops, bad: float, round_scale: bool, use_ue8m0: bool) -> None:
    """A block with an Inf or NaN gets an Inf or NaN scale and dequantises to NaN; the other
    blocks are those of the torch path (docs/semantics.md)."""
    from mpiep import fp8

    x32 = _fp8_inputs(5, 6, 640)
    x32[1, 130] = bad
    x32[4, 640 - 3] = bad  # in the last block, whose UE8M0 word is partial
    x32[2, 0:128] = bad  # a whole block
    x = bf16_tensor(oracle.f32_to_bf16(x32))
    got = ops.reference_cast_to_fp8(x, round_scale, use_ue8m0)
    q, s = fp8.per_token_cast_to_fp8(x, round_scale, use_ue8m0)
    _same_fp8(got, (fp8_bytes(q), s.contiguous().numpy()))
    back = fp8.per_token_cast_back(*got).float()
    for t, lo in [(1, 128), (4, 512), (2, 0)]:
        assert torch.isnan(back[t, lo : lo + 128]).all()
    keep = torch.ones_like(back, dtype=torch.bool)
    keep[1, 128:256] = keep[4, 512:640] = keep[2, 0:128] = False
    assert torch.isfinite(back[keep]).all()


def test_cast_bf16_bit_patterns(ops) -> None:
    """Every finite BF16 bit pattern, in blocks with the pattern's own magnitude mixed in."""
    from mpiep import fp8

    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    bits = bits[(bits & 0x7F80) != 0x7F80]
    bits = np.resize(bits, (-(-bits.size // 1024), 1024))
    x = bf16_tensor(bits)
    for round_scale, use_ue8m0 in MODES:
        got = ops.reference_cast_to_fp8(x, round_scale, use_ue8m0)
        q, s = fp8.per_token_cast_to_fp8(x, round_scale, use_ue8m0)
        _same_fp8(got, (fp8_bytes(q), s.contiguous().numpy()))


def test_cast_refuses_bad_arguments(ops) -> None:
    with pytest.raises(ValueError, match="multiple of 128"):
        ops.reference_cast_to_fp8(torch.zeros(2, 200, dtype=torch.bfloat16), False, False)
    with pytest.raises(ValueError, match="bfloat16 or float32"):
        ops.reference_cast_to_fp8(torch.zeros(2, 128, dtype=torch.float16), False, False)


# --------------------------------------------------------------------------- the choice
def test_fused_module_uses_the_op_layer(ops) -> None:
    from mpiep.backends.reference import fused

    assert fused.native() is ops


def test_env_turns_the_fused_kernels_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from mpiep.backends.reference import fused

    monkeypatch.setenv("MPIEP_REFERENCE_FUSED", "0")
    fused.native.cache_clear()
    try:
        assert fused.native() is None
    finally:
        monkeypatch.delenv("MPIEP_REFERENCE_FUSED")
        fused.native.cache_clear()


@pytest.mark.parametrize("use_native", [True, False])
def test_fused_entry_points_agree_with_torch(
    ops, monkeypatch: pytest.MonkeyPatch, use_native: bool
) -> None:
    """fused.py's functions give the torch path's results with and without the op layer,
    and fall back to torch for inputs the loops do not take (float16, CUDA-less strides)."""
    from mpiep import fp8
    from mpiep.backends.reference import fused, reduce

    if not use_native:
        monkeypatch.setattr(fused, "native", lambda: None)
    rng = np.random.default_rng(3)
    bits = _bf16_rows(rng, 41, 256)
    bits[40] = 0
    idx, w = _routing(rng, 12, 5, 40)
    rows, idx_t, w_t = bf16_tensor(bits), torch.from_numpy(idx), torch.from_numpy(w)
    a, b = torch.empty(12, 256, dtype=torch.bfloat16), torch.empty(12, 256, dtype=torch.bfloat16)
    fused.gather_sum(rows, idx_t, a, weights=w_t)
    reduce.gather_sum(rows, idx_t, b, weights=w_t)
    if TORCH_ADDCMUL_IS_FMA:
        _same_bf16(a, bf16_bits(b))
    x = bf16_tensor(oracle.f32_to_bf16(_fp8_inputs(1, 9, 512)))
    for args in [(x, True, True), (x.half(), False, False), (x.float()[:, ::1], True, False)]:
        got = fused.cast_to_fp8(*args)
        want = fp8.per_token_cast_to_fp8(*args)
        _same_fp8(got, (fp8_bytes(want[0]), want[1].contiguous().numpy()))


# --------------------------------------------------------------------------- the oracle
def test_oracle_f32_add_rounds_once() -> None:
    """f32_add is float32(a + p) rounded once, also where rounding through float64 would tie
    the wrong way; checked against exact rational arithmetic."""
    from fractions import Fraction

    def exact(a: float, p: float) -> np.float32:
        v = Fraction(a) + Fraction(p)
        lo = np.float32(float(v))  # float(v) is rounded once to float64: fix that below
        cands = [np.nextafter(lo, np.float32(-np.inf)), lo, np.nextafter(lo, np.float32(np.inf))]
        dist = [abs(Fraction(float(c)) - v) for c in cands]
        best = min(dist)
        ties = [c for c, d in zip(cands, dist, strict=True) if d == best]
        if len(ties) == 1:
            return ties[0]
        return next(c for c in ties if not (np.float32(c).view(np.uint32) & 1))

    rng = np.random.default_rng(0)
    a = (rng.standard_normal(3000) * 10.0 ** rng.uniform(-5, 5, 3000)).astype(np.float32)
    p = rng.standard_normal(3000) * 10.0 ** rng.uniform(-12, 5, 3000)
    # 1 + 2^-24 + 2^-60: float64 rounds it to the tie 1 + 2^-24, which float32 rounds to 1.0
    a = np.append(a, [np.float32(1.0), np.float32(-1.0), np.float32(1.0)])
    p = np.append(p, [2.0**-24 + 2.0**-60, -(2.0**-24) - 2.0**-60, 2.0**-24 - 2.0**-60])
    got = oracle.f32_add(a, p)
    want = np.array([exact(float(x), float(y)) for x, y in zip(a, p, strict=True)], np.float32)
    assert np.array_equal(got, want)
    assert got[-3] == np.float32(1.0 + 2.0**-23) and got[-1] == np.float32(1.0)
