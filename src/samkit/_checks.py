"""Argument checks shared by the optimizers and the instruments.

Each raises ``ValueError("Invalid <name> value: <value> (...)")`` and returns
the value converted to its plain Python type. Any real number is accepted
(Python, NumPy or a 0-d tensor's ``.item()``), booleans are not: ``True`` is an
``int`` to Python, never a valid rho.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = [
    "is_number",
    "check_nonneg",
    "check_pos",
    "check_int",
    "check_prob",
    "check_finite",
    "check_unit_interval",
    "check_rho",
    "check_flag",
    "MAX_RHO",
]

#: The largest radius accepted anywhere: the largest float32. A larger one
#: cannot even be represented in float32 weights (``e`` would be inf).
MAX_RHO = 3.4028234663852886e38


def is_number(value: Any) -> bool:
    """A real number that is not a bool (``numpy.float32(0.05)`` included)."""
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and type(value).__name__ != "bool_"
    )


def check_finite(name: str, value: Any) -> float:
    """A finite number."""
    if not is_number(value) or not math.isfinite(float(value)):
        raise ValueError(f"Invalid {name} value: {value!r} (must be a finite number)")
    return float(value)


def check_nonneg(name: str, value: Any) -> float:
    """A finite number >= 0."""
    if not is_number(value) or not 0 <= float(value) < math.inf:
        raise ValueError(f"Invalid {name} value: {value!r} (must be a finite number >= 0)")
    return float(value)


def check_rho(name: str, value: Any) -> float:
    """A radius: a finite number in ``[0, MAX_RHO]`` (the largest float32)."""
    if not is_number(value) or not 0 <= float(value) <= MAX_RHO:
        raise ValueError(
            f"Invalid {name} value: {value!r} (must be a finite number >= 0 and at most "
            f"{MAX_RHO:.4g}, the largest float32: a larger radius overflows the weights)"
        )
    return float(value)


def check_flag(name: str, value: Any, *, none: bool = False) -> bool | None:
    """``True`` or ``False`` (or ``None`` with ``none=True``): not a truthy string or number."""
    if value is None and none:
        return None
    if (
        value is True
        or value is False
        or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"))
    ):
        return bool(value)
    expected = "True, False or None" if none else "True or False"
    raise ValueError(f"Invalid {name} value: {value!r} (must be {expected})")


def check_pos(name: str, value: Any, *, zero: bool = False) -> float:
    """A finite number > 0 (>= 0 with ``zero=True``)."""
    if zero:
        return check_nonneg(name, value)
    if not is_number(value) or not 0 < float(value) < math.inf:
        raise ValueError(f"Invalid {name} value: {value!r} (must be a finite number > 0)")
    return float(value)


def check_int(name: str, value: Any, low: int) -> int:
    """An int >= ``low`` (NumPy integers included)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or type(value).__name__ == "bool_"
        or value < low
    ):
        raise ValueError(f"Invalid {name} value: {value!r} (must be an int >= {low})")
    return int(value)


def check_prob(name: str, value: Any) -> float:
    """A number in [0, 1]."""
    if not is_number(value) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"Invalid {name} value: {value!r} (must be in [0, 1])")
    return float(value)


def check_unit_interval(name: str, value: Any, *, closed_low: bool, closed_high: bool) -> float:
    """A number in (0, 1], [0, 1) or (0, 1), as the two flags say."""
    ok = is_number(value)
    if ok:
        v = float(value)
        ok = (v >= 0.0 if closed_low else v > 0.0) and (v <= 1.0 if closed_high else v < 1.0)
    if not ok:
        interval = f"{'[' if closed_low else '('}0, 1{']' if closed_high else ')'}"
        raise ValueError(f"Invalid {name} value: {value!r} (must be in {interval})")
    return float(value)
