"""Errors the CLI reports as one line on stderr with exit code 2, the output-path check,
and the optional dependencies a command checks before it starts."""

from __future__ import annotations

import sys
from pathlib import Path


class UsageError(Exception):
    """Bad input from the user (unknown name, bad value, unreadable file...)."""


def check_output_file(path: Path, flag: str, suffix: str) -> Path:
    """Check an output file can be written *before* any computation: the
    suffix, the folder (created), and a uniquely named probe file in it."""
    import os
    import tempfile

    path = Path(path)
    if not str(path).strip() or path.suffix != suffix:
        raise UsageError(f"invalid {flag} value: {str(path)!r} (expected a {suffix} path)")
    if path.is_dir():
        raise UsageError(f"invalid {flag} value: {str(path)!r} is a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".samkit-write-test.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(
            f"invalid {flag} value: cannot write {str(path)!r} ({exc.strerror or exc})"
        ) from exc
    return path


def warn_if_no_plots(command: str) -> None:
    """Before a study starts: one line when its report will have no plots (no matplotlib).

    The study still runs and writes its tables and JSON; only the figures are left out.
    """
    from ..experiments.report import NO_PLOTS, plots_available

    if not plots_available():
        print(f"samkit {command}: {NO_PLOTS}", file=sys.stderr, flush=True)


def require_plots(what: str) -> None:
    """An output that *is* a plot: refuse before computing anything without matplotlib."""
    from .._extras import available, install

    if not available("matplotlib"):
        raise UsageError(f"{what} needs matplotlib ({install('matplotlib')})")
