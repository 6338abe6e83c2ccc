"""Without validation, the CUDA backend's ops check their own tensors (src/ops/*_checks,
ops_common.h) and Buffer skips its Python copies: bad input must still raise the documented
Python exception, naming the argument, before anything is launched, so that every rank fails
alike and the Buffer stays usable. Every rank makes the same bad call here."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
MPI = pytest.importorskip("mpi4py.MPI")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import core_has, dispatch_layout, gpu_marks  # noqa: E402

from mpiep import Buffer, get_low_latency_rdma_size_hint, get_normal_buffer_size_hint  # noqa: E402
from mpiep.bench.data import make_routing, make_x  # noqa: E402
from mpiep.errors import CapacityError  # noqa: E402
from mpiep.fp8 import per_token_cast_to_fp8  # noqa: E402

HAVE_CORE = core_has("IntranodeRuntime", "LowLatencyContext")

pytestmark = gpu_marks(2, HAVE_CORE, "the GPU kernels", timeout=300)

COMM = MPI.COMM_WORLD
T, H, K = 32, 2048, 4


@pytest.fixture(scope="module")
def ll_buffer():
    E = 8 * COMM.size
    heap = get_low_latency_rdma_size_hint(T, H, COMM.size, E)
    buf = Buffer(COMM, num_rdma_bytes=heap, low_latency_mode=True, backend="cuda", validate=False)
    assert buf._lean(), "the CUDA backend without validation should skip the Python checks"
    yield buf, E
    buf.destroy()


@pytest.fixture(scope="module")
def normal_buffer():
    nvl = get_normal_buffer_size_hint(T, H, COMM.size, K)
    buf = Buffer(COMM, num_nvl_bytes=nvl, backend="cuda", validate=False)
    yield buf, 8 * COMM.size
    buf.destroy()


def _ll_round(buf: Buffer, E: int) -> None:
    """A correct dispatch + combine after the errors: the Buffer is still usable, and the
    combine of unchanged rows equals x times the sum of the token's weights."""
    dev = buf.device
    x = make_x(COMM.rank, T, H, dev)
    idx, w = make_routing(COMM.rank, T, E, K, dev, 3)
    recv, _, handle, _, _ = buf.low_latency_dispatch(x, idx, T, E, use_fp8=False)
    out, _, _ = buf.low_latency_combine(recv, idx, w, handle)
    want = x.float() * torch.where(idx >= 0, w, 0).sum(1, keepdim=True)
    err = (out.float() - want).abs() - 0.02 * want.abs() - 1e-2
    assert float(err.max()) <= 0, "combine after the refused calls differs from x * sum(w)"


LL_DISPATCH_CASES = {
    "x float32": (TypeError, "x", dict(x=lambda x: x.float())),
    "x a tuple": (TypeError, "x must be a torch.Tensor", dict(x=lambda x: (x, x))),
    "x 1-D": (ValueError, "x", dict(x=lambda x: x[0])),
    "x not contiguous": (ValueError, "contiguous", dict(x=lambda x: x[:, ::2])),
    "x on the CPU": (ValueError, "CUDA", dict(x=lambda x: x.cpu())),
    "hidden not a multiple of 128": (ValueError, "128", dict(x=lambda x: x[:, :200].contiguous())),
    "topk_idx int32": (TypeError, "topk_idx", dict(idx=lambda i: i.int())),
    "topk_idx rows": (ValueError, "topk_idx", dict(idx=lambda i: i[:-1].contiguous())),
    "more tokens than max": (CapacityError, "num_max_dispatch_tokens_per_rank", dict(max=T // 2)),
    "ue8m0 without fp8": (ValueError, "use_ue8m0", dict(ue8m0=True)),
    "stats float": (
        TypeError,
        "cumulative_local_expert_recv_stats",
        dict(stats=lambda dev, el: torch.zeros(el, device=dev)),
    ),
    "stats size": (
        ValueError,
        "cumulative_local_expert_recv_stats",
        dict(stats=lambda dev, el: torch.zeros(el + 1, dtype=torch.int32, device=dev)),
    ),
}


@pytest.mark.parametrize("case", list(LL_DISPATCH_CASES))
def test_low_latency_dispatch_refuses(ll_buffer, case):
    buf, E = ll_buffer
    error, needle, change = LL_DISPATCH_CASES[case]
    dev = buf.device
    x = make_x(COMM.rank, T, H, dev)
    idx, _ = make_routing(COMM.rank, T, E, K, dev, 1)
    if "x" in change:
        x = change["x"](x)
    if "idx" in change:
        idx = change["idx"](idx)
    stats = change["stats"](dev, E // COMM.size) if "stats" in change else None
    with pytest.raises(error, match=needle):
        buf.low_latency_dispatch(
            x,
            idx,
            change.get("max", T),
            E,
            cumulative_local_expert_recv_stats=stats,
            use_fp8=False,
            use_ue8m0=change.get("ue8m0", False),
        )
    _ll_round(buf, E)


LL_COMBINE_CASES = {
    "weights float64": (TypeError, "topk_weights", dict(w=lambda w: w.double())),
    "weights shape": (ValueError, "topk_weights", dict(w=lambda w: w[:, :1].contiguous())),
    "x float32": (TypeError, "x", dict(y=lambda y: y.float())),
    # An FP8 dispatch's (data, scales) passed straight on: not the binding's overload list.
    "x an FP8 tuple": (TypeError, "cannot be combined directly", dict(y=lambda y: (y, y))),
    "weights a list": (TypeError, "topk_weights must be a torch.Tensor", dict(w=lambda w: [w])),
    "x shape": (ValueError, "x", dict(y=lambda y: y[:, :-1].contiguous())),
    "out float32": (TypeError, "out", dict(out=lambda dev: torch.empty(T, H, device=dev))),
    "use_logfmt": (ValueError, "use_logfmt", dict(logfmt=True)),
}


@pytest.mark.parametrize("case", list(LL_COMBINE_CASES))
def test_low_latency_combine_refuses(ll_buffer, case):
    buf, E = ll_buffer
    error, needle, change = LL_COMBINE_CASES[case]
    dev = buf.device
    x = make_x(COMM.rank, T, H, dev)
    idx, w = make_routing(COMM.rank, T, E, K, dev, 2)
    recv, _, handle, _, _ = buf.low_latency_dispatch(x, idx, T, E, use_fp8=False)
    y = change["y"](recv) if "y" in change else recv
    w_bad = change["w"](w) if "w" in change else w
    out = change["out"](dev) if "out" in change else None
    with pytest.raises(error, match=needle):
        buf.low_latency_combine(
            y, idx, w_bad, handle, use_logfmt=change.get("logfmt", False), out=out
        )
    # The refused combine launched nothing: the same handle combines correctly now.
    got, _, _ = buf.low_latency_combine(recv, idx, w, handle)
    want = x.float() * torch.where(idx >= 0, w, 0).sum(1, keepdim=True)
    assert float(((got.float() - want).abs() - 0.02 * want.abs() - 1e-2).max()) <= 0
    _ll_round(buf, E)


def _layout(buf: Buffer, E: int, seed: int):
    dev = buf.device
    idx, w = make_routing(COMM.rank, T, E, K, dev, seed)
    return dispatch_layout(buf, idx, E, w)


NORMAL_DISPATCH_CASES = {
    "x float32": (TypeError, "x", "x", lambda x, lay: (x.float(), lay)),
    "x on the CPU": (ValueError, "CUDA", "x", lambda x, lay: (x.cpu(), lay)),
    "fp8 without scales": (
        ValueError,
        "scales",
        "x",
        lambda x, lay: (per_token_cast_to_fp8(x)[0], lay),
    ),
    "fp8 scales shape": (
        ValueError,
        "x scales",
        "x",
        lambda x, lay: ((per_token_cast_to_fp8(x)[0], per_token_cast_to_fp8(x)[1][:, :1]), lay),
    ),
    "topk_idx int32": (
        TypeError,
        "topk_idx",
        "layout",
        lambda x, lay: (x, {**lay, "topk_idx": lay["topk_idx"].int()}),
    ),
    "topk_weights float64": (
        TypeError,
        "topk_weights",
        "layout",
        lambda x, lay: (x, {**lay, "topk_weights": lay["topk_weights"].double()}),
    ),
    "is_token_in_rank int32": (
        TypeError,
        "is_token_in_rank",
        "layout",
        lambda x, lay: (x, {**lay, "is_token_in_rank": lay["is_token_in_rank"].int()}),
    ),
    "num_tokens_per_rank size": (
        ValueError,
        "num_tokens_per_rank",
        "layout",
        lambda x, lay: (x, {**lay, "num_tokens_per_rank": lay["num_tokens_per_rank"][:1]}),
    ),
    "no is_token_in_rank": (
        ValueError,
        "is_token_in_rank",
        "layout",
        lambda x, lay: (x, {**lay, "is_token_in_rank": None}),
    ),
}


def _normal_round(buf: Buffer, E: int) -> None:
    x = make_x(COMM.rank, T, H, buf.device)
    lay = _layout(buf, E, 5)
    recv_x, _, _, _, handle, _ = buf.dispatch(x, **lay)
    out, _, _ = buf.combine(recv_x, handle)
    want = (x.float() * lay["is_token_in_rank"].sum(1, keepdim=True).float()).to(torch.bfloat16)
    assert torch.equal(out.view(torch.int16), want.view(torch.int16)), "round after errors"


@pytest.mark.parametrize("case", list(NORMAL_DISPATCH_CASES))
def test_normal_dispatch_refuses(normal_buffer, case):
    buf, E = normal_buffer
    error, needle, _, change = NORMAL_DISPATCH_CASES[case]
    x, lay = change(make_x(COMM.rank, T, H, buf.device), _layout(buf, E, 4))
    with pytest.raises(error, match=needle):
        buf.dispatch(x, **lay)
    _normal_round(buf, E)


NORMAL_COMBINE_CASES = {
    "x float32": (TypeError, "x", lambda y, w, b: (y.float(), w, b)),
    "x rows": (ValueError, "x", lambda y, w, b: (y[:-1], w, b)),
    "weights float64": (TypeError, "topk_weights", lambda y, w, b: (y, w.double(), b)),
    "bias float32": (TypeError, "bias", lambda y, w, b: (y, w, b.float())),
    "bias shape": (ValueError, "bias", lambda y, w, b: (y, w, b[:, :8].contiguous())),
}


@pytest.mark.parametrize("case", list(NORMAL_COMBINE_CASES))
def test_normal_combine_refuses(normal_buffer, case):
    buf, E = normal_buffer
    error, needle, change = NORMAL_COMBINE_CASES[case]
    x = make_x(COMM.rank, T, H, buf.device)
    recv_x, _, recv_w, _, handle, _ = buf.dispatch(x, **_layout(buf, E, 6))
    y, w, bias = change(recv_x, recv_w, torch.zeros_like(x))
    with pytest.raises(error, match=needle):
        buf.combine(y, handle, topk_weights=w, bias=bias)
    _normal_round(buf, E)
