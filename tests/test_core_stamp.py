"""scripts/core_stamp.py: setup.sh rebuilds the CUDA core only when its inputs changed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from conftest import run_once

# One process is enough (no MPI here), and four ranks running it at once on two cores made
# it the slowest test of the multi-rank run (40 s: each step starts Python and torch).
pytestmark = run_once

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "core_stamp.py"


def _tree(root: Path) -> Path:
    (root / "scripts").mkdir()
    shutil.copy(SCRIPT, root / "scripts" / "core_stamp.py")
    (root / "src" / "kernels").mkdir(parents=True)
    (root / "src" / "kernels" / "a.cu").write_text("__global__ void k() {}\n")
    (root / "include" / "mpiep").mkdir(parents=True)
    (root / "include" / "mpiep" / "a.h").write_text("#pragma once\n")
    (root / "setup.py").write_text("# setup\n")
    (root / "python" / "mpiep").mkdir(parents=True)
    return root


def _run(root: Path, command: str, **env: str) -> int:
    full = {**os.environ, **env}
    script = root / "scripts" / "core_stamp.py"
    return subprocess.run([sys.executable, str(script), command], env=full).returncode


def test_stamp_tracks_sources_settings_and_the_built_core(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    core = root / "python" / "mpiep" / f"_C{suffix}"
    ops = root / "python" / "mpiep" / f"_ops{suffix}"
    assert _run(root, "check") == 1  # never built
    assert _run(root, "write") == 1  # nothing to record without a built core
    core.write_bytes(b"\x7fELF")
    assert _run(root, "write") == 1  # the core without its torch op layer is no build
    ops.write_bytes(b"\x7fELF")
    assert _run(root, "write") == 0
    assert _run(root, "check") == 0
    assert _run(root, "check", MPIEP_CUDA_ARCH="sm_100") == 1  # other build settings
    (root / "include" / "mpiep" / "a.h").write_text("#pragma once\n// changed\n")
    assert _run(root, "check") == 1  # a header changed
    assert _run(root, "write") == 0 and _run(root, "check") == 0
    (root / "src" / "kernels" / "b.cu").write_text("\n")
    assert _run(root, "check") == 1  # a new source file
    assert _run(root, "write") == 0
    ops.unlink()
    assert _run(root, "check") == 1  # the op layer is gone
    ops.write_bytes(b"\x7fELF")
    assert _run(root, "check") == 0
    core.unlink()
    assert _run(root, "check") == 1  # the built core is gone
