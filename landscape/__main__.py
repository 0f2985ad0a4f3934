"""``python -m landscape`` (and ``torchrun -m landscape``): the same commands as the ``landscape`` script."""

import sys

from landscape.cli.main import main

sys.exit(main())
