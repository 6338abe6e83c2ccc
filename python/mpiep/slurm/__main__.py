"""``python -m mpiep.slurm``: same as ``mpiep slurm``."""

import sys

from mpiep.slurm.cli import main

sys.exit(main())
