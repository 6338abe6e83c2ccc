"""``python -m mpiep.doctor``."""

import sys

from mpiep.doctor.cli import main

sys.exit(main())
