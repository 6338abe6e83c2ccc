"""The public API end to end on GPUs: ``Buffer(backend="cuda")`` against
``Buffer(backend="reference")`` on the same CUDA tensors, and CUDA-graph capture of
normal mode with ``num_worst_tokens``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
MPI = pytest.importorskip("mpi4py.MPI")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import agree, core_has, gpu_marks  # noqa: E402

from mpiep import Buffer, get_low_latency_rdma_size_hint, get_normal_buffer_size_hint  # noqa: E402
from mpiep.bench.data import make_routing, make_x  # noqa: E402
from mpiep.fp8 import per_token_cast_to_fp8  # noqa: E402

HAVE_CORE = core_has("IntranodeRuntime", "LowLatencyContext")

pytestmark = gpu_marks(2, HAVE_CORE, "the GPU kernels", timeout=300)

COMM = MPI.COMM_WORLD
MAX_TOKENS = 128


def routing(tokens: int, experts: int, topk: int, pattern: str, device: torch.device, seed: int):
    idx, w = make_routing(COMM.rank, tokens, experts, topk, device, seed)
    if pattern == "skewed":  # every token to rank 0's experts only
        g = torch.Generator().manual_seed(seed + 77 + COMM.rank)
        idx = torch.stack(
            [torch.randperm(experts // COMM.size, generator=g)[:topk] for _ in range(tokens)]
        )
        idx = idx.to(device)
    if pattern == "holes":
        g = torch.Generator().manual_seed(seed + 99 + COMM.rank)
        idx[(torch.rand(idx.shape, generator=g) < 0.2).to(device)] = -1
    return idx.contiguous(), w


@pytest.fixture(scope="module")
def normal_pair():
    nvl = get_normal_buffer_size_hint(MAX_TOKENS, 7168, COMM.size, 8)
    cuda = Buffer(COMM, num_nvl_bytes=nvl, backend="cuda", validate=False)
    ref = Buffer(COMM, num_nvl_bytes=nvl, backend="reference", device=cuda.device, validate=False)
    yield cuda, ref
    cuda.destroy()
    ref.destroy()


def run_normal(buf: Buffer, x, idx, w, experts: int, async_: bool):
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, experts)
    prev = buf.capture() if async_ else None
    recv_x, recv_idx, recv_w, counts, handle, ev = buf.dispatch(
        x,
        num_tokens_per_rank=per_rank,
        num_tokens_per_rdma_rank=per_rdma,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=idx,
        topk_weights=w,
        previous_event=prev,
        async_finish=async_,
        allocate_on_comm_stream=async_,
    )
    ev.current_stream_wait()
    y = recv_x[0].float().to(torch.bfloat16) if isinstance(recv_x, tuple) else recv_x
    combined, combined_w, ev = buf.combine(y, handle, topk_weights=recv_w, async_finish=async_)
    ev.current_stream_wait()
    torch.cuda.synchronize()
    return recv_x, recv_idx, recv_w, counts, combined, combined_w, in_rank


@pytest.mark.parametrize("async_", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("pattern", ["random", "skewed", "holes"])
@pytest.mark.parametrize("hidden,topk", [(2048, 1), (7168, 8)])
def test_normal_cuda_equals_reference(normal_pair, hidden, topk, pattern, fp8, async_):
    cuda, ref = normal_pair
    experts = 16 * COMM.size
    dev = cuda.device
    x = make_x(COMM.rank, MAX_TOKENS, hidden, dev)
    idx, w = routing(MAX_TOKENS, experts, topk, pattern, dev, seed=hidden + topk)
    inp = per_token_cast_to_fp8(x) if fp8 else x
    got = run_normal(cuda, inp, idx, w, experts, async_)
    want = run_normal(ref, inp, idx, w, experts, False)
    problems = []
    names = ["recv_x", "recv_topk_idx", "recv_topk_weights"]
    for name, a, b in zip(names, got[:3], want[:3], strict=True):
        a_parts = a if isinstance(a, tuple) else (a,)
        b_parts = b if isinstance(b, tuple) else (b,)
        for pa, pb in zip(a_parts, b_parts, strict=True):
            if pa.shape != pb.shape or not torch.equal(pa.view(torch.uint8), pb.view(torch.uint8)):
                problems.append(f"{name} differs ({tuple(pa.shape)} vs {tuple(pb.shape)})")
    if got[3] != want[3]:
        problems.append(f"per-expert counts {got[3]} != {want[3]}")
    if not torch.allclose(got[4].float(), want[4].float(), rtol=1e-2, atol=1e-2):
        problems.append("combined x differs")
    if not torch.allclose(got[5], want[5], rtol=1e-5, atol=1e-6):
        problems.append("combined weights differ")
    agree(problems)


@pytest.mark.parametrize(
    "use_fp8,round_scale,use_ue8m0",
    [(False, False, False), (True, False, False), (True, True, True)],
)
@pytest.mark.parametrize("pattern", ["random", "holes"])
def test_low_latency_cuda_equals_reference(pattern, use_fp8, round_scale, use_ue8m0):
    heap = get_low_latency_rdma_size_hint(MAX_TOKENS, 7168, COMM.size, 288)
    cuda = Buffer(COMM, num_rdma_bytes=heap, low_latency_mode=True, backend="cuda", validate=False)
    ref = Buffer(
        COMM,
        num_rdma_bytes=heap,
        low_latency_mode=True,
        backend="reference",
        device=cuda.device,
        validate=False,
    )
    dev, R, T, H, E, K = cuda.device, COMM.size, 64, 2048, 16 * COMM.size, 8
    x = make_x(COMM.rank, T, H, dev)
    idx, w = routing(T, E, K, pattern, dev, seed=7)
    results = []
    for buf in (cuda, ref):
        recv, count, handle, _, _ = buf.low_latency_dispatch(
            x, idx, MAX_TOKENS, E, use_fp8=use_fp8, round_scale=round_scale, use_ue8m0=use_ue8m0
        )
        data, scales = recv if use_fp8 else (recv, None)
        # FP8 rows are compared bit for bit below; combine then checks routing and weights.
        factor = (1 + torch.arange(E // R, device=dev)).view(-1, 1, 1) / 8
        y = factor.expand(data.shape).contiguous() if use_fp8 else data.float() * factor
        combined, _, _ = buf.low_latency_combine(y.to(torch.bfloat16), idx, w, handle)
        torch.cuda.synchronize()
        results.append((data, scales, count, handle, combined))
    problems = []
    (d1, s1, c1, h1, o1), (d2, s2, c2, h2, o2) = results
    if not torch.equal(c1, c2):
        problems.append(f"recv_count {c1.tolist()} != {c2.tolist()}")
    else:
        for e in range(E // R):
            n = int(c1[e])
            if not torch.equal(h1.layout_range[e], h2.layout_range[e]):
                problems.append(f"expert {e}: layout_range differs")
                continue
            src = torch.repeat_interleave(
                torch.arange(R, device=dev), h1.layout_range[e, :, 1].long()
            )
            k1 = src * (T + 1) + h1.src_token_idx[e, :n].long()
            k2 = src * (T + 1) + h2.src_token_idx[e, :n].long()
            o_1, o_2 = torch.argsort(k1), torch.argsort(k2)
            if not torch.equal(k1[o_1], k2[o_2]):
                problems.append(f"expert {e}: different (source, token) rows")
                continue
            if not torch.equal(d1[e, :n][o_1].view(torch.uint8), d2[e, :n][o_2].view(torch.uint8)):
                problems.append(f"expert {e}: row data differs")
            if s1 is not None and not torch.equal(s1[e, :n][o_1], s2[e, :n][o_2]):
                problems.append(f"expert {e}: scales differ")
    if not torch.allclose(o1.float(), o2.float(), rtol=1e-2, atol=1e-2):
        problems.append(f"combine differs by {(o1.float() - o2.float()).abs().max().item():.3g}")
    cuda.destroy()
    ref.destroy()
    agree(problems)


def test_normal_mode_cuda_graph_with_worst_tokens(normal_pair):
    """dispatch(num_worst_tokens) + combine captured once, replayed with new data."""
    cuda, _ = normal_pair
    dev, R, T, H, E, K = cuda.device, COMM.size, MAX_TOKENS, 2048, 16 * COMM.size, 4
    idx, w = routing(T, E, K, "holes", dev, seed=3)
    per_rank, per_rdma, per_expert, in_rank, _ = cuda.get_dispatch_layout(idx, E)
    static_x = make_x(COMM.rank, T, H, dev)
    worst = T * R

    def step():
        recv_x, _, _, _, handle, _ = cuda.dispatch(
            static_x,
            num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=idx,
            topk_weights=w,
            num_worst_tokens=worst,
        )
        combined, _, _ = cuda.combine(recv_x, handle)
        return combined

    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    problems = []
    graph = torch.cuda.CUDAGraph()
    try:
        COMM.Barrier()
        with torch.cuda.graph(graph):
            out = step()
    except Exception as exc:  # reported on every rank by agree()
        problems.append(f"capture failed: {type(exc).__name__}: {exc}")
    if not problems:
        # Ranks each token goes to, from the routing alone (not from the layout under test).
        owner = torch.where(idx >= 0, idx // (E // R), -1)
        count = torch.stack([(owner == r).any(1) for r in range(R)], 1).sum(1, keepdim=True)
        count = count.float()
        for i in range(3):
            static_x.copy_(make_x(COMM.rank + 7 * (i + 1), T, H, dev))
            torch.cuda.synchronize()
            COMM.Barrier()
            graph.replay()
            torch.cuda.synchronize()
            want = (static_x.float() * count).to(torch.bfloat16)
            if not torch.equal(out.view(torch.int16), want.view(torch.int16)):
                problems.append(f"replay {i}: combine result wrong")
    agree(problems)
