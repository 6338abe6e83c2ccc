"""FP8 (e4m3fn) quantisation with one float32 scale per token per 128 channels.

One formula, shared by the reference backend, the tests and the CUDA kernels:
``scale = max(amax, 1e-4) / 448`` (float32), optionally rounded up to a power of two;
``q = cast_e4m3(x / scale)`` with round-to-nearest-even. UE8M0 keeps only the scale's
exponent byte; four of them are packed into one int32, little-endian.
"""

from __future__ import annotations

import torch

FP8_BLOCK = 128
FP8_E4M3_MAX = 448.0
AMAX_FLOOR = 1e-4


def round_scale_to_pow2(scale: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= scale, exactly, through the float32 bit pattern.

    Inf and NaN become Inf (a NaN's mantissa must not carry into the sign bit: that gave
    -0.0, and a block holding a NaN came back as zeros instead of NaN)."""
    bits = scale.float().contiguous().view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    exponent = exponent + (((bits & 0x7FFFFF) != 0) & (exponent != 0xFF)).to(torch.int32)
    return (exponent << 23).view(torch.float32)


def pack_ue8m0(scale: torch.Tensor) -> torch.Tensor:
    """[..., G] power-of-two float32 scales -> [..., ceil(G/4)] int32 of exponent bytes."""
    exponent = ((scale.float().contiguous().view(torch.int32) >> 23) & 0xFF).to(torch.uint8)
    groups = exponent.shape[-1]
    padded = (groups + 3) // 4 * 4
    if padded != groups:
        exponent = torch.nn.functional.pad(exponent, (0, padded - groups))
    return exponent.contiguous().view(torch.int32)


def unpack_ue8m0(packed: torch.Tensor, groups: int) -> torch.Tensor:
    """Inverse of :func:`pack_ue8m0`: float32 scales [..., groups]."""
    exponent = packed.contiguous().view(torch.uint8)[..., :groups].to(torch.int32)
    return (exponent << 23).view(torch.float32)


def per_token_cast_to_fp8(
    x: torch.Tensor, round_scale: bool = False, use_ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``x`` [T, H] (H a multiple of 128) to e4m3 with per-128-channel scales.

    Returns ``(q [T, H] float8_e4m3fn, scales)``: float32 [T, H/128], or int32
    [T, ceil(H/512)] of packed UE8M0 bytes with ``use_ue8m0`` (which implies rounding).
    """
    if x.dim() != 2 or x.shape[1] % FP8_BLOCK:
        raise ValueError(f"x must be [T, H] with H a multiple of {FP8_BLOCK}, got {tuple(x.shape)}")
    tokens, hidden = x.shape
    blocks = x.float().view(tokens, hidden // FP8_BLOCK, FP8_BLOCK)
    amax = blocks.abs().amax(dim=2).clamp(min=AMAX_FLOOR)
    # A tensor divisor on purpose: torch on CUDA turns division by a Python scalar into
    # multiplication by its reciprocal, which rounds differently from the kernels' x / 448.
    scale = amax / torch.full_like(amax, FP8_E4M3_MAX)
    if round_scale or use_ue8m0:
        scale = round_scale_to_pow2(scale)
    q = (blocks / scale.unsqueeze(2)).to(torch.float8_e4m3fn).view(tokens, hidden)
    return q, pack_ue8m0(scale) if use_ue8m0 else scale


def per_token_cast_back(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Dequantise to bf16; ``scales`` float32 [.., H/128] or packed UE8M0 int32."""
    hidden = q.shape[-1]
    groups = hidden // FP8_BLOCK
    if scales.dtype == torch.int32:
        scales = unpack_ue8m0(scales, groups)
    blocks = q.float().view(*q.shape[:-1], groups, FP8_BLOCK) * scales.unsqueeze(-1)
    return blocks.view(q.shape).to(torch.bfloat16)
