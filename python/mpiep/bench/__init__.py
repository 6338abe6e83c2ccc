"""``mpiep bench``: the main job. Times dispatch/combine in both modes, checks results,
and prints a DeepEP-style table next to a baseline of the same bytes: NCCL all-to-all on
GPUs, a raw MPI Alltoallv (the floor) on CPUs."""
