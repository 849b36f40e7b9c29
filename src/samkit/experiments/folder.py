"""One study per run folder at a time: a lock, a write check and stale temporary files.

Two ``samkit compare`` in one folder would both train every run and
interleave their per-epoch logs. :func:`study_folder` takes an exclusive
lock on ``<folder>/.samkit.lock`` (``fcntl.flock`` on POSIX, ``msvcrt`` on
Windows); the operating system releases it when the process ends, even on
``kill -9``, so a crash never leaves the folder locked. The second process
gets :class:`FolderBusy` (a ``ValueError``) naming the holder's pid.

Holding the lock, it removes the temporary files that an atomic write
(:mod:`samkit._atomic`: ``.<name>.<random>.tmp``) leaves behind when its
process is killed mid-write, and the Optuna journal's lock of a killed
``samkit tune``. The writability check uses a uniquely named probe, so two
processes never trip over each other's probe.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .._atomic import no_space

__all__ = [
    "FolderBusy",
    "study_folder",
    "run_folder",
    "differences",
    "describe_differences",
    "check_writable",
    "clean_stale_temporaries",
]

LOCK_NAME = ".samkit.lock"
_TMP = re.compile(r"^\..+\.tmp$")
_HELD: dict[str, int] = {}  # folder -> depth, for the nested use by one process


class FolderBusy(ValueError):
    """Another process holds the folder's lock."""


#: the file only a ``samkit tune`` folder holds (the studies are told apart by their
#: summaries and settings: :func:`folder_kind`)
TUNE_SETTINGS = "tune-settings.json"


def folder_kind(path: Path) -> str | None:
    """What a run folder holds: ``"tune"``, ``"compare"``, ``"rl"``, ``"gan"``, or None
    (nothing of samkit's, or unreadable): from its summary's format, else its settings."""
    import json

    if (path / TUNE_SETTINGS).exists() or (path / "optuna-journal.log").exists():
        return "tune"  # (a search of samkit 0.1 wrote no settings file)
    for name in ("results.json", "config.json", "tune.json"):
        try:
            d = json.loads((path / name).read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(d, dict):
            continue
        fmt = d.get("format")
        if isinstance(fmt, str) and fmt.startswith("samkit-"):
            return fmt.removeprefix("samkit-")
        if "envs" in d and "timesteps" in d:
            return "rl"
        if "datasets" in d and "iterations" in d:
            return "gan"
        if "methods" in d and "dataset" in d:
            return "compare"
    return None


def refuse_other_kind(path: Path, kind: str) -> None:
    """A run folder holds one kind of study (``samkit compare``, ``rl``, ``gan``, ``tune``):
    another into it would overwrite its summary and report. ValueError naming ``out``."""
    other = folder_kind(path)
    if other is not None and other != kind:
        what = "a samkit tune search" if other == "tune" else f"a samkit {other} study"
        raise ValueError(f"Invalid out value: {str(path)!r} holds {what}; choose another --out")
    if other is None:
        _refuse_foreign(path)


_IGNORED = (LOCK_NAME, "runs", "Thumbs.db", "desktop.ini")


def _remove_if_untouched(path: Path) -> None:
    """Remove a folder this process created that holds nothing but its lock (a study
    refused by its checks left an empty folder with a .samkit.lock behind)."""
    with contextlib.suppress(OSError):
        if [p.name for p in path.iterdir()] == [LOCK_NAME]:
            (path / LOCK_NAME).unlink()
            path.rmdir()


def _refuse_foreign(path: Path) -> None:
    """A folder that holds no samkit study may hold only what a study that stopped before
    writing its settings leaves (its lock, its runs/, temporaries): `--out /` wrote a study
    into the root, `--out myproject` among the user's files, and an unreadable config.json
    was overwritten. ValueError naming ``out``."""
    try:
        names = sorted(p.name for p in path.iterdir())
    except OSError:
        return  # (not there yet, or unreadable: the write check says so)
    # (hidden files, as a version control's or the desktop's own .gitkeep, .DS_Store, are
    # nobody's study: ignored, as are the stale temporaries and the lock)
    foreign = [n for n in names if n not in _IGNORED and not n.startswith(".")]
    if not foreign:
        return
    with contextlib.suppress(OSError):  # (ours, held by this process: leave no trace there)
        (path / LOCK_NAME).unlink()
    unreadable = [n for n in foreign if n in ("config.json", "results.json", TUNE_SETTINGS)]
    if unreadable:
        raise ValueError(
            f"Invalid out value: {str(path)!r} holds a {unreadable[0]} that is not a readable "
            "samkit study's; remove it, or choose another --out"
        )
    listed = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
    raise ValueError(
        f"Invalid out value: {str(path)!r} holds files that are not a samkit study's ({listed}); "
        "choose a new or empty folder for --out"
    )


def run_folder(out: Any, default: Callable[[], Path]) -> Path:
    """The run folder: ``out`` (a non-empty path), or ``default()`` when it is None.

    ``Path("")`` is the current folder: an empty ``out`` would scatter a study's
    files there, so it is refused, as the CLI refuses ``--out ''``.
    """
    if out is None:
        return default()
    if not isinstance(out, (str, os.PathLike)) or not str(os.fspath(out)).strip():
        raise ValueError(f"Invalid out value: {out!r} (a folder path, or None for the default)")
    return Path(out)


_MISSING = object()


def differences(saved: Any, now: Any, where: str = "") -> list[tuple[str, Any, Any]]:
    """The settings that differ between two JSON-like values, as ``(dotted key, saved,
    now)`` leaves; a key on one side only has ``_MISSING`` on the other."""
    if isinstance(saved, dict) and isinstance(now, dict):
        out: list[tuple[str, Any, Any]] = []
        for key in sorted(set(saved) | set(now), key=str):
            a, b = saved.get(key, _MISSING), now.get(key, _MISSING)
            if a != b:
                out += differences(a, b, f"{where}{key}.")
        return out
    return [] if saved == now else [(where.rstrip(".") or "settings", saved, now)]


def _short(value: Any, limit: int = 40) -> str:
    text = "(none)" if value is _MISSING else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_differences(diffs: list[tuple[str, Any, Any]], limit: int = 4) -> str:
    """``"epochs: 1 -> 2, dataset: 'a' -> 'b'"``: the first ``limit`` differences,
    each value cut short, and how many more there are (never both whole configs)."""
    shown = [f"{key}: {_short(a)} -> {_short(b)}" for key, a, b in diffs[:limit]]
    more = len(diffs) - limit
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def file_in_the_way(path: Path) -> Path | None:
    """The file at ``path`` or above it, where a folder would have to be (``mkdir`` says
    only "File exists"); None if there is none."""
    return next((p for p in (path, *path.parents) if p.is_file()), None)


def check_writable(path: Path) -> Path:
    """Create ``path`` (a folder) and check a file can be written in it; ValueError if not."""
    blocking = file_in_the_way(path)
    if blocking is not None:  # (mkdir said only "File exists")
        raise ValueError(
            f"Invalid out value: {str(path)!r} is "
            + ("a file" if blocking == path else f"under {str(blocking)!r}, a file")
            + ", not a folder"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".samkit-write-test.", suffix=".tmp", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(
            f"Invalid out value: cannot write to output folder {str(path)!r} ({exc.strerror or exc})"
        ) from exc
    return path


def clean_stale_temporaries(path: Path) -> list[Path]:
    """Remove ``.*.tmp`` files left by killed atomic writes in ``path`` and ``path/runs``."""
    removed = []
    for folder in (path, path / "runs"):
        if not folder.is_dir():
            continue
        for f in folder.iterdir():
            if _TMP.match(f.name) and f.is_file():
                with contextlib.suppress(OSError):
                    f.unlink()
                    removed.append(f)
    journal_lock = path / "optuna-journal.log.lock"
    if journal_lock.is_symlink() or journal_lock.exists():
        with contextlib.suppress(OSError):
            journal_lock.unlink()
            removed.append(journal_lock)
    return removed


def _lock(fh) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


@contextlib.contextmanager
def study_folder(path: str | os.PathLike[str], *, clean: bool = True) -> Iterator[Path]:
    """Hold ``path`` for this process for the duration of the block.

    Creates the folder, checks it can be written, locks it (or raises
    :class:`FolderBusy`), and removes stale temporary files. Re-entrant
    within one process.
    """
    existed = Path(path).exists()
    path = check_writable(Path(path))
    key = str(path.resolve())
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield path
        finally:
            _HELD[key] -= 1
        return
    fh = open(path / LOCK_NAME, "a+", encoding="utf-8")  # noqa: SIM115 - held for the block
    try:
        if not _lock(fh):
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise FolderBusy(
                f"Invalid out value: {str(path)!r} is in use by another samkit process "
                f"(pid {holder}); wait for it to finish or choose another --out"
            )
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(str(os.getpid()))
            fh.flush()
        except OSError as exc:
            err = no_space(exc, path / LOCK_NAME)
            if err is exc:
                raise
            raise err from exc
        _HELD[key] = 1
        try:
            if clean:
                clean_stale_temporaries(path)
            yield path
        except BaseException:
            if not existed:  # a study refused before it wrote anything leaves no folder
                _remove_if_untouched(path)
            raise
        finally:
            del _HELD[key]
    finally:
        fh.close()  # closing releases the lock
