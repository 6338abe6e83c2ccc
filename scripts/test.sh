#!/usr/bin/env bash
# The test command: set up, then run every test that this machine can run.
#   1. single-process tests (plain pytest; MPI tests skip themselves there),
#   2. multi-rank tests under `mpirun -n 4 python -m pytest --with-mpi --only-mpi`,
# and print one closing line with the totals. Fails if the MPI tests did not run.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || { echo "setup failed"; exit 1; }

export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
# The real-Slurm test must run (not skip) wherever we can install Slurm: as root.
if [[ $(id -u) == 0 ]]; then export MPIEP_REQUIRE_SLURM=1; fi
if command -v nvcc >/dev/null; then export MPIEP_EXPECT_CORE=1; fi
NP=${MPIEP_TEST_RANKS:-4}
results=$(mktemp -d)

echo "== single-process tests"
python3 -m pytest -q -p no:cacheprovider --junitxml="$results/single.xml" "$@"
single=$?

echo "== multi-rank tests on $NP ranks"
mpirun --allow-run-as-root --oversubscribe -n "$NP" -x NVSHMEM_DISABLE_NVLS -x PYTHONUNBUFFERED \
  bash scripts/pytest_rank.sh "$results" -q -p no:cacheprovider --with-mpi --only-mpi "$@"
multi=$?

python3 scripts/junit_totals.py "$results" "$NP"
totals=$?
(( single == 0 && multi == 0 && totals == 0 ))
