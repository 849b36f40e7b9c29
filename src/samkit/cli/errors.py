"""Errors the CLI reports as one line on stderr with exit code 2, and the output-path check."""

from __future__ import annotations

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
