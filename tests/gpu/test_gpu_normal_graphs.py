"""Normal mode replayed from CUDA graphs: a cached dispatch (BF16 and FP8, with a handle) and
combine, captured once through the public Buffer (the native comm-stream hop included) and
replayed with new data, against the plain-numpy oracle (tests/oracle.py) and against the
same calls made eagerly. Also the memory layout of a dispatch's outputs (one allocation for
the outputs, the handle's tensors apart, the per-source counts a view of the count matrix).

Runs on one rank (each process alone, COMM_WORLD split) and on all ranks of the job."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
MPI = pytest.importorskip("mpi4py.MPI")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import normal_checks as nc  # noqa: E402
from gpu_common import agree, core_has, dispatch_layout, gpu_marks  # noqa: E402

import oracle  # noqa: E402
from mpiep import Buffer, get_normal_buffer_size_hint  # noqa: E402
from mpiep.fp8 import per_token_cast_to_fp8  # noqa: E402

HAVE_CORE = core_has("IntranodeRuntime")

pytestmark = gpu_marks(1, HAVE_CORE, "the GPU kernels", timeout=300)

WORLD = MPI.COMM_WORLD
T, H, K, REPLAYS = 96, 2048, 4, 3


def device() -> torch.device:
    node = WORLD.Split_type(MPI.COMM_TYPE_SHARED)
    local = node.Get_rank()
    node.Free()
    return torch.device("cuda", local % torch.cuda.device_count())


def bits(t: torch.Tensor) -> np.ndarray:
    return nc.np_bits(t)


def normal_buffer(comm, dev: torch.device) -> Buffer:  # type: ignore[no-untyped-def]
    """A normal-mode Buffer for T tokens of H on ``comm``'s ranks, CUDA backend."""
    return Buffer(
        comm,
        num_nvl_bytes=get_normal_buffer_size_hint(T, H, comm.size, K),
        backend="cuda",
        validate=False,
        device=dev,
    )


def new_x(seed: int, dev: torch.device) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(T, H, generator=g).mul_(2.0).to(torch.bfloat16).to(dev)


def expected(comm, recv_all, xs_all, q_all, s_all, idx, w, R):
    """Oracle of one step on this rank: the dispatched rows (BF16, FP8, scales), and the
    combine of y = recv_x * (receiver + 1) with the received weights."""
    me = comm.rank
    mine = recv_all[me]
    want_x = mine.rows(xs_all)
    want_q, want_s = mine.rows(q_all), mine.rows(s_all)
    # Each receiver r's y rows, rounded to BF16 as the GPU does (x * small integer is exact
    # in fp32, then one rounding).
    y_all = []
    for r, recv in enumerate(recv_all):
        y = oracle.bf16_to_f32(recv.rows(xs_all)) * np.float32(r + 1)
        y_all.append(oracle.bf16_to_f32(oracle.f32_to_bf16(y)))
    want_out = oracle.normal_combine(me, T, recv_all, y_all)
    mag = oracle.normal_combine(me, T, recv_all, [np.abs(y) for y in y_all])
    # Every valid slot's expert lives on exactly one rank: the summed weights are w there.
    want_w = np.where(idx >= 0, w, 0).astype(np.float32)
    return want_x, want_q, want_s, want_out, mag, want_w


@pytest.mark.parametrize("pattern", ["random", "holes"])
@pytest.mark.parametrize("group", ["one rank", "all ranks"])
def test_cached_dispatch_and_combine_replay(group: str, pattern: str) -> None:
    dev = device()
    torch.cuda.set_device(dev)
    comm = WORLD.Split(WORLD.rank, 0) if group == "one rank" else WORLD
    R, me = comm.size, comm.rank
    E = 16 * R
    seed = 1000 * (pattern == "holes") + 17 * WORLD.rank + 3 * (group == "one rank")
    rng = np.random.default_rng(seed)
    idx_np, w_np = oracle.make_routing(rng, T, K, E, R, me, pattern)
    idx_all, w_all = comm.allgather(idx_np), comm.allgather(w_np)
    recv_all = [oracle.normal_dispatch(idx_all, w_all, E, r) for r in range(R)]
    idx, w = torch.from_numpy(idx_np).to(dev), torch.from_numpy(w_np).to(dev)

    buf = normal_buffer(comm, dev)
    problems: list[str] = []
    try:
        assert buf._streams.ops_hop and buf.backend.normal._hop, "the op's comm-stream hop is on"
        x = new_x(seed, dev)
        xq, xs = per_token_cast_to_fp8(x)
        recv_x, _, recv_w, _, handle, _ = buf.dispatch(x, **dispatch_layout(buf, idx, E, w))
        torch.cuda.synchronize()
        # The op's outputs and the handle (checked against the oracle, not against Python).
        n = recv_all[me].num_rows
        if not np.array_equal(bits(recv_x), recv_all[me].rows(comm.allgather(bits(x)))):
            problems.append("eager dispatch: recv_x differs from the oracle")
        if not np.array_equal(bits(handle.num_recv_per_src), recv_all[me].num_recv_per_src):
            problems.append("num_recv_per_src differs from the oracle")
        if not np.array_equal(bits(handle.recv_src_idx), recv_all[me].src_token):
            problems.append("recv_src_idx differs from the oracle")
        count_matrix = handle.backend_state["state"][1]
        view = handle.num_recv_per_src
        if view.untyped_storage().data_ptr() != count_matrix.untyped_storage().data_ptr():
            problems.append("num_recv_per_src is not a view of the count matrix")
        for name, t, dtype, shape in (
            ("recv_x", recv_x, torch.bfloat16, (n, H)),
            ("recv_topk_weights", recv_w, torch.float32, (n, K)),
            ("recv_src_idx", handle.recv_src_idx, torch.int32, (n,)),
        ):
            if t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous():
                problems.append(
                    f"{name}: {t.dtype} {tuple(t.shape)} contiguous={t.is_contiguous()}"
                )
            if n and t.data_ptr() % 256:
                problems.append(f"{name} starts at {t.data_ptr():#x}, not 256-byte aligned")
        if n and recv_x.untyped_storage().data_ptr() != recv_w.untyped_storage().data_ptr():
            problems.append("recv_x and recv_topk_weights are not carved from one allocation")
        if (
            n
            and recv_x.untyped_storage().data_ptr()
            == handle.recv_src_idx.untyped_storage().data_ptr()
        ):
            problems.append("the handle's recv_src_idx shares recv_x's storage (pins it)")

        # Static inputs of the captured step.
        static_x, static_q, static_s = x.clone(), xq.clone(), xs.clone()
        factor = float(me + 1)

        def step():
            rb = buf.dispatch(static_x, handle=handle)[0]
            rq, rs = buf.dispatch((static_q, static_s), handle=handle)[0]
            out, out_w, _ = buf.combine(rb * factor, handle, topk_weights=recv_w)
            return rb, rq, rs, out, out_w

        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        why = ""
        try:
            comm.Barrier()
            with torch.cuda.graph(graph):
                captured = step()
        except Exception as exc:  # every rank of the group skips the replays below
            why = f"capture failed: {type(exc).__name__}: {exc}"
        torch.cuda.synchronize()
        whys = [w_ for w_ in comm.allgather(why) if w_]
        if whys:
            problems.append(whys[0])
        else:
            for i in range(REPLAYS):
                xi = new_x(seed + 7919 * (i + 1), dev)
                qi, si = per_token_cast_to_fp8(xi)
                static_x.copy_(xi)
                static_q.copy_(qi)
                static_s.copy_(si)
                torch.cuda.synchronize()
                comm.Barrier()
                graph.replay()
                torch.cuda.synchronize()
                rb, rq, rs, out, out_w = (t.clone() for t in captured)
                xs_all = comm.allgather(bits(xi))
                q_all, s_all = comm.allgather(bits(qi)), comm.allgather(bits(si))
                want_x, want_q, want_s, want_out, mag, want_w = expected(
                    comm, recv_all, xs_all, q_all, s_all, idx_np, w_np, R
                )
                if not np.array_equal(bits(rb), want_x):
                    problems.append(f"replay {i}: BF16 cached dispatch differs from the oracle")
                if not (np.array_equal(bits(rq), want_q) and np.array_equal(bits(rs), want_s)):
                    problems.append(f"replay {i}: FP8 cached dispatch differs from the oracle")
                try:
                    nc.close_to_sum(
                        out, torch.from_numpy(want_out).to(dev), torch.from_numpy(mag).to(dev),
                        2.0**-7, f"replay {i}: combine",
                    )  # fmt: skip
                except AssertionError as exc:
                    problems.append(str(exc))
                if not np.array_equal(bits(out_w), want_w):
                    problems.append(f"replay {i}: combined weights differ from the oracle")
                # The same calls made eagerly on the same inputs: bit for bit the replay's.
                eager = step()
                torch.cuda.synchronize()
                names = ("BF16 dispatch", "FP8 dispatch", "scales", "combine", "weights")
                for name, a, b in zip(names, (rb, rq, rs, out, out_w), eager, strict=True):
                    if not np.array_equal(bits(a), bits(b)):
                        problems.append(f"replay {i}: {name} differs from the eager call")
        del graph
        torch.cuda.synchronize()
        buf.backend.normal.check_errors()
    except Exception as exc:  # reported through agree() so that no rank hangs
        problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        buf.destroy()
        if comm is not WORLD:
            comm.Free()
    agree(problems)


def test_plain_dispatch_capture_says_why() -> None:
    """A dispatch without a handle or num_worst_tokens waits on the host for the counts, so
    it cannot be captured: the op says so (not a timeout or a bare CUDA error), and the
    Buffer and the GPU stay usable (a cached dispatch still returns the oracle's rows)."""
    dev = device()
    torch.cuda.set_device(dev)
    R, me = WORLD.size, WORLD.rank
    E = 16 * R
    rng = np.random.default_rng(4242 + me)
    idx_np, w_np = oracle.make_routing(rng, T, K, E, R, me, "random")
    recv = oracle.normal_dispatch(WORLD.allgather(idx_np), WORLD.allgather(w_np), E, me)
    idx, w = torch.from_numpy(idx_np).to(dev), torch.from_numpy(w_np).to(dev)
    buf = normal_buffer(WORLD, dev)
    problems: list[str] = []
    try:
        x = new_x(99 + me, dev)
        layout = dispatch_layout(buf, idx, E, w)
        handle = buf.dispatch(x, **layout)[4]
        torch.cuda.synchronize()
        graph, raised = torch.cuda.CUDAGraph(), None
        WORLD.Barrier()
        try:
            with torch.cuda.graph(graph):
                buf.dispatch(x, **layout)
        except Exception as exc:
            raised = exc
        del graph
        torch.cuda.synchronize()
        chain, e = [], raised
        while e is not None:  # torch's capture_end may raise over the op's error
            chain.append(str(e))
            e = e.__context__
        if raised is None:
            problems.append("capturing a plain dispatch did not raise")
        elif not any("cannot be captured in a CUDA graph" in m for m in chain):
            problems.append(f"unclear error: {chain}")
        WORLD.Barrier()
        again = buf.dispatch(x, handle=handle)[0]
        torch.cuda.synchronize()
        if not np.array_equal(bits(again), recv.rows(WORLD.allgather(bits(x)))):
            problems.append("after the failed capture: cached dispatch differs from the oracle")
    except Exception as exc:  # reported through agree() so that no rank hangs
        problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        buf.destroy()
    agree(problems)
