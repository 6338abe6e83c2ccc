"""Local argument checks. Each raises TypeError/ValueError naming the argument.

These run on one rank; ``Buffer`` then shares the outcome with every rank (see
``Communicator.agree``) so that a bad argument on one rank fails the call everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mpiep.errors import CapacityError

FP8_DTYPE = torch.float8_e4m3fn


def check_is_tensor(name: str, value: object, hint: str = "") -> None:
    """A TypeError naming the argument unless ``value`` is a tensor (``hint``: what it
    should be, appended to the message)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}{hint}")


def check_tensor(
    name: str,
    t: object,
    dtype: torch.dtype | Sequence[torch.dtype],
    ndim: int,
    device: torch.device,
    shape: Sequence[int | None] | None = None,
) -> torch.Tensor:
    """``t`` must be a contiguous tensor of ``dtype`` with ``ndim`` dims on ``device``.

    ``shape`` entries that are not None must match exactly.
    """
    check_is_tensor(name, t)
    assert isinstance(t, torch.Tensor)  # for the type checker
    dtypes = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
    if t.dtype not in dtypes:
        want = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype {want}, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if shape is not None:
        for axis, (want_n, got_n) in enumerate(zip(shape, t.shape, strict=True)):
            if want_n is not None and want_n != got_n:
                raise ValueError(
                    f"{name} has size {got_n} in dimension {axis}, expected {want_n} "
                    f"(shape {tuple(t.shape)})"
                )
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous())")
    if t.device.type != device.type or (
        device.index is not None and t.device.index != device.index
    ):
        raise ValueError(f"{name} is on {t.device}, but this Buffer works on {device}")
    return t


def check_topk_idx(topk_idx: torch.Tensor, num_experts: int, full_check: bool) -> None:
    """Expert ids must lie in [-1, num_experts). The range scan needs a device sync,
    so it only runs when ``full_check`` (validation mode) is on."""
    if not full_check or topk_idx.numel() == 0:
        return
    lo, hi = int(topk_idx.min()), int(topk_idx.max())
    if lo < -1 or hi >= num_experts:
        bad = lo if lo < -1 else hi
        raise ValueError(
            f"topk_idx holds expert id {bad}, outside [-1, {num_experts}) (-1 means none)"
        )


def check_pairs_per_expert(topk_idx: torch.Tensor, num_experts: int, max_tokens: int) -> None:
    """Low latency: one rank sends at most ``max_tokens`` (token, slot) pairs to one expert
    (a receiver holds ``max_tokens`` rows per source and expert). Only duplicate expert ids
    within a token's top-k can exceed it. Needs a device sync: validation mode only."""
    ids = topk_idx[topk_idx >= 0]
    if ids.numel() <= max_tokens:
        return
    counts = torch.bincount(ids, minlength=num_experts)
    most = int(counts.max())
    if most > max_tokens:
        expert = int(counts.argmax())
        raise CapacityError(
            f"topk_idx sends {most} (token, slot) pairs to expert {expert}, more than "
            f"num_max_dispatch_tokens_per_rank={max_tokens} (an expert repeated in the top-k "
            "of some tokens)"
        )


def check_num_experts(num_experts: int, num_ranks: int) -> int:
    if not isinstance(num_experts, int) or num_experts <= 0:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if num_experts % num_ranks:
        raise ValueError(
            f"num_experts ({num_experts}) must be a multiple of the number of ranks ({num_ranks})"
        )
    return num_experts // num_ranks


def split_fp8(x: object) -> tuple[object, object | None]:
    """Normal dispatch takes ``x`` or ``(x_e4m3, scales)``; return (data, scales or None)."""
    if isinstance(x, tuple | list):
        if len(x) != 2:
            raise ValueError("FP8 input must be a tuple (x_e4m3 [T, H], scales float32 [T, H/128])")
        return x[0], x[1]
    return x, None
