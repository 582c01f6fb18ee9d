"""``python -m coordinator_stub``: same as the ``coordinator-stub`` command."""

from .cli import main

raise SystemExit(main())
