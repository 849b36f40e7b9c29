"""Entry point of the ``samkit`` command.

Each subcommand lives in ``samkit.cli.<name>`` and exposes
``add_parser(subparsers)`` (which sets ``func=run`` on its parser) and
``run(args) -> int``. Bad input raises :class:`UsageError`; it is printed as
one line on stderr and the command exits with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .errors import UsageError

SUBCOMMANDS = ("compare", "tune", "sharpness", "landscape", "rl", "gan")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's own code)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="samkit",
        description="Sharpness-aware training: compare optimizers, tune rho, measure sharpness.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"samkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in SUBCOMMANDS:
        try:
            mod = importlib.import_module(f"samkit.cli.{name}")
        except ModuleNotFoundError as exc:  # subcommand not built (yet)
            if exc.name == f"samkit.cli.{name}":
                continue
            raise
        mod.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"samkit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"samkit {args.command}: interrupted (finished runs are saved; rerun to resume)",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
