"""Shared set-up of the GPU tests (tests/conftest.py applies here too).

Every test starts from seeds fixed by its id and the rank, so that a failure reproduces: the
global numpy, Python and torch (CPU and CUDA) generators. Inputs that matter are also drawn
from explicit generators inside the tests.
"""

from __future__ import annotations

import random
import zlib

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _seeded(request: pytest.FixtureRequest) -> None:
    try:
        import torch
        from mpi4py import MPI
    except ImportError:  # the tests themselves skip
        return
    seed = zlib.crc32(request.node.nodeid.encode()) % (1 << 30) + MPI.COMM_WORLD.rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
