#!/usr/bin/env bash
# Install what mpiep needs on a fresh Debian/Ubuntu machine, then mpiep itself.
# Idempotent: each step is skipped when its tool is already there.
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
pip_install numpy "mpi4py>=4.0" pytest pytest-mpi pytest-timeout hypothesis setuptools wheel pybind11

# The CUDA core builds wherever nvcc is: NVSHMEM comes from its wheel (version of the GPU image).
if command -v nvcc >/dev/null || [[ -x ${CUDA_HOME:-/usr/local/cuda}/bin/nvcc ]]; then
  $PY -c "import nvidia.nvshmem" 2>/dev/null || pip_install "nvidia-nvshmem-cu13==3.4.5"
  export MPIEP_BUILD_CORE=${MPIEP_BUILD_CORE:-1}
  say "nvcc found: building the CUDA core too (a few minutes on 2 cores)"
fi
pip_install --no-build-isolation --no-deps -e .
$PY -c "import mpiep; from mpi4py import MPI; print('[mpiep setup] mpiep', mpiep.__version__, 'with', MPI.Get_library_version().splitlines()[0])"
