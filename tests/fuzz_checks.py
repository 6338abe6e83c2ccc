"""One fuzz example, end to end on a group: library calls, then comparison with the oracle.

Every world rank can compute every group rank's inputs (they come from ``(seed, rank)``), so
expectations need no communication and every rank knows them before the first library call.
A check returns a list of problems (empty when the example passed).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

import oracle
from conftest import all_ranks_ok, bf16_bits, bf16_tensor, dense, fp8_bytes, fp8_tensor
from fuzz_inputs import LL_VARIANTS, Example, rank_rng, routing, split, x_values
from mpiep.errors import ArgumentMismatchError, CapacityError

TIMEOUT_S = 20.0  # library timeout of the fuzz buffers: 4 ranks share 2 cores


def run_example(world: MPI.Comm, ex: Example, check: Callable[[MPI.Comm, Example], list[str]]):
    """Run ``check`` on the example's group; fail on every world rank alike (same exception
    type, line and message, so that Hypothesis behaves the same on every rank)."""
    drawn = world.allgather(repr(ex))  # every example ends agreed, so no rank is missing here
    if len(set(drawn)) != 1:
        raise AssertionError(f"ranks drew different examples: {drawn}")
    group = split(world, ex)
    problems: list[str] = []
    try:
        if group != MPI.COMM_NULL:
            problems = check(group, ex)
    except Exception as exc:
        problems = [f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=-3)}"]
    finally:
        if group != MPI.COMM_NULL:
            group.Free()
    if not all_ranks_ok(not problems, world):
        everyone = world.allgather(problems[:3])
        lines = [f"world rank {r}: {p}" for r, ps in enumerate(everyone) for p in ps]
        raise AssertionError(f"{ex}\n" + "\n".join(lines))


def make_buffer(group: MPI.Comm, backend: str, **kwargs: Any) -> Any:
    from mpiep import Buffer

    device = "cpu" if backend == "reference" else None
    return Buffer(group, backend=backend, timeout_s=TIMEOUT_S, device=device, **kwargs)


def on(buf: Any, value: Any) -> Any:
    """``value`` (a tensor, a tuple of them, or None) on the Buffer's device."""
    if isinstance(value, tuple):
        return tuple(on(buf, v) for v in value)
    return value.to(buf.device) if isinstance(value, torch.Tensor) else value


def host(value: Any) -> Any:
    """Library outputs on the CPU, where the comparisons read them."""
    if isinstance(value, tuple):
        return tuple(host(v) for v in value)
    return value.cpu() if isinstance(value, torch.Tensor) else value


def close(got: np.ndarray, want: np.ndarray, what: str, problems: list[str]) -> None:
    """Per element, within BF16 rounding of a float32 sum; Inf/NaN where the oracle has them."""
    if got.shape != want.shape:
        problems.append(f"{what}: shape {got.shape} != {want.shape}")
        return
    same_nonfinite = np.array_equal(np.isnan(got), np.isnan(want)) and np.array_equal(
        np.where(np.isinf(got), got, 0), np.where(np.isinf(want), want, 0)
    )
    finite = np.isfinite(want) & np.isfinite(got)
    tol = 2.0**-8 * np.abs(want) + 1e-6
    with np.errstate(invalid="ignore"):
        bad = finite & ~(np.abs(got - want) <= tol)
    if not same_nonfinite or bad.any():
        where = np.argwhere(bad | (np.isfinite(got) != np.isfinite(want)))[:3].tolist()
        problems.append(
            f"{what}: {int(bad.sum())} values off, non-finite differ: "
            f"{not same_nonfinite}, first at {where}"
        )


def equal_values(got: np.ndarray, want: np.ndarray, what: str, problems: list[str]) -> None:
    """Exact equality, NaN equal to NaN (its bit pattern is not specified)."""
    if got.shape != want.shape or not np.array_equal(got, want, equal_nan=True):
        problems.append(f"{what} differs")


# --------------------------------------------------------------------------- normal mode
def normal_inputs(ex: Example, r: int) -> dict[str, Any]:
    """Group rank ``r``'s routing and x (bits or bytes, as the oracle takes them)."""
    idx, w = routing(ex, r)
    if ex.variant == "bf16":
        return {"idx": idx, "w": w, "x": oracle.f32_to_bf16(x_values(ex, r))}
    rng = rank_rng(ex, ex.members[r], 3)
    q = rng.integers(0, 256, (ex.tokens[r], ex.hidden), dtype=np.uint8)
    if not ex.nonfinite:
        q[(q & 0x7F) == 0x7F] = 0x3C  # no NaN bytes
    s = rng.uniform(0.01, 2.0, (ex.tokens[r], ex.hidden // 128)).astype(np.float32)
    return {"idx": idx, "w": w, "x": q, "scales": s}


def normal_recv_all(ex: Example) -> list[oracle.NormalRecv]:
    ins = [normal_inputs(ex, r) for r in range(ex.num_ranks)]
    idx, w = [i["idx"] for i in ins], [i["w"] for i in ins]
    return [
        oracle.normal_dispatch(idx, w, ex.num_experts, r, ex.alignment) for r in range(ex.num_ranks)
    ]


def combine_rows(ex: Example, r: int, rows: int) -> np.ndarray:
    """BF16 bits of receiver ``r``'s expert output (a few Inf/NaN with ``nonfinite``)."""
    rng = rank_rng(ex, ex.members[r], 4)
    y = rng.standard_normal((rows, ex.hidden)).astype(np.float32)
    if ex.nonfinite and rows:
        y[rng.integers(0, rows), rng.integers(0, ex.hidden)] = np.nan
    return oracle.f32_to_bf16(y)


def check_normal(group: MPI.Comm, ex: Example, backend: str) -> list[str]:
    r, n = group.rank, group.size
    ins = [normal_inputs(ex, k) for k in range(n)]
    mine = ins[r]
    recv_all = normal_recv_all(ex)
    recv = recv_all[r]
    worst = sum(ex.tokens) if ex.worst else 0
    out_rows = worst or recv.num_rows
    y_bits = [combine_rows(ex, k, worst or recv_all[k].num_rows) for k in range(n)]
    fp8 = ex.variant == "fp8"
    x: Any = bf16_tensor(mine["x"])
    x2: Any = bf16_tensor(_twice(mine["x"]))
    if fp8:
        x = (fp8_tensor(mine["x"]), dense(torch.from_numpy(mine["scales"])))
        x2 = (x[0], x[1] * 2)
    idx, w = torch.from_numpy(mine["idx"]), torch.from_numpy(mine["w"])

    from mpiep import get_normal_buffer_size_hint

    nvl = get_normal_buffer_size_hint(max(sum(ex.tokens), 1), ex.hidden, n, ex.topk)
    buf = make_buffer(group, backend, num_nvl_bytes=nvl)
    x, x2, idx, w = on(buf, (x, x2, idx, w))
    try:
        layout = buf.get_dispatch_layout(idx, ex.num_experts)
        per_rank, per_rdma, per_expert, in_rank, _ = layout
        recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
            x,
            num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=idx,
            topk_weights=w,
            expert_alignment=ex.alignment,
            num_worst_tokens=worst,
        )
        y = on(buf, bf16_tensor(y_bits[r]))
        combined, combined_w, _ = buf.combine(y, handle, topk_weights=recv_w)
        cached_x, *_ = buf.dispatch(x2, handle=handle)
        per_rank, per_expert, in_rank, recv_x, recv_idx, recv_w = host(
            (per_rank, per_expert, in_rank, recv_x, recv_idx, recv_w)
        )
        combined, combined_w, cached_x = host((combined, combined_w, cached_x))
    finally:
        buf.destroy()

    problems: list[str] = []
    want_layout = oracle.layout(mine["idx"], ex.num_experts, n)
    for name, got in (
        ("num_tokens_per_rank", per_rank),
        ("num_tokens_per_expert", per_expert),
        ("is_token_in_rank", in_rank),
    ):
        if not np.array_equal(got.numpy(), getattr(want_layout, name)):
            problems.append(f"layout {name} differs")
    if per_rdma is not None:
        problems.append("num_tokens_per_rdma_rank is not None on one node")

    m = recv.num_rows
    want_x = recv.rows([i["x"] for i in ins])
    got_x = fp8_bytes(recv_x[0]) if fp8 else bf16_bits(recv_x)
    if got_x.shape != (out_rows, ex.hidden) or not np.array_equal(got_x[:m], want_x):
        problems.append(f"recv_x differs (shape {got_x.shape}, want {m} rows)")
    elif worst and got_x[m:].any():
        problems.append("recv_x padding rows are not zero")
    if fp8:
        got_s = recv_x[1].numpy()
        equal_values(got_s[:m], recv.rows([i["scales"] for i in ins]), "recv scales", problems)
    if recv_idx.shape != (out_rows, ex.topk) or not np.array_equal(
        recv_idx.numpy()[:m], recv.topk_idx
    ):
        problems.append("recv_topk_idx differs")
    if recv_w is None or not np.array_equal(recv_w.numpy()[:m], recv.topk_weights):
        problems.append("recv_topk_weights differ")
    want_counts = [] if worst else recv.num_recv_tokens_per_expert
    if counts != want_counts:
        problems.append(f"num_recv_tokens_per_expert_list {counts} != {want_counts}")

    y_f32 = [oracle.bf16_to_f32(b) for b in y_bits]
    want_c = oracle.normal_combine(r, ex.tokens[r], recv_all, y_f32)
    close(oracle.bf16_to_f32(bf16_bits(combined)), want_c, "combined x", problems)
    want_w = np.where(mine["idx"] >= 0, mine["w"], 0).astype(np.float32)
    if combined_w is None or not np.allclose(combined_w.numpy(), want_w, rtol=1e-6, atol=1e-7):
        problems.append("combined top-k weights differ from the original ones")

    if fp8:
        equal_values(fp8_bytes(cached_x[0])[:m], want_x, "cached recv_x", problems)
        want_s2 = recv.rows([i["scales"] * 2 for i in ins])
        equal_values(cached_x[1].numpy()[:m], want_s2, "cached recv scales", problems)
    else:
        twice = [_twice(i["x"]) for i in ins]
        equal_values(bf16_bits(cached_x)[:m], recv.rows(twice), "cached recv_x", problems)
    return problems


def _twice(bits: np.ndarray) -> np.ndarray:
    """BF16 bits of 2 * x (Inf and NaN stay what they are)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return oracle.f32_to_bf16(2 * oracle.bf16_to_f32(bits))


# --------------------------------------------------------------------------- rejections
def _raised(call: Callable[[], Any]) -> BaseException | None:
    try:
        call()
    except Exception as exc:  # judged by the caller
        return exc
    return None


def _expect_rejected(
    err: BaseException | None, bad: list[bool], r: int, kind: type, words: str
) -> list[str]:
    """Ranks with ``bad`` inputs raise ``kind`` naming ``words``; the others an
    ArgumentMismatchError naming the first bad rank."""
    if bad[r]:
        if not isinstance(err, kind) or isinstance(err, ArgumentMismatchError):
            return [f"expected {kind.__name__}, got {err!r}"]
        return [] if words in str(err) else [f"message lacks {words!r}: {err}"]
    first = bad.index(True)
    if not isinstance(err, ArgumentMismatchError) or f"rank {first}" not in str(err):
        return [f"expected ArgumentMismatchError naming rank {first}, got {err!r}"]
    return []


def _most_pairs(idx: np.ndarray, num_experts: int) -> int:
    ids = idx[idx >= 0]
    return int(np.bincount(ids, minlength=num_experts).max()) if ids.size else 0


# --------------------------------------------------------------------------- low latency
def expert_factor(ex: Example) -> np.ndarray:
    return (0.5 + np.arange(ex.num_experts) / max(ex.num_experts, 1)).astype(np.float32)


def ll_combine_input(ex: Example, r: int, handle: Any, x_bits: list[np.ndarray]) -> torch.Tensor:
    """Row (expert e, source s, token t) = bf16(x_s[t] * c[e]); padding elsewhere (must be
    ignored). Never raises, so that every rank reaches the combine its peers wait in."""
    e_local, rows = ex.e_local, ex.num_ranks * ex.max_tokens
    c = expert_factor(ex)
    y = np.full((e_local, rows, ex.hidden), oracle.f32_to_bf16(np.float32([3e4]))[0], np.uint16)
    try:
        layout_range, src = host((handle.layout_range, handle.src_token_idx))
        layout_range, src = layout_range.numpy(), src.numpy()
        for j in range(e_local):
            for s in range(ex.num_ranks):
                start, count = (int(v) for v in layout_range[j, s])
                vals = oracle.bf16_to_f32(x_bits[s][src[j, start : start + count]])
                y[j, start : start + count] = oracle.f32_to_bf16(vals * c[r * e_local + j])
    except Exception:
        pass
    return bf16_tensor(y)


def check_low_latency(group: MPI.Comm, ex: Example, backend: str) -> list[str]:
    r, n = group.rank, group.size
    use_fp8, round_scale, use_ue8m0 = LL_VARIANTS[ex.variant]
    routes = [routing(ex, k) for k in range(n)]
    x_bits = [oracle.f32_to_bf16(x_values(ex, k)) for k in range(n)]
    idx_np, w_np = routes[r]
    want = oracle.low_latency_dispatch([i for i, _ in routes], ex.num_experts, r)
    idx, w = torch.from_numpy(idx_np), torch.from_numpy(w_np)
    # More than max_tokens pairs to one expert (duplicates): CapacityError on those ranks.
    over = [_most_pairs(i, ex.num_experts) > ex.max_tokens for i, _ in routes]

    from mpiep import get_low_latency_rdma_size_hint

    rdma = get_low_latency_rdma_size_hint(ex.max_tokens, ex.hidden, n, ex.num_experts)
    # The CapacityError is the contract of a validating Buffer (the reference's default);
    # without validation the GPU kernels drop the pairs past max_tokens (docs/semantics.md).
    validate = True if any(over) else None
    buf = make_buffer(group, backend, num_rdma_bytes=rdma, low_latency_mode=True, validate=validate)
    x, idx, w = on(buf, (bf16_tensor(x_bits[r]), idx, w))
    try:
        if any(over):
            err = _raised(lambda: buf.low_latency_dispatch(x, idx, ex.max_tokens, ex.num_experts))
            return _expect_rejected(err, over, r, CapacityError, "pairs to expert")
        recv_x, recv_count, handle, _, _ = buf.low_latency_dispatch(
            x,
            idx,
            ex.max_tokens,
            ex.num_experts,
            use_fp8=use_fp8,
            round_scale=round_scale,
            use_ue8m0=use_ue8m0,
        )
        y = on(buf, ll_combine_input(ex, r, handle, x_bits))
        combined, _, _ = buf.low_latency_combine(y, idx, w, handle)
        recv_x, recv_count, combined = host((recv_x, recv_count, combined))
        layout_range, src = host((handle.layout_range, handle.src_token_idx))
    finally:
        buf.destroy()

    problems: list[str] = []
    if not np.array_equal(recv_count.numpy(), want.recv_count):
        return [f"recv_count {recv_count.tolist()} != {want.recv_count.tolist()}"]
    layout_range, src = layout_range.numpy(), src.numpy()
    if not np.array_equal(layout_range, want.layout_range()):
        return ["layout_range differs"]
    refs = []
    for bits in x_bits:
        xs = oracle.bf16_to_f32(bits)
        refs.append(
            oracle.per_token_cast_to_fp8(xs, round_scale, use_ue8m0) if use_fp8 else (bits, None)
        )
    data = fp8_bytes(recv_x[0]) if use_fp8 else bf16_bits(recv_x)
    scales = recv_x[1].numpy() if use_fp8 else None
    for j in range(ex.e_local):
        for s in range(n):
            start, count = (int(v) for v in layout_range[j, s])
            tokens = src[j, start : start + count].astype(np.int64)
            if not np.array_equal(np.sort(tokens), want.groups[j][s]):
                problems.append(f"expert {j}, source {s}: source token ids differ")
                continue
            rows = data[j, start : start + count]
            if use_fp8:  # NaN bytes may differ in sign: compare decoded values
                equal_values(
                    oracle.e4m3_decode(rows),
                    oracle.e4m3_decode(refs[s][0][tokens]),
                    f"expert {j}, source {s}: fp8 rows",
                    problems,
                )
                equal_values(
                    scales[j, start : start + count],
                    refs[s][1][tokens],
                    f"expert {j}, source {s}: scales",
                    problems,
                )
            elif not np.array_equal(rows, refs[s][0][tokens]):
                problems.append(f"expert {j}, source {s}: bf16 rows differ")
    c = expert_factor(ex)
    xf = oracle.bf16_to_f32(x_bits[r])
    safe = np.where(idx_np >= 0, idx_np, 0)
    expert_rows = oracle.bf16_to_f32(oracle.f32_to_bf16(xf[:, None, :] * c[safe][:, :, None]))
    want_c = oracle.low_latency_combine(idx_np, w_np, expert_rows)
    close(oracle.bf16_to_f32(bf16_bits(combined)), want_c, "combined", problems)
    return problems
