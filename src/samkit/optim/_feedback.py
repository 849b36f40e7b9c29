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
    steps: int

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

    def hold_back(
        self, losses: Tensor, ids: Any, fraction: float = 0.1, *, epoch: int | None = None
    ) -> Tensor:
        """Keep a fixed ``fraction`` of the samples, chosen by id, out of training, for
        ``rho="auto"`` to learn from in a loop that reports no validation loss
        (:mod:`samkit.optim.holdback`, docs/autorho.md).

        Call it in the closure on ``losses``, one per sample
        (``reduction="none"``), with ``ids``, each sample's index in its dataset (a
        1-D integer tensor or array, or a sequence of ints, on the CPU as a
        DataLoader gives them); back-propagate and return what it returns: the mean
        loss of the samples kept. Their losses at ``w`` are reported as a validation
        loss once an epoch: when ``epoch`` (the loop's) changes, or, without it,
        when a held-back id comes round again (a sampler that passes each sample once an
        epoch; under a DistributedSampler, with replacement or with ``drop_last``, pass
        ``epoch``). Where the loop also reports validation losses, they take precedence
        (a warning says so). Needs a controller that learns from validation (the default
        ``rho="auto"``), else a ValueError.
        """
        controller = self.rho_controller
        if controller is None or not hasattr(controller, "hold_back"):
            raise ValueError(
                f"Invalid rho value: {controller or 'a fixed radius'} has no use for held-back "
                "samples (hold_back needs a samkit.optim.autorho controller that learns from "
                "validation, such as rho='auto')"
            )
        if not getattr(getattr(self, "perturbation", None), "needs_gradient", True):
            raise ValueError(
                "Invalid perturbation value: its one pass a step is at w + e, and hold_back "
                "reports losses at w (Momentum-SAM): report a validation loss instead "
                "(opt.observe_validation)"
            )
        return controller.hold_back(  # type: ignore[no-any-return]
            losses, ids, fraction, at_w=not self.perturbed, step=self.steps, epoch=epoch
        )


def refuse_hold_back(name: str) -> ValueError:
    """The error of ``hold_back`` in ESAM and K-SAM, whose closures return per-sample losses."""
    return ValueError(
        f"Invalid closure value: {name}'s closure returns each sample's loss for {name}'s own "
        "selection, so hold_back cannot hold samples back in it; report a validation loss "
        "instead (opt.observe_validation)"
    )
