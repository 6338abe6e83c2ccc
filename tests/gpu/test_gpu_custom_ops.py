"""The low-latency decode step (dispatch -> expert math -> combine) under torch.compile and in
a CUDA graph, through the torch custom ops (torch.ops.mpiep, src/ops/torch_library.cpp):
the compiled step equals the eager one and the plain-numpy oracle (tests/oracle.py), the
custom ops are nodes of the compiled graphs (not graph breaks around pybind calls), and a
CUDA graph captured from the compiled step replays to the same answers.

Run on the device under mpirun, on 1 or more ranks (``mpirun -np 2 ... pytest --with-mpi``;
several ranks may share one GPU through CUDA MPS). Every check agrees on pass/fail across
ranks before asserting. The engine's peer timeout is long here: each rank compiles on its
own, and a rank that finishes compiling first waits in the kernel for the others.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
MPI = pytest.importorskip("mpi4py.MPI")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import core_has, gpu_marks, run_checked  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import oracle  # noqa: E402

HAVE_CORE = core_has("LowLatencyContext")
try:
    from mpiep.backends import native

    native.ops()
    HAVE_OPS = hasattr(torch.ops.mpiep, "ll_dispatch_fp8")
except (ImportError, OSError):
    HAVE_OPS = False

pytestmark = gpu_marks(
    1,
    HAVE_CORE,
    "low-latency kernels",
    timeout=600,
    extra=(pytest.mark.skipif(not HAVE_OPS, reason="mpiep._ops without the torch custom ops"),),
)

COMM = MPI.COMM_WORLD
M, T, H, K = 64, 48, 2048, 4  # max tokens per rank, tokens, hidden, top-k
TIMEOUT_S = 300.0  # ranks compile at their own pace (see the module docstring)


def _has_triton() -> bool:
    try:
        from torch.utils._triton import has_triton

        return bool(has_triton())
    except ImportError:
        return False


BACKENDS = [
    "aot_eager",
    pytest.param(
        "inductor", marks=pytest.mark.skipif(not _has_triton(), reason="inductor needs triton")
    ),
]


# --------------------------------------------------------------------------- helpers


def num_experts() -> int:
    return 8 * COMM.size if COMM.size > 1 else 16


def factors(E: int) -> np.ndarray:
    return (1.0 + 0.01 * np.arange(E)).astype(np.float32)


class Inputs:
    """This rank's x, routing and weights (on the device), and what the oracle expects."""

    def __init__(self, seed: int, device: torch.device) -> None:
        E = num_experts()
        rng = np.random.default_rng(seed * 7919 + COMM.rank)
        idx, w = oracle.make_routing(rng, T, K, E, COMM.size, COMM.rank, "holes")
        x = rng.standard_normal((T, H)).astype(np.float32)
        x *= rng.uniform(0.1, 4.0, (T, 1)).astype(np.float32)
        bits = oracle.f32_to_bf16(x)
        self.idx_np, self.w_np = idx, w
        self.xf = oracle.bf16_to_f32(bits).reshape(T, H)
        self.x = torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16)
        self.x = self.x.reshape(T, H).to(device)
        self.idx = torch.from_numpy(idx).to(device)
        self.w = torch.from_numpy(w).to(device)
        everyone = COMM.allgather(idx)
        self.recv_count = oracle.low_latency_dispatch(everyone, E, COMM.rank).recv_count

    def expected_bf16(self) -> np.ndarray:
        """out[t] = sum_k w[t,k] * bf16(x[t] * f[expert]) (the BF16 expert math below)."""
        f = factors(num_experts())
        rows = np.zeros((T, K, H), np.float32)
        for k in range(K):
            prod = self.xf * f[np.maximum(self.idx_np[:, k], 0)][:, None]
            rows[:, k] = oracle.bf16_to_f32(oracle.f32_to_bf16(prod)).reshape(prod.shape)
        return oracle.low_latency_combine(self.idx_np, self.w_np, rows)


def check_oracle(out: torch.Tensor, count: torch.Tensor, inp: Inputs, fp8: bool) -> None:
    got_count = count.cpu().numpy()
    assert np.array_equal(got_count, inp.recv_count), f"recv_count {got_count}"
    if fp8:  # FP8 rows are checked against the oracle by test_gpu_low_latency.py
        return
    ref = inp.expected_bf16()
    got = out.float().cpu().numpy()
    bad = np.argwhere(~(np.abs(got - ref) <= 2.0**-8 * np.abs(ref) + 1e-30))
    assert bad.size == 0, f"combine: {len(bad)} elements off the oracle, first {bad[0].tolist()}"


def check_same(got: torch.Tensor, want: torch.Tensor, exact: bool, what: str) -> None:
    """Bit-identical, or (Inductor's own kernels for the expert math) within one BF16 step."""
    if exact:
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), f"{what}: bits differ"
    else:
        diff = (got.float() - want.float()).abs()
        tol = 2.0**-7 * want.float().abs() + 1e-30
        assert bool((diff <= tol).all()), f"{what}: differs by {float(diff.max())}"


class Counting:
    """A torch.compile backend that records the mpiep custom ops of every graph Dynamo
    hands it (a graph break around a pybind call would leave them out), then compiles with
    ``inner``."""

    def __init__(self, inner: str) -> None:
        self.inner = torch._dynamo.lookup_backend(inner)
        self.graphs: list[list[str]] = []

    def __call__(self, gm, example_inputs):  # type: ignore[no-untyped-def]
        targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        self.graphs.append([t for t in targets if t.startswith("mpiep.")])
        return self.inner(gm, example_inputs)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def engine():
    from mpiep.backends.cuda_low_latency import LowLatencyEngine
    from mpiep.comm import Communicator
    from mpiep.config import get_low_latency_rdma_size_hint

    comm = Communicator()
    device = torch.device("cuda", comm.select_device(torch.cuda.device_count()))
    torch.cuda.set_device(device)
    heap = get_low_latency_rdma_size_hint(M, H, comm.size, num_experts())
    eng = LowLatencyEngine(comm, device, heap, 12, True, TIMEOUT_S)
    yield eng
    torch.cuda.synchronize()
    eng.destroy()


def _step_fn(engine, fp8: bool):  # type: ignore[no-untyped-def]
    from mpiep.backends.base import LowLatencyCombineRequest, LowLatencyDispatchRequest

    E = num_experts()  # a constant of the step (Dynamo cannot trace mpi4py's Comm.size)

    def step(x, idx, w, f):  # type: ignore[no-untyped-def]
        d = engine.low_latency_dispatch(
            LowLatencyDispatchRequest(x, idx, M, E, fp8, False, False, None, False)
        )
        recv = d.recv_x.float()
        if fp8:
            recv = recv * d.recv_x_scales.repeat_interleave(128, dim=2)
        y = (recv * f[:, None, None]).to(torch.bfloat16)  # one scale per local expert
        out, _ = engine.low_latency_combine(
            LowLatencyCombineRequest(y, idx, w, d.handle, False, None, False)
        )
        return out, d.recv_count

    return step


def _local_factors(engine) -> torch.Tensor:  # type: ignore[no-untyped-def]
    EL = num_experts() // COMM.size
    f = factors(num_experts())[COMM.rank * EL : (COMM.rank + 1) * EL]
    return torch.from_numpy(f.copy()).to(engine.device)


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fp8", [False, True])
def test_compiled_decode_step(engine, backend, fp8):
    """fullgraph=True: the whole step, both custom ops included, is one graph per variant
    (the engine's two buffer indices); compiled == eager == oracle over several calls."""
    counting = Counting(backend)

    def body() -> None:
        torch._dynamo.reset()
        f = _local_factors(engine)
        step = _step_fn(engine, fp8)
        compiled = torch.compile(step, backend=counting, fullgraph=True)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            run_calls(compiled, step, f)
        # torch 2.11 warns, and 2.12 refuses, when a custom op's returns alias each other.
        alias = [str(w.message) for w in seen if "alias" in str(w.message)]
        assert not alias, alias[:1]
        name = "mpiep.ll_dispatch_fp8" if fp8 else "mpiep.ll_dispatch"
        assert len(counting.graphs) >= 2, f"one graph per buffer index: {counting.graphs}"
        assert all(g == [name, "mpiep.ll_combine"] for g in counting.graphs), counting.graphs

    def run_calls(compiled, step, f) -> None:
        for i in range(4):  # eager and compiled in turn, so that each sees both buffers
            inp = Inputs(100 + i, engine.device)
            if i % 2:
                got, got_count = compiled(inp.x, inp.idx, inp.w, f)
                want, want_count = step(inp.x, inp.idx, inp.w, f)
            else:
                want, want_count = step(inp.x, inp.idx, inp.w, f)
                got, got_count = compiled(inp.x, inp.idx, inp.w, f)
            torch.cuda.synchronize()
            engine.check()
            check_oracle(want, want_count, inp, fp8)
            check_oracle(got, got_count, inp, fp8)
            check_same(got, want, backend != "inductor", f"call {i}: compiled vs eager")

    run_checked(body)
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_step_in_cuda_graph(engine, backend):
    """The compiled step (warmed up on both buffer indices, so nothing compiles during the
    capture) captured in a torch.cuda.CUDAGraph: each replay on new inputs equals the eager
    step on the same inputs (computed before the capture) and the oracle."""

    def body() -> None:
        torch._dynamo.reset()
        f = _local_factors(engine)
        step = _step_fn(engine, False)
        counting = Counting(backend)
        compiled = torch.compile(step, backend=counting, fullgraph=True)
        first = Inputs(200, engine.device)
        x_s, idx_s, w_s = first.x.clone(), first.idx.clone(), first.w.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # buffer 0, 1, 0: both variants compiled
                compiled(x_s, idx_s, w_s, f)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        compiles = len(counting.graphs)
        replays = [Inputs(210 + r, engine.device) for r in range(3)]
        eager = [step(inp.x, inp.idx, inp.w, f) for inp in replays]
        torch.cuda.synchronize()
        engine.check()
        COMM.Barrier()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out, count = compiled(x_s, idx_s, w_s, f)
        assert len(counting.graphs) == compiles, "torch.compile recompiled during the capture"
        for inp, (want, want_count) in zip(replays, eager, strict=True):
            x_s.copy_(inp.x)
            idx_s.copy_(inp.idx)
            w_s.copy_(inp.w)
            torch.cuda.synchronize()
            COMM.Barrier()
            graph.replay()
            torch.cuda.synchronize()
            engine.check()
            check_oracle(out, count, inp, False)
            check_same(out, want, backend != "inductor", "replay vs eager")
            assert torch.equal(count, want_count)
        del graph

    run_checked(body)
    torch._dynamo.reset()


def test_buffer_step_under_compile():
    """Through Buffer (its Python bookkeeping may break the graph, which is allowed): the
    compiled step equals eager and the oracle, and both custom ops reach compiled graphs."""
    from mpiep import Buffer, get_low_latency_rdma_size_hint

    E = num_experts()
    heap = get_low_latency_rdma_size_hint(M, H, COMM.size, E)
    buf = Buffer(
        COMM, num_rdma_bytes=heap, low_latency_mode=True, backend="cuda", validate=False,
        timeout_s=TIMEOUT_S,
    )  # fmt: skip
    counting = Counting("aot_eager")

    def step(x, idx, w, f):  # type: ignore[no-untyped-def]
        recv, count, handle, _, _ = buf.low_latency_dispatch(x, idx, M, E, use_fp8=False)
        y = (recv.float() * f[:, None, None]).to(torch.bfloat16)
        out, _, _ = buf.low_latency_combine(y, idx, w, handle)
        return out, count

    def body() -> None:
        torch._dynamo.reset()
        EL = E // COMM.size
        f = torch.from_numpy(factors(E)[COMM.rank * EL : (COMM.rank + 1) * EL].copy())
        f = f.to(buf.device)
        compiled = torch.compile(step, backend=counting)
        for i in range(3):
            inp = Inputs(300 + i, buf.device)
            want, want_count = step(inp.x, inp.idx, inp.w, f)
            got, got_count = compiled(inp.x, inp.idx, inp.w, f)
            torch.cuda.synchronize()
            check_oracle(want, want_count, inp, False)
            check_oracle(got, got_count, inp, False)
            check_same(got, want, True, f"call {i}: compiled vs eager")
        seen = {t for g in counting.graphs for t in g}
        assert {"mpiep.ll_dispatch", "mpiep.ll_combine"} <= seen, counting.graphs

    try:
        run_checked(body)
    finally:
        torch._dynamo.reset()
        torch.cuda.synchronize()
        buf.destroy()
