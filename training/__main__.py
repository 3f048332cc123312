"""``python -m training`` runs the ``vvireid-train`` command line (also under ``torchrun``)."""

from training.cli import main

raise SystemExit(main())
