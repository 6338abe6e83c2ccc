"""``python -m mpiep COMMAND``: same as the ``mpiep`` console script."""

import sys

from mpiep.cli import main

sys.exit(main())
