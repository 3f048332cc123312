"""``python -m vvireid.indexer``: the same as the ``vvireid-index`` console script."""

from vvireid.indexer.cli import main

raise SystemExit(main())
