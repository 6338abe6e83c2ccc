"""The op layer as torch custom ops (torch.ops.mpiep, src/ops/torch_library.cpp and
python/mpiep/backends/torch_ops.py), on the CPU: torch.library.opcheck of the reference
backend's CPU kernels; the fake implementations of the GPU ops give the shapes and dtypes
that the C++ allocates (checked on the meta device against the formulas of DESIGN.md,
written out again here); torch.compile keeps every communication op, in program order,
while it drops an unused functional one; and compiled calls of the CPU ops equal eager.
The GPU side (the real kernels under torch.compile and CUDA graphs) is
tests/gpu/test_gpu_custom_ops.py."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import run_once

# Single-process (no MPI): once from plain pytest, not again on every rank of the MPI run.
pytestmark = [pytest.mark.timeout(600), run_once]

COMM_OPS = [
    "ll_dispatch",
    "ll_dispatch_fp8",
    "ll_dispatch_receive",
    "ll_combine",
    "ll_combine_out",
    "intranode_combine",
    "internode_combine",
]


@pytest.fixture(scope="module")
def ops():
    try:
        from mpiep.backends import native

        module = native.ops()
    except (ImportError, OSError):
        module = None
    if module is None or not hasattr(torch.ops.mpiep, "reference_cast_to_fp8"):
        if os.environ.get("MPIEP_EXPECT_CORE") == "1":
            pytest.fail("mpiep._ops is expected here but does not register torch.ops.mpiep")
        pytest.skip("mpiep._ops is not built here")
    return module


def _bf16(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 3).to(torch.bfloat16)


# --------------------------------------------------------------------------- schemas
def test_communication_ops_mutate_the_sequence(ops) -> None:
    """Every communication op declares its first argument, the sequence tensor, written
    (what keeps torch.compile from dropping or reordering it) and can be functionalized;
    the layout and the CPU kernels are functional apart from gather_sum's `out`."""
    from torch._higher_order_ops.auto_functionalize import can_auto_functionalize

    for name in COMM_OPS:
        op = getattr(torch.ops.mpiep, name).default
        first = op._schema.arguments[0]
        assert first.name == "sequence", name
        assert first.alias_info is not None and first.alias_info.is_write, name
        assert can_auto_functionalize(op), f"{name}: torch.compile cannot functionalize it"
    assert not torch.ops.mpiep.layout.default._schema.is_mutable
    assert not torch.ops.mpiep.reference_cast_to_fp8.default._schema.is_mutable
    written = [
        a.name
        for a in torch.ops.mpiep.reference_gather_sum.default._schema.arguments
        if a.alias_info is not None and a.alias_info.is_write
    ]
    assert written == ["out"]
    # Outputs the kernels fill in besides the sequence are declared too.
    for name, args in {
        "ll_dispatch": ["stats"],
        "ll_dispatch_fp8": ["stats"],
        "ll_dispatch_receive": [
            "recv_x",
            "recv_scales",
            "recv_count",
            "src_token_idx",
            "layout_range",
            "stats",
        ],
        "ll_combine_out": ["out"],
    }.items():
        schema = getattr(torch.ops.mpiep, name).default._schema
        got = [a.name for a in schema.arguments[1:] if a.alias_info and a.alias_info.is_write]
        assert got == args, name


# --------------------------------------------------------------------------- opcheck
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("round_scale,use_ue8m0", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("shape", [(5, 640), (0, 128), (1, 7168)])
def test_opcheck_cast_to_fp8(ops, dtype, round_scale, use_ue8m0, shape) -> None:
    x = _bf16(*shape).to(dtype)
    torch.library.opcheck(torch.ops.mpiep.reference_cast_to_fp8, (x, round_scale, use_ue8m0))


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("num_bias", [0, 2])
@pytest.mark.parametrize("T,J", [(6, 3), (4, 0), (0, 2)])
def test_opcheck_gather_sum(ops, weighted, num_bias, T, J) -> None:
    H, N = 256, 9
    g = torch.Generator().manual_seed(T * 10 + J)
    rows = _bf16(N, H, seed=1)
    idx = torch.randint(0, N, (T, J), generator=g)
    w = torch.rand(T, J, generator=g) if weighted else None
    bias = [_bf16(T, H, seed=2 + b) for b in range(num_bias)]
    out = torch.empty(T, H, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.mpiep.reference_gather_sum, (rows, idx, out, w, bias))


def test_custom_ops_equal_the_pybind_entries(ops) -> None:
    """The same C++ function behind both: identical bits."""
    x = _bf16(7, 1024, seed=3)
    for flags in [(False, False), (True, False), (False, True)]:
        q1, s1 = ops.reference_cast_to_fp8(x, *flags)
        q2, s2 = torch.ops.mpiep.reference_cast_to_fp8(x, *flags)
        assert torch.equal(q1.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s1, s2)
    rows, idx = _bf16(11, 256, seed=4), torch.randint(0, 11, (5, 3))
    w, b = torch.rand(5, 3), [_bf16(5, 256, seed=5)]
    o1, o2 = torch.empty(5, 256, dtype=torch.bfloat16), torch.zeros(5, 256, dtype=torch.bfloat16)
    ops.reference_gather_sum(rows, idx, o1, w, b)
    torch.ops.mpiep.reference_gather_sum(rows, idx, o2, w, b)
    assert torch.equal(o1.view(torch.int16), o2.view(torch.int16))


def test_errors_keep_their_python_class(ops) -> None:
    with pytest.raises(ValueError, match="multiple of 128"):
        torch.ops.mpiep.reference_cast_to_fp8(torch.zeros(2, 100), False, False)
    with pytest.raises(ValueError, match="idx holds 9"):
        torch.ops.mpiep.reference_gather_sum(
            _bf16(3, 128), torch.full((1, 1), 9), torch.empty(1, 128, dtype=torch.bfloat16),
            None, [],
        )  # fmt: skip


# --------------------------------------------------------------------------- fake impls
META = torch.device("meta")


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device=META)


def _sig(ts) -> list[tuple[tuple[int, ...], torch.dtype]]:
    return [(tuple(t.shape), t.dtype) for t in ts]


@pytest.mark.parametrize("R,M,E,T,H,K", [(1, 128, 8, 128, 7168, 8), (2, 16, 16, 3, 2048, 4)])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_low_latency_fakes(ops, R, M, E, T, H, K, ue8m0) -> None:
    seq = _meta(1, dtype=torch.int64)
    x, idx = _meta(T, H, dtype=torch.bfloat16), _meta(T, K, dtype=torch.int64)
    EL, rows = E // R, R * M  # rows of every local expert: R * num_max_dispatch_tokens
    i32 = torch.int32
    meta = [((EL,), i32), ((EL, rows), i32), ((EL, R, 2), i32)]
    bf16 = torch.ops.mpiep.ll_dispatch(seq, 0, R, x, idx, M, E, None, 0, 3)
    assert _sig(bf16) == [((EL, rows, H), torch.bfloat16), *meta]
    fp8 = torch.ops.mpiep.ll_dispatch_fp8(seq, 0, R, x, idx, M, E, False, ue8m0, None, 0, 3)
    # FP8: one float32 scale per 128 channels, or UE8M0 exponent bytes packed 4 per int32.
    scales = ((EL, rows, -(-H // 512)), i32) if ue8m0 else ((EL, rows, H // 128), torch.float32)
    assert _sig(fp8) == [((EL, rows, H), torch.float8_e4m3fn), scales, *meta]
    assert all(t.is_contiguous() for t in (*bf16, *fp8))
    y, w = _meta(EL, rows, H, dtype=torch.bfloat16), _meta(T, K, dtype=torch.float32)
    src, lay = bf16[2], bf16[3]
    out = torch.ops.mpiep.ll_combine(seq, 0, y, idx, w, src, lay, H, M, E, False, 0, 3)
    assert _sig([out]) == [((T, H), torch.bfloat16)]
    with pytest.raises(ValueError, match="multiple of the number of ranks"):
        torch.ops.mpiep.ll_dispatch(seq, 0, 3, x, idx, M, 16, None, 0, 3)


@pytest.mark.parametrize("R,per_node", [(4, 4), (8, 2), (64, 8)])
@pytest.mark.parametrize("weighted", [False, True])
def test_normal_fakes(ops, R, per_node, weighted) -> None:
    seq = _meta(1, dtype=torch.int64)
    T, K, E, H, rows = 10, 4, 4 * R, 1024, 23
    idx = _meta(T, K, dtype=torch.int64)
    lay = torch.ops.mpiep.layout(idx, E, R, per_node, 0)
    want = [((R,), torch.int32), ((E,), torch.int32), ((T, R), torch.bool)]
    if R // per_node > 1:  # num_tokens_per_rdma_rank only with several nodes
        want.append(((R // per_node,), torch.int32))
    assert _sig(lay) == want
    x = _meta(rows, H, dtype=torch.bfloat16)
    w = _meta(rows, K, dtype=torch.float32) if weighted else None
    src = _meta(rows, dtype=torch.int32)
    want = [((T, H), torch.bfloat16), ((T, K if weighted else 0), torch.float32)]
    intra = torch.ops.mpiep.intranode_combine(seq, 0, x, w, src, [], [], None, None, T, 24, 0)
    inter = torch.ops.mpiep.internode_combine(seq, 0, x, w, [], [], None, None, T, 24, 8, 0)
    assert _sig(intra) == want and _sig(inter) == want


# --------------------------------------------------------------------------- torch.compile
def _aot_graphs():
    from torch._dynamo.backends.common import aot_autograd

    graphs: list[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, example_inputs):  # type: ignore[no-untyped-def]
        graphs.append(gm)
        return gm.forward

    return graphs, aot_autograd(fw_compiler=record)


def _targets(gm: torch.fx.GraphModule) -> list[str]:
    """The mpiep ops of a graph in order (also inside auto_functionalized)."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        target = node.args[0] if "auto_functionalized" in str(node.target) else node.target
        if str(target).startswith("mpiep."):
            found.append(str(target))
    return found


SEQ = None  # the sequence tensor, a global as the engines' is (torch_ops._SEQUENCES)


def test_compile_keeps_communication_ops_in_order(ops) -> None:
    """After functionalization and dead-code elimination, a dispatch whose results are unused
    is still in the graph, before the one that follows it, and each runs once; an unused
    layout (functional) is dropped: the test can tell a kept op from a dropped one. Traced
    with meta tensors (the fake implementations)."""
    global SEQ
    SEQ = _meta(1, dtype=torch.int64)
    graphs, backend = _aot_graphs()

    def step(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        torch.ops.mpiep.ll_dispatch(SEQ, 0, 2, x, idx, 8, 16, None, 0, 3)  # results unused
        torch.ops.mpiep.layout(idx, 16, 2, 2, 0)  # unused, no side effects
        y = torch.ops.mpiep.ll_dispatch_fp8(SEQ, 0, 2, x, idx, 8, 16, True, False, None, 1, 3)
        w = torch.ones(idx.shape, dtype=torch.float32, device=idx.device)
        recv = y[0].to(torch.bfloat16)
        return torch.ops.mpiep.ll_combine(SEQ, 0, recv, idx, w, y[3], y[4], 256, 8, 16, False, 0, 3)

    torch._dynamo.reset()
    x, idx = _meta(3, 256, dtype=torch.bfloat16), _meta(3, 4, dtype=torch.int64)
    out = torch.compile(step, backend=backend, fullgraph=True)(x, idx)
    assert out.shape == (3, 256) and out.dtype == torch.bfloat16
    assert len(graphs) == 1
    assert _targets(graphs[0]) == [
        "mpiep.ll_dispatch.default",
        "mpiep.ll_dispatch_fp8.default",
        "mpiep.ll_combine.default",
    ]
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_compiled_cpu_ops_equal_eager(ops, backend) -> None:
    def step(x: torch.Tensor, rows: torch.Tensor, idx: torch.Tensor, w: torch.Tensor):
        q, s = torch.ops.mpiep.reference_cast_to_fp8(x * 2, False, True)
        out = torch.empty(idx.shape[0], rows.shape[1], dtype=torch.bfloat16)
        torch.ops.mpiep.reference_gather_sum(rows + 1, idx, out, w, [x])
        return q.view(torch.uint8).float().sum(1), s, out * 3

    x, rows = _bf16(6, 640, seed=7), _bf16(13, 640, seed=8)
    idx, w = torch.randint(0, 13, (6, 4)), torch.rand(6, 4)
    torch._dynamo.reset()
    want = step(x, rows, idx, w)
    got = torch.compile(step, backend=backend, fullgraph=True)(x, rows, idx, w)
    for a, b in zip(want, got, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    torch._dynamo.reset()


def test_pick_is_pybind_in_eager_and_custom_ops_under_compile(ops) -> None:
    """native.pick gives the pybind module in eager mode and the torch.ops entries while
    Dynamo traces: the layout then lands in the graph (a graph break otherwise)."""
    from mpiep.backends import native

    assert native.pick(ops) is ops and native.pick() is ops
    seen = []

    def backend(gm: torch.fx.GraphModule, example_inputs):  # type: ignore[no-untyped-def]
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    def layout(idx: torch.Tensor):
        return native.pick().layout(idx, 16, 4, 2, 0)

    torch._dynamo.reset()
    per_rank, per_node, per_expert, in_rank = torch.compile(layout, backend=backend)(
        _meta(5, 2, dtype=torch.int64)
    )
    assert "mpiep.layout" in seen  # the op itself, not a graph break around a pybind call
    assert _sig([per_rank, per_node, per_expert, in_rank]) == [
        ((4,), torch.int32),
        ((2,), torch.int32),
        ((16,), torch.int32),
        ((5, 4), torch.bool),
    ]
    torch._dynamo.reset()


@pytest.fixture
def meta_engine(ops, monkeypatch: pytest.MonkeyPatch):
    """The real LowLatencyEngine methods over a shell without a GPU: its low-latency context
    replaced by a constant rank count and its sequence tensor by a meta one. Only compiled
    calls may run on it: they run the ops' Meta kernels on meta tensors, replaced here by
    recorders of the (op, buffer) each call really receives (tracing uses the fake
    implementations, so only executed calls are recorded). An eager call would hand the
    pybind entry a context address that is not one."""
    from mpiep.backends import torch_ops
    from mpiep.backends.cuda_low_latency import LowLatencyEngine
    from mpiep.hooks import HookTracker

    seq = _meta(1, dtype=torch.int64)

    @torch._dynamo.assume_constant_result
    def two_ranks(ctx: int) -> int:
        return 2

    monkeypatch.setattr(torch_ops, "_ll_num_ranks", two_ranks)
    monkeypatch.setattr(torch_ops, "_sequence_of", lambda t: seq)
    calls: list[tuple[str, int]] = []
    lib = torch.library.Library("mpiep", "IMPL")
    for name, fake in [
        ("ll_dispatch", torch_ops._ll_dispatch_fake),
        ("ll_dispatch_fp8", torch_ops._ll_dispatch_fp8_fake),
        ("ll_combine", torch_ops._ll_combine_fake),
    ]:

        def record(*args, name=name, fake=fake):  # type: ignore[no-untyped-def]
            calls.append((name, args[-2]))  # (..., buffer, phases)
            return fake(*args)

        lib.impl(name, record, "Meta")
    eng = object.__new__(LowLatencyEngine)
    eng._ops, eng._address, eng._send, eng._recv, eng._send_recv = ops, 0x1000, 1, 2, 3
    eng.hooks = HookTracker()
    torch._dynamo.reset()
    yield eng, calls
    torch._dynamo.reset()
    lib._destroy()


def test_engine_decode_step_is_one_graph(meta_engine) -> None:
    """LowLatencyEngine's dispatch -> expert math -> combine compiles (aot_eager) into one
    graph per variant with fullgraph=True (no graph break at the op layer), every executed
    call reaches the custom op once with the buffer index the engine alternates as in eager
    mode (Dynamo guards on it), and the outputs have the shapes of DESIGN.md."""
    from mpiep.backends.base import LowLatencyCombineRequest, LowLatencyDispatchRequest

    eng, calls = meta_engine
    graphs: list[list[str]] = []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def backend(gm: torch.fx.GraphModule, example_inputs):  # type: ignore[no-untyped-def]
        graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return aot_eager(gm, example_inputs)

    def step(x, idx, w, f, fp8: bool):  # type: ignore[no-untyped-def]
        d = eng.low_latency_dispatch(
            LowLatencyDispatchRequest(x, idx, 8, 16, fp8, False, False, None, False)
        )
        recv = d.recv_x.float()
        if fp8:
            recv = recv * d.recv_x_scales.repeat_interleave(128, dim=2)
        y = (recv * f[:, None, None]).to(torch.bfloat16)
        out, _ = eng.low_latency_combine(
            LowLatencyCombineRequest(y, idx, w, d.handle, False, None, False)
        )
        return out, d.recv_count, d.handle.src_token_idx

    x, idx = _meta(3, 256, dtype=torch.bfloat16), _meta(3, 4, dtype=torch.int64)
    w, f = _meta(3, 4, dtype=torch.float32), _meta(8, dtype=torch.float32)
    compiled = torch.compile(step, backend=backend, fullgraph=True)
    variants = [False, False, False, True, True, True]
    for fp8 in variants:
        out, count, src = compiled(x, idx, w, f, fp8)
        assert _sig([out, count, src]) == [
            ((3, 256), torch.bfloat16),
            ((8,), torch.int32),
            ((8, 16), torch.int32),
        ]
    want = []
    for i, fp8 in enumerate(variants):
        want += [("ll_dispatch_fp8" if fp8 else "ll_dispatch", i % 2), ("ll_combine", i % 2)]
    assert calls == want
    assert eng.hooks.slot("dispatch") == eng.hooks.slot("combine") == 0
    for graph in graphs:
        ops = [t for t in graph if t.startswith("mpiep.")]
        assert ops in (
            ["mpiep.ll_dispatch", "mpiep.ll_combine"],
            ["mpiep.ll_dispatch_fp8", "mpiep.ll_combine"],
        )
    assert {"mpiep.ll_dispatch_fp8", "mpiep.ll_dispatch"} <= {t for g in graphs for t in g}


def test_compiled_adapters_keep_the_pybind_results(ops, monkeypatch: pytest.MonkeyPatch) -> None:
    """native.pick's compiled entries return what the pybind entries return: the combine
    into a given `out` returns that tensor (ll_combine_out), the normal combines give None
    for the weights without topk_weights, and everything is one graph (aot_eager, meta
    tensors)."""
    from mpiep.backends import native, torch_ops

    seq = _meta(1, dtype=torch.int64)
    monkeypatch.setattr(torch_ops, "_sequence_of", lambda t: seq)
    T, K, H, EL, rows = 5, 4, 256, 4, 32
    y = _meta(EL, rows, H, dtype=torch.bfloat16)
    idx, w = _meta(T, K, dtype=torch.int64), _meta(T, K, dtype=torch.float32)
    src, lay = _meta(EL, rows, dtype=torch.int32), _meta(EL, 2, 2, dtype=torch.int32)
    xr, src_r = _meta(rows, H, dtype=torch.bfloat16), _meta(rows, dtype=torch.int32)
    wr = _meta(rows, K, dtype=torch.float32)

    def step(out: torch.Tensor):  # type: ignore[no-untyped-def]
        p = native.pick(ops)
        a = p.ll_combine(1, y, idx, w, src, lay, out, H, 16, 8, False, 0, 3)
        b = p.ll_combine(1, y, idx, w, src, lay, None, H, 16, 8, False, 1, 3)
        c = p.intranode_combine(2, xr, None, src_r, [], [], None, None, T, 24, 0)
        d = p.internode_combine(3, xr, wr, [], [4, 5], None, None, T, 24, 8, 0)
        return a is out, a, b, c[0], c[1] is None, d[0], d[1]

    torch._dynamo.reset()
    out = _meta(T, H, dtype=torch.bfloat16)
    same, a, b, c0, c1_none, d0, d1 = torch.compile(step, backend="aot_eager", fullgraph=True)(out)
    assert same and c1_none
    assert _sig([a, b, c0, d0, d1]) == [((T, H), torch.bfloat16)] * 4 + [((T, K), torch.float32)]
    torch._dynamo.reset()
