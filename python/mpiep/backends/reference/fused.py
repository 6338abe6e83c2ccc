"""The one place where the reference backend picks its CPU kernels: the fused single-pass
loops of ``mpiep._ops`` (src/ops/reference_cpu_ops.cpp) where the op layer is built, else
the pure-torch code that defines the results (reduce.py, mpiep.fp8).

Both give the same bits (tests/test_reference_fused.py): the same float32 operations in the
same order, weighted terms added with one rounding (a fused multiply-add, as torch's
vectorised ``addcmul_`` does on AVX2 and AVX-512 CPUs). The fused loops read each row once;
torch widens every BF16 operand into a temporary first, which made the combine sums and the
FP8 cast the largest costs beyond MPI (docs/PERFORMANCE.md). A machine without nvcc
installs without the op layer and runs the torch code. ``MPIEP_REFERENCE_FUSED=0`` asks for
the torch code everywhere (read once per process).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cache
from typing import Any

import torch

from mpiep import fp8
from mpiep.backends.reference import reduce


@cache
def native() -> Any | None:
    """``mpiep._ops`` when it has the fused kernels and they are wanted, else None."""
    if os.environ.get("MPIEP_REFERENCE_FUSED", "1") == "0":
        return None
    try:
        from mpiep.backends.native import ops

        module = ops()
    except (ImportError, OSError):  # not built here, or built against another torch
        return None
    return module if hasattr(module, "reference_gather_sum") else None


def _cpu_bf16_rows(t: torch.Tensor) -> bool:
    """BF16 rows on the CPU whose channels are contiguous (rows may be strided)."""
    on_cpu = t.device.type == "cpu" and t.dtype == torch.bfloat16
    return on_cpu and t.dim() == 2 and t.stride(1) == 1


def gather_sum(
    rows: torch.Tensor,
    idx: torch.Tensor,
    out: torch.Tensor,
    weights: torch.Tensor | None = None,
    bias: Sequence[torch.Tensor] = (),
) -> None:
    """``out[t] = bf16(sum_j weights[t, j] * rows[idx[t, j]] + sum(bias)[t])``: see
    :func:`mpiep.backends.reference.reduce.gather_sum`."""
    ops = native()
    if (
        ops is None
        or not _cpu_bf16_rows(rows)
        or not _cpu_bf16_rows(out)
        or not all(_cpu_bf16_rows(b) for b in bias)
    ):
        reduce.gather_sum(rows, idx, out, weights=weights, bias=bias)
        return
    w = None if weights is None else weights.to(torch.float32).contiguous()
    ops.reference_gather_sum(rows, idx.to(torch.int64).contiguous(), out, w, list(bias))


def cast_to_fp8(
    x: torch.Tensor, round_scale: bool = False, use_ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`mpiep.fp8.per_token_cast_to_fp8` in one pass over ``x``."""
    ops = native()
    usable = (
        x.device.type == "cpu"
        and x.dtype in (torch.bfloat16, torch.float32)
        and x.dim() == 2
        and x.shape[1] % fp8.FP8_BLOCK == 0
        and (x.shape[1] <= 1 or x.stride(1) == 1)
    )
    if ops is None or not usable:
        return fp8.per_token_cast_to_fp8(x, round_scale=round_scale, use_ue8m0=use_ue8m0)
    q, scales = ops.reference_cast_to_fp8(x, round_scale, use_ue8m0)
    return q, scales
