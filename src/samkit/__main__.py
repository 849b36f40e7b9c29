"""``python -m samkit``: the ``samkit`` command."""

from samkit.cli.main import main

raise SystemExit(main())
