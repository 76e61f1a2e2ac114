"""``python -m fntk`` (and ``torchrun -m fntk``) runs the command line."""

import sys

from fntk.cli import main

sys.exit(main())
