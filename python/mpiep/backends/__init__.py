"""Backends: the reference (torch + MPI) and the compiled CUDA core."""
