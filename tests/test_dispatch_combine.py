"""Normal-mode dispatch and combine of the reference backend against the numpy oracle.

Every test builds its inputs, gathers them and computes the oracle *before* the first library
call, so that the only collectives after it are the library's own (which time out) and the
final pass/fail reduction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from mpi4py import MPI

import oracle
from conftest import (
    bf16_bits,
    bf16_tensor,
    collective_check,
    fp8_bytes,
    gather_arrays,
    random_bf16,
    random_fp8,
)

pytestmark = pytest.mark.timeout(180)

E_LOCAL = 8
PADDING_VALUE = 30000.0  # what the tests put in rows the library must ignore


# --------------------------------------------------------------------------- helpers
@dataclass
class Case:
    """One rank's inputs plus everything the oracle says about them."""

    group: MPI.Comm
    num_experts: int
    hidden: int
    fp8: bool
    idx: np.ndarray
    weights: np.ndarray
    x: Any  # bf16 tensor or (e4m3, scales) tuple
    x_np: dict[str, np.ndarray]  # "x" bits/bytes and "scales"
    all_idx: list[np.ndarray]
    all_weights: list[np.ndarray]
    all_x: list[dict[str, np.ndarray]]
    recv_all: list[oracle.NormalRecv]  # what every rank receives

    @property
    def rank(self) -> int:
        return self.group.rank

    @property
    def num_tokens(self) -> int:
        return int(self.idx.shape[0])

    @property
    def recv(self) -> oracle.NormalRecv:
        return self.recv_all[self.rank]

    def want_rows(self, all_x: list[dict[str, np.ndarray]] | None = None) -> dict[str, np.ndarray]:
        src = self.all_x if all_x is None else all_x
        return {key: self.recv.rows([d[key] for d in src]) for key in src[0]}


def make_case(
    group: MPI.Comm,
    rng: np.random.Generator,
    hidden: int,
    num_topk: int,
    pattern: str,
    fp8: bool,
    base_tokens: int = 24,
    expert_alignment: int = 1,
) -> Case:
    """Seeded inputs of this rank (T differs per rank), gathered, with the oracle's answer."""
    num_ranks, rank = group.size, group.rank
    num_experts = E_LOCAL * num_ranks
    num_tokens = base_tokens + 5 * rank
    idx, w = oracle.make_routing(rng, num_tokens, num_topk, num_experts, num_ranks, rank, pattern)
    num_tokens = idx.shape[0]
    x, x_np = make_x(rng, num_tokens, hidden, fp8)
    all_idx = gather_arrays(group, idx)
    all_w = gather_arrays(group, w)
    all_x = group.allgather(x_np)
    recv_all = [
        oracle.normal_dispatch(all_idx, all_w, num_experts, r, expert_alignment)
        for r in range(num_ranks)
    ]
    return Case(group, num_experts, hidden, fp8, idx, w, x, x_np, all_idx, all_w, all_x, recv_all)


def make_x(
    rng: np.random.Generator, num_tokens: int, hidden: int, fp8: bool
) -> tuple[Any, dict[str, np.ndarray]]:
    """The x argument (BF16 tensor or FP8 tuple) and its numpy form for the oracle."""
    if fp8:
        q, s = random_fp8(rng, num_tokens, hidden)
        return (q, s), {"x": fp8_bytes(q), "scales": s.numpy().copy()}
    x = random_bf16(rng, num_tokens, hidden)
    return x, {"x": bf16_bits(x)}


def recv_numpy(recv_x: Any) -> dict[str, np.ndarray]:
    """numpy form of a received x (tensor or tuple), for comparison with the oracle."""
    if isinstance(recv_x, tuple):
        q, s = recv_x
        assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
        return {"x": fp8_bytes(q), "scales": s.contiguous().numpy()}
    assert recv_x.dtype == torch.bfloat16
    return {"x": bf16_bits(recv_x)}


def layout_dispatch(
    buf: Any, x: Any, idx: np.ndarray, w: np.ndarray, num_experts: int, **kwargs: Any
) -> tuple[Any, ...]:
    """get_dispatch_layout then dispatch, as a DeepEP user does (numpy routing in)."""
    topk_idx = torch.from_numpy(idx)
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, num_experts)
    return buf.dispatch(
        x,
        num_tokens_per_rank=per_rank,
        num_tokens_per_rdma_rank=per_rdma,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=topk_idx,
        topk_weights=torch.from_numpy(w),
        **kwargs,
    )


def full_dispatch(buf: Any, case: Case, **kwargs: Any) -> tuple[Any, ...]:
    return layout_dispatch(buf, case.x, case.idx, case.weights, case.num_experts, **kwargs)


def check_recv_rows(got: Any, want: dict[str, np.ndarray], num_rows: int) -> None:
    """Bit-exact comparison of the first ``num_rows`` received rows (x and scales)."""
    arrays = recv_numpy(got)
    assert arrays.keys() == want.keys()
    for key, arr in arrays.items():
        assert arr.shape[0] >= num_rows, (key, arr.shape)
        assert arr.shape[1:] == want[key].shape[1:], (key, arr.shape, want[key].shape)
        assert np.array_equal(arr[:num_rows], want[key]), f"received {key} rows differ"


def check_dispatch(case: Case, out: tuple[Any, ...], num_worst_tokens: int = 0) -> Any:
    """Every output of a (non-cached) dispatch against the oracle; returns the handle."""
    recv_x, recv_idx, recv_w, counts, handle, _event = out
    want = case.recv
    n = want.num_rows
    rows = num_worst_tokens if num_worst_tokens else n
    num_topk = case.idx.shape[1]
    check_recv_rows(recv_x, case.want_rows(), n)
    arrays = recv_numpy(recv_x)
    assert arrays["x"].shape == (rows, case.hidden)
    if case.fp8:
        assert arrays["scales"].shape == (rows, case.hidden // 128)
    assert recv_idx.dtype == torch.int64 and tuple(recv_idx.shape) == (rows, num_topk)
    assert recv_w.dtype == torch.float32 and tuple(recv_w.shape) == (rows, num_topk)
    assert np.array_equal(recv_idx.numpy()[:n], want.topk_idx)
    assert want.topk_weights is not None
    assert np.array_equal(recv_w.numpy()[:n], want.topk_weights)
    if num_worst_tokens:
        assert counts == []
        assert np.all(arrays["x"][n:] == 0), "padding rows of recv_x are not zero"
        if case.fp8:
            assert np.all(arrays["scales"][n:] == 0)
        assert np.all(recv_idx.numpy()[n:] == -1) and np.all(recv_w.numpy()[n:] == 0)
    else:
        assert isinstance(counts, list) and all(isinstance(c, int) for c in counts)
        assert counts == want.num_recv_tokens_per_expert
    # The typed handle fields (mpiep.handles.DispatchHandle).
    assert handle.num_recv_tokens == n
    per_src = np.asarray(handle.num_recv_per_src).astype(np.int64)
    assert np.array_equal(per_src, want.num_recv_per_src)
    assert np.array_equal(handle.recv_src_idx.numpy()[:n].astype(np.int64), want.src_token)
    return handle


def assert_sum_close(got: torch.Tensor, want_f32: np.ndarray) -> None:
    """A BF16 result against the float32 oracle: within BF16 rounding of the sum."""
    assert got.dtype == torch.bfloat16 and tuple(got.shape) == want_f32.shape
    g = oracle.bf16_to_f32(bf16_bits(got))
    np.testing.assert_allclose(g, want_f32, rtol=2.0**-8, atol=1e-4)


def rows_f32(rows: np.ndarray) -> np.ndarray:
    return oracle.bf16_to_f32(rows)


def random_y(case: Case, rng: np.random.Generator, num_rows: int) -> torch.Tensor:
    """Expert output of the received rows; rows past the real ones hold PADDING_VALUE."""
    y = random_bf16(rng, num_rows, case.hidden)
    y[case.recv.num_rows :] = PADDING_VALUE
    return y


# --------------------------------------------------------------------------- oracle sanity
def test_oracle_dispatch_by_hand() -> None:
    """2 ranks x 2 experts: order by source rank then token, local ids, padded counts."""
    idx = [np.array([[0, 3], [2, -1]]), np.array([[1, 2], [3, 0], [-1, -1]])]
    w = [np.float32([[0.5, 0.25], [1.0, 0.0]]), np.float32([[0.1, 0.2], [0.3, 0.4], [0, 0]])]
    r0 = oracle.normal_dispatch(idx, w, 4, 0, expert_alignment=4)
    assert list(zip(r0.src_rank.tolist(), r0.src_token.tolist(), strict=True)) == [
        (0, 0),
        (1, 0),
        (1, 1),
    ]
    assert r0.topk_idx.tolist() == [[0, -1], [1, -1], [-1, 0]]
    assert r0.topk_weights is not None
    assert r0.topk_weights.tolist() == [[0.5, 0.0], [np.float32(0.1), 0.0], [0.0, np.float32(0.4)]]
    assert r0.num_recv_tokens_per_expert == [4, 4]  # 2 and 1, padded to 4
    r1 = oracle.normal_dispatch(idx, w, 4, 1)
    assert list(zip(r1.src_rank.tolist(), r1.src_token.tolist(), strict=True)) == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
    ]
    assert r1.num_recv_tokens_per_expert == [2, 2]
    y = [np.ones((3, 1), np.float32), 10 * np.ones((4, 1), np.float32)]
    assert oracle.normal_combine(0, 2, [r0, r1], y).ravel().tolist() == [11.0, 10.0]
    assert oracle.normal_combine(1, 3, [r0, r1], y).ravel().tolist() == [11.0, 11.0, 0.0]


# --------------------------------------------------------------------------- the matrix
CASES = [
    (h, k, p, f)
    for h in (2048, 4096, 7168)
    for k in (1, 4, 8)
    for p in oracle.ROUTING_PATTERNS
    for f in (False, True)
]


def _case_id(c: tuple[int, int, str, bool]) -> str:
    return f"h{c[0]}-top{c[1]}-{c[2]}-{'fp8' if c[3] else 'bf16'}"


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("params", CASES, ids=[_case_id(c) for c in CASES])
def test_dispatch_then_combine(
    comm: MPI.Comm,
    rng: np.random.Generator,
    make_buffer: Callable[..., Any],
    params: tuple[int, int, str, bool],
) -> None:
    """Dispatch rows, top-k ids, weights and counts exact; combine sums and weights close."""
    hidden, num_topk, pattern, fp8 = params
    _dispatch_combine_body(comm, rng, make_buffer, hidden, num_topk, pattern, fp8)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("pattern", oracle.ROUTING_PATTERNS)
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_dispatch_then_combine_rank_counts(
    ep_comm: MPI.Comm | None,
    rng: np.random.Generator,
    make_buffer: Callable[..., Any],
    fp8: bool,
    pattern: str,
) -> None:
    """The same on 2, 3 and 4 ranks."""
    if ep_comm is None:
        pytest.skip("rank outside the sub-communicator")
    _dispatch_combine_body(ep_comm, rng, make_buffer, 2048, 4, pattern, fp8)


def _dispatch_combine_body(
    group: MPI.Comm,
    rng: np.random.Generator,
    make_buffer: Callable[..., Any],
    hidden: int,
    num_topk: int,
    pattern: str,
    fp8: bool,
) -> None:
    case = make_case(group, rng, hidden, num_topk, pattern, fp8)
    n = case.recv.num_rows
    y = random_y(case, rng, n)
    factor = float(case.rank + 1)
    all_y = group.allgather(rows_f32(bf16_bits(y)))
    all_wret = [
        (r.topk_weights if r.topk_weights is not None else 0) * np.float32(s + 1)
        for s, r in enumerate(case.recv_all)
    ]
    want_x = oracle.normal_combine(case.rank, case.num_tokens, case.recv_all, all_y)
    want_w = oracle.normal_combine(case.rank, case.num_tokens, case.recv_all, all_wret)
    buf = make_buffer(group)
    with collective_check(group):
        # Every library call first, on every rank; assertions after (no peer left waiting).
        out = full_dispatch(buf, case)
        recv_w = out[2]
        wret = None if recv_w is None else recv_w * factor
        combined, combined_w, _event = buf.combine(y, out[4], topk_weights=wret)
        check_dispatch(case, out)
        assert_sum_close(combined, want_x)
        assert combined_w is not None and combined_w.dtype == torch.float32
        np.testing.assert_allclose(combined_w.numpy(), want_w, rtol=1e-6, atol=1e-7)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("ranks_per_node", [1, 2])
def test_dispatch_then_combine_virtual_nodes(
    comm: MPI.Comm,
    rng: np.random.Generator,
    make_buffer: Callable[..., Any],
    ranks_per_node: int,
) -> None:
    """Same results when the ranks are cut into virtual nodes (the internode layout)."""
    if comm.size % ranks_per_node:
        pytest.skip("ranks_per_node does not divide the rank count")
    case = make_case(comm, rng, 4096, 8, "holes", True)
    y = random_y(case, rng, case.recv.num_rows)
    all_y = comm.allgather(rows_f32(bf16_bits(y)))
    want_x = oracle.normal_combine(case.rank, case.num_tokens, case.recv_all, all_y)
    want_rdma = oracle.layout(
        case.idx, case.num_experts, comm.size, ranks_per_node
    ).num_tokens_per_rdma_rank
    buf = make_buffer(ranks_per_node=ranks_per_node)
    with collective_check(comm):
        idx = torch.from_numpy(case.idx)
        per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, case.num_experts)
        out = buf.dispatch(
            case.x,
            num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=idx,
            topk_weights=torch.from_numpy(case.weights),
        )
        combined, _, _ = buf.combine(y, out[4])
        if want_rdma is None:  # a single (virtual) node
            assert per_rdma is None
        else:
            assert per_rdma is not None and np.array_equal(per_rdma.numpy(), want_rdma)
        check_dispatch(case, out)
        assert_sum_close(combined, want_x)


# --------------------------------------------------------------------------- modes
@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_cached_dispatch(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any], fp8: bool
) -> None:
    """dispatch(x2, handle=h) moves x2 along the same rows; its handle combines the same."""
    case = make_case(comm, rng, 4096, 4, "holes", fp8)
    x2, x2_np = make_x(rng, case.num_tokens, case.hidden, fp8)
    want2 = case.want_rows(comm.allgather(x2_np))
    n = case.recv.num_rows
    y = random_y(case, rng, n)
    all_y = comm.allgather(rows_f32(bf16_bits(y)))
    want_x = oracle.normal_combine(case.rank, case.num_tokens, case.recv_all, all_y)
    buf = make_buffer()
    with collective_check(comm):
        out = full_dispatch(buf, case)
        handle = out[4]
        recv_x2, recv_idx2, recv_w2, counts2, handle2, _ev = buf.dispatch(x2, handle=handle)
        combined, combined_w, _ev = buf.combine(y, handle2)
        # and once more with the original handle, which cached mode must not have spoiled
        combined1, _, _ = buf.combine(y, handle)
        check_dispatch(case, out)
        assert recv_idx2 is None and recv_w2 is None and counts2 is None
        check_recv_rows(recv_x2, want2, n)
        assert recv_numpy(recv_x2)["x"].shape[0] == n
        assert combined_w is None
        assert_sum_close(combined, want_x)
        assert np.array_equal(bf16_bits(combined1), bf16_bits(combined))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_num_worst_tokens(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any], fp8: bool
) -> None:
    """Fixed-size outputs: padding rows zero / -1 / 0, empty count list; combine ignores them."""
    case = make_case(comm, rng, 2048, 8, "random", fp8)
    worst = comm.size * (24 + 5 * (comm.size - 1))  # every token of every rank
    y = random_y(case, rng, worst)
    all_y = comm.allgather(rows_f32(bf16_bits(y)))
    want_x = oracle.normal_combine(case.rank, case.num_tokens, case.recv_all, all_y)
    buf = make_buffer()
    with collective_check(comm):
        out = full_dispatch(buf, case, num_worst_tokens=worst)
        handle = out[4]
        combined, combined_w, _ = buf.combine(y, handle, topk_weights=out[2])
        # cached dispatch with the same num_worst_tokens keeps the fixed row count
        recv_x2, *_ = buf.dispatch(case.x, handle=handle, num_worst_tokens=worst)
        check_dispatch(case, out, num_worst_tokens=worst)
        assert_sum_close(combined, want_x)
        want_w = np.where(case.idx >= 0, case.weights, 0)
        assert combined_w is not None
        np.testing.assert_allclose(combined_w.numpy(), want_w, rtol=1e-6, atol=1e-7)
        check_recv_rows(recv_x2, case.want_rows(), case.recv.num_rows)
        assert recv_numpy(recv_x2)["x"].shape[0] == worst
        # without repeating it, the handle's num_worst_tokens still fixes the shape
        recv_x3, *_ = buf.dispatch(case.x, handle=handle)
        assert recv_numpy(recv_x3)["x"].shape[0] == worst
        check_recv_rows(recv_x3, case.want_rows(), case.recv.num_rows)
        # a different value contradicts the handle: rejected on every rank
        with pytest.raises(ValueError, match="num_worst_tokens"):
            buf.dispatch(case.x, handle=handle, num_worst_tokens=worst + 1)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("alignment", [1, 4, 128])
def test_expert_alignment(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any], alignment: int
) -> None:
    case = make_case(comm, rng, 2048, 4, "holes", False, expert_alignment=alignment)
    buf = make_buffer()
    with collective_check(comm):
        out = full_dispatch(buf, case, expert_alignment=alignment)
        check_dispatch(case, out)
        assert all(c % alignment == 0 for c in out[3])


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("bias_kind", ["one", "two"])
def test_combine_bias(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any], bias_kind: str
) -> None:
    """bias (a tensor or a pair) is added to the float32 sum before the BF16 cast."""
    case = make_case(comm, rng, 2048, 4, "random", False)
    y = random_y(case, rng, case.recv.num_rows)
    biases = [random_bf16(rng, case.num_tokens, case.hidden) for _ in range(2)]
    used = biases[:1] if bias_kind == "one" else biases
    all_y = comm.allgather(rows_f32(bf16_bits(y)))
    want_x = oracle.normal_combine(
        case.rank, case.num_tokens, case.recv_all, all_y, [rows_f32(bf16_bits(b)) for b in used]
    )
    buf = make_buffer()
    with collective_check(comm):
        out = full_dispatch(buf, case)
        bias = used[0] if bias_kind == "one" else (used[0], used[1])
        combined, _, _ = buf.combine(y, out[4], bias=bias)
        check_dispatch(case, out)
        assert_sum_close(combined, want_x)


# --------------------------------------------------------------------------- identities
@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("pattern", ["random", "holes", "zero_tokens"])
def test_backward_identity_ones(
    ep_comm: MPI.Comm | None,
    rng: np.random.Generator,
    make_buffer: Callable[..., Any],
    pattern: str,
) -> None:
    """combine(dispatch(ones)) == number of ranks each token went to; weights come back."""
    if ep_comm is None:
        pytest.skip("rank outside the sub-communicator")
    group = ep_comm
    num_experts = E_LOCAL * group.size
    num_tokens = 16 + 3 * group.rank
    idx, w = oracle.make_routing(rng, num_tokens, 8, num_experts, group.size, group.rank, pattern)
    num_tokens = idx.shape[0]
    want_counts = oracle.layout(idx, num_experts, group.size).is_token_in_rank.sum(axis=1)
    ones = torch.ones((num_tokens, 2048), dtype=torch.bfloat16)
    buf = make_buffer(group)
    with collective_check(group):
        recv_x, _, recv_w, _, handle, _ = layout_dispatch(buf, ones, idx, w, num_experts)
        combined, combined_w, _ = buf.combine(recv_x, handle, topk_weights=recv_w)
        assert torch.all(recv_x == 1)
        want = np.repeat(want_counts[:, None].astype(np.float32), 2048, axis=1)
        assert np.array_equal(combined.float().numpy(), want)
        assert combined_w is not None
        assert np.array_equal(combined_w.numpy(), np.where(idx >= 0, w, 0).astype(np.float32))


@pytest.mark.mpi(min_size=2)
def test_dispatch_and_combine_are_adjoint(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any]
) -> None:
    """<combine(y), g> == <y, dispatch(g)> summed over ranks (small integers: exact)."""
    num_experts = E_LOCAL * comm.size
    idx, w = oracle.make_routing(rng, 20, 4, num_experts, comm.size, comm.rank, "holes")
    hidden = 2048
    g = torch.from_numpy(rng.integers(-3, 4, (20, hidden)).astype(np.float32)).bfloat16()
    buf = make_buffer()
    sums = np.zeros(2)
    with collective_check(comm):
        x = torch.zeros((20, hidden), dtype=torch.bfloat16)
        recv_x, _, _, _, handle, _ = layout_dispatch(buf, x, idx, w, num_experts)
        n = recv_x.shape[0]
        y = torch.from_numpy(rng.integers(-3, 4, (n, hidden)).astype(np.float32)).bfloat16()
        combined, _, _ = buf.combine(y, handle)
        dispatched_g, *_ = buf.dispatch(g, handle=handle)
        sums[0] = float((combined.double() * g.double()).sum())
        sums[1] = float((y.double() * dispatched_g.double()).sum())
    totals = np.zeros(2)
    comm.Allreduce(sums, totals, op=MPI.SUM)
    with collective_check(comm):
        assert totals[0] == totals[1]
        assert totals[0] != 0  # the routing moved something


# --------------------------------------------------------------------------- odd cases
@pytest.mark.mpi(min_size=2)
def test_all_tokens_to_one_rank_and_one_rank_empty(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any]
) -> None:
    """Skewed routing from every rank, while the last rank has no tokens at all."""
    num_experts = E_LOCAL * comm.size
    rank = comm.rank
    num_tokens = 0 if rank == comm.size - 1 else 24
    idx, w = oracle.make_routing(rng, num_tokens, 8, num_experts, comm.size, rank, "skewed")
    x, x_np = make_x(rng, num_tokens, 7168, False)
    all_idx, all_w = gather_arrays(comm, idx), gather_arrays(comm, w)
    all_x = comm.allgather(x_np)
    recv = oracle.normal_dispatch(all_idx, all_w, num_experts, rank)
    want_rows = recv.rows([d["x"] for d in all_x])
    buf = make_buffer()
    with collective_check(comm):
        recv_x, _, _, counts, handle, _ = layout_dispatch(buf, x, idx, w, num_experts)
        combined, _, _ = buf.combine(recv_x, handle)
        assert tuple(recv_x.shape) == (recv.num_rows, 7168)
        assert (recv.num_rows > 0) == (rank == 0)
        assert np.array_equal(bf16_bits(recv_x), want_rows)
        assert counts == recv.num_recv_tokens_per_expert
        assert tuple(combined.shape) == (num_tokens, 7168)
        # Every token went to rank 0 only: the round trip returns it unchanged.
        assert np.array_equal(bf16_bits(combined), x_np["x"])


@pytest.mark.mpi(min_size=2)
def test_empty_tensors_with_zero_strides(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any]
) -> None:
    """Empty inputs whose strides are 0 (numpy broadcasting makes them; torch calls them
    contiguous): the last rank sends nothing, ranks other than 0 receive nothing."""
    num_experts = E_LOCAL * comm.size
    last = comm.rank == comm.size - 1
    num_tokens = 0 if last else 12
    idx, w = oracle.make_routing(rng, num_tokens, 4, num_experts, comm.size, comm.rank, "skewed")
    hidden = 2048

    def zero_strided(rows: int) -> torch.Tensor:
        a = np.zeros((rows, hidden), np.float32) * np.ones((rows, 1), np.float32)
        return torch.from_numpy(a).to(torch.bfloat16)

    x = zero_strided(0) if last else random_bf16(rng, num_tokens, hidden)
    all_idx, all_w = gather_arrays(comm, idx), gather_arrays(comm, w)
    recv_all = [oracle.normal_dispatch(all_idx, all_w, num_experts, r) for r in range(comm.size)]
    n = recv_all[comm.rank].num_rows
    y = zero_strided(0) if n == 0 else random_bf16(rng, n, hidden)
    all_y = comm.allgather(rows_f32(bf16_bits(y)))
    want = oracle.normal_combine(comm.rank, num_tokens, recv_all, all_y)
    buf = make_buffer()
    with collective_check(comm):
        recv_x, _, _, _, handle, _ = layout_dispatch(buf, x, idx, w, num_experts)
        combined, _, _ = buf.combine(y, handle)
        assert tuple(recv_x.shape) == (n, hidden)
        assert_sum_close(combined, want)


@pytest.mark.mpi(min_size=2)
def test_events_and_async_flags(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any]
) -> None:
    """async_finish / previous_event / allocate_on_comm_stream / explicit configs on CPU."""
    from mpiep import Buffer, Config, EventOverlap

    case = make_case(comm, rng, 2048, 4, "random", False)
    y = random_y(case, rng, case.recv.num_rows)
    all_y = comm.allgather(rows_f32(bf16_bits(y)))
    want_x = oracle.normal_combine(case.rank, case.num_tokens, case.recv_all, all_y)
    buf = make_buffer()
    with collective_check(comm):
        dcfg = Buffer.get_dispatch_config(comm.size)
        ccfg = Buffer.get_combine_config(comm.size)
        idx = torch.from_numpy(case.idx)
        per_rank, per_rdma, per_expert, in_rank, ev = buf.get_dispatch_layout(
            idx, case.num_experts, async_finish=True, allocate_on_comm_stream=True
        )
        ev.current_stream_wait()
        out = buf.dispatch(
            case.x,
            num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=idx,
            topk_weights=torch.from_numpy(case.weights),
            config=dcfg,
            previous_event=ev,
            async_finish=True,
            allocate_on_comm_stream=True,
        )
        event = out[5]
        with event:
            pass
        event.current_stream_wait()
        combined, _, cev = buf.combine(
            y,
            out[4],
            config=ccfg,
            previous_event=event,
            async_finish=True,
            allocate_on_comm_stream=True,
        )
        cev.current_stream_wait()
        assert isinstance(dcfg, Config) and isinstance(ccfg, Config)
        assert all(isinstance(e, EventOverlap) for e in (ev, event, cev))
        check_dispatch(case, out)
        assert_sum_close(combined, want_x)


@pytest.mark.mpi(min_size=2)
def test_repeated_dispatches_on_one_buffer(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any]
) -> None:
    """A buffer serves many dispatch/combine rounds with changing shapes and routing."""
    buf = make_buffer()
    cases = [
        make_case(comm, rng, h, k, p, f, base_tokens=t)
        for h, k, p, f, t in [
            (2048, 8, "random", False, 8),
            (4096, 1, "holes", True, 30),
            (2048, 4, "all_masked", False, 12),
            (2048, 8, "skewed", False, 3),
            (7168, 8, "random", True, 64),
            (7168, 4, "holes", False, 64),
        ]
    ]
    with collective_check(comm):
        results = []
        for case in cases:
            out = full_dispatch(buf, case)
            ones = bf16_tensor(np.full((case.recv.num_rows, case.hidden), 0x3F80, np.uint16))
            results.append((out, buf.combine(ones, out[4])[0]))
        for case, (out, combined) in zip(cases, results, strict=True):
            check_dispatch(case, out)
            counts = oracle.layout(case.idx, case.num_experts, comm.size).is_token_in_rank.sum(1)
            assert np.array_equal(combined.float().numpy()[:, 0], counts.astype(np.float32))
