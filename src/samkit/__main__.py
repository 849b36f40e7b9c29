"""``python -m samkit``: the ``samkit`` command."""

from samkit.cli.main import main

if __name__ == "__main__":  # (imported by a tool that walks the package: nothing runs)
    raise SystemExit(main())
