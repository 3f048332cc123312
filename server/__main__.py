"""``python -m vvireid.server`` is ``vvireid-serve``."""

import sys

from vvireid.server.cli import main

sys.exit(main())
