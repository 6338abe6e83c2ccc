#!/usr/bin/env bash
# One MPI rank of the multi-rank test run: rank 0 prints, the others log to files;
# each rank writes its own JUnit XML so that the totals cover every rank.
dir=$1; shift
rank=${OMPI_COMM_WORLD_RANK:-${PMI_RANK:-${SLURM_PROCID:-0}}}
if [[ $rank == 0 ]]; then
  exec python3 -m pytest --junitxml="$dir/mpi-rank$rank.xml" "$@"
fi
python3 -m pytest --junitxml="$dir/mpi-rank$rank.xml" "$@" >"$dir/mpi-rank$rank.log" 2>&1
rc=$?
(( rc )) && { echo "---- rank $rank failed; its log:"; tail -50 "$dir/mpi-rank$rank.log"; }
exit $rc
