"""``python -m rsmbench``: the ``rsmbench`` command, the same function as the console script."""
import sys

from rsmbench.cli import main

sys.exit(main())
