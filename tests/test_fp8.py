"""Single-process tests of mpiep.fp8 against the numpy oracle (and of the oracle itself)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import oracle
from conftest import bf16_bits, bf16_tensor, fp8_bytes, fp8_tensor

pytestmark = pytest.mark.timeout(120)


def _inputs(seed: int, num_tokens: int, hidden: int) -> torch.Tensor:
    """BF16 [T, H] with per-block magnitudes from 1e-6 to 1e4, zero blocks and tiny values."""
    rng = np.random.default_rng(seed)
    groups = hidden // 128
    mag = 10.0 ** rng.uniform(-6, 4, (num_tokens, groups, 1))
    x = (rng.standard_normal((num_tokens, groups, 128)) * mag).astype(np.float32)
    if num_tokens:
        x[0, 0] = 0.0  # an all-zero block: scale clamps at 1e-4 / 448
        x[-1, -1, :4] = [1e-30, -1e-30, 3e-5, -0.0]
    return torch.from_numpy(x.reshape(num_tokens, hidden)).to(torch.bfloat16)


def _oracle_input(x: torch.Tensor) -> np.ndarray:
    return oracle.bf16_to_f32(bf16_bits(x))


# --------------------------------------------------------------------------- oracle sanity
def test_oracle_e4m3_matches_torch_cast() -> None:
    """The numpy e4m3 rounding agrees with torch's cast on values inside the e4m3 range."""
    rng = np.random.default_rng(1)
    v = np.concatenate(
        [
            rng.standard_normal(50_000).astype(np.float32) * 100,
            (rng.standard_normal(20_000) * 1e-2).astype(np.float32),
            np.float32([0.0, -0.0, 448.0, -448.0, 460.0, 2.0**-10, 3 * 2.0**-11, 2.0**-6]),
        ]
    )
    got = oracle.e4m3_encode(oracle.e4m3_round(v))
    want = torch.from_numpy(v).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    assert np.array_equal(got, want)


def test_oracle_e4m3_codebook() -> None:
    """Every non-NaN byte decodes to torch's value and encodes back to itself."""
    b = np.arange(256, dtype=np.uint8)
    vals = oracle.e4m3_decode(b)
    finite = ~np.isnan(vals)
    assert finite.sum() == 254
    torch_vals = torch.from_numpy(b).view(torch.float8_e4m3fn).float().numpy()
    assert np.array_equal(vals[finite], torch_vals[finite])
    assert np.array_equal(oracle.e4m3_encode(vals[finite]), b[finite])
    assert vals[finite].max() == 448.0


def test_oracle_bf16_rounding_matches_torch() -> None:
    rng = np.random.default_rng(2)
    v = (rng.standard_normal(100_000) * 10.0 ** rng.uniform(-20, 20, 100_000)).astype(np.float32)
    want = torch.from_numpy(v).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(oracle.f32_to_bf16(v), want)
    assert np.array_equal(oracle.bf16_to_f32(want), torch.from_numpy(v).bfloat16().float().numpy())


def test_oracle_ue8m0_pack_roundtrip() -> None:
    scales = np.ldexp(np.float32(1.0), np.arange(-20, 12).reshape(2, 16)).astype(np.float32)
    packed = oracle.pack_ue8m0(scales)
    assert packed.dtype == np.int32 and packed.shape == (2, 4)
    # Little-endian: byte j of int i is group 4i + j.
    assert packed.view(np.uint8).reshape(2, 16)[0, 0] == 127 - 20
    assert np.array_equal(oracle.unpack_ue8m0(packed), scales)
    three = oracle.pack_ue8m0(scales[:, :13])  # 13 groups: 4 words, the last with 1 byte
    assert three.shape == (2, 4) and np.all(three.view(np.uint8).reshape(2, 16)[:, 13:] == 0)
    assert np.array_equal(oracle.unpack_ue8m0(three, 13), scales[:, :13])


# --------------------------------------------------------------------------- mpiep.fp8
@pytest.mark.parametrize("hidden", [128, 2048, 7168])
@pytest.mark.parametrize("num_tokens", [0, 1, 17])
@pytest.mark.parametrize("round_scale", [False, True])
def test_cast_to_fp8_matches_oracle(hidden: int, num_tokens: int, round_scale: bool) -> None:
    from mpiep import fp8

    x = _inputs(hidden + num_tokens, num_tokens, hidden)
    q, s = fp8.per_token_cast_to_fp8(x, round_scale=round_scale)
    want_q, want_s = oracle.per_token_cast_to_fp8(_oracle_input(x), round_scale=round_scale)
    assert q.dtype == torch.float8_e4m3fn and tuple(q.shape) == (num_tokens, hidden)
    assert s.dtype == torch.float32 and tuple(s.shape) == (num_tokens, hidden // 128)
    assert np.array_equal(s.contiguous().numpy(), want_s)
    assert np.array_equal(fp8_bytes(q), want_q)


@pytest.mark.parametrize("hidden", [128, 512, 640, 2048 + 384, 7168])
def test_cast_to_fp8_ue8m0(hidden: int) -> None:
    """UE8M0: power-of-two scales packed four exponent bytes per int32, little-endian, in
    ceil(H/512) words; the bytes past the last block are 0."""
    from mpiep import fp8

    x = _inputs(7, 9, hidden)
    q, s = fp8.per_token_cast_to_fp8(x, round_scale=True, use_ue8m0=True)
    want_q, want_s = oracle.per_token_cast_to_fp8(_oracle_input(x), use_ue8m0=True)
    assert s.dtype == torch.int32 and tuple(s.shape) == (9, -(-hidden // 512))
    unused = s.contiguous().view(torch.uint8)[:, hidden // 128 :]
    assert torch.all(unused == 0), unused
    assert np.array_equal(s.contiguous().numpy(), want_s)
    assert np.array_equal(fp8_bytes(q), want_q)


@pytest.mark.parametrize("hidden", [128, 4096])
def test_cast_back_matches_oracle(hidden: int) -> None:
    from mpiep import fp8

    rng = np.random.default_rng(hidden)
    b = rng.integers(0, 256, (13, hidden), dtype=np.uint8)
    b[(b & 0x7F) == 0x7F] = 0
    scales = rng.uniform(1e-4, 4.0, (13, hidden // 128)).astype(np.float32)
    out = fp8.per_token_cast_back(fp8_tensor(b), torch.from_numpy(scales))
    assert out.dtype == torch.bfloat16 and tuple(out.shape) == (13, hidden)
    assert np.array_equal(bf16_bits(out), oracle.per_token_cast_back(b, scales))


def test_roundtrip_error_is_bounded() -> None:
    """Dequantised values are within e4m3's half-ulp (2**-4 relative) of the input."""
    from mpiep import fp8

    x = _inputs(3, 32, 2048)
    back = fp8.per_token_cast_back(*fp8.per_token_cast_to_fp8(x))
    xf = x.float().numpy().reshape(32, 16, 128)
    err = np.abs(back.float().numpy().reshape(32, 16, 128) - xf)
    amax = np.abs(xf).max(axis=2, keepdims=True)
    # relative 2**-4 for normal values, plus the subnormal quantum 2**-9 * scale
    bound = np.abs(xf) * 2.0**-4 + np.maximum(amax, 1e-4) / 448 * 2.0**-9 + 1e-30
    assert np.all(err <= bound * 1.01 + np.abs(xf) * 2.0**-8)


def test_cast_rejects_hidden_not_multiple_of_128() -> None:
    from mpiep import fp8

    with pytest.raises(ValueError, match=r"128|hidden"):
        fp8.per_token_cast_to_fp8(bf16_tensor(np.zeros((2, 200), np.uint16)))


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize(
    ("round_scale", "use_ue8m0"), [(False, False), (True, False), (True, True)]
)
def test_non_finite_input_makes_its_block_non_finite(
    bad: float, round_scale: bool, use_ue8m0: bool
) -> None:
    """docs/semantics.md (issue 11, item 9): an Inf or NaN in a 128-channel block makes the
    whole block dequantise to NaN; other blocks are untouched. Before the fix a NaN with
    round_scale/UE8M0 gave a scale of -0.0 and the block came back as zeros: silent garbage."""
    from mpiep.fp8 import per_token_cast_back, per_token_cast_to_fp8

    x = _inputs(5, 3, 512)
    want_other = per_token_cast_back(*per_token_cast_to_fp8(x, round_scale, use_ue8m0))
    x[1, 130] = bad  # token 1, block 1
    back = per_token_cast_back(*per_token_cast_to_fp8(x, round_scale, use_ue8m0)).float()
    assert torch.isnan(back[1, 128:256]).all(), back[1, 128:136]
    keep = torch.ones_like(back, dtype=torch.bool)
    keep[1, 128:256] = False
    assert torch.equal(back[keep], want_other.float()[keep])
