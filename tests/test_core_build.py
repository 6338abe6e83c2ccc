"""The compiled core: where nvcc is present (CI included) it must have been built."""

from __future__ import annotations

import importlib
import os

import pytest


def test_core_is_built_where_expected() -> None:
    if os.environ.get("MPIEP_EXPECT_CORE") != "1":
        pytest.skip("MPIEP_EXPECT_CORE is not set (no nvcc on this machine)")
    import torch

    core = importlib.import_module("mpiep._C")
    assert core.version == (0, 1, 0)
    # The core sees the devices torch sees (0 where there is no driver, without crashing).
    assert core.device_count() == torch.cuda.device_count()


def test_cuda_backend_reports_why_it_is_unavailable() -> None:
    import torch

    from mpiep.backends import cuda

    reason = cuda.unavailable_reason(torch.device("cpu"))
    assert reason == "no CUDA device"
