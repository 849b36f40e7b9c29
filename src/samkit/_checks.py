"""Argument checks shared by the optimizers and the instruments.

Each raises ``ValueError("Invalid <name> value: <value> (...)")`` and returns
the value converted to its plain Python type. Booleans are rejected where a
number is expected (``True`` is an ``int`` to Python, never a valid rho).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["check_nonneg", "check_pos", "check_int", "check_prob"]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_nonneg(name: str, value: Any) -> float:
    """A finite number >= 0."""
    if not _is_number(value) or not 0 <= value < math.inf:
        raise ValueError(f"Invalid {name} value: {value!r} (must be a finite number >= 0)")
    return float(value)


def check_pos(name: str, value: Any, *, zero: bool = False) -> float:
    """A finite number > 0 (>= 0 with ``zero=True``)."""
    if zero:
        return check_nonneg(name, value)
    if not _is_number(value) or not 0 < value < math.inf:
        raise ValueError(f"Invalid {name} value: {value!r} (must be a finite number > 0)")
    return float(value)


def check_int(name: str, value: Any, low: int) -> int:
    """An int >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"Invalid {name} value: {value!r} (must be an int >= {low})")
    return value


def check_prob(name: str, value: Any) -> float:
    """A number in [0, 1]."""
    if not _is_number(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"Invalid {name} value: {value!r} (must be in [0, 1])")
    return float(value)
