"""Bad arguments raise on every rank, before any data moves, naming the argument or rank.

Rank 1 gets the bad input; it must raise TypeError/ValueError naming the argument, and every
other rank ArgumentMismatchError naming rank 1. After the error the same buffer must still
work (nothing was left half-sent), which every test checks with a good call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from mpi4py import MPI

import oracle
from conftest import collective_check, random_bf16, random_fp8
from mpiep.config import (
    Config,
    get_low_latency_rdma_size_hint,
    get_normal_buffer_size_hint,
)
from mpiep.errors import ArgumentMismatchError, CapacityError

pytestmark = pytest.mark.timeout(120)

BAD = 1  # the rank with the bad input
HIDDEN = 256
E_LOCAL = 4
TOKENS = 6
LL_MAX = 8


# --------------------------------------------------------------------------- Config (1 process)
def test_config_defaults_and_channels() -> None:
    c = Config()
    assert c.num_sms == 24 and c.num_channels == 12
    assert Config(8, 4, 64, 4, 64).num_channels == 4


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_sms": 0},
        {"num_sms": 3},
        {"num_sms": -2},
        {"num_max_nvl_chunked_send_tokens": 0},
        {"num_max_nvl_chunked_recv_tokens": -1},
        {"num_max_rdma_chunked_send_tokens": 0},
        {"num_max_rdma_chunked_recv_tokens": 0},
        {"num_max_nvl_chunked_send_tokens": 300, "num_max_nvl_chunked_recv_tokens": 256},
    ],
)
def test_config_rejects(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="Config"):
        Config(**kwargs)


def test_size_hints() -> None:
    small = get_normal_buffer_size_hint(64, 2048, 4, 8)
    assert get_normal_buffer_size_hint(128, 2048, 4, 8) > small
    assert get_normal_buffer_size_hint(64, 7168, 4, 8) > small
    ll = get_low_latency_rdma_size_hint(128, 7168, 2, 16)
    assert ll >= 2 * 16 * 128 * 7168 * 2  # two buffers of E x max BF16 rows at least
    with pytest.raises(ValueError, match="num_experts"):
        get_low_latency_rdma_size_hint(128, 7168, 4, 18)


def test_buffer_static_configs() -> None:
    from mpiep import Buffer

    saved = Buffer.num_sms
    try:
        Buffer.set_num_sms(20)
        assert Buffer.get_dispatch_config(4).num_sms == 20
        assert Buffer.get_combine_config(2).num_sms == 20
        assert isinstance(Buffer.get_dispatch_config(3), Config)  # a size without a table row
        with pytest.raises(ValueError):
            Buffer.set_num_sms(7)
    finally:
        Buffer.set_num_sms(saved)
    hint = Buffer.get_low_latency_rdma_size_hint(64, 2048, 4, 16)
    assert hint == get_low_latency_rdma_size_hint(64, 2048, 4, 16)


def test_buffer_constructor_rejects() -> None:
    from mpiep import Buffer

    with pytest.raises(ValueError, match="backend"):
        Buffer(MPI.COMM_SELF, backend="nope")
    with pytest.raises(ValueError, match="num_nvl_bytes"):
        Buffer(MPI.COMM_SELF, num_nvl_bytes=-1, backend="reference")
    with pytest.raises(TypeError, match="comm"):
        Buffer("world", backend="reference")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- helpers
def _inputs(
    rng: np.random.Generator, num_experts: int, num_ranks: int, rank: int, num_topk: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    idx, w = oracle.make_routing(rng, TOKENS, num_topk, num_experts, num_ranks, rank, "holes")
    return random_bf16(rng, TOKENS, HIDDEN), torch.from_numpy(idx), torch.from_numpy(w)


def _layout_kwargs(buf: Any, idx: torch.Tensor, num_experts: int) -> dict[str, Any]:
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, num_experts)
    return {
        "num_tokens_per_rank": per_rank,
        "num_tokens_per_rdma_rank": per_rdma,
        "is_token_in_rank": in_rank,
        "num_tokens_per_expert": per_expert,
    }


def _good_round(buf: Any, rng: np.random.Generator, comm: MPI.Comm) -> None:
    """A correct dispatch + combine of ones: the buffer survived the error."""
    num_experts = E_LOCAL * comm.size
    x, idx, w = _inputs(rng, num_experts, comm.size, comm.rank)
    ones = torch.ones_like(x)
    recv_x, _, _, _, handle, _ = buf.dispatch(
        ones, **_layout_kwargs(buf, idx, num_experts), topk_idx=idx, topk_weights=w
    )
    combined, _, _ = buf.combine(recv_x, handle)
    want = oracle.layout(idx.numpy(), num_experts, comm.size).is_token_in_rank.sum(1)
    assert np.array_equal(combined[:, 0].float().numpy(), want.astype(np.float32))


def _ll_round_inputs(rng: np.random.Generator, comm: MPI.Comm) -> tuple[Any, ...]:
    """Inputs and expected counts of a good low-latency round (gathered up front)."""
    num_experts = E_LOCAL * comm.size
    x, idx, _ = _inputs(rng, num_experts, comm.size, comm.rank)
    want = oracle.low_latency_dispatch(comm.allgather(idx.numpy()), num_experts, comm.rank)
    return x, idx, num_experts, want.recv_count


def _good_ll_round(buf: Any, inputs: tuple[Any, ...]) -> None:
    """A correct low-latency dispatch: the buffer survived the error."""
    x, idx, num_experts, want_count = inputs
    _, recv_count, _, _, _ = buf.low_latency_dispatch(x, idx, LL_MAX, num_experts)
    assert np.array_equal(recv_count.numpy(), want_count)


def _capture(call: Callable[[], Any]) -> BaseException | None:
    """The exception ``call`` raises (None if it returns).

    Checked only after the good round, so that a rank whose check fails still takes part in
    the calls its peers wait in.
    """
    try:
        call()
    except Exception as err:  # checked by the callers
        return err
    return None


def _expect_everywhere(
    comm: MPI.Comm,
    err: BaseException | None,
    argument: str,
    bad_types: tuple[type[Exception], ...] = (TypeError, ValueError),
) -> None:
    """Every rank raised: BAD its own error naming ``argument``, the rest a mismatch naming BAD."""
    assert isinstance(err, (TypeError, ValueError)), f"rank {comm.rank} raised {err!r}"
    msg = str(err)
    if comm.rank == BAD:
        assert isinstance(err, bad_types), repr(err)
        assert not isinstance(err, ArgumentMismatchError), repr(err)
        assert argument in msg, msg
    else:
        assert isinstance(err, ArgumentMismatchError), repr(err)
        assert f"rank {BAD}" in msg, msg


def _expect_mismatch(comm: MPI.Comm, err: BaseException | None, argument: str) -> None:
    """Ranks disagreed on ``argument``: ArgumentMismatchError on every rank, naming it."""
    assert isinstance(err, ArgumentMismatchError), f"rank {comm.rank} raised {err!r}"
    msg = str(err)
    assert argument in msg, msg
    assert "rank" in msg, msg


def _buf(make_buffer: Callable[..., Any], **kwargs: Any) -> Any:
    return make_buffer(**kwargs)


def _ll_buf(make_buffer: Callable[..., Any], comm: MPI.Comm, hidden: int = HIDDEN) -> Any:
    hint = get_low_latency_rdma_size_hint(LL_MAX, hidden, comm.size, E_LOCAL * comm.size)
    return make_buffer(num_nvl_bytes=0, num_rdma_bytes=hint, low_latency_mode=True)


# --------------------------------------------------------------------------- normal dispatch
def _bad_x_float32(x: Any, idx: torch.Tensor, w: torch.Tensor) -> tuple[Any, Any, Any]:
    return x.float(), idx, w


def _bad_x_1d(x: Any, idx: torch.Tensor, w: torch.Tensor) -> tuple[Any, Any, Any]:
    return x.reshape(-1), idx, w


def _bad_x_strided(x: Any, idx: torch.Tensor, w: torch.Tensor) -> tuple[Any, Any, Any]:
    wide = torch.zeros((x.shape[0], 2 * x.shape[1]), dtype=x.dtype)
    wide[:, ::2] = x
    return wide[:, ::2], idx, w


def _bad_idx_int32(x: Any, idx: torch.Tensor, w: torch.Tensor) -> tuple[Any, Any, Any]:
    return x, idx.to(torch.int32), w


def _bad_idx_too_big(x: Any, idx: torch.Tensor, w: torch.Tensor) -> tuple[Any, Any, Any]:
    bad = idx.clone()
    bad[1, 0] = E_LOCAL * MPI.COMM_WORLD.size  # == num_experts (tests run on COMM_WORLD)
    return x, bad, w


def _bad_idx_below_minus_one(x: Any, idx: torch.Tensor, w: torch.Tensor) -> tuple[Any, Any, Any]:
    bad = idx.clone()
    bad[0, 1] = -2
    return x, bad, w


def _bad_weights_shape(x: Any, idx: torch.Tensor, w: torch.Tensor) -> tuple[Any, Any, Any]:
    return x, idx, torch.zeros((w.shape[0], w.shape[1] + 1), dtype=torch.float32)


def _bad_weights_dtype(x: Any, idx: torch.Tensor, w: torch.Tensor) -> tuple[Any, Any, Any]:
    return x, idx, w.to(torch.bfloat16)


BAD_DISPATCH = {
    "x-float32": (_bad_x_float32, "x"),
    "x-1d": (_bad_x_1d, "x"),
    "x-non-contiguous": (_bad_x_strided, "x"),
    "topk_idx-int32": (_bad_idx_int32, "topk_idx"),
    "topk_idx-too-big": (_bad_idx_too_big, "topk_idx"),
    "topk_idx-below-minus-one": (_bad_idx_below_minus_one, "topk_idx"),
    "topk_weights-shape": (_bad_weights_shape, "topk_weights"),
    "topk_weights-dtype": (_bad_weights_dtype, "topk_weights"),
}


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("bad", list(BAD_DISPATCH), ids=list(BAD_DISPATCH))
def test_dispatch_bad_argument_on_one_rank(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any], bad: str
) -> None:
    corrupt, argument = BAD_DISPATCH[bad]
    num_experts = E_LOCAL * comm.size
    x, idx, w = _inputs(rng, num_experts, comm.size, comm.rank)
    buf = _buf(make_buffer)
    with collective_check(comm):
        layout = _layout_kwargs(buf, idx, num_experts)  # from the good routing
        if comm.rank == BAD:
            x, idx, w = corrupt(x, idx, w)
        err = _capture(lambda: buf.dispatch(x, **layout, topk_idx=idx, topk_weights=w))
        _good_round(buf, rng, comm)
        _expect_everywhere(comm, err, argument)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("bad", ["topk_idx-int32", "topk_idx-too-big", "topk_idx-below-minus-one"])
def test_layout_bad_topk_idx_on_one_rank(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any], bad: str
) -> None:
    corrupt, argument = BAD_DISPATCH[bad]
    num_experts = E_LOCAL * comm.size
    x, idx, w = _inputs(rng, num_experts, comm.size, comm.rank)
    if comm.rank == BAD:
        x, idx, w = corrupt(x, idx, w)
    buf = _buf(make_buffer)
    with collective_check(comm):
        err = _capture(lambda: buf.get_dispatch_layout(idx, num_experts))
        _good_round(buf, rng, comm)
        _expect_everywhere(comm, err, argument)


@pytest.mark.mpi(min_size=2)
def test_num_experts_not_divisible(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any]
) -> None:
    """The same bad value on every rank: each raises its own ValueError naming num_experts."""
    num_experts = E_LOCAL * comm.size + 1
    idx = torch.from_numpy(
        oracle.make_routing(rng, TOKENS, 2, num_experts - 1, comm.size, comm.rank)[0]
    )
    x = random_bf16(rng, TOKENS, HIDDEN)
    buf = _buf(make_buffer)
    llbuf = _ll_buf(make_buffer, comm)
    good = _ll_round_inputs(rng, comm)
    with collective_check(comm):
        errs = [
            _capture(lambda: buf.get_dispatch_layout(idx, num_experts)),
            _capture(lambda: llbuf.low_latency_dispatch(x, idx, LL_MAX, num_experts)),
        ]
        _good_round(buf, rng, comm)
        _good_ll_round(llbuf, good)
        for err in errs:
            assert isinstance(err, ValueError) and "num_experts" in str(err), repr(err)


@pytest.mark.mpi(min_size=2)
def test_fp8_hidden_not_multiple_of_128(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any]
) -> None:
    num_experts = E_LOCAL * comm.size
    _, idx, w = _inputs(rng, num_experts, comm.size, comm.rank)
    q = torch.zeros((TOKENS, 200), dtype=torch.float8_e4m3fn)
    scales = torch.ones((TOKENS, 2), dtype=torch.float32)
    buf = _buf(make_buffer)
    with collective_check(comm):
        layout = _layout_kwargs(buf, idx, num_experts)
        err = _capture(lambda: buf.dispatch((q, scales), **layout, topk_idx=idx, topk_weights=w))
        _good_round(buf, rng, comm)
        assert isinstance(err, ValueError), repr(err)
        msg = str(err)
        assert "hidden" in msg or "128" in msg or f"rank {BAD}" in msg or "rank 0" in msg, msg


@pytest.mark.mpi(min_size=2)
def test_fp8_scales_wrong_on_one_rank(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any]
) -> None:
    """FP8 tuple whose scales have the wrong shape or dtype on rank 1."""
    num_experts = E_LOCAL * comm.size
    _, idx, w = _inputs(rng, num_experts, comm.size, comm.rank)
    q, scales = random_fp8(rng, TOKENS, HIDDEN)
    if comm.rank == BAD:
        scales = scales[:, :1].contiguous()
    buf = _buf(make_buffer)
    with collective_check(comm):
        layout = _layout_kwargs(buf, idx, num_experts)
        err = _capture(lambda: buf.dispatch((q, scales), **layout, topk_idx=idx, topk_weights=w))
        _good_round(buf, rng, comm)
        _expect_everywhere(comm, err, "scale")


@pytest.mark.mpi(min_size=2)
def test_normal_receive_over_capacity(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any]
) -> None:
    """All tokens to rank 0 with a buffer sized for 8 tokens per rank: CapacityError."""
    num_experts = E_LOCAL * comm.size
    hidden = 2048
    nbytes = get_normal_buffer_size_hint(8, hidden, comm.size, 4)
    idx, w = oracle.make_routing(rng, 64, 4, num_experts, comm.size, comm.rank, "skewed")
    x = random_bf16(rng, 64, hidden)
    buf = _buf(make_buffer, num_nvl_bytes=nbytes)
    with collective_check(comm):
        layout = _layout_kwargs(buf, torch.from_numpy(idx), num_experts)
        err = _capture(
            lambda: buf.dispatch(
                x, **layout, topk_idx=torch.from_numpy(idx), topk_weights=torch.from_numpy(w)
            )
        )
        # A dispatch that fits still works on the same buffer.
        _good_round(buf, rng, comm)
        if comm.rank == 0:
            assert isinstance(err, CapacityError), repr(err)
            assert "num_nvl_bytes" in str(err), str(err)
        else:
            assert isinstance(err, (CapacityError, ArgumentMismatchError)), repr(err)


# --------------------------------------------------------------------------- mismatches
@pytest.mark.mpi(min_size=2)
def test_hidden_differs_across_ranks(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any]
) -> None:
    num_experts = E_LOCAL * comm.size
    _, idx, w = _inputs(rng, num_experts, comm.size, comm.rank)
    x = random_bf16(rng, TOKENS, 2 * HIDDEN if comm.rank == BAD else HIDDEN)
    buf = _buf(make_buffer)
    with collective_check(comm):
        layout = _layout_kwargs(buf, idx, num_experts)
        err = _capture(lambda: buf.dispatch(x, **layout, topk_idx=idx, topk_weights=w))
        _good_round(buf, rng, comm)
        _expect_mismatch(comm, err, "hidden")


@pytest.mark.mpi(min_size=2)
def test_num_experts_differs_across_ranks(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any]
) -> None:
    num_experts = E_LOCAL * comm.size * (2 if comm.rank == BAD else 1)
    _, idx, _ = _inputs(rng, E_LOCAL * comm.size, comm.size, comm.rank)
    buf = _buf(make_buffer)
    with collective_check(comm):
        err = _capture(lambda: buf.get_dispatch_layout(idx, num_experts))
        _good_round(buf, rng, comm)
        _expect_mismatch(comm, err, "num_experts")


@pytest.mark.mpi(min_size=2)
def test_topk_differs_across_ranks(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any]
) -> None:
    num_experts = E_LOCAL * comm.size
    x, idx, w = _inputs(rng, num_experts, comm.size, comm.rank, 2 if comm.rank == BAD else 4)
    buf = _buf(make_buffer)
    with collective_check(comm):

        def call() -> None:
            layout = _layout_kwargs(buf, idx, num_experts)
            buf.dispatch(x, **layout, topk_idx=idx, topk_weights=w)

        err = _capture(call)
        _good_round(buf, rng, comm)
        _expect_mismatch(comm, err, "topk")


@pytest.mark.mpi(min_size=2)
def test_dtype_differs_across_ranks(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any]
) -> None:
    """Rank 1 sends an FP8 tuple while the others send BF16."""
    num_experts = E_LOCAL * comm.size
    x, idx, w = _inputs(rng, num_experts, comm.size, comm.rank)
    arg: Any = random_fp8(rng, TOKENS, HIDDEN) if comm.rank == BAD else x
    buf = _buf(make_buffer)
    with collective_check(comm):
        layout = _layout_kwargs(buf, idx, num_experts)
        err = _capture(lambda: buf.dispatch(arg, **layout, topk_idx=idx, topk_weights=w))
        _good_round(buf, rng, comm)
        assert isinstance(err, ArgumentMismatchError), repr(err)
        msg = str(err)
        assert "fp8" in msg.lower() or "dtype" in msg or "float8" in msg, msg


# --------------------------------------------------------------------------- combine
@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("bad", ["dtype", "rows"])
def test_combine_bad_input_on_one_rank(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any], bad: str
) -> None:
    num_experts = E_LOCAL * comm.size
    x, idx, w = _inputs(rng, num_experts, comm.size, comm.rank)
    buf = _buf(make_buffer)
    with collective_check(comm):
        recv_x, _, _, _, handle, _ = buf.dispatch(
            x, **_layout_kwargs(buf, idx, num_experts), topk_idx=idx, topk_weights=w
        )
        y = recv_x
        if comm.rank == BAD:
            y = recv_x.float() if bad == "dtype" else torch.zeros((recv_x.shape[0] + 1, HIDDEN))
            y = y.to(torch.bfloat16) if bad == "rows" else y
        err = _capture(lambda: buf.combine(y, handle))
        _good_round(buf, rng, comm)
        assert isinstance(err, (TypeError, ValueError)), repr(err)
        if comm.rank == BAD:
            assert not isinstance(err, ArgumentMismatchError), repr(err)
        else:
            assert isinstance(err, ArgumentMismatchError), repr(err)
            assert f"rank {BAD}" in str(err)


# --------------------------------------------------------------------------- low latency
@pytest.mark.mpi(min_size=2)
def test_low_latency_too_many_tokens(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any]
) -> None:
    num_experts = E_LOCAL * comm.size
    tokens = LL_MAX + 1 if comm.rank == BAD else LL_MAX
    idx, _ = oracle.make_routing(rng, tokens, 2, num_experts, comm.size, comm.rank)
    x = random_bf16(rng, tokens, HIDDEN)
    buf = _ll_buf(make_buffer, comm)
    good = _ll_round_inputs(rng, comm)
    with collective_check(comm):
        err = _capture(
            lambda: buf.low_latency_dispatch(x, torch.from_numpy(idx), LL_MAX, num_experts)
        )
        _good_ll_round(buf, good)
        _expect_everywhere(
            comm, err, "num_max_dispatch_tokens_per_rank", bad_types=(CapacityError,)
        )


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("use_fp8", [True, False])
def test_low_latency_hidden_not_multiple_of_128(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any], use_fp8: bool
) -> None:
    num_experts = E_LOCAL * comm.size
    idx, _ = oracle.make_routing(rng, 4, 2, num_experts, comm.size, comm.rank)
    x = random_bf16(rng, 4, 200)
    buf = _ll_buf(make_buffer, comm)
    good = _ll_round_inputs(rng, comm)
    with collective_check(comm):
        err = _capture(
            lambda: buf.low_latency_dispatch(
                x, torch.from_numpy(idx), LL_MAX, num_experts, use_fp8=use_fp8
            )
        )
        _good_ll_round(buf, good)
        assert isinstance(err, ValueError), repr(err)
        assert "hidden" in str(err) or "128" in str(err), str(err)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("bad", ["x-float32", "topk_idx-int32", "topk_idx-too-big"])
def test_low_latency_bad_argument_on_one_rank(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any], bad: str
) -> None:
    corrupt, argument = BAD_DISPATCH[bad]
    num_experts = E_LOCAL * comm.size
    x, idx, w = _inputs(rng, num_experts, comm.size, comm.rank)
    if comm.rank == BAD:
        x, idx, w = corrupt(x, idx, w)
    buf = _ll_buf(make_buffer, comm)
    good = _ll_round_inputs(rng, comm)
    with collective_check(comm):
        err = _capture(lambda: buf.low_latency_dispatch(x, idx, LL_MAX, num_experts))
        _good_ll_round(buf, good)
        _expect_everywhere(comm, err, argument)


@pytest.mark.mpi(min_size=2)
def test_low_latency_max_tokens_differs(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any]
) -> None:
    num_experts = E_LOCAL * comm.size
    x, idx, _ = _inputs(rng, num_experts, comm.size, comm.rank)
    max_tokens = LL_MAX // 2 + 2 if comm.rank == BAD else LL_MAX  # both >= TOKENS
    buf = _ll_buf(make_buffer, comm)
    good = _ll_round_inputs(rng, comm)
    with collective_check(comm):
        err = _capture(lambda: buf.low_latency_dispatch(x, idx, max_tokens, num_experts))
        _good_ll_round(buf, good)
        _expect_mismatch(comm, err, "num_max_dispatch_tokens_per_rank")


@pytest.mark.mpi(min_size=2)
def test_low_latency_on_normal_buffer(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any]
) -> None:
    """A buffer made without low_latency_mode refuses low-latency calls on every rank."""
    num_experts = E_LOCAL * comm.size
    x, idx, _ = _inputs(rng, num_experts, comm.size, comm.rank)
    buf = _buf(make_buffer)
    with collective_check(comm):
        err = _capture(lambda: buf.low_latency_dispatch(x, idx, LL_MAX, num_experts))
        _good_round(buf, rng, comm)
        assert isinstance(err, (RuntimeError, ValueError)), repr(err)
        assert "low_latency_mode" in str(err), str(err)
