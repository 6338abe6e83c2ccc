#!/usr/bin/env bash
# Install what mpiep needs on a fresh Debian/Ubuntu machine, then mpiep itself.
# Idempotent: each step is skipped when its tool is already there, and the CUDA core is
# rebuilt only when its sources changed since the last build (scripts/core_stamp.py).
#
# MPI: Debian's Open MPI (apt), not the MPI wheels on PyPI. Clusters run their own
# system MPI built against their Slurm (PMIx) and fabric; mpi4py built for the
# system MPI is what users run in production, and Debian's Open MPI is the same
# family (`srun --mpi=pmix` works with it). Set MPIEP_SKIP_APT=1 where MPI is a module.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "[mpiep setup] $*"; }
PY=${PYTHON:-python3}

if ! command -v mpicc >/dev/null || ! command -v mpirun >/dev/null; then
  if [[ ${MPIEP_SKIP_APT:-0} == 1 ]]; then
    say "no MPI found and MPIEP_SKIP_APT=1: load your MPI module first"; exit 1
  fi
  SUDO=""; [[ $(id -u) == 0 ]] || SUDO=sudo
  say "installing Open MPI from apt"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq openmpi-bin libopenmpi-dev >/dev/null
fi

pip_install() { $PY -m pip install -q --disable-pip-version-check "$@"; }
# torch: keep the one present (a GPU machine brings its CUDA build); else the CPU 2.13 build.
$PY -c "import torch" 2>/dev/null || { say "installing torch"; pip_install "torch==2.13.0"; }
# The rest only when something is missing (pip asks the index even when all is there).
if ! $PY - <<'PYEOF' 2>/dev/null
import importlib, sys
for name in ("numpy", "pytest", "pytest_mpi", "pytest_timeout", "setuptools", "wheel", "pybind11",
             "hypothesis"):
    importlib.import_module(name)
import mpi4py
sys.exit(int(mpi4py.__version__.split(".")[0]) < 4)
PYEOF
then
  pip_install numpy "mpi4py>=4.0" pytest pytest-mpi pytest-timeout hypothesis setuptools wheel pybind11
fi

# The CUDA core builds wherever nvcc is: NVSHMEM comes from its wheel (version of the GPU image).
have_nvcc=0
if command -v nvcc >/dev/null || [[ -x ${CUDA_HOME:-/usr/local/cuda}/bin/nvcc ]]; then
  have_nvcc=1
  $PY -c "import nvidia.nvshmem" 2>/dev/null || pip_install "nvidia-nvshmem-cu13==3.4.5"
fi
# `pip install -e .` recompiles the whole core each time (minutes): skip it when mpiep is
# installed from this checkout and the core was built from the sources as they are now
# (scripts/core_stamp.py); install without rebuilding when only the install is missing.
here=$($PY -c "import mpiep, pathlib; print(pathlib.Path(mpiep.__file__).resolve().parent)" \
  2>/dev/null || true)
core_current=1
if (( have_nvcc )); then $PY scripts/core_stamp.py check || core_current=0; fi
if [[ $here == "$(pwd -P)/python/mpiep" ]] && (( core_current )); then
  say "mpiep is installed from this checkout$( ((have_nvcc)) && echo ' and its CUDA core is current'): nothing to build"
else
  if (( have_nvcc && !core_current )); then
    export MPIEP_BUILD_CORE=${MPIEP_BUILD_CORE:-1}
    say "nvcc found: building the CUDA core too (a few minutes on 2 cores)"
  elif (( have_nvcc )); then
    export MPIEP_BUILD_CORE=0
    say "the CUDA core is current (scripts/core_stamp.py): installing without rebuilding it"
  fi
  pip_install --no-build-isolation --no-deps -e .
  if (( have_nvcc && !core_current )); then $PY scripts/core_stamp.py write || true; fi
fi
$PY -c "import mpiep; from mpi4py import MPI; print('[mpiep setup] mpiep', mpiep.__version__, 'with', MPI.Get_library_version().splitlines()[0])"
