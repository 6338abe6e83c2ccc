"""mpiep: expert-parallel (MoE) all-to-all for MPI-launched GPU clusters."""
__version__ = "0.1.0"
