"""Everything SAM needs to know about ``torch.amp.GradScaler``, in one place.

SAM meets the scaler twice per step:

* **first pass** (``first_step(scaler=...)``): the gradients at ``w`` are
  unscaled in place and checked for inf/NaN (:func:`unscale_`), because the
  ascent direction needs true gradients. On a step that does not ascend those
  gradients go to the base step as they are, so the scaler is told they are
  already unscaled (:func:`mark_unscaled`): a later ``scaler.unscale_(opt)``
  then raises torch's usual error instead of dividing twice, and
  ``scaler.step(opt)`` uses the overflow flags recorded here.
* **second pass** (``scaler.step(opt)``): SAM sets
  ``_step_supports_amp_scaling``, so the scaler calls ``opt.step()`` even on
  overflow, with ``opt.grad_scale`` and ``opt.found_inf`` set
  (:func:`scaler_step_inputs`): SAM restores the weights, unscales the
  second-pass gradients itself (:func:`unscale_by_`) and skips the update on
  overflow.

This is the only module that reads or writes GradScaler internals
(``_per_optimizer_states``, ``OptState``); ``tests/test_amp.py`` pins their
behaviour in the installed torch, so an upgrade that changes them fails
loudly rather than silently.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeAlias, TypeGuard

import torch
from torch import Tensor

from .. import functional

if TYPE_CHECKING:  # pragma: no cover
    from ._step import Step
    from .mix import Mix

__all__ = [
    "Scaler",
    "is_enabled",
    "unscale_",
    "unscale_first_pass",
    "check_mix_units",
    "mark_unscaled",
    "scaler_step_inputs",
    "unscale_by_",
]


#: the GradScaler a step was given (None: none)
Scaler: TypeAlias = "torch.amp.GradScaler | None"


def is_enabled(scaler: Scaler) -> TypeGuard[torch.amp.GradScaler]:
    return scaler is not None and scaler.is_enabled()


def unscale_(
    grads: list[Tensor], scaler: torch.amp.GradScaler
) -> tuple[Tensor, dict[torch.device, Tensor]]:
    """Divide ``grads`` by the scale in place.

    Returns a 0-d flag that is > 0 iff any gradient is not finite, and the
    per-device flags in the form :func:`mark_unscaled` records.
    """
    inverse = 1.0 / scaler.get_scale()
    by_device: dict[torch.device, list[Tensor]] = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
    found_per_device = {}
    for device, device_grads in by_device.items():
        flag = torch.zeros((), device=device)
        inverse_tensor = torch.full((), inverse, device=device)
        for (_, _), (bucket,) in functional.group_by_device(device_grads).items():
            torch._amp_foreach_non_finite_check_and_unscale_(bucket, flag, inverse_tensor)
        found_per_device[device] = flag
    found = functional.global_norm([f.square() for f in found_per_device.values()])
    return found, found_per_device


def unscale_first_pass(step: Step, grads: list[Tensor], scaler: Scaler) -> None:
    """Unscale the first-pass gradients in place (with an enabled ``scaler``), and record
    on the ``step`` what was done: the overflow flags, and that they are unscaled now."""
    if not is_enabled(scaler):
        step.first_pass_scaled = False
        return
    step.first_pass_scaled = True
    if grads:
        step.found_inf, step.found_per_device = unscale_(grads, scaler)
        step.unscaled = True  # second_step must not unscale these again


def check_mix_units(step: Step, mix: Mix | None, name: str) -> None:
    """Refuse ``scaler.step(opt)`` after a first step without the scaler when a mix combines
    the two passes' gradients: they would be in different units."""
    if mix is not None and step.ascended and not step.first_pass_scaled:
        raise ValueError(
            "Invalid scaler value: scaler.step(opt) after first_step() without the scaler: "
            f"{name} mixes first- and second-pass gradients, which would be in "
            "different units. Call first_step(scaler=scaler) (or step(closure, scaler=scaler))."
        )


def mark_unscaled(
    scaler: Scaler,
    optimizer: torch.optim.Optimizer,
    found_per_device: dict[torch.device, Tensor] | None,
    *,
    force_overflow: bool = False,
) -> None:
    """Record with the scaler that this step's gradients are unscaled, as its ``unscale_()`` would.

    ``force_overflow`` records an overflow on every device: under local DDP
    ascent another replica may have overflowed, and all must back off alike.
    """
    # (called after a first pass this scaler unscaled: both are set)
    assert scaler is not None and found_per_device is not None
    flags = found_per_device
    if force_overflow:
        flags = {device: torch.ones_like(flag) for device, flag in flags.items()}
    state = scaler._per_optimizer_states[id(optimizer)]
    state["stage"] = torch.amp.grad_scaler.OptState.UNSCALED
    state["found_inf_per_device"] = flags


def scaler_step_inputs(optimizer: torch.optim.Optimizer) -> tuple[Tensor | None, Tensor | None]:
    """``(grad_scale, found_inf)`` that ``GradScaler.step`` set on the optimizer (``None`` outside it)."""
    return getattr(optimizer, "grad_scale", None), getattr(optimizer, "found_inf", None)


def unscale_by_(grads: list[Tensor], grad_scale: Tensor, *, foreach: bool) -> None:
    """``g /= grad_scale`` for the second-pass gradients (as a multiplication by the exact inverse)."""
    inverse = grad_scale.double().reciprocal().float()
    for (_, _), (bucket,) in functional.group_by_device(grads).items():
        functional.mul_(bucket, inverse.to(bucket[0].device), foreach=foreach)
