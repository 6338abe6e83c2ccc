"""The op layer as torch custom ops (``torch.ops.mpiep.*``, src/ops/torch_library.cpp): the
fake (meta) implementations torch.compile needs, the per-device sequence tensor, and
:data:`COMPILED`, the entries the engines call while torch.compile traces them
(:func:`mpiep.backends.native.pick`). Loaded with the op layer (``native.ops()``); torch
also imports it on its own when it needs a fake implementation (``set_python_module``).

Eager calls keep the pybind entries of ``mpiep._ops``: they are cheaper per call than the
dispatcher (docs: the numbers are in the issue 10 report). Under torch.compile the same C++
functions run through ``torch.ops.mpiep``, so that the calls sit in the graph.

Side effects: every communication op declares ``Tensor(a!) sequence``, one small tensor per
device that stands for the buffers torch cannot see; see the comment at the top of
src/ops/torch_library.cpp for why that keeps torch.compile from dropping, reordering or
merging the calls. The sequence tensor must exist before torch.compile traces a call (a
tensor made inside a graph would be an intermediate, whose mutation the graph may drop):
the engines create it when they are built (:func:`sequence`).

Not registered: normal-mode dispatch. Its number of output rows is known only after the
notify phase (the host waits for the peers' counts), and it returns host-side lists (tokens
per expert, the handle's host counts) that a graph cannot carry; under torch.compile the
engines call its pybind entry, which is a graph break. ``make_stream_hop`` and
``free_stream_hop`` are set-up calls and stay pybind too.
"""

from __future__ import annotations

from typing import Any

import torch

from mpiep import _ops  # type: ignore[attr-defined]  # defines torch.ops.mpiep

# device index -> the sequence tensor of that device (created outside any graph).
_SEQUENCES: dict[int, torch.Tensor] = {}


def sequence(device: torch.device | str | int) -> torch.Tensor:
    """The sequence tensor of a CUDA device, created on first use: call outside torch.compile
    (the engines do when they are built)."""
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    seq = _SEQUENCES.get(index)
    if seq is None:
        seq = _SEQUENCES[index] = torch.zeros(1, dtype=torch.int64, device=f"cuda:{index}")
    return seq


def _sequence_of(t: torch.Tensor) -> torch.Tensor:
    index = t.device.index
    if index not in _SEQUENCES:
        raise RuntimeError(
            f"mpiep: no sequence tensor for cuda:{index}; the engine creates it when it is "
            "built (mpiep.backends.torch_ops.sequence), outside torch.compile"
        )
    return _SEQUENCES[index]


@torch._dynamo.assume_constant_result
def _ll_num_ranks(ctx: int) -> int:
    """The rank count of a low-latency context, a constant while tracing (the engine's
    context address is one: Dynamo guards on it)."""
    return int(_ops.ll_num_ranks(ctx))


# ---------------------------------------------------------------------------- fake impls
# Shapes exactly as the C++ allocates them (src/ops/*.cpp); the kernels check the inputs.


def _ll_shapes(
    x: torch.Tensor, num_ranks: int, max_tokens: int, num_experts: int
) -> tuple[int, int, int, int]:
    if num_ranks <= 0 or num_experts <= 0 or num_experts % num_ranks:
        raise ValueError(
            f"num_experts ({num_experts}) must be a positive multiple of the number of ranks "
            f"({num_ranks})"
        )
    return num_ranks, num_experts // num_ranks, num_ranks * max_tokens, x.shape[1]


def _ll_meta(x: torch.Tensor, R: int, EL: int, rows: int) -> tuple[torch.Tensor, ...]:
    """(recv_count [EL], src_token_idx [EL, rows], layout_range [EL, R, 2]), int32."""
    return (
        x.new_empty((EL,), dtype=torch.int32),
        x.new_empty((EL, rows), dtype=torch.int32),
        x.new_empty((EL, R, 2), dtype=torch.int32),
    )


@torch.library.register_fake("mpiep::ll_dispatch")
def _ll_dispatch_fake(
    sequence, ctx, num_ranks, x, topk_idx, max_tokens, num_experts, stats, buffer, phases
):
    R, EL, rows, H = _ll_shapes(x, num_ranks, max_tokens, num_experts)
    recv_x = x.new_empty((EL, rows, H), dtype=torch.bfloat16)
    return (recv_x, *_ll_meta(x, R, EL, rows))


@torch.library.register_fake("mpiep::ll_dispatch_fp8")
def _ll_dispatch_fp8_fake(
    sequence, ctx, num_ranks, x, topk_idx, max_tokens, num_experts, round_scale, use_ue8m0,
    stats, buffer, phases,
):  # fmt: skip
    R, EL, rows, H = _ll_shapes(x, num_ranks, max_tokens, num_experts)
    recv_x = x.new_empty((EL, rows, H), dtype=torch.float8_e4m3fn)
    # One float32 scale per 128 channels, or with UE8M0 four exponent bytes per int32.
    if use_ue8m0:
        scales = x.new_empty((EL, rows, (H + 511) // 512), dtype=torch.int32)
    else:
        scales = x.new_empty((EL, rows, H // 128), dtype=torch.float32)
    return (recv_x, scales, *_ll_meta(x, R, EL, rows))


@torch.library.register_fake("mpiep::ll_dispatch_receive")
def _ll_dispatch_receive_fake(*args):
    return None


@torch.library.register_fake("mpiep::ll_combine")
def _ll_combine_fake(
    sequence, ctx, y, topk_idx, topk_weights, src_token_idx, layout_range, hidden, max_tokens,
    num_experts, zero_copy, buffer, phases,
):  # fmt: skip
    return topk_idx.new_empty((topk_idx.shape[0], hidden), dtype=torch.bfloat16)


@torch.library.register_fake("mpiep::ll_combine_out")
def _ll_combine_out_fake(*args):
    return None


def _combine_fake(x: torch.Tensor, topk_weights: torch.Tensor | None, num_tokens: int):
    out = x.new_empty((num_tokens, x.shape[1]), dtype=torch.bfloat16)
    k = 0 if topk_weights is None else topk_weights.shape[1]
    return out, x.new_empty((num_tokens, k), dtype=torch.float32)


@torch.library.register_fake("mpiep::intranode_combine")
def _intranode_combine_fake(
    sequence, runtime, x, topk_weights, recv_src_idx, state, host_counts, bias0, bias1,
    num_tokens, num_sms, hop,
):  # fmt: skip
    return _combine_fake(x, topk_weights, num_tokens)


@torch.library.register_fake("mpiep::internode_combine")
def _internode_combine_fake(
    sequence, runtime, x, topk_weights, state, host_counts, bias0, bias1, num_tokens, num_sms,
    chunk, hop,
):  # fmt: skip
    return _combine_fake(x, topk_weights, num_tokens)


@torch.library.register_fake("mpiep::layout")
def _layout_fake(topk_idx, num_experts, num_ranks, ranks_per_node, hop):
    T = topk_idx.shape[0]
    out = [
        topk_idx.new_empty((num_ranks,), dtype=torch.int32),
        topk_idx.new_empty((num_experts,), dtype=torch.int32),
        topk_idx.new_empty((T, num_ranks), dtype=torch.bool),
    ]
    nodes = num_ranks // ranks_per_node
    if nodes > 1:
        out.append(topk_idx.new_empty((nodes,), dtype=torch.int32))
    return out


@torch.library.register_fake("mpiep::reference_gather_sum")
def _reference_gather_sum_fake(rows, idx, out, weights, bias):
    return None


@torch.library.register_fake("mpiep::reference_cast_to_fp8")
def _reference_cast_to_fp8_fake(x, round_scale, use_ue8m0):
    T, H = x.shape
    q = x.new_empty((T, H), dtype=torch.float8_e4m3fn)
    groups = H // 128
    if use_ue8m0:
        return q, x.new_empty((T, (groups + 3) // 4), dtype=torch.int32)
    return q, x.new_empty((T, groups), dtype=torch.float32)


# ---------------------------------------------------------------------------- compiled path
class _Compiled:
    """The pybind entries' signatures and results, through ``torch.ops.mpiep``: what
    :func:`mpiep.backends.native.pick` returns while torch.compile traces."""

    @staticmethod
    def layout(topk_idx, num_experts, num_ranks, ranks_per_node, hop):  # type: ignore[no-untyped-def]
        out = torch.ops.mpiep.layout(topk_idx, num_experts, num_ranks, ranks_per_node, hop)
        per_node = out[3] if len(out) > 3 else None
        return out[0], per_node, out[1], out[2]

    @staticmethod
    def ll_dispatch(  # type: ignore[no-untyped-def]
        ctx, x, topk_idx, max_tokens, num_experts, use_fp8, round_scale, use_ue8m0, stats,
        buffer, phases,
    ):  # fmt: skip
        seq, R = _sequence_of(x), _ll_num_ranks(ctx)
        if use_fp8:
            return torch.ops.mpiep.ll_dispatch_fp8(
                seq, ctx, R, x, topk_idx, max_tokens, num_experts, round_scale, use_ue8m0,
                stats, buffer, phases,
            )  # fmt: skip
        if use_ue8m0:
            raise ValueError("use_ue8m0 needs use_fp8=True")
        recv_x, count, src, layout = torch.ops.mpiep.ll_dispatch(
            seq, ctx, R, x, topk_idx, max_tokens, num_experts, stats, buffer, phases
        )
        return recv_x, None, count, src, layout

    @staticmethod
    def ll_dispatch_receive(  # type: ignore[no-untyped-def]
        ctx, x, topk_idx, recv_x, recv_scales, recv_count, src_token_idx, layout_range,
        max_tokens, num_experts, use_fp8, round_scale, use_ue8m0, stats, buffer,
    ):  # fmt: skip
        torch.ops.mpiep.ll_dispatch_receive(
            _sequence_of(x), ctx, x, topk_idx, recv_x, recv_scales, recv_count, src_token_idx,
            layout_range, max_tokens, num_experts, use_fp8, round_scale, use_ue8m0, stats,
            buffer,
        )  # fmt: skip

    @staticmethod
    def ll_combine(  # type: ignore[no-untyped-def]
        ctx, y, topk_idx, topk_weights, src_token_idx, layout_range, out, hidden, max_tokens,
        num_experts, zero_copy, buffer, phases,
    ):  # fmt: skip
        seq = _sequence_of(topk_idx)
        if out is None:
            return torch.ops.mpiep.ll_combine(
                seq, ctx, y, topk_idx, topk_weights, src_token_idx, layout_range, hidden,
                max_tokens, num_experts, zero_copy, buffer, phases,
            )  # fmt: skip
        torch.ops.mpiep.ll_combine_out(
            seq, ctx, y, topk_idx, topk_weights, src_token_idx, layout_range, out, hidden,
            max_tokens, num_experts, zero_copy, buffer, phases,
        )  # fmt: skip
        return out

    @staticmethod
    def intranode_combine(  # type: ignore[no-untyped-def]
        rt, x, topk_weights, recv_src_idx, state, host_counts, bias0, bias1, num_tokens,
        num_sms, hop,
    ):  # fmt: skip
        out, weights = torch.ops.mpiep.intranode_combine(
            _sequence_of(x), rt, x, topk_weights, recv_src_idx, state, host_counts, bias0,
            bias1, num_tokens, num_sms, hop,
        )  # fmt: skip
        return out, None if topk_weights is None else weights

    @staticmethod
    def internode_combine(  # type: ignore[no-untyped-def]
        rt, x, topk_weights, state, host_counts, bias0, bias1, num_tokens, num_sms, chunk, hop
    ):
        out, weights = torch.ops.mpiep.internode_combine(
            _sequence_of(x), rt, x, topk_weights, state, host_counts, bias0, bias1, num_tokens,
            num_sms, chunk, hop,
        )  # fmt: skip
        return out, None if topk_weights is None else weights

    def __getattr__(self, name: str) -> Any:
        # Everything without a custom op (normal dispatch, stream hops): the pybind entry,
        # a graph break under torch.compile.
        return getattr(_ops, name)


COMPILED = _Compiled()
