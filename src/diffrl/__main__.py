"""``python -m diffrl``: the ``diffrl`` command (for environments where the console script is not on PATH)."""

import sys

from diffrl.cli import main

sys.exit(main())
