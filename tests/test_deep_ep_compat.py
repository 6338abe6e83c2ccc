"""``mpiep.deep_ep``, DeepEP's API on mpiep, driven as DeepEP's callers drive it.

MPI tests (``mpirun -n 4 python -m pytest --with-mpi``): a torch process group from
``init_process_group`` (gloo), world and subgroups, the normal and low-latency call sequences
of an MoE layer, forward and backward, against the numpy oracle (tests/deep_ep_scenarios.py);
launches whose torch ranks are not MPI's must fail on every rank, never hang.
Single-process tests: the pure-Python pieces and a one-rank end to end.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from mpi4py import MPI

import deep_ep_scenarios as sc
import mpiep
import mpiep.deep_ep as deep_ep
from conftest import BUFFER_TIMEOUT_S, collective_check
from mpiep import config as mcfg
from mpiep.deep_ep import group as pg
from mpiep.deep_ep import handles as hd
from mpiep.deep_ep import utils as ut
from mpiep.event import EventOverlap as MpiepEventOverlap
from mpiep.handles import DispatchHandle, LowLatencyHandle

pytestmark = pytest.mark.timeout(240)

CPU = torch.device("cpu")
# mpiep's own keywords, the only non-DeepEP arguments here: keep these tests on the reference
# backend and CPU tensors on a GPU machine too (tests/gpu/ covers the default path there).
CPU_ONLY: dict[str, Any] = {"backend": "reference", "device": "cpu", "timeout_s": BUFFER_TIMEOUT_S}
HIDDEN = 256
LL_HIDDEN = 512  # UE8M0 packs four 128-channel scales per int32


def deep_ep_nvl_bytes(hidden_bytes: int, num_ranks: int) -> int:
    """num_nvl_bytes as Megatron-LM's and SGLang's DeepEP code computes it."""
    size = 0
    for config in (
        deep_ep.Buffer.get_dispatch_config(num_ranks),
        deep_ep.Buffer.get_combine_config(num_ranks),
    ):
        size = max(config.get_nvl_buffer_size_hint(hidden_bytes, num_ranks), size)
    return size


@pytest.fixture
def restore_num_sms() -> Iterator[None]:
    saved = (deep_ep.Buffer.num_sms, deep_ep.Buffer._num_sms_set)
    yield
    deep_ep.Buffer.num_sms, deep_ep.Buffer._num_sms_set = saved


# ============================================================================ MPI: normal mode
NORMAL_CASES = [  # group kind, routing pattern, async_finish
    ("world", "random", False),
    ("world", "holes", True),
    ("world", "zero_tokens", False),
    ("pair", "random", True),
    ("tail", "holes", False),
    ("tail", "zero_tokens", True),
]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize(
    "kind,pattern,async_finish",
    NORMAL_CASES,
    ids=[f"{k}-{p}-{'async' if a else 'sync'}" for k, p, a in NORMAL_CASES],
)
def test_moe_layer_forward_backward(
    comm: MPI.Comm, seed: int, kind: str, pattern: str, async_finish: bool
) -> None:
    """Megatron-style autograd dispatch/combine over a torch process group: outputs, x.grad
    and topk_weights.grad against the oracle (backward = combine, cached dispatch)."""
    if kind != "world" and comm.size < 3:
        pytest.skip("subgroups need 3+ ranks")
    with sc.torch_world():
        group, tcomm = sc.make_group(kind)
        with collective_check(comm):
            if tcomm is None:
                # Not a member: the group is torch's non-member sentinel; refused locally.
                with pytest.raises(TypeError, match="ProcessGroup"):
                    deep_ep.Buffer(group, 1 << 20)
                return
            case = sc.make_normal_case(tcomm, seed, HIDDEN, 4, 4, pattern)
            buffer = deep_ep.Buffer(group, deep_ep_nvl_bytes(HIDDEN * 2, group.size()), **CPU_ONLY)
            try:
                assert buffer.group is group and buffer.rank == tcomm.rank
                assert buffer.mpiep_buffer.backend_name == "reference"
                sc.run_normal_layer(buffer, case, CPU, async_finish)
            finally:
                buffer.destroy()
                tcomm.Free()


EXTRA_CASES = [("world", False, 0), ("world", True, 0), ("world", False, 96), ("tail", True, 96)]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize(
    "kind,fp8,worst",
    EXTRA_CASES,
    ids=[f"{k}-{'fp8' if f else 'bf16'}-worst{w}" for k, f, w in EXTRA_CASES],
)
def test_dispatch_fp8_alignment_worst_and_cached(
    comm: MPI.Comm, seed: int, kind: str, fp8: bool, worst: int
) -> None:
    """Positional DeepEP arguments, FP8 tuples, expert_alignment, num_worst_tokens, and
    DeepEP's cached-mode tuple."""
    if kind != "world" and comm.size < 3:
        pytest.skip("subgroups need 3+ ranks")
    with sc.torch_world():
        group, tcomm = sc.make_group(kind)
        with collective_check(comm):
            if tcomm is None:
                return
            case = sc.make_normal_case(tcomm, seed, HIDDEN, 4, 2, "random")
            buffer = deep_ep.Buffer(
                group, deep_ep_nvl_bytes(HIDDEN * 2, group.size()), 0, **CPU_ONLY
            )
            try:
                sc.run_normal_extras(buffer, case, CPU, fp8, worst)
            finally:
                buffer.destroy()
                tcomm.Free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("how", ["comm_keyword", "comm_positional"])
def test_mpi_communicator_instead_of_group(comm: MPI.Comm, seed: int, how: str) -> None:
    """DeepEP V1's ``comm=``, or an mpi4py communicator as the group: no torch.distributed."""
    sub = comm.Split(0 if comm.rank < 2 else 1, comm.rank)
    with collective_check(comm):
        case = sc.make_normal_case(sub, seed, HIDDEN, 2, 2, "random")
        nvl = deep_ep_nvl_bytes(HIDDEN * 2, sub.size)
        buffer = (
            deep_ep.Buffer(None, nvl, comm=sub, **CPU_ONLY)
            if how == "comm_keyword"
            else deep_ep.Buffer(sub, nvl, **CPU_ONLY)
        )
        try:
            assert buffer.group is sub and buffer.group_size == sub.size
            sc.run_normal_layer(buffer, case, CPU, async_finish=False)
        finally:
            buffer.destroy()
    sub.Free()


# ============================================================================ MPI: low latency
LL_CASES = [  # group kind, mode, hook, zero_copy
    ("world", "bf16", False, False),
    ("world", "fp8", True, False),
    ("world", "fp8_ue8m0", False, True),
    ("tail", "fp8", False, False),
    ("pair", "bf16", True, True),
]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize(
    "kind,mode,hook,zero_copy",
    LL_CASES,
    ids=[f"{k}-{m}-{'hook' if h else 'async'}{'-zc' if z else ''}" for k, m, h, z in LL_CASES],
)
def test_low_latency_decode_step(
    comm: MPI.Comm, seed: int, kind: str, mode: str, hook: bool, zero_copy: bool
) -> None:
    """SGLang/vLLM-style decode: low_latency_dispatch (hook or async event), experts,
    low_latency_combine (optionally zero-copy), DeepEP's handle tuple, against the oracle."""
    if kind != "world" and comm.size < 3:
        pytest.skip("subgroups need 3+ ranks")
    with sc.torch_world():
        group, tcomm = sc.make_group(kind)
        with collective_check(comm):
            if tcomm is None:
                return
            case = sc.make_low_latency_case(tcomm, seed, LL_HIDDEN, 4, 3, max_tokens=24)
            rdma, qps = sc.low_latency_buffer_args(case)
            buffer = deep_ep.Buffer(
                group, 0, rdma, low_latency_mode=True, num_qps_per_rank=qps, **CPU_ONLY
            )
            try:
                sc.run_low_latency_layer(buffer, case, CPU, mode, hook, zero_copy)
                # A second step into the same buffer, after DeepEP's clean call.
                buffer.clean_low_latency_buffer(case.max_tokens, case.hidden, case.num_experts)
                sc.run_low_latency_layer(buffer, case, CPU, mode, not hook, False)
            finally:
                buffer.destroy()
                tcomm.Free()


# ============================================================================ MPI: bad launches
@pytest.mark.mpi(min_size=2)
def test_swapped_ranks_fail_on_every_rank(comm: MPI.Comm) -> None:
    """torch ranks 0 and 1 swapped against MPI's: every member raises (also ranks 2, 3,
    whose own ranks match), naming the culprits and how to launch; nobody waits in MPI."""
    swap = {0: 1, 1: 0}
    with sc.torch_world(rank_of=lambda r: swap.get(r, r)):
        with collective_check(comm):
            with pytest.raises(deep_ep.ProcessGroupMismatchError) as info:
                deep_ep.Buffer(dist.group.WORLD, 1 << 20)
            text = str(info.value)
            assert "torch rank 1 != MPI rank 0" in text, text
            assert "torch rank 0 != MPI rank 1" in text, text
            assert "mpirun" in text and "comm=" in text, text
            assert "2 of" in text, text
        # The torch group still works afterwards (nobody is stuck in a collective).
        t = torch.ones(1)
        dist.all_reduce(t)
        assert t.item() == comm.size


@pytest.mark.mpi(min_size=3)
def test_torch_world_smaller_than_mpi_world_fails(comm: MPI.Comm) -> None:
    """A torch world of 2 inside an MPI world of 3+ (as under torchrun-like launches)."""
    with sc.torch_world(members=[0, 1]) as member:
        with collective_check(comm):
            if member:
                with pytest.raises(deep_ep.ProcessGroupMismatchError, match="world size 2 !="):
                    deep_ep.Buffer(dist.group.WORLD, 1 << 20)


# ============================================================================ single process
def test_one_rank_end_to_end(seed: int) -> None:
    """A world of one (an MPI singleton and a one-rank gloo group): the whole ProcessGroup
    path in the plain-pytest stage."""
    if MPI.COMM_WORLD.size != 1:
        pytest.skip("single-process test")
    with sc.torch_world():
        group, tcomm = sc.make_group("world")
        assert tcomm is not None
        case = sc.make_normal_case(tcomm, seed, HIDDEN, 2, 3, "holes")
        buffer = deep_ep.Buffer(group, deep_ep_nvl_bytes(HIDDEN * 2, 1), **CPU_ONLY)
        try:
            sc.run_normal_layer(buffer, case, CPU, async_finish=True)
        finally:
            buffer.destroy()
            tcomm.Free()


def test_import_starts_no_mpi() -> None:
    """``import mpiep`` stays free of MPI and torch; ``mpiep.deep_ep`` loads torch only."""
    if MPI.COMM_WORLD.size != 1:
        pytest.skip("single-process test (spawns a Python)")
    code = (
        "import sys\n"
        "import mpiep\n"
        "assert 'mpi4py' not in sys.modules and 'torch' not in sys.modules\n"
        "from mpiep import deep_ep\n"
        "assert 'mpi4py' not in sys.modules, 'mpi4py imported'\n"
        "assert 'mpiep.buffer' not in sys.modules\n"
        "assert deep_ep.Buffer.get_dispatch_config(8).num_sms == deep_ep.Buffer.num_sms\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(mpiep.__file__).parents[1]), env.get("PYTHONPATH", "")]
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr


def test_install_as_deep_ep() -> None:
    """``import deep_ep`` inside unmodified libraries resolves to mpiep.deep_ep; a real
    deep_ep already imported is refused."""
    if MPI.COMM_WORLD.size != 1:
        pytest.skip("single-process test (spawns a Python)")
    code = (
        "import sys, types\n"
        "import mpiep.deep_ep as compat\n"
        "assert compat.install_as_deep_ep() is compat\n"
        "import deep_ep\n"
        "from deep_ep import Buffer, Config, EventOverlap, topk_idx_t\n"
        "from deep_ep.utils import EventHandle, EventOverlap as E2\n"
        "from deep_ep.buffer import Buffer as B2\n"
        "assert deep_ep is compat and Buffer is B2 and EventOverlap is E2\n"
        "assert topk_idx_t is __import__('torch').int64\n"
        "sys.modules['deep_ep'] = types.ModuleType('deep_ep')\n"
        "try:\n"
        "    compat.install_as_deep_ep()\n"
        "except RuntimeError as e:\n"
        "    assert 'already imported' in str(e)\n"
        "else:\n"
        "    raise SystemExit('not refused')\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(mpiep.__file__).parents[1]), env.get("PYTHONPATH", "")]
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr


def test_config_signature_and_hints(monkeypatch: pytest.MonkeyPatch) -> None:
    c = deep_ep.Config(20, 6, 256, 6, 128)
    assert isinstance(c, mpiep.Config)
    assert (c.num_sms, c.num_max_nvl_chunked_recv_tokens, c.num_max_rdma_chunked_recv_tokens) == (
        20,
        256,
        128,
    )
    kw = deep_ep.Config(
        num_sms=24,
        num_max_nvl_chunked_send_tokens=8,
        num_max_nvl_chunked_recv_tokens=256,
        num_max_rdma_chunked_send_tokens=16,
        num_max_rdma_chunked_recv_tokens=128,
    )
    assert kw.num_max_rdma_chunked_send_tokens == 16
    with pytest.raises(ValueError, match="even"):
        deep_ep.Config(21)
    # The NVLink hint covers a whole receive of MPIEP_MAX_TOKENS_PER_RANK tokens.
    hidden, ranks = 7168, 8
    monkeypatch.delenv("MPIEP_MAX_TOKENS_PER_RANK", raising=False)
    default = c.get_nvl_buffer_size_hint(hidden * 2, ranks)
    assert default >= mcfg.get_normal_buffer_size_hint(4096, hidden, ranks, 32)
    assert default >= mcfg.Config(20, 6, 256, 6, 128).get_nvl_buffer_size_hint(hidden * 2, ranks)
    monkeypatch.setenv("MPIEP_MAX_TOKENS_PER_RANK", "16384")
    big = c.get_nvl_buffer_size_hint(hidden * 2, ranks)
    assert big == mcfg.get_normal_buffer_size_hint(16384, hidden, ranks, 32) > default
    monkeypatch.setenv("MPIEP_MAX_TOKENS_PER_RANK", "lots")
    with pytest.raises(ValueError, match="MPIEP_MAX_TOKENS_PER_RANK"):
        c.get_nvl_buffer_size_hint(hidden * 2, ranks)
    # RDMA: none within one node (8 ranks by default, DeepEP's NVLink domain); across nodes
    # a whole exchange of the same token count.
    monkeypatch.delenv("MPIEP_MAX_TOKENS_PER_RANK", raising=False)
    monkeypatch.delenv("MPIEP_RANKS_PER_NODE", raising=False)
    assert c.get_rdma_buffer_size_hint(hidden * 2, ranks) == 0
    want = mcfg.get_internode_rdma_size_hint(4096, hidden, 32, 8, 32)
    assert c.get_rdma_buffer_size_hint(hidden * 2, 32) == want > 0
    monkeypatch.setenv("MPIEP_RANKS_PER_NODE", "2")
    assert c.get_rdma_buffer_size_hint(hidden * 2, ranks) == mcfg.get_internode_rdma_size_hint(
        4096, hidden, ranks, 2, 32
    )


def test_class_helpers(restore_num_sms: None) -> None:
    B = deep_ep.Buffer
    assert B.is_sm90_compiled() is True
    assert B.get_low_latency_rdma_size_hint(128, 7168, 8, 288) == (
        mcfg.get_low_latency_rdma_size_hint(128, 7168, 8, 288)
    )
    for n in (2, 4, 8, 12, 160):  # any rank count (DeepEP knows a fixed list)
        assert isinstance(B.get_dispatch_config(n), deep_ep.Config)
        assert isinstance(B.get_combine_config(n), deep_ep.Config)
    B.set_num_sms(32)
    assert B.num_sms == 32
    assert B.get_dispatch_config(8).num_sms == 32 and B.get_combine_config(4).num_sms == 32
    for bad in (0, 7, -2):
        with pytest.raises(ValueError, match="even"):
            B.set_num_sms(bad)
    ev = B.capture()
    assert isinstance(ev, deep_ep.EventOverlap) and isinstance(ev.event, deep_ep.EventHandle)


def test_events_on_cpu() -> None:
    """DeepEP's event idioms run on CPUs: nothing is pending, so waits return."""
    handle = deep_ep.EventHandle()
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        assert handle.event is None  # no CUDA work can be pending
    handle.current_stream_wait()
    overlap = deep_ep.EventOverlap(handle, extra_tensors=(torch.ones(1),))
    with overlap as same:
        assert same is overlap
    overlap.current_stream_wait()
    deep_ep.EventOverlap().current_stream_wait()  # DeepEP asserts here; calls on CPU have none
    # Conversions at the boundary with mpiep's Buffer.
    assert ut.to_mpiep_event(None) is None
    inner = ut.to_mpiep_event(overlap)
    assert isinstance(inner, MpiepEventOverlap) and inner.event is None
    assert inner.extra_tensors is overlap.extra_tensors
    native = MpiepEventOverlap(None)
    assert ut.to_mpiep_event(native) is native
    back = ut.from_mpiep_event(MpiepEventOverlap(None, (torch.zeros(1),)))
    assert isinstance(back, deep_ep.EventOverlap) and back.event is None
    with pytest.raises(TypeError, match="previous_event"):
        ut.to_mpiep_event("event")
    with pytest.raises(TypeError, match="EventHandle"):
        ut.to_mpiep_event(deep_ep.EventOverlap(object()))  # type: ignore[arg-type]


def _dispatch_handle() -> DispatchHandle:
    return DispatchHandle(
        num_ranks=2,
        num_experts=4,
        hidden=8,
        is_token_in_rank=torch.tensor([[True, False], [True, True], [False, False]]),
        num_tokens_per_rank=torch.tensor([2, 1], dtype=torch.int32),
        num_recv_per_src=torch.tensor([2, 1], dtype=torch.int32),
        recv_src_idx=torch.tensor([0, 1, 4], dtype=torch.int32),
        num_recv_tokens=3,
        num_recv_tokens_per_expert_list=[2, 1],
    )


def test_dispatch_handle_tuple() -> None:
    inner = _dispatch_handle()
    h = deep_ep.DispatchHandleTuple(inner)
    assert isinstance(h, tuple) and len(h) == 6
    a, b, c, src, in_rank, head = h  # DeepEP callers unpack the intranode handle
    assert (a, b, c, head) == (None, None, None, None)
    assert src is inner.recv_src_idx and in_rank is inner.is_token_in_rank
    assert h[3] is h[-3] and h.mpiep_handle is inner
    wide = deep_ep.DispatchHandleTuple(inner, num_nodes=2)  # DeepEP's internode form
    assert len(wide) == 10 and wide[0] is inner.is_token_in_rank
    assert all(v is None for v in wide[1:])
    copy = pickle.loads(pickle.dumps(h))
    assert isinstance(copy, deep_ep.DispatchHandleTuple) and len(copy) == 6
    assert torch.equal(copy[3], inner.recv_src_idx)
    assert hd.unwrap_dispatch_handle(h) is inner and hd.unwrap_dispatch_handle(inner) is inner
    with pytest.raises(TypeError, match="handles of the real deep_ep"):
        hd.unwrap_dispatch_handle(tuple(h))


def test_low_latency_handle_tuple() -> None:
    # 2 local experts, 2 source ranks, (first row, count) pairs as mpiep keeps them.
    layout = torch.tensor([[[0, 2], [2, 3]], [[0, 0], [0, 1]]], dtype=torch.int32)
    src = torch.tensor([[4, 7, 0, 1, 2, -1], [5, -1, -1, -1, -1, -1]], dtype=torch.int32)
    inner = LowLatencyHandle(3, 128, 8, src, layout, num_tokens=9)
    h = deep_ep.LowLatencyHandleTuple(inner)
    assert isinstance(h, tuple) and len(h) == 5
    src_info, packed, m, hidden, experts = h
    assert src_info is src and (m, hidden, experts) == (3, 128, 8)
    assert packed.dtype == torch.int64
    want = [[2, (2 << 32) | 3], [0, 1]]  # DeepEP: count in the low half, first row high
    assert packed.tolist() == want and h[1].tolist() == want and h[-4].tolist() == want
    assert h[1:3][0].tolist() == want and h[1:3][1] == 3
    assert list(h)[4] == 8 and tuple(h)[1].tolist() == want
    with pytest.raises(IndexError):
        h[5]
    assert (packed & 0xFFFFFFFF).sum().item() == 6 and (packed >> 32)[0, 1].item() == 2
    copy = pickle.loads(pickle.dumps(h))
    assert copy[1].tolist() == want and copy.mpiep_handle.num_tokens == 9
    assert "num_experts=8" in repr(h)
    assert hd.unwrap_low_latency_handle(h) is inner
    with pytest.raises(TypeError):
        hd.unwrap_low_latency_handle(tuple(h))


def test_mismatch_diagnosis() -> None:
    assert pg.describe_mismatch(3, 4, 3, 4) is None
    assert pg.describe_mismatch(1, 4, 0, 4) == "torch rank 1 != MPI rank 0"
    both = pg.describe_mismatch(0, 8, 0, 1)
    assert both == "torch world size 8 != MPI world size 1"  # torchrun: MPI singletons
    assert pg.mismatch_message([(0, 0, None), (1, 1, None)]) is None
    text = pg.mismatch_message([(r, 0, "torch world size 8 != MPI world size 1") for r in range(8)])
    assert text is not None and "8 of 8 members" in text and "and 4 more" in text
    assert "mpirun" in text and "srun" in text and "torchrun" in text


def test_constructor_refusals() -> None:
    """Refusals that happen before any communication."""
    with pytest.raises(ValueError, match="Either 'group' or 'comm'"):
        deep_ep.Buffer()
    with pytest.raises(ValueError, match="not both"):
        deep_ep.Buffer(object(), comm=object())
    with pytest.raises(TypeError, match="ProcessGroup or an mpi4py communicator"):
        deep_ep.Buffer(object())
    with pytest.raises(TypeError):  # DeepEP V1 and V2 disagree on position 8: keyword-only
        deep_ep.Buffer(None, 0, 0, False, 24, True, False, False)  # type: ignore[misc]


def test_group_without_init_process_group() -> None:
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    with pytest.raises(RuntimeError, match="init_process_group"):
        pg.comm_from_process_group(object())


def test_single_rank_buffer_surface(seed: int) -> None:
    """The rest of DeepEP's surface on a one-rank Buffer over COMM_WORLD (mpi4py comm)."""
    if MPI.COMM_WORLD.size != 1:
        pytest.skip("single-process test")
    buffer = deep_ep.Buffer(
        comm=MPI.COMM_WORLD,
        num_nvl_bytes=deep_ep_nvl_bytes(HIDDEN * 2, 1),
        num_rdma_bytes=deep_ep.Buffer.get_low_latency_rdma_size_hint(8, HIDDEN, 1, 4),
        low_latency_mode=True,
        num_qps_per_rank=4,
        use_fabric=True,
        explicitly_destroy=True,
        device="cpu",
    )
    try:
        assert buffer.get_comm_stream() is None
        with torch.cuda.stream(buffer.get_comm_stream()):  # DeepEP idiom, a no-op on CPU
            pass
        with pytest.raises(NotImplementedError, match="get_next_low_latency_combine_buffer"):
            buffer.get_local_buffer_tensor(torch.bfloat16)
        for call in (
            lambda: buffer.low_latency_update_mask_buffer(0, True),
            lambda: buffer.low_latency_query_mask_buffer(torch.zeros(1, dtype=torch.int32)),
            buffer.low_latency_clean_mask_buffer,
        ):
            with pytest.raises(RuntimeError, match="enable_shrink=True"):
                call()  # rank masking is mpiep's, and needs enable_shrink
        assert buffer.internode_dispatch == buffer.dispatch
        x = torch.ones(4, HIDDEN, dtype=torch.bfloat16)
        idx = torch.tensor([[0, 1], [2, -1], [3, 0], [-1, -1]])
        w = torch.full((4, 2), 0.5)
        with pytest.raises(TypeError, match="int64"):
            buffer.low_latency_dispatch(
                x, idx, 8, 4, dispatch_wait_recv_cost_stats=torch.zeros(1, dtype=torch.int32)
            )
        stats = torch.zeros(1, dtype=torch.int64)
        with pytest.warns(UserWarning, match="not updated"):
            recv_x, count, handle, _, _ = buffer.low_latency_dispatch(
                x, idx, 8, 4, dispatch_wait_recv_cost_stats=stats, use_fp8=False
            )
        assert stats.item() == 0 and count.tolist() == [2, 1, 1, 1]
        y = recv_x.clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # use_logfmt warns once per process
            out, _, _ = buffer.low_latency_combine(y, idx, w, handle, use_logfmt=True)
        want = torch.tensor([1.0, 0.5, 1.0, 0.0]).unsqueeze(1).expand(4, HIDDEN)
        assert torch.equal(out.float(), want)
        with pytest.raises(TypeError, match="low_latency_dispatch returned"):
            buffer.low_latency_combine(y, idx, w, tuple(handle))
        # A handle from the real deep_ep (a plain tuple) is refused by name.
        with pytest.raises(TypeError, match="real deep_ep"):
            buffer.combine(x, (None,) * 6)
    finally:
        buffer.destroy()


def test_capacity_error_explains_deep_ep_sizing(monkeypatch: pytest.MonkeyPatch) -> None:
    if MPI.COMM_WORLD.size != 1:
        pytest.skip("single-process test")
    monkeypatch.setenv("MPIEP_MAX_TOKENS_PER_RANK", "2")
    # Room for a few rows after the 1 MiB control area: 64 tokens do not fit.
    buffer = deep_ep.Buffer(MPI.COMM_WORLD, mcfg.CONTROL_BYTES + 1024, device="cpu")
    try:
        topk_idx = torch.zeros(64, 1, dtype=torch.int64)
        layout: Any = buffer.get_dispatch_layout(topk_idx, 2)
        x = torch.zeros(64, 64, dtype=torch.bfloat16)
        with pytest.raises(mpiep.CapacityError, match="MPIEP_MAX_TOKENS_PER_RANK=2"):
            buffer.dispatch(
                x,
                num_tokens_per_rank=layout[0],
                is_token_in_rank=layout[3],
                num_tokens_per_expert=layout[2],
                topk_idx=topk_idx,
            )
    finally:
        buffer.destroy()
