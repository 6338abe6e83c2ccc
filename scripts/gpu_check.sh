#!/usr/bin/env bash
# One call on the GPU machine: build the core, run the GPU tests under mpirun, run the
# benchmark, and leave logs and JSON under $OUT.
#
#   scripts/gpu_check.sh [build] [test] [bench] [sweep] [doctor]    (default: all)
#
# Environment: MPIEP_NP ranks (default: number of GPUs, at least 2; with one GPU the
# ranks share it through CUDA MPS), MPIEP_GPU_TESTS test paths (default tests/),
# MPIEP_BENCH_ARGS extra `mpiep bench` arguments (';' separates several runs), MPIEP_TEST_TIMEOUT seconds.
set -uo pipefail
cd "$(dirname "$0")/.."

# NVLink multicast stays off on shared hosts, always.
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
steps=${*:-build test bench sweep doctor}
status=0

note() { echo "== $(date +%H:%M:%S) $*" | tee -a "$OUT/summary.txt"; }

# pytest-mpi (and pytest-timeout) travel as wheels in .whl/.
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

ngpu=$(nvidia-smi -L 2>/dev/null | wc -l)
NP=${MPIEP_NP:-$(( ngpu < 2 ? 2 : ngpu ))}
MPIRUN=(mpirun --allow-run-as-root --oversubscribe --bind-to none -np "$NP"
  -x NVSHMEM_DISABLE_NVLS -x NCCL_NVLS_ENABLE -x TORCH_SYMM_MEM_DISABLE_MULTICAST
  -x PYTHONUNBUFFERED -x PYTHONPATH -x MPIEP_TIMEOUT_S -x MPIEP_ALLOW_GPU_SHARING
  -x CUDA_MPS_PIPE_DIRECTORY -x CUDA_MPS_LOG_DIRECTORY -x NVSHMEM_SYMMETRIC_SIZE
  -x MPIEP_INTERNODE_FORCE_PUTS -x MPIEP_NVSHMEM_BOOTSTRAP -x MPIEP_RANKS_PER_NODE)
export MPIEP_TIMEOUT_S=${MPIEP_TIMEOUT_S:-60}
# One NVSHMEM heap per process, sized at its first init: room for every Buffer the tests make.
export NVSHMEM_SYMMETRIC_SIZE=${NVSHMEM_SYMMETRIC_SIZE:-$((8 << 30))}

if (( NP > ngpu )); then
  # Several ranks on one GPU: MPS lets their kernels run side by side, so a kernel
  # that waits on a peer's kernel is not starved by time slicing.
  export MPIEP_ALLOW_GPU_SHARING=1
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if nvidia-cuda-mps-control -d 2>>"$OUT/summary.txt"; then
    note "started CUDA MPS for $NP ranks on $ngpu GPU(s)"
    trap 'echo quit | nvidia-cuda-mps-control' EXIT
  else
    note "CUDA MPS did not start; $NP ranks time-slice $ngpu GPU(s)"
  fi
fi
note "device: $(nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c | xargs); ranks: $NP; commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

if [[ $steps == *build* ]]; then
  note "build"
  if ! MPIEP_BUILD_CORE=1 MPIEP_NVCC_THREADS=8 python3 -m pip install --no-build-isolation --no-deps \
      -e . >/tmp/mpiep-build.log 2>&1; then
    cp /tmp/mpiep-build.log "$OUT/build.log"  # only on failure: $OUT holds 8 files at most
    note "BUILD FAILED (see build.log)"; tail -40 "$OUT/build.log"; exit 1
  fi
  python3 -c "import mpiep._C as c; print('core', c.version, 'devices', c.device_count())" 2>&1 | tee -a "$OUT/summary.txt"
fi

if [[ $steps == *test* ]]; then
  note "GPU tests on $NP ranks"
  timeout "${MPIEP_TEST_TIMEOUT:-420}" "${MPIRUN[@]}" python3 -m pytest --with-mpi -m gpu --maxfail=5 -q \
    -p no:cacheprovider ${MPIEP_GPU_TESTS:-tests/} >"$OUT/gpu_tests_np$NP.log" 2>&1
  rc=$?; tail -25 "$OUT/gpu_tests_np$NP.log"; note "GPU tests on $NP ranks exit $rc"; (( rc )) && status=1
fi

if [[ $steps == *bench* ]]; then
  # MPIEP_BENCH_ARGS may hold several argument sets separated by ';' (one run each).
  IFS=';' read -r -a bench_sets <<<"${MPIEP_BENCH_ARGS:- }"
  for i in "${!bench_sets[@]}"; do
    json=(); (( i == 0 )) && json=(--json "$OUT/bench.json")
    note "benchmark on $NP ranks: mpiep bench ${bench_sets[$i]}"
    # shellcheck disable=SC2086  # word splitting of the argument set is wanted
    timeout "${MPIEP_BENCH_TIMEOUT:-300}" "${MPIRUN[@]}" python3 -m mpiep bench "${json[@]}" \
      ${bench_sets[$i]} >>"$OUT/bench.log" 2>&1
    rc=$?; note "bench exit $rc"; (( rc )) && status=1
  done
  tail -60 "$OUT/bench.log"
fi

if [[ $steps == *sweep* ]]; then
  note "token sweep on $NP ranks"
  timeout "${MPIEP_SWEEP_TIMEOUT:-200}" "${MPIRUN[@]}" python3 -m mpiep bench --sweep --shapes standard \
    --iters 20 --plot "$OUT/sweep.png" >>"$OUT/bench.log" 2>&1
  rc=$?; tail -30 "$OUT/bench.log"; note "sweep exit $rc"; (( rc )) && status=1
fi

if [[ $steps == *doctor* ]]; then
  python3 -m mpiep doctor >"$OUT/doctor.txt" 2>&1 || true
fi
exit $status
