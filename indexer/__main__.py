"""``python -m indexer``: the same as the ``vvireid-index`` console script."""

from indexer.cli import main

raise SystemExit(main())
