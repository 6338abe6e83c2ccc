"""Is the compiled core (python/mpiep/_C*.so) built from the sources as they are now?

``pip install -e .`` recompiles the whole CUDA core (minutes on two cores) every time, since
setuptools builds editable extensions in a fresh temporary directory. scripts/setup.sh asks
this script first and skips the build when nothing it depends on changed:

    python3 scripts/core_stamp.py check   # exit 0: the core in python/mpiep is current
    python3 scripts/core_stamp.py write   # after a successful build: record its inputs

The stamp (build/mpiep-core.stamp, git-ignored) is a SHA-256 of every file under src/ and
include/, setup.py, the nvcc version, the torch version (the op layer mpiep._ops links
against it), the Python extension suffix and the build settings read from the environment.
Deleting it forces a rebuild.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ENV = ("MPIEP_CUDA_ARCH", "MPIEP_DISABLE_PTX_TRICKS", "NVSHMEM_DIR", "CUDA_HOME")


def digest(root: Path) -> str:
    h = hashlib.sha256()
    files = [p for d in ("src", "include") for p in sorted((root / d).rglob("*")) if p.is_file()]
    for path in [*files, root / "setup.py"]:
        h.update(str(path.relative_to(root)).encode() + b"\0")
        h.update(path.read_bytes() if path.exists() else b"")
    h.update(_nvcc_version().encode())
    h.update(_torch_version().encode())  # mpiep._ops is built against the installed torch
    h.update(str(sysconfig.get_config_var("EXT_SUFFIX")).encode())
    for name in ENV:
        h.update(f"{name}={os.environ.get(name, '')}".encode())
    return h.hexdigest()


def _nvcc_version() -> str:
    home = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    nvcc = shutil.which("nvcc") or str(home / "bin" / "nvcc")
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
        return out.stdout
    except (OSError, subprocess.SubprocessError):
        return "no nvcc"


def _torch_version() -> str:
    try:
        import torch
    except ImportError:
        return "no torch"
    return f"{torch.__version__} {torch.version.cuda} {torch._C._GLIBCXX_USE_CXX11_ABI}"


def built_core(root: Path) -> Path | None:
    """The core, when it and the torch op layer built with it are both there."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    paths = [root / "python" / "mpiep" / f"{name}{suffix}" for name in ("_C", "_ops")]
    return paths[0] if all(p.exists() for p in paths) else None


def main(argv: list[str]) -> int:
    root = Path(__file__).resolve().parent.parent
    stamp = root / "build" / "mpiep-core.stamp"
    if argv[1:] == ["check"]:
        current = (
            built_core(root) is not None
            and stamp.exists()
            and stamp.read_text().strip() == digest(root)
        )
        return 0 if current else 1
    if argv[1:] == ["write"]:
        if built_core(root) is None:
            print("core_stamp: no python/mpiep/_C*.so to record", file=sys.stderr)
            return 1
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(digest(root) + "\n")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
