"""Slurm integration: network profiles, sbatch rendering and the ``mpiep slurm`` command."""

from mpiep.slurm.profiles import PROFILES, JobNetwork, NetworkProfile, ServiceLevels
from mpiep.slurm.render import JobSpec, render

__all__ = ["PROFILES", "JobNetwork", "JobSpec", "NetworkProfile", "ServiceLevels", "render"]
