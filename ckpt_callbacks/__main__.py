"""``python -m ckpt_callbacks`` runs the ``ckpt-callbacks`` command."""

from ckpt_callbacks.cli import main

raise SystemExit(main())
