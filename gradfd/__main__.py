"""``python -m gradfd``: the command line (see :mod:`gradfd.cli`)."""

import sys

from .cli import main

sys.exit(main())
