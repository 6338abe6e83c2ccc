"""Positional calls of the GPU engines, for the tests that drive an engine without a Buffer.

The engines take one request object per operation (``mpiep.backends.base``); these helpers
take the request's fields in order, so the tests' calls stay short and readable.
"""

from __future__ import annotations

from typing import Any


def normal_dispatch(engine: Any, *fields: Any) -> Any:
    """(x, x_scales, topk_idx, topk_weights, layout, handle, num_experts, expert_alignment,
    num_worst_tokens, config)"""
    from mpiep.backends.base import DispatchRequest

    return engine.dispatch(DispatchRequest(*fields))


def normal_combine(engine: Any, *fields: Any) -> Any:
    """(x, handle, topk_weights, bias, config)"""
    from mpiep.backends.base import CombineRequest

    return engine.combine(CombineRequest(*fields))


def ll_dispatch(engine: Any, *fields: Any) -> Any:
    """(x, topk_idx, max_tokens, num_experts, use_fp8, round_scale, use_ue8m0, stats,
    return_recv_hook)"""
    from mpiep.backends.base import LowLatencyDispatchRequest

    return engine.low_latency_dispatch(LowLatencyDispatchRequest(*fields))


def ll_combine(engine: Any, *fields: Any) -> Any:
    """(x, topk_idx, topk_weights, handle, zero_copy, out, return_recv_hook)"""
    from mpiep.backends.base import LowLatencyCombineRequest

    return engine.low_latency_combine(LowLatencyCombineRequest(*fields))
