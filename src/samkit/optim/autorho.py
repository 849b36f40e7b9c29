r"""Self-tuning rho: controllers that choose SAM's radius as training goes.

``SAM(base, rho="auto")`` builds :func:`default_controller`; ``rho="auto:<name>"``
picks a controller by name (:data:`CONTROLLERS`). Each is a
:class:`~samkit.optim.rho.RhoController`: SAM calls ``begin_step(view)``
before every ascent, and the training loop may report validation losses
through ``opt.observe_validation(loss)`` (samkit's trainer does; without it
every controller still works).

Every controller keeps one scalar radius :math:`\rho_t` and writes
:math:`\rho_t \cdot s_g` into each param group, where :math:`s_g` is the
group's rho at construction divided by the controller's starting radius
(1 unless a group set its own rho; a group with rho 0 stays unperturbed).
The starting radius is 0.05 for SAM and 0.5 for ASAM (``adaptive=True``),
samkit's defaults; ``rho=0`` is exactly the base optimizer.

Controllers:

* :class:`LossEquated` (LE-SAM, Wang et al., arXiv 2605.10183): the radius
  that raises the linearised loss by a fixed budget,
  :math:`\rho_t = \min(\sigma_t / (\lVert g_t \rVert + \varrho), \rho_{max})`.
* :class:`ValidationPlateau` (ours): start at the default radius and raise it
  whenever the validation loss stops improving (overfitting is what SAM's
  radius regularises against); without validation it is plain SAM.
* :class:`ValidationSearch` (ours, after LETS, Wang et al., arXiv
  2408.08222): a finite-difference estimate, across epochs, of how the
  validation loss responds to :math:`\log\rho`, followed downhill.

Under DDP every replica writes the same radius: the gradient norm they read
is averaged over the process group (:meth:`StepView.sq_grad_norm`), and a
reported validation loss is summed over the group at the next step, so a
loss reported on rank 0 only reaches every replica.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from typing import TYPE_CHECKING, Any, cast

import torch

from .._checks import check_int, check_nonneg, check_pos, is_number
from . import _ddp
from .holdback import HeldBack
from .rho import RhoController

Tensor = torch.Tensor

if TYPE_CHECKING:  # pragma: no cover
    from .view import RhoGroups, StepView

__all__ = [
    "AutoRho",
    "NoValidationWarning",
    "GradientAgreement",
    "LossEquated",
    "ValidationPlateau",
    "ValidationSearch",
    "CONTROLLERS",
    "DEFAULT_CONTROLLER",
    "default_controller",
    "controller_from_name",
]

#: Starting radius of an automatic controller: samkit's fixed-rho defaults.
START_RHO = {"l2": 0.05, "adaptive": 0.5}

#: Gradient entries up to which GradientAgreement gathers its sketch from one copy of the
#: whole gradient rather than tensor by tensor.
FLAT_LIMIT = 1 << 20

#: Steps without a validation report after which a validation controller warns.
WARN_AFTER = 1000


class NoValidationWarning(UserWarning):
    """A validation-driven rho controller has been told no validation loss."""


class AutoRho(RhoController):
    """Base class: one radius ``rho_t``, written as ``rho_t * s_g`` into every group.

    Subclasses implement :meth:`next_rho` (called at every step with the
    step's view) and may use :meth:`observe_validation`. Their state lives in
    attributes named in ``_STATE`` (plain Python numbers, saved exactly).

    A controller that learns from validation (``uses_validation``) and has
    been told no validation loss in its first ``warn_after`` steps warns once
    (:class:`NoValidationWarning`, naming ``observe_validation``): until a loss
    is reported it is SAM at a fixed radius. ``warn_after=None`` silences it.
    """

    name = "auto"
    uses_validation = False
    learns_without_validation = False
    _STATE: tuple[str, ...] = ()

    def __init__(self, rho: float | None = None, *, warn_after: int | None = WARN_AFTER) -> None:
        super().__init__(START_RHO["l2"] if rho is None else rho)
        self._rho_given = rho is not None
        self.rho = self.initial_rho
        self.scales: list[float] = []
        # reported since the last step: the validation losses' sum and count, then the
        # held-back losses' (opt.hold_back), which count only in a loop that reports none
        self._pending = [0.0, 0.0, 0.0, 0.0]
        self.warn_after = None if warn_after is None else check_int("warn_after", warn_after, 1)
        # steps before the first validation report (None once one arrived or the warning
        # was given); not saved: a resumed run counts again, and warns at most once more
        self._unreported: int | None = 0
        self._counted: int | None = None  # the SAM step last counted (mSAM: once per step)
        self._held = HeldBack()  # opt.hold_back's samples (docs/autorho.md)
        self._fresh: dict[str, Any] | None = None  # the state at bind (see load_state_dict)
        # the loop has reported a validation loss (then held-back losses are not reported)
        self._validated = False
        self._warned_both = False  # (not saved: a resumed run may say it once more)

    # ---- SAM's side of the protocol
    def bind(self, groups: RhoGroups) -> None:
        super().bind(groups)
        self.scales = [self._scale(g[groups.rho_key]) for g in groups.param_groups]
        self._bind(groups)
        self._fresh = _copy(self.state_dict())  # (what a fixed-rho checkpoint loads)

    def _bind(self, groups: RhoGroups) -> None:
        """A subclass's own settings read from the groups at bind (before ``_fresh``)."""

    def adapt_to(self, *, adaptive: bool) -> None:
        """Called by SAM before :meth:`bind`: the starting radius for ASAM when none was given."""
        if adaptive and not self._rho_given:
            self.initial_rho = self.rho = START_RHO["adaptive"]
        # before SAM touches the groups: a ceiling given below this start is refused
        _check_ceiling(getattr(self, "rho_max", None), self.initial_rho)

    def _scale(self, group_rho: float) -> float:
        return float(group_rho) / self.initial_rho if self.initial_rho > 0 else 0.0

    def begin_step(self, view: StepView) -> None:
        # A non-finite gradient (a GradScaler overflow) makes a step that will be
        # skipped: learn nothing from it, keep any validation report for later.
        if not self._finite(view):
            self._write()
            return
        if self.uses_validation:
            self._gather_validation(view)
            if not self.learns_without_validation:
                self._check_reported(view.steps)
        if self.initial_rho > 0:
            self.rho = self.next_rho(view)
        self._write()

    def _finite(self, view: StepView) -> bool:
        """Whether the step's gradient is finite (a subclass that guards its own reads may
        answer without reading the whole gradient's norm)."""
        return math.isfinite(float(view.sq_grad_norm()))

    def _write(self) -> None:
        key = self.groups.rho_key
        groups = self.groups.param_groups
        while len(self.scales) < len(groups):  # groups added after construction
            self.scales.append(self._scale(groups[len(self.scales)][key]))
        for group, scale in zip(groups, self.scales):
            group[key] = self.rho * scale

    def next_rho(self, view: StepView) -> float:
        raise NotImplementedError

    # ---- validation feedback
    def observe_validation(self, loss: float) -> None:
        value = reported_loss(loss)
        if self.uses_validation and value is not None:
            if not self._validated and self._held.fraction is not None:
                self._both_reported()
            self._validated = True
            self._add_report(value)

    def _add_report(self, value: float, *, held: bool = False) -> None:
        at = 2 if held else 0
        if not math.isfinite(self._pending[at] + value):  # (two finite losses near 1e308)
            warnings.warn(
                f"{'hold_back' if held else 'observe_validation'}: the loss {value!r} is too "
                "large to average with the losses reported before the next step (their sum "
                "overflows) and is ignored",
                RuntimeWarning,
                stacklevel=_caller_level(),
            )
            return
        self._pending[at] += value
        self._pending[at + 1] += 1.0

    def _both_reported(self) -> None:
        """A loop that reports validation losses and holds samples back: say, once, that
        the validation losses take precedence (averaged, they mixed an evaluation in eval
        mode with training-mode losses of other epochs)."""
        if not self._warned_both:
            self._warned_both = True
            warnings.warn(
                "rho='auto': this loop reports validation losses (observe_validation) and "
                "holds samples back (hold_back); the validation losses take precedence, and "
                "the held-back samples' losses are not reported from now on (they are still "
                "kept out of training). Use one or the other.",
                RuntimeWarning,
                stacklevel=_caller_level(),
            )

    def hold_back(
        self, losses: Tensor, ids: Any, fraction: float, *, at_w: bool, step: int, epoch: Any
    ) -> Tensor:
        """SAM.hold_back: the mean loss of the samples kept for training; the held-back
        samples' mean loss at ``w`` over each epoch is reported as a validation loss."""
        if not self.uses_validation:
            raise ValueError(
                f"Invalid rho value: {self.name!r} learns nothing from held-back samples "
                "(hold_back needs a controller that learns from validation, such as the "
                "default rho='auto')"
            )
        trained, report = self._held.take(losses, ids, fraction, at_w=at_w, step=step, epoch=epoch)
        if self._held.count:  # held-back losses recorded, reported once an epoch: no
            self._unreported = None  # warning that nothing is reported
        if self._validated:  # (the loop reports validation losses: they take precedence)
            self._both_reported()
        elif report is not None:
            self._add_report(report, held=True)
        return trained

    def _gather_validation(self, view: StepView) -> None:
        """Apply the losses reported since the last step (summed over replicas under DDP)."""
        total, count, held_total, held_count = self._pending
        if view.distributed:
            # Every step, so replicas that were told nothing still take part:
            # a loss reported on one rank only reaches all of them, never a hang.
            # (With them, whether any replica's loop reports validation losses.)
            total, count, held_total, held_count, validated = _ddp.sum_scalars(
                [*self._pending, float(self._validated)], view.process_group
            )
            self._validated = validated > 0
        self._pending = [0.0, 0.0, 0.0, 0.0]
        if not self._validated:  # (then no validation loss is pending: the held-back's)
            total, count = held_total, held_count
        elif held_count > 0:  # (held back on a replica before it knew: not used)
            self._both_reported()
        if count > 0 and not math.isfinite(total):  # (the replicas' sum overflowed)
            warnings.warn(
                "observe_validation: the validation losses reported on the replicas are too "
                "large to average (their sum overflows) and are ignored",
                RuntimeWarning,
                stacklevel=_caller_level(),
            )
        elif count > 0:
            self._unreported = None
            self.on_validation(total / count)

    def _check_reported(self, step: int) -> None:
        if self._unreported is None or self.warn_after is None or step == self._counted:
            return  # (mSAM begins each micro-batch of one step: that step counts once)
        self._counted = step
        self._unreported += 1
        if self._unreported >= self.warn_after:
            self._unreported = None
            warnings.warn(
                f"rho='auto' ({self.name}) learns from validation losses and none has been "
                f"reported in {self.warn_after} steps: until one is, this is SAM with the fixed "
                f"radius {self.rho:g}. Report each evaluation with "
                "opt.observe_validation(val_loss) (samkit's trainer, Lightning and the Hugging "
                "Face callback do), or use rho='auto', the default, which learns from the "
                "gradients without reports; warn_after=None silences this.",
                NoValidationWarning,
                stacklevel=_caller_level(),
            )

    def on_validation(self, loss: float) -> None:
        return None

    # ---- state
    def state_dict(self) -> dict[str, Any]:
        state = {k: getattr(self, k) for k in ("rho", "initial_rho", *self._STATE)}
        state["scales"] = list(self.scales)
        # (the held-back losses' pair only where some are pending: a state of 0.3 has two)
        state["pending"] = list(self._pending[:2] if self._pending[3] == 0 else self._pending)
        if self._held.fraction is not None:
            state["held"] = self._held.state_dict()
        if self._validated:
            state["validated"] = True
        return {"name": self.name, **_copy(state)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:  # a state dict from before this controller existed: start afresh
            fresh = getattr(self, "_fresh", None)
            if fresh is None:  # (not bound yet: fresh already)
                return
            state = _copy(fresh)
        if not isinstance(state, dict) or state.get("name") != self.name:
            raise ValueError(
                f"Invalid state value: a rho controller state for {state.get('name')!r}, "
                f"not {self.name!r}"
                if isinstance(state, dict)
                else "Invalid state value: the rho controller state is not a dict"
            )
        keys = ("rho", "initial_rho", "scales", "pending", *self._STATE)
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(f"Invalid state value: the {self.name} state has no {missing}")
        values = {k: _copy(state[k]) for k in keys}
        _check_state(self.name, values)
        if len(values["scales"]) > len(self.scales) and getattr(self, "groups", None) is not None:
            raise ValueError(
                f"Invalid state value: {self.name} scales for {len(values['scales'])} param "
                f"groups, this optimizer has {len(self.scales)}"
            )
        # groups the saved run had not stepped with yet keep this optimizer's scales
        values["scales"] += self.scales[len(values["scales"]) :]
        held = HeldBack()
        if "held" in state:  # (checked before anything is changed)
            held.load_state_dict(_copy(state["held"]))
        validated = state.get("validated", False)
        if type(validated) is not bool:
            raise ValueError(
                f"Invalid state value: {self.name} validated = {validated!r} (expected a bool)"
            )
        self._held, self._validated = held, validated
        for k, v in values.items():
            if k == "pending":
                self._pending = v + [0.0, 0.0] if len(v) == 2 else v
            else:
                setattr(self, k, v)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rho={self.initial_rho})"


_INTERNAL = (
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),  # samkit
    os.path.dirname(os.path.abspath(torch.__file__)),  # torch's step wrappers
)


def _caller_level() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside samkit and torch."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level


def reported_loss(loss: Any) -> float | None:
    """A validation loss given to ``observe_validation``, as a float: a number or a
    one-element tensor or array (anything else is a ValueError naming ``loss``). A non-finite
    one (an evaluation of a diverged model) is None, with a warning: a controller learns
    nothing from it, and a loop that reports NaN is told so rather than left to think it
    reported."""
    if not isinstance(loss, torch.Tensor) and hasattr(loss, "__array__") and not is_number(loss):
        try:  # (a NumPy, JAX or TensorFlow array: read as a tensor, checked as one)
            loss = torch.as_tensor(loss.__array__())
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(
                f"Invalid loss value: {loss!r:.200} (the validation loss: a number)"
            ) from None
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1 or loss.dtype == torch.bool or loss.is_complex():
            raise ValueError(
                f"Invalid loss value: a {loss.dtype} tensor of shape {tuple(loss.shape)} (the "
                "validation loss: a number or a one-element real tensor)"
            )
        value = float(loss.detach().reshape(()).item())
    elif is_number(loss):
        try:
            value = float(loss)
        except OverflowError:  # an int beyond float's range
            value = math.inf
    else:
        raise ValueError(f"Invalid loss value: {loss!r} (the validation loss: a number)")
    if not math.isfinite(value):
        warnings.warn(
            f"observe_validation: the validation loss {value!r} is not finite and is ignored "
            "(the radius learns nothing from this evaluation)",
            RuntimeWarning,
            stacklevel=_caller_level(),
        )
        return None
    return value


def _improves(loss: float, best: float | None, tol: float) -> bool:
    """Whether ``loss`` improves on ``best`` by the relative ``tol`` (for a negative best too:
    ``(1 - tol) * best`` would then lie above it, and a worse loss would count as better)."""
    if best is None:
        return True
    return loss < ((1.0 - tol) * best if best >= 0 else (1.0 + tol) * best)


def _check_tol(tol: Any) -> float:
    """The relative improvement that counts: below 1 (at 1 or above every report would be a
    plateau)."""
    value = check_nonneg("tol", tol)
    if value >= 1.0:
        raise ValueError(f"Invalid tol value: {tol!r} (a relative improvement: must be < 1)")
    return value


def _check_ceiling(rho_max: float | None, start: float) -> None:
    """A ceiling below the starting radius would pull the radius down at the first raise."""
    if rho_max is not None and rho_max < start:
        raise ValueError(
            f"Invalid rho_max value: {rho_max!r} is below the starting radius {start!r} "
            "(the ceiling the radius may rise to)"
        )


def _parameters(groups: RhoGroups) -> list[Tensor]:
    """The param groups' parameters end to end (the positions a saved sketch layout uses)."""
    return [p for g in groups.param_groups for p in g["params"]]


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_copy(v) for v in value]
    return value


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _cosine(v: Any) -> bool:
    """An average of cosines (a rounding above 1 included)."""
    return _finite(v) and abs(v) <= 1.0 + 1e-6


def _count(v: Any) -> bool:
    return _finite(v) and v >= 0 and float(v).is_integer()


#: What each saved field may hold (a state dict is a file a user hands us: checked, not
#: trusted): numbers in their range, None only where the controller starts with None.
_STATE_RULES: dict[str, tuple[str, Any]] = {
    "rho": ("a number >= 0", lambda v: _finite(v) and v >= 0),
    "initial_rho": ("a number >= 0", lambda v: _finite(v) and v >= 0),
    "scales": ("numbers >= 0", lambda v: all(_finite(x) and x >= 0 for x in v)),
    "pending": (
        "a sum and a count, or two of them",
        lambda v: (
            len(v) in (2, 4) and all(_finite(x) for x in v[::2]) and all(map(_count, v[1::2]))
        ),
    ),
    "log_rho": ("a number", _finite),
    "agreement": ("a number in [-1, 1]", lambda v: _cosine(v)),
    "peak": ("None or a number in [-1, 1]", lambda v: v is None or _cosine(v)),
    "seen": ("a count", _count),
    # (NaN: a coordinate of a tensor that had no gradient in that step, see GradientAgreement)
    "previous": ("numbers or NaN", lambda v: all(_finite(x) or x != x for x in v)),
    "best": ("None or a number", lambda v: v is None or _finite(v)),
    "bad": ("a count", _count),
    "sigma": ("None or a number >= 0", lambda v: v is None or (_finite(v) and v >= 0)),
    "rho_max": ("a number > 0", lambda v: _finite(v) and v > 0),
    "norm_sum": ("a number >= 0", lambda v: _finite(v) and v >= 0),
    "norm_count": ("a count", _count),
    "lr0": ("None or a number >= 0", lambda v: v is None or (_finite(v) and v >= 0)),
    "center": ("a number >= 0", lambda v: _finite(v) and v >= 0),
    "arm": ("-1, 0 or 1", lambda v: _finite(v) and v in (-1, 0, 1)),
    "last": ("None or a number", lambda v: v is None or _finite(v)),
    "deltas": ("up to 3 numbers", lambda v: len(v) <= 3 and all(_finite(x) for x in v)),
}
_LISTS = ("scales", "pending", "previous", "deltas")


def _check_state(name: str, values: dict[str, Any]) -> None:
    for key, value in values.items():
        what, ok = _STATE_RULES[key]
        if key in _LISTS and not isinstance(value, list):
            ok = None
        if ok is None or not ok(value):
            raise ValueError(f"Invalid state value: {name} {key} = {value!r} (expected {what})")


# --------------------------------------------------------------------- LE-SAM
class LossEquated(AutoRho):
    r"""LE-SAM: a fixed budget of loss increase instead of a fixed radius
    (Wang, Liu, Xie, Gao, "Fix the Loss, Not the Radius", ICML 2026, arXiv 2605.10183).

    .. math::

        \rho_t = \min\Big(\frac{\sigma_t}{\lVert g_t \rVert + \varrho},\ \rho_{max}\Big),
        \qquad e_t = \rho_t \frac{g_t}{\lVert g_t \rVert}

    so the first-order rise of the loss, :math:`g_t^\top e_t = \rho_t \lVert g_t
    \rVert`, is the budget :math:`\sigma_t` whatever the gradient's size.

    The paper sets :math:`\sigma` by hand (0.35 for a ResNet-18 on CIFAR-100)
    and anneals it to zero over the last epochs. Here, when ``sigma`` is not
    given, it is *calibrated*: for the first ``calibration_steps`` steps
    :math:`\rho_t = \rho` (the starting radius) while the mean
    :math:`\overline{\lVert g \rVert}` is recorded, then :math:`\sigma =
    \rho\, \overline{\lVert g \rVert}`: the budget SAM's default radius spends
    at the start of training. The paper's annealing is optional and follows the
    learning rate (``anneal="lr"``: :math:`\sigma_t = \sigma \cdot lr_t / lr_0`,
    ``lr_0`` the first group's learning rate at construction), because a
    controller does not know how many steps are left; ``anneal=None`` (the
    default) keeps :math:`\sigma`.

    Args:
        rho: the starting radius (default 0.05; 0.5 for ASAM).
        sigma: the loss budget; None (default) calibrates it as above.
        rho_max: the ceiling on :math:`\rho_t` (default ``10 * rho``).
        calibration_steps: steps that measure :math:`\overline{\lVert g \rVert}` (default 200).
        anneal: ``"lr"`` or None (default).
        stability: :math:`\varrho` (default 1e-12).

    With ASAM the gradient norm read is :math:`\lVert g \rVert`, not
    :math:`\lVert T g \rVert`, so the budget is kept in proportion only.
    """

    name = "loss_equated"
    _STATE = ("sigma", "rho_max", "norm_sum", "norm_count", "lr0")

    def __init__(
        self,
        rho: float | None = None,
        *,
        sigma: float | None = None,
        rho_max: float | None = None,
        calibration_steps: int = 200,
        anneal: str | None = None,
        stability: float = 1e-12,
    ) -> None:
        super().__init__(rho)
        self.sigma = None if sigma is None else check_pos("sigma", sigma)  # 0: SAM turned off
        self._rho_max_given = rho_max is not None
        self.rho_max = check_pos("rho_max", rho_max) if rho_max is not None else None
        self.calibration_steps = check_int("calibration_steps", calibration_steps, 1)
        if anneal not in ("lr", None):
            raise ValueError(f"Invalid anneal value: {anneal!r} (expected 'lr' or None)")
        self.anneal = anneal
        self.stability = check_pos("stability", stability)
        self.norm_sum, self.norm_count = 0.0, 0
        self.lr0: float | None = None

    def _bind(self, groups: RhoGroups) -> None:
        _check_ceiling(self.rho_max, self.initial_rho)
        if self.rho_max is None:
            self.rho_max = 10.0 * self.initial_rho
        group = groups.param_groups[0]
        self.lr0 = float(group.get("initial_lr", group["lr"]))

    def next_rho(self, view: StepView) -> float:
        norm: float = float(view.sq_grad_norm()) ** 0.5
        if self.sigma is None:
            self.norm_sum += norm
            self.norm_count += 1
            if self.norm_count < self.calibration_steps:
                return self.initial_rho
            self.sigma = self.initial_rho * self.norm_sum / self.norm_count
        sigma = self.sigma * self._anneal_factor()
        assert self.rho_max is not None  # (set by bind)
        return min(sigma / (norm + self.stability), self.rho_max)

    def _anneal_factor(self) -> float:
        if self.anneal != "lr" or not self.lr0:
            return 1.0
        return max(float(self.groups.param_groups[0]["lr"]) / self.lr0, 0.0)

    def __repr__(self) -> str:
        return (
            f"LossEquated(rho={self.initial_rho}, sigma={self.sigma}, rho_max={self.rho_max}, "
            f"anneal={self.anneal!r})"
        )


# ---------------------------------------------------------- gradient agreement
class GradientAgreement(AutoRho):
    r"""The radius from how well successive batches agree, and from validation when told (ours).

    While a network learns what generalises, the gradients of different
    batches point the same way; once it starts fitting what each batch alone
    says (noisy labels, memorisation) they stop agreeing: the coherent-gradients
    account of generalisation (Chatterjee, ICLR 2020), and gradient disparity
    as an early-stopping signal that needs no validation set (Forouzesh and
    Thiran, ECML 2021). That is the moment a validation loss shows as a
    plateau, and the moment SAM's radius should grow. Every step has two
    successive batch gradients for free, so the controller reads

    .. math::

        c_t = \cos(g_t, g_{t-1}), \qquad \bar c_t = \text{EMA}_\beta(c_t), \qquad
        q_t = \bar c_t / \max_{s \le t} \bar c_s

    (``q``: the agreement relative to its best so far, scale-free across
    models, data and batch sizes) and integrates it into the log-radius:

    .. math::

        \log \rho_{t+1} = \log \rho_t + \text{rate} \cdot
        \begin{cases}
            \log(q_0 / q_t) & q_t < q_0 \quad \text{(batches disagree: up)} \\
            d_t \log(q_1 / q_t) & q_t > q_1 \quad \text{(they agree as at best: down)} \\
            0 & \text{otherwise}
        \end{cases}

    within ``[low, high]`` x the starting radius :math:`\rho_0`, with
    :math:`d_t = 1` above :math:`\rho_0` and ``down`` below it. Integrating
    (rather than mapping ``q`` to a radius) averages out the step-to-step
    noise of :math:`c_t`; the band :math:`[q_0, q_1]` holds the radius while
    training goes as usual. A radius too large to train with leaves a loss
    every batch agrees on, so it comes back down as fast as it went up; below
    the start it goes down four times slower, because early in training,
    when batches agree most, a radius cut at once let a network that SAM had
    steadied fall apart (the MNIST-1D CNN at lr 0.1, seen in the pilot). At
    the defaults a sustained :math:`q = 0.3` raises the radius 20-fold in
    about 430 steps, :math:`q = 1` brings it from 20x back to the start in
    about 2,800 and then 5-fold below it in about 6,100.

    **Validation, when reported** (``opt.observe_validation(loss)``, as
    samkit's trainer, Lightning's callback and the Hugging Face trainer do):
    each plateau of the validation loss (``patience`` reports without a
    relative improvement of ``tol``) multiplies the radius by ``factor``, as
    :class:`ValidationPlateau` does; both signals move the one radius. Without
    reports it learns from the gradients alone, and does not warn.

    The cosine is read on a fixed sketch of ``sketch`` gradient coordinates
    (evenly strided over the parameters): the state is that many numbers, not
    a copy of the weights, and a step costs a gather, three dot products of
    that length and one host read. For the first ``warmup`` steps the radius
    is the starting one while :math:`\bar c` settles. Under DDP (a local first
    pass) the sketch is averaged over the replicas, under FSDP2 (each rank's sketch
    of its own shards) its dot products are summed over the ranks, and reports are
    summed, so every replica writes the same radius.

    Args:
        rho: the starting radius (default 0.05; 0.5 for ASAM).
        q0, q1: the band of relative agreement that holds the radius (default 0.6, 0.9).
        rate: the log-radius's gain per step (default 0.01).
        down: the gain's fraction on the way down (default 0.25).
        low, high: the radius's range, as multiples of the start (default
            0.2 and 20: 0.01 to 1.0 for SAM).
        beta: the decay of :math:`\bar c` (default 0.98).
        warmup: steps before the best agreement is tracked, at the starting
            radius (default 50, the average's window 1 / (1 - beta): a best
            taken from a few noisy cosines would be noise).
        sketch: gradient coordinates read per step (default 4096).
        min_agreement: the best :math:`\bar c` below which the gradients' rule
            holds the radius (default 0.05): where successive batches never
            agreed (nothing learnable, or noise that drowns it) there is no
            fall of agreement to read.
        factor, patience, tol: the validation plateau rule (default 1.5, 2, 1e-3).
    """

    name = "gradient_agreement"
    uses_validation = True
    learns_without_validation = True
    _STATE = ("log_rho", "agreement", "peak", "seen", "previous", "best", "bad")

    def __init__(
        self,
        rho: float | None = None,
        *,
        q0: float = 0.6,
        q1: float = 0.9,
        rate: float = 0.01,
        down: float = 0.25,
        low: float = 0.2,
        high: float = 20.0,
        beta: float = 0.98,
        warmup: int = 50,
        sketch: int = 4096,
        min_agreement: float = 0.05,
        factor: float = 1.5,
        patience: int = 2,
        tol: float = 1e-3,
    ) -> None:
        super().__init__(rho, warn_after=None)
        self.q0, self.q1 = check_pos("q0", q0), check_pos("q1", q1)
        if not self.q0 <= self.q1 <= 1.0:
            raise ValueError(f"Invalid q0/q1 value: {q0!r}/{q1!r} (need 0 < q0 <= q1 <= 1)")
        self.rate = check_pos("rate", rate)
        self.down = check_nonneg("down", down)
        self.low, self.high = check_pos("low", low), check_pos("high", high)
        if self.low > 1.0 or self.high < 1.0:
            raise ValueError(f"Invalid low/high value: {low!r}/{high!r} (need low <= 1 <= high)")
        if not 0.0 <= check_nonneg("beta", beta) < 1.0:
            raise ValueError(f"Invalid beta value: {beta!r} (must be in [0, 1))")
        self.beta = float(beta)
        self.warmup = check_int("warmup", warmup, 0)
        self.sketch = check_int("sketch", sketch, 2)
        self.min_agreement = check_pos("min_agreement", min_agreement)
        if self.min_agreement >= 1.0:  # a cosine's average never reaches it: never moves
            raise ValueError(f"Invalid min_agreement value: {min_agreement!r} (must be < 1)")
        self.factor = check_pos("factor", factor)
        if self.factor < 1:
            raise ValueError(f"Invalid factor value: {factor!r} (must be >= 1)")
        self.patience = check_int("patience", patience, 1)
        self.tol = _check_tol(tol)
        self.log_rho = 0.0  # log(rho / start)
        self.agreement = 0.0  # the EMA of c_t, before bias correction
        self.peak: float | None = None  # the best bias-corrected EMA after the warm-up
        self.seen = 0  # cosines folded into the EMA
        self.previous: list[float] = []  # the last sketch, as saved (see _last)
        self.best: float | None = None  # validation: the best loss so far
        self.bad = 0  # validation: reports in a row without improvement
        self._last: Tensor | None = None  # the last sketch, on the gradients' device
        # which of its coordinates are of tensors that had a gradient (None: all of them)
        self._last_mask: Tensor | None = None
        self._ranges: list[tuple[int, int]] = []  # each tensor's coordinates in the sketch
        self._layout: list[Tensor] = []  # the tensors the sketch is laid over (_tensors)
        self._layout_ids: list[int] = []  # (their ids: the check of every step)
        self._changed = False  # whether they changed at this step (_indices)
        self._saved_layout: list[int] | None = None  # a loaded layout's positions, until used
        self._last_sq: tuple[Tensor, float] | None = None  # a sketch and its squared norm
        self._index: list[Tensor] = []
        self._flat: Tensor | None = None  # the sketch's coordinates in the gradient end to end
        self._buffers: list[Tensor] = []  # two sketches, used in turn (see _buffer)
        # the tensors with gradients and their shapes, for which _index was computed
        self._shapes: tuple[list[int], list[torch.Size]] = ([], [])

    # ---- the sketch
    def _tensors(self, view: StepView) -> tuple[list[Tensor], list[Tensor | None], bool]:
        """The tensors the sketch is laid over (its layout) and their gradients this step,
        ``None`` for one without a gradient this step (a layer skipped, an expert or a head
        not used). The layout is every parameter that has had a gradient and still requires
        one, in the param groups' order: a tensor that never had one (an unused pooler) takes
        no coordinate; one without a gradient this step keeps its coordinates, and the
        cosine with the last sketch is read over the tensors with a gradient in both steps.
        The layout changes, with no cosine across the change, when a tensor has its first
        gradient or stops requiring one. (Under DDP or FSDP2, or in a view built by hand, the
        layout is the tensors with gradients this step: the replicas' could differ.) The
        last: whether every one of them has its gradient."""
        params, grads = view.params(), view.grads()
        if self._layout_ids and list(map(id, params)) == self._layout_ids:
            return params, list(grads), True  # (the layout's tensors, each with its gradient)
        groups = getattr(view, "groups", None)
        if (
            groups is None
            or getattr(view, "sharding", None) is not None
            or getattr(view, "distributed", False)
        ):
            return params, list(grads), True
        layout = self._layout
        every = _parameters(groups)
        if self._saved_layout is not None:  # resumed: the layout saved with the last sketch
            layout = [every[i] for i in self._saved_layout if i < len(every)]
            self._saved_layout = None
        at = {id(p): i for i, p in enumerate(every)}
        kept = [p for p in layout if p.requires_grad and id(p) in at]
        known = {id(p) for p in kept}
        new = [p for p in params if id(p) not in known]
        if new or len(kept) != len(layout):
            # other coordinates from this step on: a cosine with the last sketch, over the
            # old ones, would be noise (the next step compares with this one)
            layout = sorted(kept + new, key=lambda p: at[id(p)])
            self._forget()
        self._layout, self._layout_ids = layout, [id(p) for p in layout]
        if len(params) == len(layout):
            return params, list(grads), True
        given = {id(p): g for p, g in zip(params, grads)}
        return layout, [given.get(id(p)) for p in layout], False

    def _indices(
        self, params: list[Tensor], grads: list[Tensor | None], full: bool
    ) -> list[Tensor]:
        # (a tensor without a gradient is laid out by its parameter, of the same shape)
        like = (
            cast(list[Tensor], grads)
            if full
            else [g if g is not None else p for p, g in zip(params, grads)]
        )
        shapes = (list(map(id, params)), [t.shape for t in like])
        changed = shapes != self._shapes
        self._changed = changed and bool(self._shapes[0])
        if changed:
            if self._changed:
                # other tensors this step (a parameter frozen, unfrozen or added): the
                # sketch's coordinates change, and a cosine with the last sketch, over other
                # coordinates, would be noise: compare from the next step on
                self._forget()
            total = sum(t.numel() for t in like)
            stride = max(1, -(-total // self.sketch))
            index, starts, offset, ranges, at = [], [], 0, [], 0
            for t in like:
                first = (-offset) % stride  # the stride runs on across tensors
                # a tensor shorter than the stride's offset (an FSDP2 shard may even be empty)
                # contributes no coordinate
                end = max(first, t.numel())
                index.append(torch.arange(first, end, stride, device=t.device))
                ranges.append((min(at, self.sketch), min(at + index[-1].numel(), self.sketch)))
                at += index[-1].numel()
                starts.append(offset)
                offset += t.numel()
            self._index, self._shapes, self._ranges = index, shapes, ranges
            self._buffers = []  # (their zero tails are for the old coordinates' count)
            # Small models (a step of a millisecond or less): one gather from the gradient
            # laid end to end costs less than one per tensor; the same coordinates, so the
            # same numbers. Above FLAT_LIMIT the copy would cost more than it saves.
            self._flat = None
            kinds = {(t.device, t.dtype) for t in like}
            if like and total <= FLAT_LIMIT and kinds == {(like[0].device, torch.float32)}:
                self._flat = torch.cat([i + start for i, start in zip(index, starts)])
        return self._index

    def _read(self, view: StepView) -> tuple[Tensor, Tensor | None]:
        """The step's sketch, and which of its coordinates are of tensors with a gradient
        (None: all; the others are zeros in the sketch)."""
        params, grads, full = self._tensors(view)
        present = cast(list[Tensor], grads) if full else [g for g in grads if g is not None]
        device = present[0].device if present else torch.device("cpu")
        index = self._indices(params, grads, full)
        if self._flat is not None and full:
            # (torch's own flatten: the cat of the flattened gradients in one call, the same
            # numbers as torch.cat([g.reshape(-1) ...]) for less of a small model's step)
            whole = torch._C._nn.flatten_dense_tensors(present)
            vec = self._buffer(device)
            torch.index_select(whole, 0, self._flat, out=vec[: self._flat.numel()])
        else:
            pieces = [
                torch.zeros(i.numel(), device=device, dtype=torch.float32)
                if g is None
                else g.detach().reshape(-1).index_select(0, i).to(device, torch.float32)
                for g, i in zip(grads, index)
                if i.numel()
            ]
            flat = torch.cat(pieces) if pieces else torch.zeros(0, device=device)
            if flat.numel() >= self.sketch:
                vec = flat[: self.sketch]
            else:
                vec = self._buffer(device)
                vec[: flat.numel()] = flat
        if view.local and view.sharding is None and view.distributed:
            # DDP, local first pass: the same coordinates on every replica, averaged (under
            # FSDP2 each rank's are of its own shards: their dot products are summed instead).
            # With them, whether the tensors with gradients changed on any replica (a layer
            # skipped on one): then none compares with its last sketch, so all read the same
            changed = torch.tensor([float(self._changed)], device=vec.device)
            _ddp.average_([vec, changed], view.process_group, foreach=False)
            if not self._changed and changed.item() > 0:
                self._forget()
        mask = None
        if not full:
            mask = torch.ones(self.sketch, device=device, dtype=torch.float32)
            for g, (start, end) in zip(grads, self._ranges):
                if g is None and start < end:
                    mask[start:end] = 0.0
        return vec, mask

    def _forget(self) -> None:
        """No last sketch: the next step compares with none (its coordinates changed, or the
        last gradient was not finite)."""
        self._last, self._last_sq, self._last_mask, self.previous = None, None, None, []

    def _buffer(self, device: torch.device) -> Tensor:
        """A sketch-long buffer, zero past the coordinates written into it, that is not the
        last sketch (which the next cosine still reads): two, used in turn. Allocating a
        fresh one each step cost a small model as much as the gather."""
        buffers = self._buffers
        if not buffers or buffers[0].device != device:
            # float32 whatever the default dtype (the sketch is read as float32, and a resumed
            # one comes back as float32: a float64 default made the dot fail after a resume)
            buffers[:] = [
                torch.zeros(self.sketch, device=device, dtype=torch.float32) for _ in range(2)
            ]
        return buffers[1] if buffers[0] is self._last else buffers[0]

    def _finite(self, view: StepView) -> bool:
        # Where a non-finite gradient skips the step, learn nothing from it (the base
        # rule: one norm of the whole gradient); elsewhere SAM steps with it anyway, and
        # next_rho only guards its own numbers, which saves that norm on every step.
        return super()._finite(view) if view.skips_nonfinite else True

    # ---- the rule
    def relative(self) -> float | None:
        """:math:`q_t`, the agreement relative to its best (None during the warm-up, and
        while the best is below ``min_agreement``: batches that never agreed give nothing
        to compare with, and a ratio to a best that is noise would be noise)."""
        if self.peak is None or self.peak < self.min_agreement or self.seen == 0:
            return None
        current = self.agreement / (1.0 - self.beta**self.seen)
        return current / self.peak

    def next_rho(self, view: StepView) -> float:
        vec, mask = self._read(view)
        last, last_mask = self._last, self._last_mask
        if last is None and len(self.previous) == self.sketch:  # resumed from a state dict
            saved = torch.tensor(self.previous, dtype=torch.float32, device=vec.device)
            gaps = saved.isnan()  # (the coordinates of tensors that had no gradient)
            last = saved.nan_to_num(0.0)
            last_mask = (~gaps).float() if bool(gaps.any()) else None
        known = self._last_sq
        self._last_sq = None
        # the coordinates of tensors with a gradient in both steps (None: all of them)
        common = last_mask if mask is None else mask if last_mask is None else mask * last_mask
        if last is not None and last.shape == vec.shape:
            # ||last||^2 was read a step ago as that step's ||vec||^2 (the same dot of the same
            # numbers, so the same bits): one dot fewer on the steps that follow a comparison
            reuse = common is None and known is not None and known[0] is last
            if common is None:
                dots = [torch.dot(vec, last), torch.dot(vec, vec)]
            else:  # (the missing coordinates are zeros in their own sketch: out of the dot)
                dots = [torch.dot(vec, last), torch.dot(vec * common, vec)]
            if not reuse:
                dots.append(
                    torch.dot(last, last) if common is None else torch.dot(last * common, last)
                )
            if common is not None:
                dots.append(torch.dot(vec, vec))  # (whether this sketch is zero)
            if view.sharding is not None and view.distributed:
                # FSDP2: each rank's sketch holds coordinates of its own shards, so the dot
                # products of the whole sketch are the sums of the ranks' (averaging the
                # sketches mixed unrelated coordinates: a cosine of nothing)
                numbers = view.sharding.reduce_(torch.stack(dots)).tolist()
            elif vec.device.type == "cpu":
                numbers = [d.item() for d in dots]  # (cheaper than a stack and one read)
            else:
                numbers = torch.stack(dots).tolist()  # (one host synchronisation, not three)
            if reuse:
                dot, a = numbers
                b = known[1]  # type: ignore[index]
            else:
                dot, a, b = numbers[:3]
            whole = a if common is None else numbers[3]  # ||vec||^2
            if not math.isfinite(dot + a + b + whole):  # a non-finite gradient SAM steps with:
                # learn nothing, compare the next with none
                self._forget()
                return self.initial_rho * math.exp(self.log_rho)
            if whole == 0.0:
                # a zero sketch (a batch held back whole) agrees with nothing and disagrees
                # with nothing: no cosine, and the next step compares with the last sketch
                self._last, self._last_mask, self.previous = last, last_mask, []
                self._last_sq = (last, b) if common is None else None
                return self._rho_after(self.relative())
            self._last_sq = (vec, a) if common is None else None
            if a > 0 and b > 0:  # (else no tensor with a gradient in both: no cosine)
                cos = dot / math.sqrt(a * b)
                self.agreement = self.beta * self.agreement + (1.0 - self.beta) * cos
                self.seen += 1
                if self.seen >= self.warmup:
                    current = self.agreement / (1.0 - self.beta**self.seen)
                    self.peak = current if self.peak is None else max(self.peak, current)
        self._last, self._last_mask, self.previous = vec, mask, []
        return self._rho_after(self.relative())

    def _rho_after(self, q: float | None) -> float:
        """The radius after this step's move on ``q`` (none while it is None)."""
        if q is not None:
            q = max(q, 1e-3)
            if q < self.q0:
                drive = math.log(self.q0 / q)
            elif q > self.q1:
                # back down to the start as fast as up; below it, slowly (see the docstring)
                drive = math.log(self.q1 / q) * (1.0 if self.log_rho > 0 else self.down)
            else:
                drive = 0.0
            self._move(self.rate * drive)
        return self.initial_rho * math.exp(self.log_rho)

    def _move(self, step: float) -> None:
        self.log_rho = min(max(self.log_rho + step, math.log(self.low)), math.log(self.high))

    def on_validation(self, loss: float) -> None:
        if _improves(loss, self.best, self.tol):
            self.best, self.bad = loss, 0
            return
        self.bad += 1
        if self.bad >= self.patience:
            self._move(math.log(self.factor))
            self.bad = 0

    # ---- state: the sketch is saved as numbers
    def state_dict(self) -> dict[str, Any]:
        if self._last is not None:
            last = self._last
            if self._last_mask is not None:  # (NaN: a tensor without a gradient in that step)
                last = torch.where(self._last_mask > 0, last, math.nan)
            self.previous = last.tolist()
        state = super().state_dict()
        if self._last is not None:
            self.previous = []
        if self._saved_layout is not None:
            state["layout"] = list(self._saved_layout)
        elif self._layout and getattr(self, "groups", None) is not None:
            # the tensors the sketch is laid over, as positions in the groups' parameters
            at = {id(p): i for i, p in enumerate(_parameters(self.groups))}
            state["layout"] = [at[id(p)] for p in self._layout if id(p) in at]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        previous = state.get("previous") if isinstance(state, dict) else None
        if isinstance(previous, list) and previous and len(previous) != self.sketch:
            raise ValueError(
                f"Invalid state value: {self.name} previous has {len(previous)} numbers, "
                f"not sketch={self.sketch}"
            )
        layout = state.get("layout") if isinstance(state, dict) else None
        if layout is not None:
            groups = getattr(self, "groups", None)
            count = len(_parameters(groups)) if groups is not None else None
            if not (
                isinstance(layout, list)
                and all(type(i) is int and i >= 0 for i in layout)
                and all(a < b for a, b in zip(layout, layout[1:]))
                and (count is None or not layout or layout[-1] < count)
            ):
                raise ValueError(
                    f"Invalid state value: {self.name} layout = {layout!r:.200} (expected "
                    "increasing positions of this optimizer's parameters)"
                )
        super().load_state_dict(state)
        self._last, self._last_mask = None, None  # (the loaded sketch is in previous)
        self._layout, self._layout_ids = [], []
        self._saved_layout = list(layout) if layout is not None else None

    def __repr__(self) -> str:
        return (
            f"GradientAgreement(rho={self.initial_rho}, q0={self.q0}, q1={self.q1}, "
            f"rate={self.rate}, low={self.low}, high={self.high})"
        )


# ----------------------------------------------------------- validation plateau
class ValidationPlateau(AutoRho):
    r"""Raise the radius when the validation loss stops improving (ours).

    SAM's radius trades fitting the training set for flatness; the moment to
    spend more of it is when the model starts fitting what does not
    generalise, which the validation loss shows as a plateau or a rise. Each
    reported validation loss :math:`v_k` is compared with the best so far:

    .. math::

        \text{if } v_k > (1 - \text{tol})\, v^\star \text{ for ``patience'' reports in a row:}
        \quad \rho \leftarrow \min(\rho \cdot \text{factor},\ \rho_{max})

    (the counter then restarts), like ``ReduceLROnPlateau`` turned around. The
    radius never decreases: a plateau that more flatness cannot fix ends at
    ``rho_max``. Without validation reports it is SAM at the starting radius.

    Args:
        rho: the starting radius (default 0.05; 0.5 for ASAM).
        factor: the multiplier per plateau (default 1.5).
        patience: reports without improvement before raising (default 2).
        tol: the relative improvement that counts (default 1e-3).
        rho_max: the ceiling (default ``8 * rho``).
        warn_after: steps without a validation report before one warning
            (default 1000; None: never).

    Example (a report applies at the next step):

    >>> import torch, samkit
    >>> model = torch.nn.Linear(2, 1)
    >>> base = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> opt = samkit.SAM(base, rho="auto:validation_plateau")
    >>> x, y = torch.randn(8, 2), torch.randn(8, 1)
    >>> def closure():
    ...     loss = torch.nn.functional.mse_loss(model(x), y)
    ...     loss.backward()
    ...     return loss
    >>> for val_loss in [1.0, 0.9, 0.95, 0.92]:  # the last two do not improve on 0.9
    ...     _ = opt.step(closure)
    ...     opt.zero_grad()
    ...     opt.observe_validation(val_loss)
    >>> _ = opt.step(closure)
    >>> opt.param_groups[0]["rho"]  # 0.05 * 1.5 after `patience` = 2 reports without improvement
    0.075...
    """

    name = "validation_plateau"
    uses_validation = True
    _STATE = ("best", "bad", "rho_max")

    def __init__(
        self,
        rho: float | None = None,
        *,
        factor: float = 1.5,
        patience: int = 2,
        tol: float = 1e-3,
        rho_max: float | None = None,
        warn_after: int | None = WARN_AFTER,
    ) -> None:
        super().__init__(rho, warn_after=warn_after)
        self.factor = check_pos("factor", factor)
        if self.factor < 1:
            raise ValueError(f"Invalid factor value: {factor!r} (must be >= 1)")
        self.patience = check_int("patience", patience, 1)
        self.tol = _check_tol(tol)
        self.rho_max = check_pos("rho_max", rho_max) if rho_max is not None else None
        self.best: float | None = None
        self.bad = 0

    def _bind(self, groups: RhoGroups) -> None:
        _check_ceiling(self.rho_max, self.initial_rho)
        if self.rho_max is None:
            self.rho_max = 8.0 * self.initial_rho

    def next_rho(self, view: StepView) -> float:
        return self.rho

    def on_validation(self, loss: float) -> None:
        if _improves(loss, self.best, self.tol):
            self.best, self.bad = loss, 0
            return
        self.bad += 1
        if self.bad >= self.patience:
            assert self.rho_max is not None  # (set by bind)
            self.rho = min(self.rho * self.factor, self.rho_max)
            self.bad = 0

    def __repr__(self) -> str:
        return (
            f"ValidationPlateau(rho={self.initial_rho}, factor={self.factor}, "
            f"patience={self.patience}, rho_max={self.rho_max})"
        )


# ------------------------------------------------------------ validation search
class ValidationSearch(AutoRho):
    r"""Follow the validation loss downhill in :math:`\log\rho` (ours, after LETS).

    LETS (Wang, Jiang, Fu, Zhang, arXiv 2408.08222) learns rho by a
    hypergradient of a validation objective, which needs a validation
    gradient at every step. With only the validation *loss* once per epoch,
    this controller estimates the derivative by finite differences instead
    (a simultaneous-perturbation scheme, Spall 1992): from the first report
    on, the radius alternates between :math:`\rho c` and :math:`\rho / c`
    from one report to the next (arm :math:`a_k = \pm 1`), and with :math:`\Delta_k = v_k - v_{k-1}` the change
    of validation loss over period :math:`k`,

    .. math::

        d_k = a_k\,\frac{\Delta_k - 2\Delta_{k-1} + \Delta_{k-2}}{4 \log c}
        \approx \frac{\partial\, \Delta}{\partial \log\rho},
        \qquad \log\rho \leftarrow \log\rho - \eta\,\operatorname{sign}(d_k)

    (the second difference cancels the steady, slowing fall of the
    validation loss, which is the same for both arms). The centre is clipped
    to ``[rho / 8, 8 rho]``. Without validation reports it is SAM at the
    starting radius.

    Args:
        rho: the starting radius (default 0.05; 0.5 for ASAM).
        probe: :math:`c` (default 1.5).
        step: :math:`e^\eta`, the centre's multiplier per report (default 1.15).
        warn_after: as for :class:`ValidationPlateau`.
    """

    name = "validation_search"
    uses_validation = True
    _STATE = ("center", "arm", "last", "deltas")

    def __init__(
        self,
        rho: float | None = None,
        *,
        probe: float = 1.5,
        step: float = 1.15,
        warn_after: int | None = WARN_AFTER,
    ) -> None:
        super().__init__(rho, warn_after=warn_after)
        self.probe = check_pos("probe", probe)
        self.step = check_pos("step", step)
        if self.probe <= 1 or self.step <= 1:
            raise ValueError(f"Invalid probe/step value: {probe!r}/{step!r} (must be > 1)")
        self.center = self.initial_rho
        self.arm = 0.0  # no probing before the first report: without reports this is plain SAM
        self.last: float | None = None
        self.deltas: list[float] = []

    def next_rho(self, view: StepView) -> float:
        rho: float = self.center * self.probe**self.arm
        return rho

    def on_validation(self, loss: float) -> None:
        if self.last is not None:
            self.deltas = (self.deltas + [loss - self.last])[-3:]
        self.last = loss
        if len(self.deltas) == 3:
            d0, d1, d2 = self.deltas
            estimate = self.arm * (d2 - 2.0 * d1 + d0)
            if estimate != 0.0:
                move = -1.0 if estimate > 0 else 1.0
                low, high = self.initial_rho / 8.0, self.initial_rho * 8.0
                self.center = min(max(self.center * self.step**move, low), high)
        self.arm = -self.arm if self.arm else 1.0

    def __repr__(self) -> str:
        return f"ValidationSearch(rho={self.initial_rho}, probe={self.probe}, step={self.step})"


# --------------------------------------------------------------------- names
CONTROLLERS: dict[str, type[AutoRho]] = {
    GradientAgreement.name: GradientAgreement,
    LossEquated.name: LossEquated,
    ValidationPlateau.name: ValidationPlateau,
    ValidationSearch.name: ValidationSearch,
}

#: The controller ``rho="auto"`` builds (chosen by benchmarks/autorho.py).
DEFAULT_CONTROLLER = GradientAgreement.name


def default_controller() -> AutoRho:
    return CONTROLLERS[DEFAULT_CONTROLLER]()


def controller_from_name(spec: str) -> AutoRho:
    """``"auto"`` or ``"auto:<name>"`` -> a fresh controller (ValueError naming ``rho`` otherwise)."""
    if not isinstance(spec, str):
        raise ValueError(f"Invalid rho value: {spec!r}")
    head, _, name = spec.partition(":")
    if head != "auto" or (_ and name not in CONTROLLERS):
        raise ValueError(
            f"Invalid rho value: {spec!r} (a number >= 0, a RhoController, 'auto', or one of "
            f"{', '.join('auto:' + n for n in CONTROLLERS)})"
        )
    return CONTROLLERS[name or DEFAULT_CONTROLLER]()
