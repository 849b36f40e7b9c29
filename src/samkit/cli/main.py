"""Entry point of the ``samkit`` command.

Each subcommand lives in ``samkit.cli.<name>`` and exposes
``add_parser(subparsers)`` (which sets ``func=run`` on its parser) and
``run(args) -> int``. Errors end as one line on stderr, without a traceback
(``--debug``, on every subcommand, prints it too):

* bad input raises :class:`UsageError`: exit code 2;
* an exception raised inside the user's own ``--model`` / ``--data`` code is
  named as such (``in your data function mod:load: IndexError: 0 (mod.py:35,
  in ...)``): exit code 2;
* a full disk (or quota) while writing the run folder: ``no space left on
  device while writing PATH``, exit code 2 (every write is atomic: nothing
  half-written is left);
* Ctrl-C: what was finished is saved and a rerun resumes; exit code 130 (SIGTERM:
  the same, exit code 143);
* a study whose runs failed on every retry (a worker killed each time): the
  table without them, a warning naming them, exit code 1.

Any other exception is a bug in samkit and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
import traceback
import warnings
from collections.abc import Sequence

from .errors import UsageError

SUBCOMMANDS = ("compare", "tune", "sharpness", "landscape", "rl", "gan")


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: object, **kwargs: object) -> None:
        # no abbreviations: `compare --seed 3` was read as --seeds 3 (three seeds, not seed 3),
        # `tune --rho 0.05,0.2` as --rho-range (a search, not those values)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

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
        sub.choices[name].add_argument(
            "--debug",
            action="store_true",
            help="on an error, print the full traceback as well as the one-line message",
        )
    return parser


def _no_space(exc: BaseException) -> OSError | None:
    """The full-disk error in ``exc``'s chain (the one naming its file, if any), or None."""
    from .._atomic import _NO_SPACE, NoSpaceError

    found: list[OSError] = []
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            found.append(e)
        todo += [e.__cause__, e.__context__]
    ours = [e for e in found if isinstance(e, NoSpaceError)]  # these name the destination
    named = [e for e in found if e.filename is not None]
    return (ours or named or found or [None])[0]


def _error_line(exc: BaseException, debug: bool = False) -> str | None:
    """The one line for an exception the CLI reports without a traceback (None: a bug)."""
    if isinstance(exc, UsageError):
        return str(exc)
    full = _no_space(exc)
    if full is not None:
        where = full.filename if full.filename is not None else "the output folder"
        return f"no space left on device while writing {where}"
    if isinstance(exc, Exception):
        from ..experiments.problem import user_code_error

        line = user_code_error(exc)
        if line is None or debug:
            return line
        return f"{line}; --debug shows the traceback"
    return None


def _format_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    line: str | None = None,
) -> str:
    """samkit's own warnings as one line (``samkit: warning: ...``); others as Python
    prints them (a warning from the user's model or data code is theirs to read in full)."""
    from pathlib import Path

    here = Path(__file__).resolve().parent.parent  # the samkit package
    try:
        ours = Path(filename).resolve().is_relative_to(here)
    except (OSError, ValueError):
        ours = False
    if ours:
        return f"samkit: warning: {message}\n"
    return _python_format(message, category, filename, lineno, line)


_python_format = warnings.formatwarning


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or `kill`'s stop), handled as Ctrl-C is: exit code 143."""


def _terminate(signum: int, frame: object) -> None:
    raise _Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    previous, warnings.formatwarning = warnings.formatwarning, _format_warning
    term = None
    with contextlib.suppress(ValueError):  # (not the main thread: leave SIGTERM alone)
        term = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _main(argv)
    finally:
        warnings.formatwarning = previous
        if term is not None:
            signal.signal(signal.SIGTERM, term)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    debug = bool(getattr(args, "debug", False))
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as exc:
        if debug:
            traceback.print_exc()
        print(
            f"samkit {args.command}: interrupted (finished runs are saved; rerun to resume)",
            file=sys.stderr,
        )
        return 143 if isinstance(exc, _Terminated) else 130
    except Exception as exc:
        line = _error_line(exc, debug)
        if line is None:
            raise
        if debug:
            traceback.print_exc()
        print(f"samkit {args.command}: error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
