"""GPU low-latency mode (NVSHMEM) against the plain-numpy oracle (tests/oracle.py).

Run on the device under mpirun (scripts/gpu_check.sh): 2, 4 or 8 ranks; several ranks may
share one GPU through CUDA MPS. ``MPIEP_NP=1`` runs the same cases on one rank (it owns all
experts: every kernel path still runs, through the local store). Every check agrees on
pass/fail across ranks before asserting, so a failure on one rank never strands the others.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
MPI = pytest.importorskip("mpi4py.MPI")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_calls import ll_combine, ll_dispatch  # noqa: E402
from gpu_common import agree_ok, core_has, gpu_marks, run_checked  # noqa: E402

import oracle  # noqa: E402

HAVE_CORE = core_has("LowLatencyContext")

MIN_RANKS = 1 if os.environ.get("MPIEP_NP") == "1" else 2
pytestmark = gpu_marks(MIN_RANKS, HAVE_CORE, "low-latency kernels")


MAX_TOKENS = 128
BENCH_EXPERTS = 288  # the speed bar's configuration sizes the shared engine


# --------------------------------------------------------------------------- helpers
def world():
    return MPI.COMM_WORLD


def to_torch_bf16(bits: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16).to(device)


def make_inputs(seed: int, T: int, H: int, K: int, E: int, pattern: str = "holes"):
    """This rank's (x bits, x float32, topk_idx, topk_weights), and every rank's."""
    comm = world()
    rng = np.random.default_rng(seed * 7919 + comm.rank)
    idx, w = oracle.make_routing(rng, T, K, E, comm.size, comm.rank, pattern)
    T = idx.shape[0]
    x = rng.standard_normal((T, H)).astype(np.float32) * rng.uniform(0.01, 10, (T, 1)).astype(
        np.float32
    )
    if T:
        x[0, :128] *= 1e-6  # a block under the 1e-4 amax clamp
    bits = oracle.f32_to_bf16(x)
    xf = oracle.bf16_to_f32(bits).reshape(T, H)
    everyone = comm.allgather((bits, idx, w))
    return bits, xf, idx, w, everyone


def expert_factor(E: int) -> np.ndarray:
    return (1.0 + 0.01 * np.arange(E)).astype(np.float32)


_FACTORS: dict = {}


def fake_experts(recv_x: torch.Tensor, E: int) -> torch.Tensor:
    """y[e_local, row] = bf16(x_row * f[global expert]): different per expert, exact in numpy."""
    comm = world()
    el = recv_x.shape[0]
    key = (E, str(recv_x.device))
    if key not in _FACTORS:  # made once, outside any CUDA graph capture (no host copies there)
        _FACTORS[key] = torch.from_numpy(
            expert_factor(E)[comm.rank * el : (comm.rank + 1) * el]
        ).to(recv_x.device)
    f = _FACTORS[key]
    return (recv_x.float() * f[:, None, None]).to(torch.bfloat16)


def check_dispatch(res, everyone, H, E, M, fp8, round_scale, ue8m0, stats_before=None, stats=None):
    comm = world()
    R, rank = comm.size, comm.rank
    EL = E // R
    exp = oracle.low_latency_dispatch([e[1] for e in everyone], E, rank)
    count = res.recv_count.cpu().numpy()
    assert np.array_equal(count, exp.recv_count), f"recv_count {count} != {exp.recv_count}"
    lr = res.handle.layout_range.cpu().numpy()
    assert np.array_equal(lr, exp.layout_range()), "layout_range differs"
    src = res.handle.src_token_idx.cpu().numpy()
    if fp8:
        rx = res.recv_x.view(torch.uint8).cpu().numpy()
        sc = res.recv_x_scales.cpu().numpy()
    else:
        rx = res.recv_x.view(torch.int16).cpu().numpy().view(np.uint16)
    for j in range(EL):
        assert np.all(src[j, count[j] :] == -1), f"expert {j}: src_token_idx not -1 past the count"
        for s in range(R):
            start, n = lr[j, s]
            tok = src[j, start : start + n].astype(np.int64)
            order = np.argsort(tok, kind="stable")
            assert np.array_equal(tok[order], exp.groups[j][s]), f"expert {j} source {s}: token ids"
            if n == 0:
                continue
            rows = start + order
            sbits = everyone[s][0]
            if not fp8:
                assert np.array_equal(rx[j, rows], sbits[exp.groups[j][s]]), (
                    f"expert {j} src {s}: rows"
                )
            else:
                xs = oracle.bf16_to_f32(sbits[exp.groups[j][s]]).reshape(n, H)
                q, scale = oracle.per_token_cast_to_fp8(xs, round_scale, ue8m0)
                got_q = rx[j, rows]
                assert np.array_equal(sc[j, rows], scale), f"expert {j} src {s}: scales differ"
                assert np.array_equal(got_q, q), (
                    f"expert {j} src {s}: fp8 bytes differ at "
                    f"{np.argwhere(got_q != q)[:4].tolist()}"
                )
    if stats is not None:
        got = stats.cpu().numpy() - stats_before
        assert np.array_equal(got, exp.recv_count), "cumulative_local_expert_recv_stats"


def expected_combine(idx, w, xf, E) -> np.ndarray:
    f = expert_factor(E)
    T, K = idx.shape
    rows = np.zeros((T, K, xf.shape[1]), np.float32)
    for k in range(K):
        e = idx[:, k]
        prod = xf * f[np.maximum(e, 0)][:, None]
        rows[:, k] = oracle.bf16_to_f32(oracle.f32_to_bf16(prod)).reshape(prod.shape)
    return oracle.low_latency_combine(idx, w, rows)


def check_combine(out: torch.Tensor, idx, w, xf, E) -> None:
    """Per element: the kernel sums in float32 and rounds to BF16 once, so each element is
    within half a BF16 step (2**-8 relative) of the exact sum. Every term of a sum has the
    sign of x (weights and expert factors are positive), so there is no cancellation, and a
    lost or doubled contribution (weight >= 0.1 of a sum of at most 8) is far outside."""
    ref = expected_combine(idx, w, xf, E)
    got = out.float().cpu().numpy()
    assert got.shape == ref.shape, f"combine shape {got.shape} != {ref.shape}"
    tol = 2.0**-8 * np.abs(ref) + 1e-30
    bad = np.argwhere(~(np.abs(got - ref) <= tol))
    assert bad.size == 0, (
        f"combine: {len(bad)} elements off, first at {bad[0].tolist()}: "
        f"{got[tuple(bad[0])]} vs {ref[tuple(bad[0])]}"
    )


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def engine():
    from mpiep.backends.cuda_low_latency import LowLatencyEngine
    from mpiep.comm import Communicator
    from mpiep.config import get_low_latency_rdma_size_hint

    comm = Communicator()
    device = torch.device("cuda", comm.select_device(torch.cuda.device_count()))
    torch.cuda.set_device(device)
    heap = get_low_latency_rdma_size_hint(MAX_TOKENS, 7168, comm.size, BENCH_EXPERTS)
    eng = LowLatencyEngine(
        comm, device, heap, num_qps_per_rank=12, allow_nvlink=True, timeout_s=30.0
    )
    yield eng
    eng.destroy()


def experts_for(R: int) -> int:
    return 8 * R if R > 1 else 16


def run_case(
    eng,
    seed,
    T,
    H,
    K,
    fp8=False,
    round_scale=False,
    ue8m0=False,
    pattern="holes",
    hooks=False,
    combine=True,
):
    R = world().size
    E = experts_for(R)
    bits, xf, idx, w, everyone = make_inputs(seed, T, H, K, E, pattern)
    dev = eng.device
    x = to_torch_bf16(bits, dev).reshape(idx.shape[0], H)
    topk = torch.from_numpy(idx).to(dev)
    weights = torch.from_numpy(w).to(dev)
    stats = torch.randint(0, 5, (E // R,), dtype=torch.int32, device=dev)
    before = stats.cpu().numpy()
    res = ll_dispatch(eng, x, topk, MAX_TOKENS, E, fp8, round_scale, ue8m0, stats, hooks)
    if hooks:
        assert res.hook is not None
        res.hook()
    torch.cuda.synchronize()
    eng.check()
    check_dispatch(res, everyone, H, E, MAX_TOKENS, fp8, round_scale, ue8m0, before, stats)
    if not combine or fp8:
        return
    y = fake_experts(res.recv_x, E)
    out, hook = ll_combine(eng, y, topk, weights, res.handle, False, None, hooks)
    if hooks:
        hook()
    torch.cuda.synchronize()
    eng.check()
    check_combine(out, idx, w, xf, E)


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("hidden", [2048, 4096, 7168])
@pytest.mark.parametrize("topk", [1, 4, 8])
def test_bf16_dispatch_combine(engine, hidden, topk):
    run_checked(lambda: run_case(engine, hidden + topk, 96, hidden, topk))


@pytest.mark.parametrize("hidden", [2048, 7168])
@pytest.mark.parametrize("scales", ["plain", "round", "ue8m0"])
def test_fp8_dispatch(engine, hidden, scales):
    rs, ue = scales != "plain", scales == "ue8m0"
    run_checked(lambda: run_case(engine, hidden + len(scales), 64, hidden, 8, True, rs, ue))


@pytest.mark.parametrize("hidden", [2048 + 128, 640])
@pytest.mark.parametrize("hooks", [False, True])
def test_fp8_ue8m0_hidden_not_multiple_of_512(engine, hidden, hooks):
    """UE8M0 scales in ceil(H/512) int32 words, the last one partly filled with zero bytes
    past the last block (issue 11, defect 8; the oracle packs the same way)."""
    run_checked(lambda: run_case(engine, hidden + 5, 64, hidden, 8, True, True, True, hooks=hooks))


@pytest.mark.parametrize("case", ["t_max", "t_one", "zero_tokens", "skewed", "all_masked"])
def test_edge_cases(engine, case):
    T = {"t_max": MAX_TOKENS, "t_one": 1}.get(case, 40)
    pattern = case if case in ("zero_tokens", "skewed", "all_masked") else "random"
    run_checked(lambda: run_case(engine, 11, T, 4096, 4, pattern=pattern))


@pytest.mark.parametrize("fp8", [False, True])
def test_hooks(engine, fp8):
    run_checked(lambda: run_case(engine, 23, 77, 7168, 8, fp8=fp8, hooks=True))


def test_two_pairs_in_flight(engine):
    def body():
        R = world().size
        E, H, K = experts_for(R), 4096, 6
        dev = engine.device
        cases = []
        for seed in (31, 32):
            bits, xf, idx, w, everyone = make_inputs(seed, 50 + seed, H, K, E)
            cases.append(
                (
                    to_torch_bf16(bits, dev).reshape(-1, H),
                    torch.from_numpy(idx).to(dev),
                    torch.from_numpy(w).to(dev),
                    xf,
                    idx,
                    w,
                    everyone,
                )
            )
        ds = [
            ll_dispatch(engine, c[0], c[1], MAX_TOKENS, E, False, False, False, None, True)
            for c in cases
        ]
        for d in ds:
            d.hook()
        torch.cuda.synchronize()
        engine.check()
        for d, c in zip(ds, cases, strict=True):
            check_dispatch(d, c[6], H, E, MAX_TOKENS, False, False, False)
        outs = [
            ll_combine(engine, fake_experts(d.recv_x, E), c[1], c[2], d.handle, False, None, True)
            for d, c in zip(ds, cases, strict=True)
        ]
        for _, hook in outs:
            hook()
        torch.cuda.synchronize()
        engine.check()
        for (out, _), c in zip(outs, cases, strict=True):
            check_combine(out, c[4], c[5], c[3], E)

    run_checked(body)


def _standard_inputs(eng, seed: int, pattern: str = "random"):
    """The speed bar's shape: T=128, hidden 7168, top-8 of 288 experts."""
    E, H, K, T = BENCH_EXPERTS, 7168, 8, MAX_TOKENS
    bits, _, idx, _, everyone = make_inputs(seed, T, H, K, E, pattern)
    dev = eng.device
    return to_torch_bf16(bits, dev).reshape(-1, H), torch.from_numpy(idx).to(dev), everyone


@pytest.mark.parametrize("fp8", [False, True])
def test_standard_shape_hook_pairs(engine, fp8):
    """Receive hooks at the benchmark's shape (144 local experts per rank at 2 ranks, more
    experts than blocks): back-to-back send/hook pairs, then two dispatches in flight."""
    E, H = BENCH_EXPERTS, 7168

    def pairs():
        for seed in (101, 102, 103):
            x, topk, everyone = _standard_inputs(engine, seed, "random" if seed != 102 else "holes")
            d = ll_dispatch(engine, x, topk, MAX_TOKENS, E, fp8, False, False, None, True)
            assert d.hook is not None
            d.hook()
            torch.cuda.synchronize()
            engine.check()
            check_dispatch(d, everyone, H, E, MAX_TOKENS, fp8, False, False)

    def in_flight():
        cases = [_standard_inputs(engine, seed) for seed in (104, 105)]
        ds = [
            ll_dispatch(engine, c[0], c[1], MAX_TOKENS, E, fp8, False, False, None, True)
            for c in cases
        ]
        for d in ds:
            d.hook()
        torch.cuda.synchronize()
        engine.check()
        for d, c in zip(ds, cases, strict=True):
            check_dispatch(d, c[2], H, E, MAX_TOKENS, fp8, False, False)

    run_checked(pairs)
    run_checked(in_flight)  # every rank finished `pairs` first (run_checked agrees collectively)


def test_hooks_bench_sequence(engine):
    """The benchmark's hook row: after a clean, send-only calls issued back to back with their
    hooks pending (its timer ran the call 1 + 10 times), then the hooks. Buffers alternate, so
    the 1st, 3rd, ... 11th sends all landed in buffer 0: its count is SET (n) but its arrival
    counter was ADDED six times (6n), and the first hook timed out ("saw 6n, expected n").
    Now a dispatch into a buffer whose hook is pending is refused before anything launches."""
    E, H = BENCH_EXPERTS, 7168
    old = engine.timeout_s
    engine.clean_low_latency_buffer(MAX_TOKENS, H, E)
    engine.timeout_s = 5.0
    state: dict = {}

    def sends():
        x, topk, everyone = _standard_inputs(engine, 111)
        ds, refused = [], []
        for _ in range(11):
            try:
                ds.append(
                    ll_dispatch(engine, x, topk, MAX_TOKENS, E, True, False, False, None, True)
                )
            except RuntimeError as exc:
                refused.append(str(exc))
        for d in ds:
            d.hook()
        torch.cuda.synchronize()
        engine.check()
        assert len(ds) == 2 and len(refused) == 9, f"{len(ds)} sends issued, {len(refused)} refused"
        assert "receive hooks" in refused[0], refused[0]
        for d in ds:
            check_dispatch(d, everyone, H, E, MAX_TOKENS, True, False, False)
        with pytest.raises(RuntimeError, match="already called"):
            ds[0].hook()
        state["x"], state["topk"], state["everyone"] = x, topk, everyone

    def after():  # the engine goes on normally (run_checked: every rank finished `sends`)
        d = ll_dispatch(
            engine, state["x"], state["topk"], MAX_TOKENS, E, True, False, False, None, True
        )
        d.hook()
        torch.cuda.synchronize()
        engine.check()
        check_dispatch(d, state["everyone"], H, E, MAX_TOKENS, True, False, False)

    try:
        run_checked(sends)
        run_checked(after)
    finally:
        engine.timeout_s = old
        engine.clean_low_latency_buffer(MAX_TOKENS, H, E)


def test_zero_copy_and_out(engine):
    def body():
        R = world().size
        E, H, K = experts_for(R), 2048, 4
        bits, xf, idx, w, _everyone = make_inputs(41, 100, H, K, E)
        dev = engine.device
        x, topk, weights = (
            to_torch_bf16(bits, dev).reshape(-1, H),
            torch.from_numpy(idx).to(dev),
            torch.from_numpy(w).to(dev),
        )
        d = ll_dispatch(engine, x, topk, MAX_TOKENS, E, False, False, False, None, False)
        buf = engine.get_next_low_latency_combine_buffer(d.handle)
        assert buf.shape == (E // R, R * MAX_TOKENS, H) and buf.dtype == torch.bfloat16
        buf.copy_(fake_experts(d.recv_x, E))
        out = torch.full((x.shape[0], H), float("nan"), dtype=torch.bfloat16, device=dev)
        got, _ = ll_combine(engine, buf, topk, weights, d.handle, True, out, False)
        torch.cuda.synchronize()
        engine.check()
        assert got.data_ptr() == out.data_ptr()
        check_combine(out, idx, w, xf, E)

    run_checked(body)


def test_cuda_graph_replay(engine):
    def body():
        R = world().size
        E, H, K, T = experts_for(R), 4096, 8, 64
        dev = engine.device
        bits, xf, idx, w, everyone = make_inputs(51, T, H, K, E, "random")
        x_s = to_torch_bf16(bits, dev).reshape(T, H)
        topk_s, w_s = torch.from_numpy(idx).to(dev), torch.from_numpy(w).to(dev)

        def step():
            d = ll_dispatch(engine, x_s, topk_s, MAX_TOKENS, E, False, False, False, None, False)
            out, _ = ll_combine(
                engine, fake_experts(d.recv_x, E), topk_s, w_s, d.handle, False, None, False
            )
            return d, out

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        world().Barrier()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            d, out = step()
        for rep in range(3):
            bits, xf, idx, w, everyone = make_inputs(60 + rep, T, H, K, E, "holes")
            x_s.copy_(to_torch_bf16(bits, dev).reshape(T, H))
            topk_s.copy_(torch.from_numpy(idx).to(dev))
            w_s.copy_(torch.from_numpy(w).to(dev))
            torch.cuda.synchronize()
            world().Barrier()
            graph.replay()
            torch.cuda.synchronize()
            engine.check()
            check_dispatch(d, everyone, H, E, MAX_TOKENS, False, False, False)
            check_combine(out, idx, w, xf, E)
        del graph

    run_checked(body)


def test_thousand_iterations_identical(engine):
    def body():
        R = world().size
        E, H, K, T = experts_for(R), 2048, 8, 128
        dev = engine.device
        bits, _xf, idx, w, _everyone = make_inputs(71, T, H, K, E, "holes")
        x, topk, weights = (
            to_torch_bf16(bits, dev).reshape(T, H),
            torch.from_numpy(idx).to(dev),
            torch.from_numpy(w).to(dev),
        )
        d0 = ll_dispatch(engine, x, topk, MAX_TOKENS, E, True, True, False, None, False)
        y = fake_experts(d0.recv_x.float().to(torch.bfloat16), E)
        out0, _ = ll_combine(engine, y, topk, weights, d0.handle, False, None, False)
        valid = d0.handle.src_token_idx >= 0
        bad = torch.zeros((), dtype=torch.int64, device=dev)
        for _ in range(1000):
            d = ll_dispatch(engine, x, topk, MAX_TOKENS, E, True, True, False, None, False)
            out, _ = ll_combine(engine, y, topk, weights, d.handle, False, None, False)
            bad += (out.view(torch.int16) != out0.view(torch.int16)).sum()
            bad += (d.handle.src_token_idx != d0.handle.src_token_idx).sum()
            # Rows past recv_count are unspecified: mask them without a host sync.
            bad += (
                (d.recv_x.view(torch.uint8) != d0.recv_x.view(torch.uint8)) & valid[..., None]
            ).sum()
            bad += ((d.recv_x_scales != d0.recv_x_scales) & valid[..., None]).sum()
        torch.cuda.synchronize()
        engine.check()
        assert int(bad) == 0, f"{int(bad)} elements changed across 1000 iterations"

    run_checked(body)


def test_puts_without_nvlink(engine):
    """allow_nvlink_for_low_latency_mode=False: every transfer goes through NVSHMEM puts."""
    from mpiep.backends.cuda_low_latency import LowLatencyEngine
    from mpiep.config import get_low_latency_rdma_size_hint

    comm = engine.comm
    heap = get_low_latency_rdma_size_hint(MAX_TOKENS, 2048, comm.size, experts_for(comm.size))
    eng = LowLatencyEngine(comm, engine.device, heap, 12, False, 30.0)
    try:
        run_checked(lambda: run_case(eng, 81, 90, 2048, 8))
        run_checked(lambda: run_case(eng, 82, 90, 2048, 8, fp8=True, ue8m0=True, hooks=True))
    finally:
        eng.destroy()


def test_timeout_names_rank_and_phase(engine):
    """Rank 0 dispatches alone: its kernel gives up, and the error names rank and phase."""
    from mpiep.errors import PeerTimeoutError

    comm = world()
    if comm.size < 2:
        pytest.skip("needs a peer that stays away")
    R, E, H = comm.size, experts_for(comm.size), 2048
    msg = ""
    ok = True
    old = engine.timeout_s
    if comm.rank == 0:
        engine.timeout_s = 2.0
        gen = torch.Generator(device="cpu").manual_seed(97)
        x = torch.randn(8, H, generator=gen).to(torch.bfloat16).to(engine.device)
        topk = (
            torch.arange(8, device=engine.device).remainder(E).view(8, 1)
        )  # includes rank 1's experts
        topk = (topk + E // R).remainder(E)
        ll_dispatch(engine, x, topk, MAX_TOKENS, E, False, False, False, None, False)
        torch.cuda.synchronize()
        try:
            engine.check()
            ok, msg = False, "no timeout reported"
        except PeerTimeoutError as exc:
            ok = "rank 0" in str(exc) and "dispatch" in str(exc)
            msg = str(exc)
        engine.timeout_s = old
    comm.Barrier()
    engine.clean_low_latency_buffer(MAX_TOKENS, H, E)
    agree_ok(ok, msg)
    run_checked(lambda: run_case(engine, 91, 32, H, 4))  # usable again after cleaning


@pytest.mark.parametrize("scales", ["plain", "round", "ue8m0"])
def test_fp8_non_finite_blocks(engine, scales):
    """docs/semantics.md "FP8": an Inf or NaN in a 128-channel block makes that block's scale
    Inf/NaN (with round_scale and UE8M0: +Inf; before the fix the kernel's amax dropped NaN,
    and a rounded NaN scale became -0.0) and the block dequantise to NaN; other blocks are
    exact. Decoded values and scales equal the oracle's, NaN equal to NaN."""

    seen = {"bad_rows": 0}

    def body():
        comm = world()
        R, E, H, T = comm.size, experts_for(comm.size), 1024, 16
        rs, ue = scales != "plain", scales == "ue8m0"
        rng = np.random.default_rng(1234 + comm.rank)
        idx, _ = oracle.make_routing(rng, T, 4, E, R, comm.rank, "random")
        x = rng.standard_normal((T, H)).astype(np.float32)
        x[1, 5] = np.nan  # one NaN: block 0 of token 1
        x[2, 130] = np.inf  # block 1 of token 2
        x[3, 300] = -np.inf  # block 2 of token 3
        x[4, 384:512] = np.nan  # a whole block
        bits = oracle.f32_to_bf16(x)
        everyone = comm.allgather((bits, idx))
        dev = engine.device
        xt = to_torch_bf16(bits, dev).reshape(T, H)
        res = ll_dispatch(
            engine, xt, torch.from_numpy(idx).to(dev), MAX_TOKENS, E, True, rs, ue, None, False
        )
        torch.cuda.synchronize()
        engine.check()
        exp = oracle.low_latency_dispatch([e[1] for e in everyone], E, comm.rank)
        lr = res.handle.layout_range.cpu().numpy()
        src = res.handle.src_token_idx.cpu().numpy()
        q = res.recv_x.view(torch.uint8).cpu().numpy()
        sc = res.recv_x_scales.cpu().numpy()
        for j in range(E // R):
            for s in range(R):
                start, n = lr[j, s]
                if n == 0:
                    continue
                tok = src[j, start : start + n].astype(np.int64)
                assert np.array_equal(np.sort(tok), exp.groups[j][s]), f"expert {j} src {s}"
                xs = oracle.bf16_to_f32(everyone[s][0][tok]).reshape(n, H)
                want_q, want_s = oracle.per_token_cast_to_fp8(xs, rs, ue)
                got_q = oracle.e4m3_decode(q[j, start : start + n])
                assert np.array_equal(got_q, oracle.e4m3_decode(want_q), equal_nan=True), (
                    f"expert {j} src {s}: fp8 values differ"
                )
                got_s = sc[j, start : start + n]
                assert np.array_equal(got_s, want_s, equal_nan=not ue), (
                    f"expert {j} src {s}: scales {got_s[~np.isfinite(xs).any(1)][:2]} "
                    f"vs {want_s[~np.isfinite(xs).any(1)][:2]}"
                )
                if rs and not ue:  # rounded: +Inf for a non-finite block, never -0.0
                    bad_blocks = ~np.isfinite(xs.reshape(n, H // 128, 128)).all(2)
                    assert np.all(np.isposinf(got_s[bad_blocks])), got_s[bad_blocks]
                seen["bad_rows"] += int((~np.isfinite(xs)).any(1).sum())

    run_checked(body)
    total = world().allreduce(seen["bad_rows"])
    agree_ok(total > 0, "no non-finite row was received anywhere: the test tests nothing")
