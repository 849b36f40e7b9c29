r"""How rho is set: schedules used like LR schedulers, and controllers SAM drives.

**Schedules** are stepped by the user, like LR schedulers (call ``.step()``
after them).

:class:`ProportionalRho` ties rho to the learning rate, as GSAM does
(Zhuang et al., ICLR 2022, arXiv 2203.08065):

.. math:: \rho_t = \rho_{min} + (\rho_{max} - \rho_{min})
          \frac{lr_t - lr_{min}}{lr_{max} - lr_{min}}

:class:`LambdaRho` multiplies each group's initial rho by ``fn(step)``.
Both write the group's ``"rho"`` key, which :class:`~samkit.SAM` reads each
step, and both have ``state_dict`` / ``load_state_dict`` for resuming.

**Controllers** (:class:`RhoController`) are given to SAM as its ``rho``
(``SAM(base, rho=FollowLR(0.05))``) and set every group's rho at the start of
each step, before the ascent, from what they see of the step; SAM saves their
state with its own. :class:`FollowLR` is GSAM's schedule as a controller.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .._checks import check_nonneg, check_pos, check_rho, is_number
from .view import RhoGroups

if TYPE_CHECKING:  # pragma: no cover
    from .view import StepView

__all__ = ["ProportionalRho", "LambdaRho", "RhoController", "FollowLR"]


def _groups(optimizer: torch.optim.Optimizer | RhoGroups) -> tuple[list[dict[str, Any]], str]:
    """The param groups and the key under which SAM keeps rho in them."""
    if not isinstance(optimizer, (torch.optim.Optimizer, RhoGroups)):
        raise ValueError(
            f"Invalid optimizer value: expected a torch optimizer, got {type(optimizer).__name__}"
        )
    controller = getattr(optimizer, "rho_controller", None)
    if controller is not None:
        # the controller writes the radius before every ascent: a schedule's value, shown
        # in the param groups until then, would never be used
        raise ValueError(
            f"Invalid optimizer value: its radius is set by a rho controller ({controller!r}), "
            "which overwrites a schedule's at every step; schedule a fixed rho "
            "(samkit.SAM(base, rho=0.05); GSAM: follow_lr=False) or leave the radius to "
            "the controller"
        )
    key = getattr(optimizer, "rho_key", "rho")
    for i, g in enumerate(optimizer.param_groups):
        if key not in g:
            raise ValueError(
                f"Invalid optimizer value: param group {i} has no {key!r} (wrap it in samkit.SAM first)"
            )
    return optimizer.param_groups, key


def _one_number(value: Any) -> Any:
    """A one-element (non-bool) tensor as its number; anything else as it is."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype != torch.bool:
        return value.item()
    return value


def _peak_lr(group: dict[str, Any], default: float) -> float:
    """A group's peak learning rate as an LR scheduler left it: ``OneCycleLR``'s ``max_lr``,
    else ``initial_lr`` (the lr a scheduler started from), else ``default``."""
    for key in ("max_lr", "initial_lr"):
        value = _one_number(group.get(key))  # (a tensor lr too)
        if is_number(value) and math.isfinite(float(value)):
            return float(value)
    return default


class LrRangeError(ValueError):
    """A group's peak learning rate is not above ``lr_min``: rho has no lr range to follow."""


def _state_number(
    state: dict[str, Any], key: str, low: float, value: Any = None, *, above: bool = False
) -> float:
    """A saved number, finite and at least (or, ``above``, more than) ``low``; else a
    ValueError naming the field."""
    value = state[key] if value is None else value
    if not is_number(value) or not math.isfinite(value) or value < low or (above and value == low):
        bound = f"> {low}" if above else f">= {low}"
        raise ValueError(
            f"Invalid state value: {key} = {value!r} (must be a finite number {bound})"
        )
    return float(value)


class ProportionalRho:
    """Keep rho proportional to the learning rate (GSAM's schedule).

    Args:
        optimizer: a :class:`~samkit.SAM` (or anything whose groups carry "rho"), or
            the :class:`~samkit.optim.view.RhoGroups` a rho controller is given.
        rho_max: rho at the peak learning rate (default: each group's current rho).
        rho_min: rho at ``lr_min`` (default 0).
        lr_max: the peak learning rate (default: each group's ``max_lr`` where an LR
            scheduler set one, as ``OneCycleLR`` does, else its ``initial_lr``, else its
            current lr; read again at every step, so a scheduler built later counts). A
            learning rate above it holds rho at ``rho_max`` and warns once (``CyclicLR``
            sets neither key at its peak: pass ``lr_max``).
        lr_min: the learning rate at which rho reaches ``rho_min`` (default 0).

    Example:
        >>> import torch, samkit
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> opt = samkit.SAM(torch.optim.SGD([w], lr=0.1), rho=0.1)
        >>> sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5)
        >>> rho = samkit.ProportionalRho(opt)
        >>> rho.step(); round(opt.param_groups[0]["rho"], 6)
        0.05
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer | RhoGroups,
        rho_max: float | None = None,
        rho_min: float = 0.0,
        lr_max: float | None = None,
        lr_min: float = 0.0,
    ) -> None:
        groups, self.key = _groups(optimizer)
        if rho_max is not None:
            check_rho("rho_max", rho_max)
        if lr_max is not None:
            check_pos("lr_max", lr_max)
        self.optimizer = optimizer
        self.rho_min = check_nonneg("rho_min", rho_min)
        self.lr_min = check_nonneg("lr_min", lr_min)
        self._given = (rho_max, lr_max)
        self.rho_max: list[float] = []
        self.lr_max: list[float] = []
        self._warned = False  # a learning rate above lr_max (once)
        self._cover_groups()
        # Like an LR scheduler, set the value for the current lr now: under a
        # warm-up the first steps would otherwise run at rho_max.
        self.step()

    def _cover_groups(self) -> None:
        """Take the peak rho and lr of groups added since (``add_param_group``): their current ones."""
        rho_max, lr_max = self._given
        for i in range(len(self.rho_max), len(self.optimizer.param_groups)):
            g = self.optimizer.param_groups[i]
            rmax = float(g[self.key]) if rho_max is None else float(rho_max)
            lmax = _peak_lr(g, float(g["lr"])) if lr_max is None else float(lr_max)
            if not lmax > self.lr_min:
                raise LrRangeError(
                    f"Invalid lr_max value: {lmax!r} for group {i} (must be > lr_min={self.lr_min})"
                )
            if rmax < self.rho_min:
                raise ValueError(
                    f"Invalid rho_min value: {self.rho_min!r} (larger than rho_max {rmax} of group {i})"
                )
            self.rho_max.append(rmax)
            self.lr_max.append(lmax)

    def step(self) -> None:
        self._cover_groups()
        for i, g in enumerate(self.optimizer.param_groups):
            if self._given[1] is None:  # a scheduler may have set (or moved) its peak since
                peak = _peak_lr(g, self.lr_max[i])
                if peak > self.lr_min:
                    self.lr_max[i] = peak
            lr, lmax = float(g["lr"]), self.lr_max[i]
            if lr > lmax * (1 + 1e-9) and not self._warned:
                from .autorho import _caller_level

                self._warned = True
                warnings.warn(
                    f"rho follows the learning rate up to its peak lr_max={lmax:g}, and group "
                    f"{i}'s learning rate is {lr:g}, above it: rho is held at its largest. The "
                    "LR scheduler set no max_lr or initial_lr at its peak (CyclicLR, a warm-up "
                    "built before SAM?): pass lr_max= the peak learning rate",
                    RuntimeWarning,
                    stacklevel=_caller_level(),
                )
            frac = min(max((lr - self.lr_min) / (lmax - self.lr_min), 0.0), 1.0)
            rmax = self.rho_max[i]
            # This form of the interpolation is exact at both ends: rho_max at the peak lr.
            g[self.key] = rmax * frac + self.rho_min * (1.0 - frac)

    _STATE = ("rho_min", "lr_min", "rho_max", "lr_max")

    def state_dict(self) -> dict[str, Any]:
        self._cover_groups()
        return {k: getattr(self, k) for k in self._STATE}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [k for k in self._STATE if k not in state]
        if missing:
            raise ValueError(f"Invalid state value: the ProportionalRho state has no {missing}")
        groups = len(self.optimizer.param_groups)
        for key in ("rho_max", "lr_max"):
            value = state[key]
            if not isinstance(value, (list, tuple)) or len(value) != groups:
                raise ValueError(
                    f"Invalid state value: ProportionalRho {key} = {value!r} (one number for "
                    f"each of the {groups} param groups)"
                )
        rho_min, lr_min = (_state_number(state, k, 0.0) for k in ("rho_min", "lr_min"))
        rho_max = [_state_number(state, "rho_max", rho_min, v) for v in state["rho_max"]]
        lr_max = [_state_number(state, "lr_max", lr_min, v, above=True) for v in state["lr_max"]]
        self.rho_min, self.lr_min, self.rho_max, self.lr_max = rho_min, lr_min, rho_max, lr_max
        # rho for the current lr, whether the optimizer's state was loaded before
        # or after this one (built after it, the constructor read a scaled rho)
        self.step()


class LambdaRho:
    """Set each group's rho to ``initial_rho * fn(step)``; ``step()`` advances the count.

    ``fn`` is not saved by :meth:`state_dict` (like ``LambdaLR``); the count is.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, fn: Callable[[int], float]) -> None:
        groups, self.key = _groups(optimizer)
        if not callable(fn):
            raise ValueError(f"Invalid fn value: {fn!r} is not callable")
        self.optimizer = optimizer
        self.fn = fn
        self.base_rhos = [float(g[self.key]) for g in groups]
        self.last_step = 0
        self._apply()

    def _apply(self) -> None:
        f = _one_number(self.fn(self.last_step))  # a one-element tensor is a number too
        if not is_number(f) or not 0 <= f < math.inf:
            raise ValueError(
                f"Invalid fn value: fn({self.last_step}) = {f!r} (must be a finite number >= 0)"
            )
        f = float(f)
        for g, r in zip(self.optimizer.param_groups, self.base_rhos):
            g[self.key] = r * f

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"base_rhos": list(self.base_rhos), "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [k for k in ("base_rhos", "last_step") if k not in state]
        if missing:
            raise ValueError(f"Invalid state value: the LambdaRho state has no {missing}")
        rhos, step = state["base_rhos"], state["last_step"]
        groups = len(self.optimizer.param_groups)
        if not isinstance(rhos, (list, tuple)) or len(rhos) != groups:
            raise ValueError(
                f"Invalid state value: LambdaRho base_rhos = {rhos!r} (one number for each of "
                f"the {groups} param groups)"
            )
        base_rhos = [_state_number(state, "base_rhos", 0.0, v) for v in rhos]
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"Invalid state value: last_step = {step!r} (must be a count >= 0)")
        saved = (self.base_rhos, self.last_step)
        self.base_rhos, self.last_step = base_rhos, step
        try:
            self._apply()
        except ValueError:
            self.base_rhos, self.last_step = saved
            raise


class RhoController:
    """Base class: sets each param group's ``"rho"`` at the start of every SAM step.

    SAM calls :meth:`bind` once with its param groups' radius
    (:class:`~samkit.optim.view.RhoGroups`: ``groups.param_groups`` and
    ``groups.rho_key``; the groups already carry their initial rho,
    :attr:`initial_rho` unless a group set its own), then :meth:`begin_step`
    before each step's ascent (``view.groups`` is the same accessor), and
    :meth:`observe_validation` when the training loop reports a validation
    loss. A controller never sees the SAM object. State for resuming goes in
    :meth:`state_dict`; SAM saves it with its own.
    """

    name = "controller"

    def __init__(self, initial_rho: float) -> None:
        self.initial_rho = check_rho("rho", initial_rho)

    def bind(self, groups: RhoGroups) -> None:
        self.groups = groups

    @property
    def optimizer(self) -> RhoGroups:
        """:attr:`groups` under its samkit 0.2 name (a controller written then reads
        ``self.optimizer.param_groups``; the SAM object itself is never given)."""
        return self.groups

    def begin_step(self, view: StepView) -> None:
        return None

    def observe_validation(self, loss: float) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.initial_rho})"


class FollowLR(RhoController):
    r"""rho proportional to the learning rate, set before every step (GSAM, arXiv 2203.08065).

    .. math:: \rho_t = \rho_{min} + (\rho - \rho_{min})
              \frac{lr_t - lr_{min}}{lr_{max} - lr_{min}}

    with ``lr_max`` each group's peak learning rate as :class:`ProportionalRho`
    reads it (``OneCycleLR``'s ``max_lr``, else an LR scheduler's ``initial_lr``,
    else the lr when SAM is built). Unlike :class:`ProportionalRho` nothing
    needs stepping: SAM reads the current lr at each step.

    Args:
        rho: rho at the peak learning rate.
        rho_min: rho at ``lr_min`` (default 0).
        lr_min: the learning rate at which rho reaches ``rho_min`` (default 0).
        lr_max: the peak learning rate, for every group (default: each group's, as
            above; give it under a scheduler that records no peak, such as ``CyclicLR``).
    """

    name = "follow_lr"

    def __init__(
        self,
        rho: float = 0.05,
        *,
        rho_min: float = 0.0,
        lr_min: float = 0.0,
        lr_max: float | None = None,
    ) -> None:
        super().__init__(rho)
        self.rho_min = check_nonneg("rho_min", rho_min)
        self.lr_min = check_nonneg("lr_min", lr_min)
        self.lr_max = None if lr_max is None else check_pos("lr_max", lr_max)
        self.schedule: ProportionalRho | None = None

    def bind(self, groups: RhoGroups) -> None:
        super().bind(groups)
        self.schedule = ProportionalRho(
            groups, rho_min=self.rho_min, lr_min=self.lr_min, lr_max=self.lr_max
        )

    def begin_step(self, view: StepView) -> None:
        if self.schedule is None:
            raise RuntimeError(
                "FollowLR is used by a SAM optimizer only: pass it as SAM(..., rho=FollowLR(...))"
            )
        self.schedule.step()

    def state_dict(self) -> dict[str, Any]:
        return {} if self.schedule is None else self.schedule.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.schedule is not None and state:
            self.schedule.load_state_dict(dict(state))

    def __repr__(self) -> str:
        return (
            f"FollowLR(rho={self.initial_rho}, rho_min={self.rho_min}, lr_min={self.lr_min}, "
            f"lr_max={self.lr_max})"
        )
