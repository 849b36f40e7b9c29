"""Atomic file writes: a crash or an error never leaves a half-written file.

Everything samkit writes (results, metrics summaries, checkpoints, cached
data, plots) goes to a temporary file in the destination's folder, is flushed
to disk, and is then renamed over the destination (``os.replace`` is atomic
on POSIX and Windows). On any error the temporary file is removed and the old
file, if any, is left as it was; a full disk is a :class:`NoSpaceError` that
names the file being written (the command line prints it as one line).

JSON is strict: :func:`write_json_atomic` refuses NaN and infinities (a bare
``NaN`` or ``-Infinity`` is not JSON, and most tools reject the file). Where a
non-finite number is a legitimate result (a diverged run's loss, a standard
error from one sample), the caller maps it to ``null`` explicitly with
:func:`finite`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "NoSpaceError",
    "append_line",
    "atomic_open",
    "atomic_write_via",
    "finite",
    "no_space",
    "write_json_atomic",
    "write_text_atomic",
]


class NoSpaceError(OSError):
    """The disk (or the quota) filled up while writing ``filename`` (the
    destination, never the temporary file); nothing half-written was left."""


_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def no_space(exc: BaseException, path: str | os.PathLike[str]) -> BaseException:
    """``exc`` itself, or for a full disk a :class:`NoSpaceError` naming ``path``."""
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE and not isinstance(exc, NoSpaceError):
        err = NoSpaceError(exc.errno, os.strerror(exc.errno), str(path))
        err.__cause__ = exc
        return err
    return exc


def _temp_file(path: Path, mode: str, encoding: str | None) -> tuple[str, IO[Any]]:
    """A new temporary file beside ``path``, open for writing: where every write starts."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    return tmp, os.fdopen(fd, mode, encoding=None if "b" in mode else encoding)


@contextlib.contextmanager
def _discarding(path: Path) -> Iterator[list[str]]:
    """On any error in the block: remove the temporary files it listed, and raise a
    full disk as :class:`NoSpaceError` naming ``path`` (the destination)."""
    temps: list[str] = []
    try:
        yield temps
    except BaseException as exc:
        for tmp in temps:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        err = no_space(exc, path)
        if err is exc:
            raise
        raise err from exc


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike[str], mode: str = "w", encoding: str | None = "utf-8"
) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success it replaces ``path``.

    A full disk raises :class:`NoSpaceError` naming ``path``; the temporary
    file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    with _discarding(path) as temps:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp, fh = _temp_file(path, mode, encoding)
        temps.append(tmp)
        with fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)


def atomic_write_via(
    path: str | os.PathLike[str], write: Callable[[str], Any], suffix: str = ".tmp"
) -> Path:
    """Call ``write(tmp_name)`` (for writers that want a file name, e.g. savefig) and rename over ``path``.

    ``suffix`` lets writers that pick a format from the extension (".png") see the right one.
    """
    path = Path(path)
    with _discarding(path) as temps:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
        os.close(fd)
        temps.append(tmp)
        write(tmp)
        os.replace(tmp, path)
    return path


def append_line(path: str | os.PathLike[str], line: str) -> None:
    """Append ``line`` (and a newline) to ``path``. A write cut off (a full disk) is
    taken back, so the file never ends in half a line."""
    data = memoryview((line + "\n").encode("utf-8"))
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            while data:
                data = data[os.write(fd, data) :]
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            err = no_space(exc, path)
            if err is exc:
                raise
            raise err from exc
    finally:
        os.close(fd)


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
