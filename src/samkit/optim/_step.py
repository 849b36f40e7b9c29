r"""The state of one SAM step in flight: everything that lives from one step's
opening to its closing, in one object (:class:`Step`), so that none of it is
left on the optimizer between steps.

The protocol as a state machine (``SAM._step`` holds the step; ``None``
between steps)::

    no step ──first_pass()──▶ AT_W                       the first pass runs (DDP: no_sync)
    no step / AT_W ──first_step()──┬─▶ PERTURBED          returned True: weights at w + e
                                   └─▶ PLAIN              returned False: weights at w
    PERTURBED / PLAIN ──second_step()──▶ _close_step ─▶ no step   w restored, base step taken
    any ──abort_step(), or an error in first_step()──▶ _close_step ─▶ no step   w restored, no update

``AT_W`` only records how the first pass ran (``local``); a step is *open*
(``SAM._pending``) in ``PERTURBED`` and ``PLAIN``. :meth:`Step.close`
restores the weights bit for bit and releases BatchNorm; what it leaves
(``ascended``, ``skip``, ``unscaled``, ...) is what ``second_step`` reads.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import functional
from .view import Gathered

__all__ = ["Step"]


@dataclass(eq=False)
class Step:
    """One SAM step, from ``first_pass()`` / ``first_step()`` to ``_close_step``.

    Attributes:
        opened: ``first_step`` has run (``PLAIN`` or ``PERTURBED``; else ``AT_W``).
        local: the first pass ran under DDP's ``no_sync`` (per-replica gradients).
        restore: the ``(params, backups)`` pairs that bring ``w`` back; set
            while the weights are at ``w + e`` (``PERTURBED``).
        ascended: this step moved the weights to ``w + e`` (kept after the restore).
        skip: the base step must not update anything (a non-finite gradient).
        first_pass_scaled: ``first_step`` was given an enabled GradScaler.
        unscaled: the gradients the base step will see are unscaled already.
        found_inf: the GradScaler's overflow flag for the first pass (a 0-d tensor).
        found_per_device: the same per device, as the scaler records it.
        cleared: the gathered parameters whose first-pass gradients were
            cleared (``second_step`` gives a zero gradient to those the pass
            at ``w + e`` did not reach).
        large_radius: the radius, when above ``CHECKED_RHO`` (``second_step``
            then checks the pass at ``w + e``); 0 otherwise.
        frozen_bn: the BatchNorm freeze held from the first step to the close.
    """

    opened: bool = False
    local: bool = False
    restore: list[tuple[list[Tensor], list[Tensor]]] | None = None
    ascended: bool = False
    skip: bool = False
    first_pass_scaled: bool = False
    unscaled: bool = False
    found_inf: Tensor | None = None
    found_per_device: dict[torch.device, Tensor] | None = None
    cleared: Gathered | None = None
    large_radius: float = 0.0
    frozen_bn: contextlib.ExitStack | None = None

    @property
    def perturbed(self) -> bool:
        """The weights are at ``w + e`` now."""
        return self.restore is not None

    def fill_unreached_grads(self) -> bool:
        """Zero gradients for the parameters whose first-pass gradients were cleared and
        that the pass at ``w + e`` did not reach (an unused head or branch): they had a
        gradient, so the base step must still see one (momentum, weight decay, Adam's
        step count), as with ``zero_grad(set_to_none=False)`` and no SAM. False, and
        nothing filled, where that pass reached none of them (no backward at ``w + e``)."""
        cleared = [p for _, params, _ in self.cleared or () for p in params]
        self.cleared = None
        unreached = [p for p in cleared if p.grad is None]
        if cleared and len(unreached) == len(cleared):
            return False
        for p in unreached:
            p.grad = torch.zeros_like(p)
        return True

    def close(self, *, foreach: bool) -> None:
        """Copy ``w`` back (bit for bit) and release BatchNorm; both at most once."""
        if self.restore is not None:
            functional.restore_(self.restore, foreach=foreach)
            self.restore = None
        else:  # (restore_ does it: the base step that follows moves the weights in place too)
            functional.forget_autocast_copies()
        if self.frozen_bn is not None:
            self.frozen_bn.close()
            self.frozen_bn = None
