r"""SAM in PyTorch Lightning (``lightning`` 2.6): return ``samkit.SAM`` from ``configure_optimizers``.

SAM (Foret et al., arXiv 2010.01412) needs two forward/backward passes per
step: the gradient :math:`g = \nabla L(w)` gives the ascent
:math:`e = \rho\, g / \lVert g \rVert`, and the base optimizer steps with
:math:`\nabla L(w + e)`. Lightning's own step paths cannot do that alone:

* ``accumulate_grad_batches=k`` back-propagates the first ``k - 1``
  micro-batches outside the optimizer's closure, so only the last one could
  be recomputed at ``w + e``;
* ``precision="16-mixed"`` calls the closure once and then
  ``scaler.step(optimizer)`` without it;
* the closure runs ``training_step`` (and ``self.log``) on both passes, and
  BatchNorm would update its statistics on both.

:class:`SAMCallback` fixes all of it. It is registered through Lightning's
``lightning.pytorch.callbacks_factory`` entry point, so every ``Trainer``
gets it once samkit is installed: returning ``samkit.SAM(...)`` from
``configure_optimizers`` stays the one-line way. It does nothing unless one
of the trainer's optimizers is a :class:`samkit.SAM`. When one is, at
``on_fit_start`` it

* gives the SAM the trained module as ``model=`` (unless one was given), so
  BatchNorm statistics move once per step, on the pass at ``w``;
* extends the precision plugin (its class, for this fit) so that an optimizer
  step on a SAM is one whole SAM step, whatever the precision:

  1. the closure runs at ``w`` (``training_step`` + backward, scaled by the
     GradScaler under ``16-mixed``); with accumulation the ``k - 1`` earlier
     micro-batches already added their gradients, so ``.grad`` holds the
     gradient of the accumulated batch;
  2. ``first_step`` (unscales the first pass itself) moves to ``w + e``;
  3. every micro-batch of the step is run again at ``w + e`` (the earlier ones
     from the batches recorded by ``on_train_batch_start``, then the closure),
     with ``self.log`` calls dropped so that logs hold the loss at ``w``;
  4. ``on_before_optimizer_step`` hooks and gradient clipping run once, on the
     final, unscaled gradient (the one the base optimizer uses);
  5. ``second_step`` restores ``w`` exactly and steps (through
     ``scaler.step`` and ``scaler.update`` under ``16-mixed``, so an overflow
     in either pass skips the step and backs the scale off);

* routes ``first_step`` / ``second_step`` / ``abort_step`` called on
  Lightning's optimizer wrapper (``self.optimizers()`` in manual optimization)
  to the SAM itself, with the precision's GradScaler, and completes the step
  through ``LightningOptimizer.step`` so ``global_step`` counts it.

Gradient clipping (``gradient_clip_val``) clips the gradient the base step
uses (at ``w + e``); the ascent uses the unclipped gradient at ``w``. Clipping
by norm would not change the ascent anyway (``e`` is normalised); clipping by
value would change its direction, which SAM does not do.

Refused, with an error naming what works: samkit variants with their own
``step(closure)`` (ESAM, mSAM), and strategies other than single-device and
DDP (FSDP, DeepSpeed, XLA, model parallel), where the ascent norm would be a
shard's; and, in manual optimization, ``opt.step()`` without a closure (the
pass at ``w + e`` cannot run). DDP is handled (the first pass runs under
``no_sync`` for ``ddp_ascent="local"``) but not tested here.

The logic lives in :mod:`samkit.integrations._lightning_common`, shared with
:mod:`samkit.integrations.pytorch_lightning` (the standalone package).
"""

from __future__ import annotations

from .._extras import reraise_missing

try:
    from lightning.pytorch.callbacks import Callback
except ImportError as error:  # the framework is an extra: say which
    reraise_missing(
        error, "samkit.integrations.lightning", "lightning", "pip install 'samkit[lightning]'"
    )

from ._lightning_common import SAMCallbackMixin, perturbed

__all__ = ["SAMCallback", "perturbed"]


class SAMCallback(SAMCallbackMixin, Callback):
    """Make every SAM step under a Lightning ``Trainer`` a correct SAM step.

    Added to every ``Trainer`` by samkit's entry point (see the module doc);
    pass one yourself only to change its settings (yours then takes over).

    Args:
        drop_perturbed_logs: drop ``self.log`` / ``self.log_dict`` calls made
            while ``training_step`` runs again at ``w + e`` (default True), so
            logged training metrics are those at ``w``, as without SAM.
    """


def _callbacks_factory() -> list[Callback]:
    """Lightning's ``callbacks_factory`` entry point: one inert-unless-SAM callback per Trainer."""
    return [SAMCallback()]
