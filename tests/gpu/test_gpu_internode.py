"""GPU normal mode across nodes (NVLink + NVSHMEM RDMA with forwarding) against the contract.

Run under mpirun (scripts/gpu_check.sh). Nodes are virtual where needed: the engine is built
on a Communicator with ``ranks_per_node``, so 2 ranks run as 2 nodes x 1 and 4 ranks as
4 x 1 and 2 x 2, on one GPU through CUDA MPS or on several GPUs; the same code serves 2-4
real nodes x 2-8 GPUs. Expectations are recomputed from every rank's gathered inputs
(tests/gpu/normal_checks.py), never from the code under test: dispatch bit-exact; combine
per element within the rounding the path allows (per-node partial sums travel as BF16).
Each engine call happens in the same order on every rank before any check, and pass/fail is
agreed across ranks before asserting.
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
MPI = pytest.importorskip("mpi4py.MPI")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import normal_checks as nc  # noqa: E402
from engine_calls import normal_combine, normal_dispatch  # noqa: E402
from gpu_common import core_has, gpu_marks  # noqa: E402

HAVE_CORE = core_has("InternodeRuntime")

pytestmark = gpu_marks(2, HAVE_CORE, "the internode kernels", timeout=600)

NUM_EXPERTS = 64
NVL_BYTES = 256 << 20
RDMA_BYTES = 256 << 20
ENGINE_TIMEOUT_S = 15.0
# Per-node partial sums travel as BF16 (one rounding each), then an fp32 sum, then BF16.
COMBINE_REL_TOL = 2.0**-7
SIZE = MPI.COMM_WORLD.size
# (ranks per node) configurations this world size allows, at least two nodes each.
LAYOUTS = [rpn for rpn in (1, 2, 4, 8) if SIZE % rpn == 0 and SIZE // rpn >= 2]


def world():
    return MPI.COMM_WORLD


class Engines:
    """One engine per (ranks per node, force_puts); rebuilt after a failed test so that a
    kernel timeout (which leaves an engine unusable) does not fail every later test."""

    def __init__(self) -> None:
        self.engines: dict = {}
        self.device = None

    def get(self, rpn: int, force_puts: bool = False):
        """The engine of this configuration; the others are destroyed first (collectively:
        every rank asks for the same sequence), so that one set of buffers exists at a time."""
        key = (rpn, force_puts)
        for other in [k for k in self.engines if k != key]:
            self.engines.pop(other).destroy()
        if key not in self.engines:
            self.engines[key] = self._new(rpn, force_puts)
        return self.engines[key]

    def _new(self, rpn: int, force_puts: bool):
        from mpiep.backends.cuda_internode import InternodeEngine
        from mpiep.comm import Communicator

        comm = Communicator(MPI.COMM_WORLD, ranks_per_node=rpn, timeout_s=ENGINE_TIMEOUT_S)
        self.device = torch.device("cuda", comm.select_device(torch.cuda.device_count()))
        torch.cuda.set_device(self.device)
        return InternodeEngine(
            comm, self.device, NVL_BYTES, RDMA_BYTES, ENGINE_TIMEOUT_S, force_puts=force_puts
        )

    def run(self, key, fn) -> None:
        try:
            fn()
            ok, msg = True, ""
        except Exception as exc:  # reported collectively below
            import traceback

            ok, msg = False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"
        results = world().allgather((ok, msg))
        if not all(o for o, _ in results) and key in self.engines:
            try:
                self.engines.pop(key).destroy()
            except Exception:
                pass
        bad = [f"rank {r}: {m}" for r, (o, m) in enumerate(results) if not o]
        assert not bad, "; ".join(bad)

    def close(self) -> None:
        for key in sorted(self.engines):
            self.engines.pop(key).destroy()


@pytest.fixture(scope="module")
def engines():
    holder = Engines()
    yield holder
    holder.close()


# --------------------------------------------------------------------------- inputs
PATTERNS = ("random", "holes", "skewed", "zero_tokens", "all_masked", "one_node", "node_empty")


def make_routing(rng, T: int, K: int, rpn: int, pattern: str):
    """Distinct experts per token from a pattern's pool: ``skewed`` rank 0's experts,
    ``one_node`` node 0's, ``node_empty`` all but the last node's; ``holes`` ~20% -1 slots;
    ``zero_tokens`` the last rank has no tokens; ``all_masked`` every slot -1."""
    R, me = world().size, world().rank
    E_loc = NUM_EXPERTS // R
    pool = {
        "skewed": E_loc,
        "one_node": E_loc * rpn,
        "node_empty": NUM_EXPERTS - E_loc * rpn,
    }.get(pattern, NUM_EXPERTS)
    if pattern == "zero_tokens" and me == R - 1:
        T = 0
    K = max(1, min(K, pool))
    idx = np.argsort(rng.random((T, pool)), axis=1)[:, :K].astype(np.int64)
    w = rng.uniform(0.1, 1.0, (T, K)).astype(np.float32)
    if pattern == "holes":
        idx[rng.random(idx.shape) < 0.2] = -1
    elif pattern == "all_masked":
        idx[:] = -1
    w[idx < 0] = 0.0
    return np.ascontiguousarray(idx), np.ascontiguousarray(w)


def make_case(seed: int, T: int, H: int, K: int, rpn: int, pattern: str, fp8: bool, device):
    me = world().rank
    rng = np.random.default_rng(seed * 7919 + me)
    T = T + 37 * me  # uneven token counts per rank
    idx, w = make_routing(rng, T, K, rpn, pattern)
    T = idx.shape[0]
    if fp8:
        b = rng.integers(0, 256, (T, H), dtype=np.uint8)
        b[(b & 0x7F) == 0x7F] = 0x3C  # no NaN encodings
        x = torch.from_numpy(b).view(torch.float8_e4m3fn).to(device)
        scales = torch.from_numpy(rng.uniform(0.01, 2.0, (T, H // 128)).astype(np.float32))
        scales = scales.to(device)
    else:
        xf = rng.standard_normal((T, H)).astype(np.float32) * rng.uniform(0.1, 8, (T, 1)).astype(
            np.float32
        )
        x = torch.from_numpy(xf).to(torch.bfloat16).to(device)
        scales = None
    return x, scales, torch.from_numpy(idx).to(device), torch.from_numpy(w).to(device)


def check_layout(lay, topk_idx: torch.Tensor, rpn: int) -> None:
    idx = topk_idx.cpu().numpy()
    R = world().size
    in_rank = nc.in_rank_from_inputs(idx, NUM_EXPERTS, R)
    assert np.array_equal(lay.is_token_in_rank.cpu().numpy(), in_rank), "is_token_in_rank"
    assert np.array_equal(lay.num_tokens_per_rank.cpu().numpy(), in_rank.sum(0)), "per rank"
    per_node = in_rank.reshape(len(idx), R // rpn, rpn).any(axis=2).sum(0)
    assert np.array_equal(lay.num_tokens_per_rdma_rank.cpu().numpy(), per_node), "per node"
    per_expert = np.bincount(idx[idx >= 0], minlength=NUM_EXPERTS)
    assert np.array_equal(lay.num_tokens_per_expert.cpu().numpy(), per_expert), "per expert"


# --------------------------------------------------------------------------- the cases
def run_case(engine, device, seed, rpn, pattern, hidden, K, fp8, alignment, with_bias, worst,
             num_sms=24, chunk=16):  # fmt: skip
    """Every engine call first, in the same order on every rank; checks afterwards."""
    from mpiep.config import Config

    cfg = Config(num_sms, num_max_rdma_chunked_send_tokens=chunk)
    me, R = world().rank, world().size
    x, scales, topk_idx, topk_w = make_case(seed, 300, hidden, K, rpn, pattern, fp8, device)
    T = x.shape[0]
    ti, tw = (topk_idx, topk_w) if K else (None, None)
    lay = engine.get_dispatch_layout(topk_idx, NUM_EXPERTS)
    res = normal_dispatch(engine, x, scales, ti, tw, lay, None, NUM_EXPERTS, alignment, worst, cfg)
    y = nc.expert_output(res.recv_x, res.recv_x_scales, me)
    bias = ()
    if with_bias:
        g = torch.Generator(device="cpu").manual_seed(seed + me)
        bias = tuple(
            torch.randn(T, hidden, generator=g).to(torch.bfloat16).to(device) for _ in "ab"
        )
    out, out_w = normal_combine(engine, y, res.handle, res.recv_topk_weights, bias, cfg)
    # Cached dispatch of fresh data along the same routes (no notify).
    x2, s2, _, _ = make_case(seed + 1, 300, hidden, K, rpn, pattern, fp8, device)
    cached = normal_dispatch(
        engine, x2, s2, None, None, None, res.handle, NUM_EXPERTS, alignment, worst, cfg
    )
    # Backward identity: combine of ones counts the ranks each token went to.
    ones = torch.ones(res.recv_x.shape[0], hidden, dtype=torch.bfloat16, device=device)
    cnt, _ = normal_combine(engine, ones, res.handle, None, (), cfg)
    torch.cuda.synchronize()
    engine.check_errors()

    check_layout(lay, topk_idx, rpn)
    ins = world().allgather(
        (nc.np_bits(x), nc.np_bits(scales), nc.np_bits(topk_idx), nc.np_bits(topk_w))
    )
    exp = nc.expected_dispatch(ins, me, R, NUM_EXPERTS, K, alignment)
    nc.check_dispatch(res, exp, K, worst)
    in_rank = torch.from_numpy(nc.in_rank_from_inputs(ins[me][2], NUM_EXPERTS, R)).to(device)
    want, mag = nc.expected_combine(x, scales, in_rank, bias)
    nc.close_to_sum(out, want, mag, COMBINE_REL_TOL, "combined x")
    if K:
        want_w = torch.where(topk_idx >= 0, topk_w, torch.zeros_like(topk_w))
        assert torch.allclose(out_w, want_w, rtol=1e-6, atol=0), "combined top-k weights"
    else:
        assert out_w is None
    ins2 = world().allgather(
        (nc.np_bits(x2), nc.np_bits(s2), nc.np_bits(topk_idx), nc.np_bits(topk_w))
    )
    exp2 = nc.expected_dispatch(ins2, me, R, NUM_EXPERTS, 0, alignment)
    n = len(exp2["src"])
    assert np.array_equal(nc.np_bits(cached.recv_x)[:n], exp2["x"]), "cached recv_x differs"
    if s2 is not None:
        got = nc.np_bits(cached.recv_x_scales)[:n]
        assert np.array_equal(got, exp2["scales"]), "cached scales"
    want_cnt = in_rank.sum(1, dtype=torch.float32).unsqueeze(1).expand_as(cnt)
    assert torch.equal(cnt.float(), want_cnt), "combine(ones) != ranks per token"


CASES = [
    # pattern, hidden, top-k (0: dispatch without top-k), fp8, expert_alignment, with bias
    ("random", 7168, 8, False, 1, False),
    ("holes", 4096, 4, False, 4, True),
    ("skewed", 2048, 1, False, 1, False),
    ("zero_tokens", 4096, 8, False, 8, False),
    ("all_masked", 2048, 4, False, 1, False),
    ("one_node", 2048, 8, False, 1, True),
    ("node_empty", 4096, 4, False, 1, False),
    ("random", 2048, 0, False, 1, False),
    ("random", 7168, 8, True, 1, False),
    ("holes", 2048, 4, True, 2, True),
    ("one_node", 4096, 1, True, 1, False),
    ("node_empty", 7168, 4, True, 1, False),
]


@pytest.mark.parametrize("rpn", LAYOUTS)
@pytest.mark.parametrize("pattern,hidden,K,fp8,alignment,with_bias", CASES)
def test_dispatch_combine(engines, rpn, pattern, hidden, K, fp8, alignment, with_bias):
    engine = engines.get(rpn)
    seed = zlib.crc32(f"{pattern}-{hidden}-{K}-{fp8}-{rpn}".encode()) % 100000
    engines.run(
        (rpn, False),
        lambda: run_case(
            engine, engines.device, seed, rpn, pattern, hidden, K, fp8, alignment, with_bias, 0
        ),
    )


@pytest.mark.parametrize("rpn", LAYOUTS)
@pytest.mark.parametrize("fp8", [False, True])
def test_worst_tokens(engines, rpn, fp8):
    engine = engines.get(rpn)
    worst = sum(300 + 37 * r for r in range(SIZE))  # every token of every rank
    engines.run(
        (rpn, False),
        lambda: run_case(
            engine, engines.device, 77 + fp8, rpn, "holes", 4096, 8, fp8, 1, False, worst
        ),
    )


@pytest.mark.parametrize("rpn", LAYOUTS)
@pytest.mark.parametrize("pattern,fp8", [("random", False), ("one_node", True)])
def test_put_path(engines, rpn, pattern, fp8):
    """Every RDMA message through NVSHMEM puts (staged), as between real nodes."""
    engine = engines.get(rpn, force_puts=True)
    engines.run(
        (rpn, True),
        lambda: run_case(engine, engines.device, 4242, rpn, pattern, 4096, 8, fp8, 1, True, 0),
    )


@pytest.mark.parametrize("num_sms,chunk", [(2, 1), (8, 5), (20, 64)])
def test_grid_chunks_and_repeats(engines, num_sms, chunk):
    """Several grid sizes and chunk sizes, four rounds back to back without synchronising."""
    rpn = LAYOUTS[-1]
    engine = engines.get(rpn)
    from mpiep.config import Config

    def body():
        cfg = Config(num_sms, num_max_rdma_chunked_send_tokens=chunk)
        results = []
        for i in range(4):
            x, _, topk_idx, topk_w = make_case(
                500 + i + num_sms, 400, 2048, 4, rpn, "random", False, engines.device
            )
            lay = engine.get_dispatch_layout(topk_idx, NUM_EXPERTS)
            res = normal_dispatch(
                engine, x, None, topk_idx, topk_w, lay, None, NUM_EXPERTS, 1, 0, cfg
            )
            out, _ = normal_combine(engine, res.recv_x, res.handle, None, (), cfg)
            results.append((x, topk_idx, out))
        torch.cuda.synchronize()
        engine.check_errors()
        for x, topk_idx, out in results:
            # combine(dispatch(x)) == x * (number of ranks the token went to)
            in_rank = nc.in_rank_from_inputs(topk_idx.cpu().numpy(), NUM_EXPERTS, SIZE)
            times = torch.from_numpy(in_rank.sum(1).astype(np.float32)).to(x.device)
            want = x.float() * times.unsqueeze(1)
            nc.close_to_sum(out, want, want.abs(), COMBINE_REL_TOL, "combine(dispatch(x))")

    engines.run((rpn, False), body)


def test_buffer_api_and_cuda_graph(engines):
    """The public Buffer on virtual nodes runs the internode kernels (no reference
    fallback), and a num_worst_tokens dispatch + combine replays from a CUDA graph."""
    from mpiep import Buffer
    from mpiep.config import Config

    rpn = LAYOUTS[-1]
    engines.close()  # the Buffer allocates its own buffers

    def body():
        buf = Buffer(
            MPI.COMM_WORLD,
            num_nvl_bytes=NVL_BYTES,
            num_rdma_bytes=RDMA_BYTES,
            backend="cuda",
            ranks_per_node=rpn,
            timeout_s=ENGINE_TIMEOUT_S,
            validate=False,
        )
        try:
            assert buf.num_nodes == SIZE // rpn
            assert type(buf.backend.normal).__name__ == "InternodeEngine"
            cfg = Config(16)
            x, _, topk_idx, topk_w = make_case(9, 200, 2048, 8, rpn, "random", False, buf.device)
            worst = sum(200 + 37 * r for r in range(SIZE))
            per_rank, per_node, per_expert, in_rank, _ = buf.get_dispatch_layout(
                topk_idx, NUM_EXPERTS
            )
            assert per_node is not None and per_node.shape[0] == SIZE // rpn

            def step():
                recv, _, _, _, handle, _ = buf.dispatch(
                    x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_node,
                    is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                    topk_idx=topk_idx, topk_weights=topk_w, num_worst_tokens=worst, config=cfg,
                )  # fmt: skip
                out, _, _ = buf.combine(recv, handle, config=cfg)
                return out

            eager = step().clone()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                step()  # warm-up on the capture stream
                torch.cuda.synchronize()
                with torch.cuda.graph(graph, stream=stream):
                    captured = step()
            torch.cuda.current_stream().wait_stream(stream)
            for _ in range(3):
                graph.replay()
            torch.cuda.synchronize()
            buf.backend.normal.check_errors()
            times = in_rank.sum(1, dtype=torch.float32).unsqueeze(1)
            want = x.float() * times
            nc.close_to_sum(eager, want, want.abs(), COMBINE_REL_TOL, "eager combine")
            assert torch.equal(captured, eager), "graph replay differs from the eager call"
        finally:
            buf.destroy()

    engines.run(("buffer", False), body)


def test_bench_shape(engines):
    """Timings at the speed bar's shape (T=4096, H=7168, top-8 of 256), JSON into $OUT; the
    bench command reports the same with the intranode kernels beside them."""
    rpn = LAYOUTS[-1]
    engine = engines.get(rpn)
    from mpiep.config import Config, get_internode_rdma_size_hint

    def body():
        T, H, K, E = 4096, 7168, 8, 256
        need = get_internode_rdma_size_hint(T, H, SIZE, rpn, K)
        res = {"ranks": SIZE, "ranks_per_node": rpn, "device": torch.cuda.get_device_name()}
        if need > RDMA_BYTES or SIZE * T * 14400 > NVL_BYTES:
            res["skipped"] = f"buffers too small for the bench shape (rdma needs {need})"
        else:
            dev = engines.device
            g = torch.Generator(device="cpu").manual_seed(1234 + world().rank)
            topk_idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(dev)
            topk_w = torch.rand(T, K, generator=g).to(dev)
            x = torch.randn(T, H, generator=g).to(torch.bfloat16).to(dev)
            cfg = Config(24)
            lay = engine.get_dispatch_layout(topk_idx, E)
            first = normal_dispatch(engine, x, None, topk_idx, topk_w, lay, None, E, 1, 0, cfg)

            def timed(fn, iters=10):
                fn()
                torch.cuda.synchronize()
                world().Barrier()
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for _ in range(iters):
                    fn()
                b.record()
                b.synchronize()
                engine.check_errors()
                return a.elapsed_time(b) * 1000 / iters

            res["dispatch_bf16_us"] = timed(
                lambda: normal_dispatch(engine, x, None, topk_idx, topk_w, lay, None, E, 1, 0, cfg)
            )
            res["combine_us"] = timed(
                lambda: normal_combine(engine, first.recv_x, first.handle, None, (), cfg)
            )
        allres = world().allgather(res)
        if world().rank == 0:
            print("internode bench:", json.dumps(allres))
            out_dir = os.environ.get("OUT")
            if out_dir:
                Path(out_dir, f"internode_bench_np{SIZE}.json").write_text(
                    json.dumps(allres, indent=1)
                )

    engines.run((rpn, False), body)
