"""``python -m server`` is ``vvireid-serve``."""

import sys

from server.cli import main

sys.exit(main())
