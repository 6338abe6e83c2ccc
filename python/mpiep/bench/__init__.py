"""``mpiep bench``: the main job. Times dispatch/combine in both modes, checks results,
and prints a DeepEP-style table next to an NCCL all-to-all baseline (GPUs only)."""
