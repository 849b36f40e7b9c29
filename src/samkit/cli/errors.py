"""Errors the CLI reports as one line on stderr with exit code 2, the output-path check,
and the optional dependencies a command checks before it starts."""

from __future__ import annotations

import sys
from pathlib import Path


class UsageError(Exception):
    """Bad input from the user (unknown name, bad value, unreadable file...)."""


def check_output_file(path: Path, flag: str, suffix: str) -> Path:
    """Check an output file can be written *before* any computation: the
    suffix, the folder (created), and a uniquely named probe file in it. An
    existing ``.json`` or ``.npz`` is replaced only if it is samkit's own output of
    that kind (a sharpness result, a landscape or density grid): `--out
    mydata.png` replaced the user's mydata.npz, `--out results.json` a study's."""
    import os
    import tempfile

    path = Path(path)
    if not str(path).strip() or path.suffix != suffix:
        raise UsageError(f"invalid {flag} value: {str(path)!r} (expected a {suffix} path)")
    if path.is_dir():
        raise UsageError(f"invalid {flag} value: {str(path)!r} is a folder")
    if path.is_file() and suffix in _OURS and not _OURS[suffix](path):
        raise UsageError(
            f"invalid {flag} value: {str(path)!r} exists and is not samkit's "
            f"{_OURS_WHAT[suffix]}; it would be replaced: choose another name, or remove it"
        )
    from ..experiments.folder import file_in_the_way

    blocking = file_in_the_way(path.parent)
    if blocking is not None:
        raise UsageError(
            f"invalid {flag} value: {str(path)!r} is under {str(blocking)!r}, a file, not a folder"
        )
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


def _sharpness_result(path: Path) -> bool:
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == "samkit-sharpness"


def _grid(path: Path) -> bool:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as arrays:
            return "meta" in arrays.files
    except Exception:  # noqa: BLE001 - not an .npz numpy can read: not ours
        return False


_OURS = {".json": _sharpness_result, ".npz": _grid}
_OURS_WHAT = {".json": "sharpness result", ".npz": "grid (landscape or eigenvalue density)"}
