"""Atomic file writes: a crash or an error never leaves a half-written file.

Everything samkit writes (results, metrics summaries, checkpoints, cached
data, plots) goes to a temporary file in the destination's folder, is flushed
to disk, and is then renamed over the destination (``os.replace`` is atomic
on POSIX and Windows). On any error the temporary file is removed and the old
file, if any, is left as it was.

JSON is strict: :func:`write_json_atomic` refuses NaN and infinities (a bare
``NaN`` or ``-Infinity`` is not JSON, and most tools reject the file). Where a
non-finite number is a legitimate result (a diverged run's loss, a standard
error from one sample), the caller maps it to ``null`` explicitly with
:func:`finite`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_open", "atomic_write_via", "finite", "write_json_atomic", "write_text_atomic"]


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike[str], mode: str = "w", encoding: str | None = "utf-8"
) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success it replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_via(
    path: str | os.PathLike[str], write: Callable[[str], Any], suffix: str = ".tmp"
) -> Path:
    """Call ``write(tmp_name)`` (for writers that want a file name, e.g. savefig) and rename over ``path``.

    ``suffix`` lets writers that pick a format from the extension (".png") see the right one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_open(path, "w") as fh:
        fh.write(text)


def finite(x: Any) -> Any:
    """NaN and infinities -> None, recursively: JSON that any tool can read."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, indent: int = 1) -> None:
    """Write ``obj`` as strict JSON; ValueError (the old file kept) if it holds NaN or
    an infinity: map those to null with :func:`finite` where they are expected."""
    with atomic_open(path, "w") as fh:  # on an error the old file is left as it was
        json.dump(obj, fh, indent=indent, allow_nan=False)
        fh.write("\n")
