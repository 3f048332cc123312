"""``python -m vvireid.training`` runs the ``vvireid-train`` command line (also under ``torchrun``)."""

from vvireid.training.cli import main

raise SystemExit(main())
