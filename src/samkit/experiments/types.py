"""The experiments' shared types and checks: a leaf module (it imports nothing of samkit's
experiments), so that :mod:`.settings`, :mod:`.registry` and :mod:`.methods` all import
it and none of them the others at import time.

:class:`TrainSpec` (what every method is built with), the base optimizers' defaults,
the bounds of every setting and the checks that name the setting in their ValueError;
:class:`MethodDef`, what every study knows of a method (compare's registry entries
extend it; ``samkit rl`` and ``samkit gan`` list theirs as plain ones).
:mod:`.settings` re-exports all of it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any

from .._checks import is_number

__all__ = [
    "BASE_DEFAULTS",
    "LIMITS",
    "TASKS",
    "AMP",
    "SCHEDULES",
    "FLOAT32_MAX",
    "TrainSpec",
    "MethodDef",
    "plain",
    "check_int",
    "check_float",
    "check_bool",
    "check_choice",
    "check_label",
    "check_device",
]

#: Learning rate, momentum and weight decay used when the study does not set them,
#: per base optimizer. Found on MNIST-1D with the paper's CNN (docs/compare.md).
BASE_DEFAULTS: dict[str, dict[str, float]] = {
    "sgd": {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
    "adam": {"lr": 1e-2, "momentum": 0.9, "weight_decay": 0.0},
    "adamw": {"lr": 1e-2, "momentum": 0.9, "weight_decay": 1e-2},
}

#: Upper bounds: far above any sensible study, low enough that a typo fails at once.
LIMITS = {
    "seeds": 1000,  # runs per method
    "seed": 2**31 - 1,
    "epochs": 100_000,
    "batch_size": 1 << 24,
    "train_size": 10**9,
    "sharpness_samples": 10**7,
    "num_workers": 256,
    "methods": 1000,
    "rho": 100,  # values in the --rho list
    "label": 100,  # characters
}

TASKS = ("classification", "regression")
AMP = ("bf16", "fp16")
SCHEDULES = ("cosine", "constant")
_LABEL = re.compile(r"[A-Za-z0-9_.()=,+-]+")
_DEVICE = re.compile(r"(auto|cpu|mps|cuda(:\d+)?)")


# ------------------------------------------------------------------ checks
# Numbers are numbers, as in the optimizers (samkit._checks): a NumPy integer or
# float scalar is accepted wherever an int or a float is, and stored as the plain
# Python value (so it writes to JSON); a bool is never a number.
_is_number = is_number


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and is_number(v)


def plain(value: Any) -> Any:
    """``value`` with every NumPy (or other ``numbers``) scalar made a plain int or
    float, recursively through dicts, lists and tuples; anything else as it is."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    if type(value) in (int, float) or not is_number(value):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def check_int(
    name: str, v: Any, lo: int = 1, hi: int | None = None, *, none_ok: bool = False
) -> int | None:
    """An int in ``[lo, hi]`` (a float such as ``3.0`` is refused: say what you mean)."""
    if v is None and none_ok:
        return None
    hi_txt = f" and <= {hi}" if hi is not None else ""
    if not _is_int(v) or v < lo or (hi is not None and v > hi):
        raise ValueError(f"Invalid {name} value: {v!r} (must be an int >= {lo}{hi_txt})")
    return int(v)


#: the largest float32: hyper-parameters torch's kernels read as float32 must stay below it
FLOAT32_MAX = 3.4028234663852886e38


def check_float(
    name: str,
    v: Any,
    lo: float = -math.inf,
    hi: float = math.inf,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    none_ok: bool = False,
) -> float | None:
    """A finite number in the interval (NaN and infinities are refused)."""
    if v is None and none_ok:
        return None
    ok = _is_number(v) and math.isfinite(float(v))
    if ok:
        ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        if hi == math.inf:
            bound = f"{'>' if lo_open else '>='} {lo:g}" if lo > -math.inf else ""
        elif lo == -math.inf:
            bound = f"{'<' if hi_open else '<='} {hi:g}"
        else:
            bound = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ValueError(
            f"Invalid {name} value: {v!r} (must be a finite number {bound})".replace(" )", ")")
        )
    return float(v)


def check_bool(name: str, v: Any) -> bool:
    """A real boolean: the TOML string ``"false"`` is not false, so it is refused."""
    if not isinstance(v, bool):
        kind = ", not a string" if isinstance(v, str) else ""
        raise ValueError(f"Invalid {name} value: {v!r} (must be true or false, a boolean{kind})")
    return v


def check_choice(name: str, v: Any, choices: tuple[str, ...], *, none_ok: bool = False) -> Any:
    if v is None and none_ok:
        return None
    if not isinstance(v, str) or v not in choices:
        raise ValueError(f"Invalid {name} value: {v!r} (choose from {', '.join(choices)})")
    return v


def check_label(v: Any) -> str:
    if not isinstance(v, str) or not _LABEL.fullmatch(v) or len(v) > LIMITS["label"]:
        raise ValueError(
            f"Invalid label value: {v!r} (letters, digits and _.()=,+- only, "
            f"at most {LIMITS['label']} characters)"
        )
    return v


def check_device(v: Any) -> str:
    if not isinstance(v, str) or not _DEVICE.fullmatch(v):
        raise ValueError(f"Invalid device value: {v!r} (auto, cpu, cuda, cuda:N or mps)")
    return v


# ------------------------------------------------------------------- types
@dataclass
class TrainSpec:
    """Hyper-parameters shared by every method.

    ``momentum`` is SGD's momentum, or Adam's beta1. ``total_steps``,
    ``steps_per_epoch`` and ``epochs`` describe the run, for methods whose
    behaviour depends on its length (RST's schedule, late SAM, MESA's start).
    """

    base: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    total_steps: int = 1
    steps_per_epoch: int = 1
    epochs: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choice("base", self.base, tuple(BASE_DEFAULTS))
        # torch's kernels take these as float32: larger values fail mid-run
        self.lr = check_float("lr", self.lr, 0.0, FLOAT32_MAX, lo_open=True)
        self.momentum = check_float("momentum", self.momentum, 0.0, 1.0, hi_open=True)
        self.weight_decay = check_float("weight_decay", self.weight_decay, 0.0, FLOAT32_MAX)
        for name in ("total_steps", "steps_per_epoch", "epochs"):
            setattr(self, name, check_int(name, getattr(self, name)))

    def replace(self, **changes: Any) -> TrainSpec:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class MethodDef:
    """A method as a study sees it: one line of description, its options with
    their defaults, and how ``--rho`` reaches it.

    ``rho_scale``: ``--rho r`` gives the method ``rho = rho_scale * r`` (ASAM: 10).
    ``samkit compare``'s registry entries (:class:`~samkit.experiments.registry.MethodInfo`)
    are these plus a builder and capabilities; ``samkit rl`` and ``samkit gan`` use
    them as they are.
    """

    description: str
    defaults: dict[str, Any] = field(default_factory=dict)
    rho_scale: float = 1.0

    @property
    def uses_rho(self) -> bool:
        """Sharpness-aware: the method takes a ``rho`` option (``--rho`` applies to it)."""
        return "rho" in self.defaults
