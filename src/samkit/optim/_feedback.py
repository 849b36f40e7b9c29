"""What a training loop tells SAM's rho controller: validation losses, and held-back samples.

A mixin of :class:`~samkit.optim.sam.SAM`, kept out of sam.py (issue 21: that file
stays one a newcomer can read in one sitting).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

from . import _args

if TYPE_CHECKING:  # pragma: no cover
    from .rho import RhoController


class Feedback:
    rho_controller: RhoController | None

    @property
    def perturbed(self) -> bool:
        raise NotImplementedError  # (SAM's: the weights are at w + e)

    def observe_validation(self, loss: float) -> None:
        """Report a validation loss (the study's trainer and the integrations do): a number
        or a one-element tensor, else a ValueError naming ``loss``; a non-finite one is
        ignored with a warning. Only a rho controller that learns from validation uses it."""
        value = _args.reported_loss(loss)
        if self.rho_controller is not None and value is not None:
            self.rho_controller.observe_validation(value)

    def hold_back(self, losses: Tensor, ids: Any, fraction: float = 0.1) -> Tensor:
        """Keep a fixed ``fraction`` of the samples, chosen by id, out of training, for
        ``rho="auto"`` to learn from in a loop that reports no validation loss
        (:mod:`samkit.optim.holdback`, docs/autorho.md).

        Call it in the closure on ``losses``, one per sample
        (``reduction="none"``), with ``ids``, each sample's index in its dataset (a
        1-D integer tensor or a sequence of ints, on the CPU as a DataLoader gives
        them); back-propagate and return what it returns: the mean loss of the
        samples kept. Their losses at ``w`` are reported as a validation loss once
        per epoch (when an id comes round again). Needs a controller that learns
        from validation (the default ``rho="auto"``), else a ValueError.
        """
        controller = self.rho_controller
        if controller is None or not hasattr(controller, "hold_back"):
            raise ValueError(
                f"Invalid rho value: {controller or 'a fixed radius'} learns nothing from "
                "held-back samples (hold_back needs rho='auto')"
            )
        return controller.hold_back(losses, ids, fraction, at_w=not self.perturbed)  # type: ignore[no-any-return]
