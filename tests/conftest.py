"""Shared fixtures and helpers of the reference-backend suite.

Run the MPI tests with ``mpirun --oversubscribe -n 4 python -m pytest --with-mpi``; plain
``pytest`` runs the single-process tests and skips the MPI ones. Every MPI test ends with
:func:`collective_check` (a LAND reduction of pass/fail), so that an assertion failing on one
rank fails the test on every rank instead of leaving the others blocked.
"""

from __future__ import annotations

import os
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch
from mpi4py import MPI

torch.set_num_threads(1)  # four ranks share two cores

AGREE_TIMEOUT_S = 120.0  # how long all_ranks_ok waits for the slowest rank
# library timeout of the test buffers (ranks share few cores; a failure costs this much)
BUFFER_TIMEOUT_S = float(os.environ.get("MPIEP_TEST_BUFFER_TIMEOUT_S", "15"))
NVL_BYTES = 64 << 20  # default normal-mode buffer: far above what the tests move

_mpi_stats = {"collected": 0, "passed": 0}

# Tests that start their own mpirun, or time themselves, run once from plain pytest: pytest-mpi
# 0.6 runs unmarked tests on every rank too when --with-mpi and --only-mpi are both given.
run_once = pytest.mark.skipif(
    MPI.COMM_WORLD.Get_size() > 1, reason="runs once, from plain pytest, not on every MPI rank"
)


# --------------------------------------------------------------------------- pass/fail
def all_ranks_ok(ok: bool, comm: MPI.Comm) -> bool:
    """Logical AND of ``ok`` over ``comm`` (``allreduce(ok, op=MPI.LAND)``).

    Nonblocking with a deadline, so that a rank that never arrives fails the test after
    ``AGREE_TIMEOUT_S`` instead of hanging the suite.
    """
    send = np.array([1 if ok else 0], dtype=np.int32)
    recv = np.zeros(1, dtype=np.int32)
    req = comm.Iallreduce(send, recv, op=MPI.LAND)
    deadline = time.monotonic() + AGREE_TIMEOUT_S
    while not req.Test():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {comm.rank}: peers did not report pass/fail in time")
        time.sleep(1e-3)
    return bool(recv[0])


@contextmanager
def collective_check(comm: MPI.Comm) -> Iterator[None]:
    """Run the block on every rank of ``comm``; a failure anywhere fails every rank."""
    ok = False
    try:
        yield
        ok = True
    finally:
        everyone = all_ranks_ok(ok, comm)
    if not everyone:
        raise AssertionError(f"rank {comm.rank}: the test failed on another rank")


def gather_arrays(comm: MPI.Comm, arr: np.ndarray | None) -> list[Any]:
    """Every rank's numpy array (or None), indexed by rank."""
    return comm.allgather(None if arr is None else np.ascontiguousarray(arr))


# --------------------------------------------------------------------------- tensors
def bf16_bits(t: torch.Tensor) -> np.ndarray:
    """BF16 tensor -> uint16 bit patterns (numpy)."""
    assert t.dtype == torch.bfloat16, t.dtype
    return t.detach().contiguous().view(torch.int16).numpy().view(np.uint16).copy()


def dense(t: torch.Tensor) -> torch.Tensor:
    """A copy with row-major strides (numpy can give empty arrays strides of 0)."""
    return t.clone(memory_format=torch.contiguous_format)


def bf16_tensor(bits: np.ndarray) -> torch.Tensor:
    """uint16 bit patterns -> BF16 tensor."""
    arr = np.ascontiguousarray(bits, dtype=np.uint16).view(np.int16)
    return dense(torch.from_numpy(arr.copy()).view(torch.bfloat16))


def fp8_bytes(t: torch.Tensor) -> np.ndarray:
    """float8_e4m3fn tensor -> uint8 bytes (numpy)."""
    assert t.dtype == torch.float8_e4m3fn, t.dtype
    return t.detach().contiguous().view(torch.uint8).numpy().copy()


def fp8_tensor(b: np.ndarray) -> torch.Tensor:
    """uint8 bytes -> float8_e4m3fn tensor."""
    return dense(
        torch.from_numpy(np.ascontiguousarray(b, dtype=np.uint8).copy()).view(torch.float8_e4m3fn)
    )


def random_bf16(rng: np.random.Generator, num_tokens: int, hidden: int) -> torch.Tensor:
    """A BF16 [T, H] tensor of normal values with per-token magnitudes."""
    mag = rng.uniform(0.1, 8.0, (num_tokens, 1)).astype(np.float32)
    x = rng.standard_normal((num_tokens, hidden)).astype(np.float32) * mag
    return dense(torch.from_numpy(x).to(torch.bfloat16))


def random_fp8(
    rng: np.random.Generator, num_tokens: int, hidden: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """An FP8 input tuple: random e4m3 bytes (no NaN) and positive float32 scales."""
    b = rng.integers(0, 256, (num_tokens, hidden), dtype=np.uint8)
    b[(b & 0x7F) == 0x7F] = 0x3C  # 0x7f / 0xff are NaN: replace with 1.5
    scales = rng.uniform(0.01, 2.0, (num_tokens, hidden // 128)).astype(np.float32)
    return fp8_tensor(b), dense(torch.from_numpy(scales))


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def comm() -> MPI.Comm:
    """mpi4py's COMM_WORLD."""
    return MPI.COMM_WORLD


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """Base seed of the test, identical on every rank (from the test id)."""
    return zlib.crc32(request.node.nodeid.encode()) % (1 << 30)


@pytest.fixture
def rng(seed: int, comm: MPI.Comm) -> np.random.Generator:
    """This rank's generator, seeded with base + rank (torch seeded the same way)."""
    torch.manual_seed(seed + comm.rank)
    return np.random.default_rng(seed + comm.rank)


@pytest.fixture
def same_draws_on_every_rank(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Hypothesis under MPI: every rank must draw the same examples. Hypothesis >= 6.131
    mixes into its draws constants read from the source of the local modules the process
    has imported, and ranks that ran different code before (some tests import a module on
    one rank only) hold different pools: they drew different examples, then waited in
    different collectives. Here every rank draws without local constants."""
    import hypothesis
    from hypothesis.internal.conjecture import providers

    if not hasattr(providers, "_get_local_constants"):
        if hypothesis.__version_info__ >= (6, 131, 0):
            pytest.fail(
                f"Hypothesis {hypothesis.__version__} keeps local constants elsewhere: "
                "update same_draws_on_every_rank (tests/conftest.py)"
            )
        yield  # older Hypothesis draws no local constants
        return
    none = providers.Constants()
    monkeypatch.setattr(providers, "_get_local_constants", lambda: none)
    providers.CONSTANTS_CACHE.cache.clear()  # pools cached per draw kind
    yield
    providers.CONSTANTS_CACHE.cache.clear()


@pytest.fixture(params=["world", "split2", "split3"])
def ep_comm(request: pytest.FixtureRequest, comm: MPI.Comm) -> Iterator[MPI.Comm | None]:
    """COMM_WORLD, or the first 2 or 3 ranks of it (None on the ranks left out).

    The split is collective on COMM_WORLD; tests skip their body where this is None.
    """
    if request.param == "world":
        yield comm
        return
    n = int(request.param[-1])
    if comm.size <= n:
        pytest.skip(f"needs more than {n} ranks to split off {n}")
    sub = comm.Split(0 if comm.rank < n else MPI.UNDEFINED, comm.rank)
    try:
        yield None if sub == MPI.COMM_NULL else sub
    finally:
        if sub != MPI.COMM_NULL:
            sub.Free()


@pytest.fixture
def make_buffer(comm: MPI.Comm) -> Iterator[Callable[..., Any]]:
    """Factory of reference-backend Buffers on CPU tensors, destroyed at the end of the test."""
    from mpiep import Buffer

    created: list[Any] = []

    def factory(group: MPI.Comm | None = None, **kwargs: Any) -> Any:
        args: dict[str, Any] = {
            "num_nvl_bytes": NVL_BYTES,
            "num_rdma_bytes": 0,
            "low_latency_mode": False,
            "backend": "reference",
            "timeout_s": BUFFER_TIMEOUT_S,
            "device": "cpu",  # CPU tensors, also on a machine with GPUs
        }
        args.update(kwargs)
        buf = Buffer(comm if group is None else group, **args)
        created.append(buf)
        return buf

    yield factory
    for buf in created:
        try:
            buf.destroy()
        except Exception:  # a test may have destroyed it already
            pass


# --------------------------------------------------------------------------- MPI run check
def pytest_collection_finish(session: pytest.Session) -> None:
    _mpi_stats["collected"] = sum(1 for item in session.items if item.get_closest_marker("mpi"))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" and report.passed and "mpi" in report.keywords:
        _mpi_stats["passed"] += 1


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under ``--with-mpi`` on 2+ ranks, an all-skipped MPI run is a failure, not a pass."""
    with_mpi = session.config.getoption("--with-mpi", default=False)
    if (
        with_mpi
        and MPI.COMM_WORLD.size >= 2
        and _mpi_stats["collected"] > 0
        and _mpi_stats["passed"] == 0
        and exitstatus == 0
    ):
        print(f"\nrank {MPI.COMM_WORLD.rank}: MPI tests were collected but none passed")
        session.exitstatus = 1
