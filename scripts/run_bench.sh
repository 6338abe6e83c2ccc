#!/usr/bin/env bash
# The main job: set up, then run `mpiep bench` with one rank per GPU, or with
# MPIEP_BENCH_RANKS (default 4) ranks on the reference backend where there is no GPU.
# Extra arguments go to `mpiep bench` (see `mpiep bench --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
ngpu=$(nvidia-smi -L 2>/dev/null | wc -l || true)
NP=${MPIEP_BENCH_RANKS:-$(( ngpu > 0 ? ngpu : 4 ))}
exec mpirun --allow-run-as-root --oversubscribe -n "$NP" -x NVSHMEM_DISABLE_NVLS -x NCCL_NVLS_ENABLE \
  -x PYTHONUNBUFFERED python3 -m mpiep bench "$@"
