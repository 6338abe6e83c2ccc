"""Low-latency dispatch and combine of the reference backend against the numpy oracle.

The combine input is built from the dispatch handle: the row of (expert e, source s, token t)
holds ``bf16(x_s[t] * c[e])``, so the oracle of each source rank needs only its own x and
routing: ``out[t] = sum_k w[t, k] * bf16(x[t] * c[idx[t, k]])``. Rows past ``recv_count`` hold
a large value that must not leak into the result.
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
from conftest import bf16_bits, bf16_tensor, collective_check, gather_arrays, random_bf16

pytestmark = pytest.mark.timeout(180)

MAX_TOKENS = 48
PADDING_VALUE = 30000.0
MODES = {  # name -> (use_fp8, round_scale, use_ue8m0)
    "bf16": (False, False, False),
    "fp8": (True, False, False),
    "fp8_round": (True, True, False),
    "fp8_ue8m0": (True, True, True),
}


@dataclass
class LLCase:
    group: MPI.Comm
    hidden: int
    num_experts: int
    idx: np.ndarray
    weights: np.ndarray
    x: torch.Tensor
    all_x: list[np.ndarray]  # BF16 bits of every rank's x
    want: oracle.LowLatencyRecv

    @property
    def rank(self) -> int:
        return self.group.rank

    @property
    def num_ranks(self) -> int:
        return self.group.size

    @property
    def e_local(self) -> int:
        return self.num_experts // self.num_ranks

    def expert_scale(self) -> np.ndarray:
        """c[e]: the factor expert e applies to its rows in the combine tests."""
        return (0.5 + np.arange(self.num_experts) / self.num_experts).astype(np.float32)


def make_ll_case(
    group: MPI.Comm,
    rng: np.random.Generator,
    hidden: int,
    num_topk: int,
    pattern: str,
    e_local: int = 8,
    base_tokens: int = 16,
) -> LLCase:
    num_experts = e_local * group.size
    num_tokens = min(base_tokens + 8 * group.rank, MAX_TOKENS)
    idx, w = oracle.make_routing(
        rng, num_tokens, num_topk, num_experts, group.size, group.rank, pattern
    )
    x = random_bf16(rng, idx.shape[0], hidden)
    all_idx = gather_arrays(group, idx)
    all_x = gather_arrays(group, bf16_bits(x))
    want = oracle.low_latency_dispatch(all_idx, num_experts, group.rank)
    return LLCase(group, hidden, num_experts, idx, w, x, all_x, want)


def ll_buffer(make_buffer: Callable[..., Any], case: LLCase, max_tokens: int = MAX_TOKENS) -> Any:
    from mpiep import Buffer

    hint = Buffer.get_low_latency_rdma_size_hint(
        max_tokens, case.hidden, case.num_ranks, case.num_experts
    )
    return make_buffer(
        case.group,
        num_nvl_bytes=0,
        num_rdma_bytes=hint,
        low_latency_mode=True,
        num_qps_per_rank=case.e_local,
    )


def source_reference(case: LLCase, mode: str) -> list[dict[str, np.ndarray]]:
    """Per source rank, what each of its tokens must look like on arrival (oracle FP8)."""
    use_fp8, round_scale, use_ue8m0 = MODES[mode]
    refs = []
    for bits in case.all_x:
        if not use_fp8:
            refs.append({"x": bits})
            continue
        q, s = oracle.per_token_cast_to_fp8(oracle.bf16_to_f32(bits), round_scale, use_ue8m0)
        refs.append({"x": q, "scales": s})
    return refs


def recv_arrays(recv_x: Any) -> dict[str, np.ndarray]:
    if isinstance(recv_x, tuple):
        q, s = recv_x
        assert q.dtype == torch.float8_e4m3fn
        return {"x": q.contiguous().view(torch.uint8).numpy(), "scales": s.contiguous().numpy()}
    assert recv_x.dtype == torch.bfloat16
    return {"x": bf16_bits(recv_x)}


def check_ll_dispatch(
    case: LLCase, mode: str, recv_x: Any, recv_count: torch.Tensor, handle: Any
) -> None:
    """Counts, layout ranges, source ids (as sets per source group) and row contents."""
    use_fp8, _, use_ue8m0 = MODES[mode]
    e_local, num_ranks, rows = case.e_local, case.num_ranks, case.num_ranks * MAX_TOKENS
    want = case.want
    assert recv_count.dtype == torch.int32 and tuple(recv_count.shape) == (e_local,)
    assert np.array_equal(recv_count.numpy(), want.recv_count)
    got = recv_arrays(recv_x)
    assert got["x"].shape == (e_local, rows, case.hidden)
    assert isinstance(recv_x, tuple) == use_fp8
    if use_fp8:
        groups = -(-case.hidden // 512) if use_ue8m0 else case.hidden // 128
        assert got["scales"].shape == (e_local, rows, groups)
        assert got["scales"].dtype == (np.int32 if use_ue8m0 else np.float32)
    layout_range = handle.layout_range.numpy()
    assert layout_range.shape == (e_local, num_ranks, 2)
    assert np.array_equal(layout_range, want.layout_range())
    src = handle.src_token_idx.numpy()
    assert src.shape == (e_local, rows)
    refs = source_reference(case, mode)
    for j in range(e_local):
        assert np.all(src[j, want.recv_count[j] :] == -1), f"expert {j}: src ids past recv_count"
        for s in range(num_ranks):
            start, count = (int(v) for v in layout_range[j, s])
            tokens = src[j, start : start + count].astype(np.int64)
            assert np.array_equal(np.sort(tokens), want.groups[j][s]), f"expert {j}, source {s}"
            for key, arr in got.items():
                rows_got = arr[j, start : start + count]
                assert np.array_equal(rows_got, refs[s][key][tokens]), f"{key}: expert {j}, src {s}"


def combine_input(case: LLCase, handle: Any) -> torch.Tensor:
    """BF16 [E_local, R*max, H]: row (e, s, t) = bf16(x_s[t] * c[e]), padding elsewhere.

    Never raises: a broken handle gives a wrong input (caught by the checks later), so that
    every rank still reaches the combine call that its peers wait in.
    """
    c = case.expert_scale()
    rows = case.num_ranks * MAX_TOKENS
    pad = oracle.f32_to_bf16(np.float32([PADDING_VALUE]))[0]
    y = np.full((case.e_local, rows, case.hidden), pad, dtype=np.uint16)
    try:
        layout_range = handle.layout_range.numpy()
        src = handle.src_token_idx.numpy()
        for j in range(case.e_local):
            e = case.rank * case.e_local + j
            for s in range(case.num_ranks):
                start, count = (int(v) for v in layout_range[j, s])
                tokens = src[j, start : start + count]
                vals = oracle.bf16_to_f32(case.all_x[s][tokens]) * c[e]
                y[j, start : start + count] = oracle.f32_to_bf16(vals)
    except Exception:
        pass
    return bf16_tensor(y)


def combine_oracle(case: LLCase, weights: np.ndarray | None = None) -> np.ndarray:
    """float32 [T, H] at the source, from its own x and routing only."""
    c = case.expert_scale()
    x = oracle.bf16_to_f32(case.all_x[case.rank])
    safe = np.where(case.idx >= 0, case.idx, 0)
    rows = oracle.bf16_to_f32(oracle.f32_to_bf16(x[:, None, :] * c[safe][:, :, None]))
    w = case.weights if weights is None else weights
    return oracle.low_latency_combine(case.idx, w, rows)


def assert_sum_close(got: torch.Tensor, want_f32: np.ndarray) -> None:
    assert got.dtype == torch.bfloat16 and tuple(got.shape) == want_f32.shape
    np.testing.assert_allclose(
        oracle.bf16_to_f32(bf16_bits(got)), want_f32, rtol=2.0**-8, atol=1e-4
    )


def run_ll_dispatch(buf: Any, case: LLCase, mode: str, **kwargs: Any) -> tuple[Any, ...]:
    use_fp8, round_scale, use_ue8m0 = MODES[mode]
    return buf.low_latency_dispatch(
        case.x,
        torch.from_numpy(case.idx),
        MAX_TOKENS,
        case.num_experts,
        use_fp8=use_fp8,
        round_scale=round_scale,
        use_ue8m0=use_ue8m0,
        **kwargs,
    )


def run_ll_combine(buf: Any, case: LLCase, y: torch.Tensor, handle: Any, **kwargs: Any) -> Any:
    return buf.low_latency_combine(
        y, torch.from_numpy(case.idx), torch.from_numpy(case.weights), handle, **kwargs
    )


# --------------------------------------------------------------------------- oracle sanity
def test_oracle_low_latency_by_hand() -> None:
    """2 ranks x 2 experts: one row per (token, expert) pair, grouped by source."""
    idx = [np.array([[1, 0], [0, 3]]), np.array([[0, -1], [2, 1], [0, 1]])]
    r0 = oracle.low_latency_dispatch(idx, 4, 0)
    assert r0.recv_count.tolist() == [4, 3]
    assert [g.tolist() for g in r0.groups[0]] == [[0, 1], [0, 2]]
    assert [g.tolist() for g in r0.groups[1]] == [[0], [1, 2]]
    assert r0.layout_range().tolist() == [[[0, 2], [2, 2]], [[0, 1], [1, 2]]]
    rows = np.arange(2 * 2 * 3, dtype=np.float32).reshape(2, 2, 3)
    out = oracle.low_latency_combine(
        np.array([[1, -1], [0, 2]]), np.float32([[2.0, 5.0], [1.0, 0.5]]), rows
    )
    assert out.tolist() == [[0.0, 2.0, 4.0], [6 + 4.5, 7 + 5.0, 8 + 5.5]]


# --------------------------------------------------------------------------- the matrix
CASES = [
    (h, k, p, m)
    for h in (2048, 4096, 7168)
    for k in (1, 4, 8)
    for p in oracle.ROUTING_PATTERNS
    for m in MODES
]


def _case_id(c: tuple[int, int, str, str]) -> str:
    return f"h{c[0]}-top{c[1]}-{c[2]}-{c[3]}"


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("params", CASES, ids=[_case_id(c) for c in CASES])
def test_low_latency_dispatch_then_combine(
    comm: MPI.Comm,
    rng: np.random.Generator,
    make_buffer: Callable[..., Any],
    params: tuple[int, int, str, str],
) -> None:
    hidden, num_topk, pattern, mode = params
    _ll_body(comm, rng, make_buffer, hidden, num_topk, pattern, mode)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("pattern", oracle.ROUTING_PATTERNS)
@pytest.mark.parametrize("mode", ["bf16", "fp8"])
def test_low_latency_rank_counts(
    ep_comm: MPI.Comm | None,
    rng: np.random.Generator,
    make_buffer: Callable[..., Any],
    mode: str,
    pattern: str,
) -> None:
    """2, 3 and 4 ranks."""
    if ep_comm is None:
        pytest.skip("rank outside the sub-communicator")
    _ll_body(ep_comm, rng, make_buffer, 2048, 4, pattern, mode)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("hidden", [128, 640, 2048 + 128, 7168 + 384])
def test_low_latency_ue8m0_hidden_not_multiple_of_512(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any], hidden: int
) -> None:
    """UE8M0 scales take ceil(H/512) words, the last one partly filled (issue 11, defect 8)."""
    _ll_body(comm, rng, make_buffer, hidden, 4, "random", "fp8_ue8m0")


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("mode", ["bf16", "fp8"])
def test_low_latency_full_capacity(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any], mode: str
) -> None:
    """T == num_max_dispatch_tokens_per_rank on every rank, all to rank 0's experts."""
    _ll_body(comm, rng, make_buffer, 7168, 8, "skewed", mode, base_tokens=MAX_TOKENS)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("pattern", oracle.ROUTING_PATTERNS)
@pytest.mark.parametrize("mode", list(MODES))
def test_low_latency_staged_path(
    comm: MPI.Comm,
    rng: np.random.Generator,
    make_buffer: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
    pattern: str,
) -> None:
    """The packed Ialltoallv path that CUDA tensors take, run on CPU tensors."""
    from mpiep.backends.reference import low_latency

    monkeypatch.setattr(low_latency, "IN_PLACE", False)
    _ll_body(comm, rng, make_buffer, 2048, 8, pattern, mode)


def _ll_body(
    group: MPI.Comm,
    rng: np.random.Generator,
    make_buffer: Callable[..., Any],
    hidden: int,
    num_topk: int,
    pattern: str,
    mode: str,
    base_tokens: int = 16,
) -> None:
    case = make_ll_case(group, rng, hidden, num_topk, pattern, base_tokens=base_tokens)
    want = combine_oracle(case)
    buf = ll_buffer(make_buffer, case)
    with collective_check(group):
        recv_x, recv_count, handle, event, hook = run_ll_dispatch(buf, case, mode)
        event.current_stream_wait()
        y = combine_input(case, handle)
        combined, cevent, chook = run_ll_combine(buf, case, y, handle)
        cevent.current_stream_wait()
        assert hook is None and chook is None
        check_ll_dispatch(case, mode, recv_x, recv_count, handle)
        assert_sum_close(combined, want)


# --------------------------------------------------------------------------- features
@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("mode", ["bf16", "fp8"])
def test_receive_hooks(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any], mode: str
) -> None:
    """return_recv_hook=True: outputs are allocated at once and valid after hook()."""
    case = make_ll_case(comm, rng, 2048, 8, "random")
    want = combine_oracle(case)
    buf = ll_buffer(make_buffer, case)
    with collective_check(comm):
        recv_x, recv_count, handle, _, hook = run_ll_dispatch(
            buf, case, mode, return_recv_hook=True, async_finish=False
        )
        shape_before = tuple((recv_x[0] if isinstance(recv_x, tuple) else recv_x).shape)
        hook()
        y = combine_input(case, handle)
        combined, _, chook = run_ll_combine(buf, case, y, handle, return_recv_hook=True)
        combined_shape = tuple(combined.shape)
        chook()
        assert callable(hook) and callable(chook)
        assert shape_before == (case.e_local, comm.size * MAX_TOKENS, 2048)
        assert combined_shape == (case.idx.shape[0], 2048)
        check_ll_dispatch(case, mode, recv_x, recv_count, handle)
        assert_sum_close(combined, want)


@pytest.mark.mpi(min_size=2)
def test_cumulative_recv_stats(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any]
) -> None:
    """cumulative_local_expert_recv_stats accumulates recv_count over calls."""
    cases = [make_ll_case(comm, rng, 2048, 4, p) for p in ("random", "holes")]
    buf = ll_buffer(make_buffer, cases[0])
    start = rng.integers(0, 100, cases[0].e_local).astype(np.int32)
    stats = torch.from_numpy(start.copy())
    with collective_check(comm):
        counts = [
            run_ll_dispatch(buf, case, "fp8", cumulative_local_expert_recv_stats=stats)[1]
            for case in cases
        ]
        for case, recv_count in zip(cases, counts, strict=True):
            assert np.array_equal(recv_count.numpy(), case.want.recv_count)
        assert stats.dtype == torch.int32
        total = start + sum(c.want.recv_count for c in cases)
        assert np.array_equal(stats.numpy(), total)


@pytest.mark.mpi(min_size=2)
def test_zero_copy_combine(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any]
) -> None:
    """Write y into get_next_low_latency_combine_buffer, combine with zero_copy=True."""
    case = make_ll_case(comm, rng, 4096, 4, "holes")
    want = combine_oracle(case)
    buf = ll_buffer(make_buffer, case)
    with collective_check(comm):
        _, _, handle, _, _ = run_ll_dispatch(buf, case, "bf16")
        target = buf.get_next_low_latency_combine_buffer(handle)
        y = combine_input(case, handle)
        shape_ok = tuple(target.shape) == tuple(y.shape) and target.dtype == torch.bfloat16
        if shape_ok:
            target.copy_(y)
        combined, _, _ = run_ll_combine(buf, case, target, handle, zero_copy=True)
        assert shape_ok, (target.dtype, tuple(target.shape))
        assert_sum_close(combined, want)


@pytest.mark.mpi(min_size=2)
def test_combine_into_out(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any]
) -> None:
    """out= receives the result in place."""
    case = make_ll_case(comm, rng, 2048, 4, "random")
    want = combine_oracle(case)
    buf = ll_buffer(make_buffer, case)
    out = torch.full((case.idx.shape[0], 2048), 7.0, dtype=torch.bfloat16)
    with collective_check(comm):
        _, _, handle, _, _ = run_ll_dispatch(buf, case, "fp8")
        y = combine_input(case, handle)
        combined, _, _ = run_ll_combine(buf, case, y, handle, out=out)
        assert combined is out or combined.data_ptr() == out.data_ptr()
        assert_sum_close(out, want)


@pytest.mark.mpi(min_size=2)
def test_rounds_with_changing_routing_and_clean(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any]
) -> None:
    """One buffer, several rounds (fewer tokens after more), clean_low_latency_buffer between.

    Stale rows of an earlier round must not show up in a later one.
    """
    cases = [
        make_ll_case(comm, rng, 2048, 8, "random", base_tokens=20),
        make_ll_case(comm, rng, 2048, 2, "holes", base_tokens=3),
        make_ll_case(comm, rng, 2048, 4, "all_masked"),
        make_ll_case(comm, rng, 2048, 4, "zero_tokens"),
    ]
    wants = [combine_oracle(c) for c in cases]
    buf = ll_buffer(make_buffer, cases[0])
    modes = [("fp8", "bf16")[i % 2] for i in range(len(cases))]
    with collective_check(comm):
        results = []
        for i, (case, mode) in enumerate(zip(cases, modes, strict=True)):
            recv_x, recv_count, handle, _, _ = run_ll_dispatch(buf, case, mode)
            y = combine_input(case, handle)
            combined, _, _ = run_ll_combine(buf, case, y, handle)
            results.append((recv_x, recv_count, handle, combined))
            if i == 1:
                buf.clean_low_latency_buffer(MAX_TOKENS, 2048, case.num_experts)
        for case, mode, want, (recv_x, recv_count, handle, combined) in zip(
            cases, modes, wants, results, strict=True
        ):
            check_ll_dispatch(case, mode, recv_x, recv_count, handle)
            assert_sum_close(combined, want)


@pytest.mark.mpi(min_size=2)
def test_combine_with_other_weights(
    comm: MPI.Comm, rng: np.random.Generator, make_buffer: Callable[..., Any]
) -> None:
    """The weights of the combine call are the ones applied (not the dispatch's)."""
    case = make_ll_case(comm, rng, 2048, 4, "holes")
    other = rng.uniform(-2.0, 2.0, case.weights.shape).astype(np.float32)
    want = combine_oracle(case, other)
    buf = ll_buffer(make_buffer, case)
    with collective_check(comm):
        _, _, handle, _, _ = run_ll_dispatch(buf, case, "bf16")
        y = combine_input(case, handle)
        combined, _, _ = buf.low_latency_combine(
            y, torch.from_numpy(case.idx), torch.from_numpy(other), handle
        )
        assert_sum_close(combined, want)
