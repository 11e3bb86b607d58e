"""``python -m launcher.cli``: the ``ftlaunch`` command."""

import sys

from launcher.cli import entry

sys.exit(entry())
