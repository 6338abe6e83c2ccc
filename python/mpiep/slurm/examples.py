"""The example scripts checked in under slurm/, and the options that produce them.

``python -m mpiep.slurm.examples slurm/`` rewrites them; tests/test_slurm_render.py checks
that the checked-in files equal what the renderer produces.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mpiep.slurm.cli import main as slurm_main

# file name -> ``mpiep slurm`` options (the payload stays the default benchmark)
EXAMPLES: dict[str, list[str]] = {
    **{
        f"ep{n}-normal.sbatch": ["--gpus", str(n), "--gpus-per-node", "8", "--exclusive"]
        for n in (8, 16, 32, 64, 128, 256)
    },
    "ep16-low-latency-adaptive.sbatch": [
        "--gpus", "16", "--mode", "low-latency", "--profile", "isolated-adaptive", "--exclusive",
    ],
    "ep16-normal-mpirun.sbatch": ["--gpus", "16", "--launcher", "mpirun", "--exclusive"],
    "ep32-4gpn-nicmap.sbatch": [
        "--gpus", "32", "--gpus-per-node", "4", "--nic-map",
        "mlx5_0:1,mlx5_1:1,mlx5_2:1,mlx5_3:1", "--mpi", "pmi2",
    ],
}  # fmt: skip


def write_examples(directory: str) -> list[Path]:
    """Render every example into ``directory``; returns the written paths."""
    written = []
    for name, options in EXAMPLES.items():
        path = Path(directory) / name
        rc = slurm_main([*options, "-o", str(path)])
        if rc != 0:
            raise RuntimeError(f"rendering {name} failed with exit code {rc}")
        written.append(path)
    return written


if __name__ == "__main__":
    for p in write_examples(sys.argv[1] if len(sys.argv) > 1 else "slurm"):
        print(p)
