"""GPU normal mode inside a node (CUDA IPC kernels) against the semantics contract.

Run under mpirun on 2, 4 or 8 ranks (scripts/gpu_check.sh; ranks may share one GPU through
CUDA MPS). Every case draws fresh seeded random inputs and requires: the layout equal to the
numpy oracle's (tests/oracle.py); BF16/FP8 dispatch bit-exact against the contract
recomputed here from every rank's gathered inputs (by source rank, then source token); combine
within fp32-summation tolerance of the sum recomputed at the source (each rank's "expert"
output is bf16((rank + 1) * x), reproducible there). Every expectation comes from the inputs,
never from what the code under test returned (its layout or handle). The ReferenceBackend is
not called: its
MPI exchange would put the ranks out of step whenever one check fails (and, on 2026-11-24,
it raised on ranks receiving no rows). Pass/fail is agreed across ranks before asserting.
"""

from __future__ import annotations

import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
MPI = pytest.importorskip("mpi4py.MPI")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import normal_checks as nc  # noqa: E402
from engine_calls import normal_combine, normal_dispatch  # noqa: E402
from gpu_common import core_has, gpu_marks, run_checked  # noqa: E402

import oracle  # noqa: E402

HAVE_CORE = core_has("IntranodeRuntime")

pytestmark = gpu_marks(2, HAVE_CORE, "the intranode kernels", timeout=300)

NUM_EXPERTS = 64
# One fp32 sum per token, in another order than the expectation's, then one BF16 rounding.
FP32_ORDER_TOL = 2.0**-16
NVL_BYTES = 256 << 20
ENGINE_TIMEOUT_S = 15.0  # a hung kernel reports within this, naming rank and phase


# --------------------------------------------------------------------------- helpers
def world():
    return MPI.COMM_WORLD


class Engines:
    """The module's engine; rebuilt after a failed test so that one failure (a kernel
    timeout leaves the engine unusable) does not fail every later test too."""

    def __init__(self) -> None:
        from mpiep.comm import Communicator

        self.comm = Communicator(MPI.COMM_WORLD, timeout_s=ENGINE_TIMEOUT_S)
        self.device = torch.device("cuda", self.comm.select_device(torch.cuda.device_count()))
        torch.cuda.set_device(self.device)
        self.engine = self._new()

    def _new(self):
        from mpiep.backends.cuda_intranode import IntranodeEngine

        return IntranodeEngine(self.comm, self.device, NVL_BYTES, ENGINE_TIMEOUT_S)

    def run(self, fn) -> None:
        try:
            fn()
            ok, msg = True, ""
        except Exception as exc:  # reported collectively below
            import traceback

            ok, msg = False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"
        results = world().allgather((ok, msg))
        if not all(o for o, _ in results):
            try:
                self.engine.destroy()
            except Exception:
                pass
            self.engine = self._new()
        bad = [f"rank {r}: {m}" for r, (o, m) in enumerate(results) if not o]
        assert not bad, "; ".join(bad)


@pytest.fixture(scope="module")
def setup():
    holder = Engines()
    yield holder
    holder.engine.destroy()


def make_case(seed: int, T: int, H: int, K: int, pattern: str, fp8: bool, device):
    comm = world()
    rng = np.random.default_rng(seed * 7919 + comm.rank)
    T = T + 13 * comm.rank  # ranks hold different token counts
    idx, w = oracle.make_routing(rng, T, max(K, 1), NUM_EXPERTS, comm.size, comm.rank, pattern)
    T = idx.shape[0]
    if fp8:
        b = rng.integers(0, 256, (T, H), dtype=np.uint8)
        b[(b & 0x7F) == 0x7F] = 0x3C
        x = torch.from_numpy(b).view(torch.float8_e4m3fn).to(device)
        scales = torch.from_numpy(rng.uniform(0.01, 2.0, (T, H // 128)).astype(np.float32)).to(
            device
        )
    else:
        xf = rng.standard_normal((T, H)).astype(np.float32) * rng.uniform(0.1, 8, (T, 1)).astype(
            np.float32
        )
        x = torch.from_numpy(xf).to(torch.bfloat16).to(device)
        scales = None
    topk_idx = torch.from_numpy(idx).to(device)
    topk_w = torch.from_numpy(w).to(device)
    return x, scales, topk_idx, topk_w


def in_rank_of(topk_idx) -> torch.Tensor:
    """is_token_in_rank [T, R] bool from the routing alone (the oracle), on its device."""
    want = oracle.layout(topk_idx.cpu().numpy(), NUM_EXPERTS, world().size).is_token_in_rank
    return torch.from_numpy(want).to(topk_idx.device)


def check_layout(lay, topk_idx) -> None:
    want = oracle.layout(topk_idx.cpu().numpy(), NUM_EXPERTS, world().size)
    for name, dtype in (
        ("num_tokens_per_rank", torch.int32),
        ("num_tokens_per_expert", torch.int32),
        ("is_token_in_rank", torch.bool),
    ):
        a = getattr(lay, name)
        assert a.dtype == dtype, f"layout {name}: dtype {a.dtype}"
        assert np.array_equal(a.cpu().numpy(), getattr(want, name)), f"layout {name} differs"
    assert lay.num_tokens_per_rdma_rank is None


# --------------------------------------------------------------------------- cases
CASES = [
    # pattern, hidden, top-k (0: dispatch without top-k), fp8, expert_alignment, with bias
    ("random", 7168, 8, False, 1, False),
    ("holes", 4096, 4, False, 4, True),
    ("skewed", 2048, 1, False, 1, False),
    ("zero_tokens", 4096, 8, False, 8, False),
    ("all_masked", 2048, 4, False, 1, False),
    ("random", 2048, 0, False, 1, False),
    ("random", 7168, 8, True, 1, False),
    ("holes", 2048, 4, True, 2, True),
    ("skewed", 4096, 1, True, 1, False),
    ("zero_tokens", 7168, 4, True, 1, False),
]


def run_case(
    engine, device, seed, pattern, hidden, K, fp8, alignment, with_bias, worst, num_sms=24
):
    """Every engine call first, in the same order on every rank; checks afterwards, so a
    failed check never leaves the ranks out of step."""
    from mpiep.config import Config

    cfg = Config(num_sms)
    x, scales, topk_idx, topk_w = make_case(seed, 300, hidden, K, pattern, fp8, device)
    T = x.shape[0]
    ti, tw = (topk_idx, topk_w) if K else (None, None)
    lay = engine.get_dispatch_layout(topk_idx, NUM_EXPERTS)
    res = normal_dispatch(engine, x, scales, ti, tw, lay, None, NUM_EXPERTS, alignment, worst, cfg)
    y = nc.expert_output(res.recv_x, res.recv_x_scales, world().rank)
    bias = ()
    if with_bias:
        gen = torch.Generator().manual_seed(seed * 31 + world().rank)
        bias = tuple(
            torch.randn(T, hidden, generator=gen).to(torch.bfloat16).to(device) for _ in range(2)
        )
    out, out_w = normal_combine(engine, y, res.handle, res.recv_topk_weights, bias, cfg)
    # Cached dispatch of fresh data with the handle (no notify).
    x2, s2, _, _ = make_case(seed + 1, 300, hidden, K, pattern, fp8, device)
    cached = normal_dispatch(
        engine, x2, s2, None, None, None, res.handle, NUM_EXPERTS, alignment, worst, cfg
    )
    # Backward identity: combine of ones counts the ranks each token went to.
    ones = torch.ones(res.recv_x.shape[0], hidden, dtype=torch.bfloat16, device=device)
    cnt, _ = normal_combine(engine, ones, res.handle, None, (), cfg)
    torch.cuda.synchronize()
    engine.check_errors()

    check_layout(lay, topk_idx)
    me, R = world().rank, world().size
    ins = world().allgather(
        (nc.np_bits(x), nc.np_bits(scales), nc.np_bits(topk_idx), nc.np_bits(topk_w))
    )
    exp = nc.expected_dispatch(ins, me, R, NUM_EXPERTS, K, alignment)
    nc.check_dispatch(res, exp, K, worst)
    in_rank = in_rank_of(topk_idx)
    want, mag = nc.expected_combine(x, scales, in_rank, bias)
    nc.close_to_sum(out, want, mag, FP32_ORDER_TOL, "combined x")
    if K:
        want_w = torch.where(topk_idx >= 0, topk_w, torch.zeros_like(topk_w))
        assert torch.equal(out_w, want_w), "combined top-k weights != original weights"
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
    want = in_rank.sum(1, dtype=torch.float32).unsqueeze(1).expand_as(cnt)
    assert torch.equal(cnt.float(), want), "combine(ones) != ranks per token"


@pytest.mark.parametrize("pattern,hidden,K,fp8,alignment,with_bias", CASES)
def test_dispatch_combine(setup, pattern, hidden, K, fp8, alignment, with_bias):
    _comm, device, engine = setup.comm, setup.device, setup.engine
    seed = zlib.crc32(f"{pattern}-{hidden}-{K}-{fp8}".encode()) % 100000
    setup.run(
        lambda: run_case(engine, device, seed, pattern, hidden, K, fp8, alignment, with_bias, 0)
    )


@pytest.mark.parametrize("fp8", [False, True])
def test_worst_tokens(setup, fp8):
    _comm, device, engine = setup.comm, setup.device, setup.engine
    worst = sum(300 + 13 * r for r in range(world().size))  # every token of every rank
    setup.run(lambda: run_case(engine, device, 77 + fp8, "holes", 4096, 8, fp8, 1, False, worst))


@pytest.mark.parametrize("num_sms", [2, 8, 20])
def test_num_sms_and_repeats(setup, num_sms):
    """Several channel counts, back to back without synchronising (buffer reuse)."""
    _comm, device, engine = setup.comm, setup.device, setup.engine
    from mpiep.config import Config

    def body():
        cfg = Config(num_sms)
        outs = []
        inputs = []
        for i in range(4):
            x, _, topk_idx, topk_w = make_case(
                500 + i + num_sms, 400, 2048, 4, "random", False, device
            )
            lay = engine.get_dispatch_layout(topk_idx, NUM_EXPERTS)
            res = normal_dispatch(
                engine, x, None, topk_idx, topk_w, lay, None, NUM_EXPERTS, 1, 0, cfg
            )
            y = res.recv_x
            out, _ = normal_combine(engine, y, res.handle, None, (), cfg)
            outs.append(out)
            inputs.append((x, topk_idx))
        torch.cuda.synchronize()
        engine.check_errors()
        for out, (x, topk_idx) in zip(outs, inputs, strict=True):
            # combine(dispatch(x)) == x * (number of ranks the token went to)
            expect = x.float() * in_rank_of(topk_idx).sum(1, dtype=torch.float32).unsqueeze(1)
            nc.close_to_sum(out, expect, expect.abs(), FP32_ORDER_TOL, "combine(dispatch(x))")

    setup.run(body)


def test_create_destroy_no_leak():
    from mpiep.backends.cuda_intranode import IntranodeEngine
    from mpiep.comm import Communicator

    comm = Communicator(MPI.COMM_WORLD, timeout_s=ENGINE_TIMEOUT_S)
    device = torch.device("cuda", comm.select_device(torch.cuda.device_count()))
    torch.cuda.set_device(device)

    def cycle():
        e = IntranodeEngine(comm, device, 64 << 20, ENGINE_TIMEOUT_S)
        e.destroy()

    def body():
        for _ in range(3):
            cycle()
        torch.cuda.synchronize()
        comm.barrier("leak test start")
        free0, _ = torch.cuda.mem_get_info(device)
        t0 = time.monotonic()
        for _ in range(100):
            cycle()
        torch.cuda.synchronize()
        comm.barrier("leak test end")
        free1, _ = torch.cuda.mem_get_info(device)
        drift = free0 - free1
        assert drift < (32 << 20), f"free memory dropped by {drift >> 20} MiB over 100 cycles"
        print(f"100 create/destroy cycles: {time.monotonic() - t0:.1f}s, drift {drift} B")

    try:
        run_checked(body)
    finally:
        comm.free()
