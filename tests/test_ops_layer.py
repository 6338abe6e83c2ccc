"""The torch op layer mpiep._ops (one native call per operation) builds wherever the core
does, loads against the installed torch, and refuses bad arguments with clear errors before
touching a GPU. Its GPU behaviour is covered by tests/gpu/ (every GPU test goes through it)."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def ops():
    try:
        from mpiep.backends import native

        return native.ops()
    except ImportError:
        if os.environ.get("MPIEP_EXPECT_CORE") == "1":
            raise
        pytest.skip("mpiep._ops is not built here")


def test_entries_exist(ops) -> None:
    for name in (
        "layout",
        "intranode_dispatch",
        "intranode_combine",
        "internode_dispatch",
        "internode_combine",
        "ll_dispatch",
        "ll_dispatch_receive",
        "ll_combine",
    ):
        assert callable(getattr(ops, name)), name
    assert ops.ABI == 1


def test_null_runtime_is_refused(ops) -> None:
    x = torch.zeros(4, 128, dtype=torch.bfloat16)
    idx = torch.zeros(4, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="context is null"):
        ops.ll_dispatch(0, x, idx, 8, 8, False, False, False, None, 0, 3)
    with pytest.raises(ValueError, match="runtime is null"):
        ops.intranode_dispatch(0, x, None, idx, None, None, None, None, [], [], 0, 8, 1, 0, 24, 0)
    with pytest.raises(ValueError, match="runtime is null"):
        ops.internode_combine(0, x, None, [], [], None, None, 4, 24, 16, 0)


def test_cpu_tensors_are_refused_by_name(ops) -> None:
    idx = torch.zeros(4, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="topk_idx must be a CUDA tensor"):
        ops.layout(idx, 8, 2, 2, 0)


def test_error_types_map_to_mpiep_exceptions(ops) -> None:
    """native.ops() registered mpiep's classes; a kInvalidArgument stays a ValueError that
    is not one of them."""
    from mpiep.errors import CapacityError, PeerTimeoutError

    with pytest.raises(ValueError) as err:
        ops.layout(torch.zeros(2, 2, dtype=torch.int64), 8, 2, 2, 0)
    assert not isinstance(err.value, (CapacityError, PeerTimeoutError))
