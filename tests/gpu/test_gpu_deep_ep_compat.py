"""``mpiep.deep_ep`` on the GPU kernels: the call sequences of tests/test_deep_ep_compat.py
(tests/deep_ep_scenarios.py), with a torch process group as DeepEP's callers create it (NCCL
when every rank has its own GPU, gloo when ranks share one under MPS, where NCCL refuses),
against the numpy oracle.

Run on the device under mpirun (scripts/gpu_check.sh), 2+ ranks.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
MPI = pytest.importorskip("mpi4py.MPI")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import core_has, gpu_marks  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import deep_ep_scenarios as sc  # noqa: E402
import mpiep.deep_ep as deep_ep  # noqa: E402
from conftest import collective_check  # noqa: E402

HAVE_CORE = core_has("IntranodeRuntime", "LowLatencyContext")

pytestmark = gpu_marks(2, HAVE_CORE, "the GPU kernels", timeout=300)

COMM = MPI.COMM_WORLD
HIDDEN = 2048


@pytest.fixture(scope="module")
def device() -> torch.device:
    """This rank's GPU, set current before torch.distributed starts (as training code does)."""
    local = COMM.Split_type(MPI.COMM_TYPE_SHARED)
    dev = torch.device("cuda", local.rank % torch.cuda.device_count())
    local.Free()
    torch.cuda.set_device(dev)
    return dev


def torch_backend() -> str:
    local = COMM.Split_type(MPI.COMM_TYPE_SHARED)
    shared = local.size > torch.cuda.device_count()
    local.Free()
    return "gloo" if shared else "nccl"


@pytest.fixture
def world(device: torch.device) -> Iterator[None]:
    with sc.torch_world(backend=torch_backend()):
        yield


def _build(group: Any, **kwargs: Any) -> deep_ep.Buffer:
    buffer = deep_ep.Buffer(group, **kwargs)
    assert buffer.mpiep_buffer.backend_name == "cuda", buffer
    return buffer


@pytest.mark.parametrize("async_finish", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("kind", ["world", "pair"])
def test_gpu_moe_layer_forward_backward(
    world: None, device: torch.device, seed: int, kind: str, async_finish: bool
) -> None:
    if kind == "pair" and COMM.size < 3:
        pytest.skip("a subgroup needs 3+ ranks")
    group, tcomm = sc.make_group(kind)
    with collective_check(COMM):
        if tcomm is None:
            return
        case = sc.make_normal_case(tcomm, seed, HIDDEN, 8, 4, "holes")
        nvl = deep_ep.Buffer.get_dispatch_config(tcomm.size).get_nvl_buffer_size_hint(
            HIDDEN * 2, tcomm.size
        )
        buffer = _build(group, num_nvl_bytes=nvl)
        try:
            sc.run_normal_layer(buffer, case, device, async_finish)
        finally:
            buffer.destroy()
            tcomm.Free()


@pytest.mark.parametrize("fp8,worst", [(False, 0), (True, 0), (False, 256)])
def test_gpu_dispatch_fp8_worst_cached(
    world: None, device: torch.device, seed: int, fp8: bool, worst: int
) -> None:
    group, tcomm = sc.make_group("world")
    with collective_check(COMM):
        assert tcomm is not None
        e_local = max(2, -(-8 // tcomm.size))  # top-8 needs at least 8 experts in all
        case = sc.make_normal_case(tcomm, seed, HIDDEN, 8, e_local, "random")
        nvl = deep_ep.Buffer.get_combine_config(tcomm.size).get_nvl_buffer_size_hint(
            HIDDEN * 2, tcomm.size
        )
        buffer = _build(group, num_nvl_bytes=nvl)
        try:
            sc.run_normal_extras(buffer, case, device, fp8, worst)
        finally:
            buffer.destroy()
            tcomm.Free()


@pytest.mark.parametrize(
    "mode,hook,zero_copy",
    [("bf16", False, False), ("fp8", True, False), ("fp8_ue8m0", False, True)],
)
def test_gpu_low_latency_decode_step(
    world: None, device: torch.device, seed: int, mode: str, hook: bool, zero_copy: bool
) -> None:
    group, tcomm = sc.make_group("world")
    with collective_check(COMM):
        assert tcomm is not None
        case = sc.make_low_latency_case(tcomm, seed, HIDDEN, 8, 4, max_tokens=64)
        rdma, qps = sc.low_latency_buffer_args(case)
        buffer = _build(group, num_rdma_bytes=rdma, low_latency_mode=True, num_qps_per_rank=qps)
        try:
            sc.run_low_latency_layer(buffer, case, device, mode, hook, zero_copy)
            buffer.clean_low_latency_buffer(case.max_tokens, case.hidden, case.num_experts)
            sc.run_low_latency_layer(buffer, case, device, mode, not hook, False)
        finally:
            buffer.destroy()
            tcomm.Free()
