"""A study's run files: each run's name, its atomic strict-JSON record (and
:class:`RunResult`, a record as a study returns it), one-line errors.

Shared by every study (``compare``, ``tune``, ``rl``, ``gan``); a leaf module.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from .._atomic import finite
from .._atomic import write_json_atomic as _write_json_atomic

__all__ = ["RunResult", "run_key", "write_json_atomic", "first_line"]


@dataclass
class RunResult:
    """One run of a study as :func:`~samkit.experiments.study.run_study` returns it."""

    key: str
    label: str
    seed: int
    record: dict[str, Any]  # what is stored in runs/<key>.json
    executed: bool  # False when loaded from a finished run


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as strict JSON (NaN and infinities as null), atomically."""
    _write_json_atomic(path, finite(obj))


def run_key(label: str, seed: int) -> str:
    """The file stem of a (label, seed) run: ``("sam:rho=0.1", 0)`` -> ``sam_rho=0.1-seed0``."""
    return f"{re.sub(r'[^A-Za-z0-9_.=+-]', '_', label)}-seed{seed}"


def check_run_files(labels: list[str], what: str = "methods") -> None:
    """Refuse distinct labels whose runs would share files: ``a(b)`` and ``a_b_`` both
    write ``runs/a_b_-seed0.*``, and ``SAM`` and ``sam`` do on a case-insensitive disk
    (macOS, Windows)."""
    stems: dict[str, list[str]] = {}
    for label in labels:
        stems.setdefault(run_key(label, 0).casefold(), []).append(label)
    for same in stems.values():
        if len(set(same)) > 1:
            names = " and ".join(repr(x) for x in sorted(set(same)))
            raise ValueError(
                f"Invalid {what} value: the labels {names} name the same run files "
                f"(runs/{run_key(same[0], 0)[:-1]}<seed>.*, letters' case aside); give one "
                "of them another label"
            )


def first_line(exc: BaseException) -> str:
    """``"ValueError: <its first line>"``, at most 300 characters."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:300]
