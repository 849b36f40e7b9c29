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
shard's. DDP is handled (the first pass runs under ``no_sync`` for
``ddp_ascent="local"``) but not tested here.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.loops.optimization.automatic import Closure
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import GradClipAlgorithmType

from ..optim.sam import SAM

__all__ = ["SAMCallback", "perturbed"]


def perturbed(module: pl.LightningModule) -> bool:
    """True while a SAM optimizer of ``module``'s trainer holds the weights at ``w + e``.

    Code in ``training_step`` with side effects other than ``self.log`` (metric
    updates, counters) can skip them on the second pass::

        if not perturbed(self):
            self.train_accuracy.update(logits, y)

    ``self.optimizers().perturbed`` says the same for one optimizer.
    """
    trainer = module._trainer
    if trainer is None:
        return False
    return any(isinstance(opt, SAM) and opt.perturbed for opt in trainer.optimizers)


@dataclass
class _State:
    """What the extended precision plugin needs during one fit."""

    owner: SAMCallback
    original_class: type
    drop_perturbed_logs: bool
    micro_batches: list[tuple[Any, int]] = field(default_factory=list)
    open_steps: dict[int, bool] = field(default_factory=dict)  # id(sam) -> ascended


class SAMCallback(Callback):
    """Make every SAM step under a Lightning ``Trainer`` a correct SAM step.

    Added to every ``Trainer`` by samkit's entry point (see the module doc);
    pass one yourself only to change its settings (yours then takes over).

    Args:
        drop_perturbed_logs: drop ``self.log`` / ``self.log_dict`` calls made
            while ``training_step`` runs again at ``w + e`` (default True), so
            logged training metrics are those at ``w``, as without SAM.
    """

    def __init__(self, *, drop_perturbed_logs: bool = True) -> None:
        if not isinstance(drop_perturbed_logs, bool):
            raise ValueError(
                f"Invalid drop_perturbed_logs value: {drop_perturbed_logs!r} (expected True or False)"
            )
        self.drop_perturbed_logs = drop_perturbed_logs

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sams = [opt for opt in trainer.optimizers if isinstance(opt, SAM)]
        precision = trainer.strategy.precision_plugin
        if not sams or isinstance(getattr(precision, "_samkit", None), _State):
            return  # nothing to do, or another SAMCallback (the user's) did it
        _check_supported(trainer, sams)
        for sam in sams:
            if sam.model is None:  # BatchNorm statistics from the pass at w only
                sam.model = trainer.strategy.model
        precision._samkit = _State(self, type(precision), self.drop_perturbed_logs)
        precision.__class__ = _extended(type(precision), _SAMPrecision)
        for wrapper in trainer.strategy._lightning_optimizers:
            if isinstance(wrapper._optimizer, SAM):
                wrapper.__class__ = _extended(type(wrapper), _SAMLightningOptimizer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = self._state(trainer)
        if state is not None:
            state.micro_batches.clear()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # With accumulation, Lightning back-propagates the earlier micro-batches
        # outside the optimizer step; keep them to run again at w + e.
        state = self._state(trainer)
        if (
            state is not None
            and pl_module.automatic_optimization
            and trainer.accumulate_grad_batches > 1
        ):
            state.micro_batches.append((batch, batch_idx))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        state = self._state(trainer)
        if state is None:
            return
        precision = trainer.strategy.precision_plugin
        precision.__class__ = state.original_class
        del precision._samkit
        for wrapper in trainer.strategy._lightning_optimizers:
            if isinstance(wrapper, _SAMLightningOptimizer):
                wrapper.__class__ = type(wrapper).__bases__[1]

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self.teardown(trainer, pl_module, "fit")

    def _state(self, trainer: pl.Trainer) -> _State | None:
        state = getattr(trainer.strategy.precision_plugin, "_samkit", None)
        return state if isinstance(state, _State) and state.owner is self else None


def _callbacks_factory() -> list[Callback]:
    """Lightning's ``callbacks_factory`` entry point: one inert-unless-SAM callback per Trainer."""
    return [SAMCallback()]


def _check_supported(trainer: pl.Trainer, sams: list[SAM]) -> None:
    for sam in sams:
        if type(sam).step is not SAM.step:
            raise ValueError(
                f"Invalid optimizer value: {type(sam).__name__} takes its own step(closure) form, which "
                "Lightning's optimizer step cannot give it; use samkit.SAM, GSAM or LookSAM under "
                f"Lightning, or train {type(sam).__name__} in a plain loop (examples/plain_loop.py)"
            )
    strategy = trainer.strategy
    if type(strategy) not in (SingleDeviceStrategy, DDPStrategy):
        raise ValueError(
            f"Invalid strategy value: {type(strategy).__name__} with samkit.SAM is not supported (the "
            "ascent norm must be that of the whole gradient, not of one shard or device's part); use a "
            "single-device or DDP strategy (strategy='auto' or 'ddp')"
        )


_EXTENDED: dict[tuple[type, type], type] = {}


def _extended(cls: type, mixin: type) -> type:
    """``cls`` with ``mixin``'s methods first; isinstance checks on ``cls`` still hold."""
    key = (cls, mixin)
    if key not in _EXTENDED:
        _EXTENDED[key] = type(cls.__name__, (mixin, cls), {"__module__": cls.__module__})
    return _EXTENDED[key]


class _SAMPrecision:
    """Mixin put in front of the trainer's precision plugin class for one fit."""

    _samkit: _State

    def optimizer_step(
        self, optimizer: Any, model: Any, closure: Callable[[], Any], **kwargs: Any
    ) -> Any:
        if not isinstance(optimizer, SAM):
            return super().optimizer_step(optimizer, model, closure, **kwargs)  # type: ignore[misc]
        if kwargs:
            raise ValueError(
                f"Invalid optimizer.step arguments: {sorted(kwargs)}; under Lightning a SAM step takes "
                "only the closure (the precision plugin supplies the GradScaler)"
            )
        return _sam_step(self, optimizer, model, closure)  # type: ignore[arg-type]

    def clip_gradients(
        self,
        optimizer: Any,
        clip_val: float = 0.0,
        gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM,
    ) -> None:
        if isinstance(optimizer, SAM):
            # The SAM step unscales the gradients before the clipping hook
            # (MixedPrecision refuses optimizers that unscale in step(); SAM
            # does not need that refusal here).
            return Precision.clip_gradients(self, optimizer, clip_val, gradient_clip_algorithm)  # type: ignore[arg-type]
        return super().clip_gradients(optimizer, clip_val, gradient_clip_algorithm)  # type: ignore[misc]


def _enabled_scaler(precision: Precision) -> Any:
    scaler = getattr(precision, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def _sam_step(
    precision: Any, sam: SAM, model: pl.LightningModule, closure: Callable[[], Any]
) -> Any:
    state: _State = precision._samkit
    scaler = _enabled_scaler(precision)
    if id(sam) in state.open_steps:  # second_step() on the wrapper: finish what first_step began
        ascended = state.open_steps.pop(id(sam))
        closure()
        _finish(precision, sam, model, scaler, ascended)
        return None
    micro_batches, state.micro_batches = state.micro_batches[:-1], []
    with sam.first_pass():
        loss = closure()
    if loss is None and model.automatic_optimization:
        return None  # training_step returned None: no step, as Lightning's own AMP path does
    first_result = getattr(closure, "_result", None) if isinstance(closure, Closure) else None
    try:
        ascended = sam.first_step(zero_grad=True, scaler=scaler)
        if ascended:
            with _quiet(model, state.drop_perturbed_logs):
                for batch, batch_idx in micro_batches:
                    _replay(model.trainer, sam, batch, batch_idx)
                closure()
            if first_result is not None:  # on_train_batch_end sees the outputs at w
                closure._result = first_result  # type: ignore[attr-defined]
    except BaseException:
        sam.abort_step()
        raise
    _finish(precision, sam, model, scaler, ascended)
    return loss


def _finish(precision: Any, sam: SAM, model: Any, scaler: Any, ascended: bool) -> None:
    try:
        if ascended and scaler is not None:
            # The second-pass gradients are still scaled (a step that did not
            # ascend has its first-pass gradients unscaled by first_step).
            scaler.unscale_(sam)
        precision._after_closure(model, sam)  # on_before_optimizer_step hooks + clipping, once
    except BaseException:
        sam.abort_step()
        raise
    if scaler is not None:
        scaler.step(sam)  # calls SAM.step(), which completes the step (or skips it on overflow)
        scaler.update()
    else:
        sam.second_step()


def _replay(trainer: pl.Trainer, sam: SAM, batch: Any, batch_idx: int) -> None:
    """Run an earlier micro-batch of this step again (training_step + backward), as Lightning did."""
    epoch_loop = trainer.fit_loop.epoch_loop
    automatic = epoch_loop.automatic_optimization
    result = automatic._make_step_fn(epoch_loop._build_kwargs(OrderedDict(), batch, batch_idx))()
    backward = automatic._make_backward_fn(sam)
    if backward is not None and result.closure_loss is not None:
        backward(result.closure_loss)


@contextlib.contextmanager
def _quiet(module: pl.LightningModule, drop: bool) -> Iterator[None]:
    """``self.log`` (and ``log_dict``, which calls it) does nothing inside."""
    if not drop:
        yield
        return
    module.log = _drop_log  # type: ignore[method-assign]
    try:
        yield
    finally:
        del module.log


def _drop_log(*args: Any, **kwargs: Any) -> None:
    return None


class _SAMLightningOptimizer:
    """Mixin for Lightning's optimizer wrapper around a SAM (``self.optimizers()``).

    SAM's methods would otherwise run on the wrapper and write SAM's counters
    to it; these run them on the SAM itself, and ``second_step`` goes through
    ``LightningOptimizer.step`` so that the trainer counts the step.
    """

    _optimizer: SAM
    _strategy: Any

    def _samkit_state(self) -> _State:
        return self._strategy.precision_plugin._samkit

    def first_step(self, zero_grad: bool = True, *, scaler: Any = None) -> bool:
        """SAM.first_step, given the precision plugin's GradScaler (``16-mixed``) by default."""
        sam, state = self._optimizer, self._samkit_state()
        if scaler is None:
            scaler = _enabled_scaler(self._strategy.precision_plugin)
        ascended = sam.first_step(zero_grad, scaler=scaler)
        state.open_steps[id(sam)] = ascended
        return ascended

    def second_step(self, zero_grad: bool = False) -> None:
        """Restore ``w`` and take the base step, counted by the trainer (``global_step``)."""
        if id(self._optimizer) not in self._samkit_state().open_steps:
            raise RuntimeError("second_step() called without first_step()")
        LightningOptimizer.step(self)  # type: ignore[arg-type]
        if zero_grad:
            self._optimizer.zero_grad()

    def abort_step(self) -> None:
        self._samkit_state().open_steps.pop(id(self._optimizer), None)
        self._optimizer.abort_step()

    def first_pass(self) -> contextlib.AbstractContextManager[None]:
        return self._optimizer.first_pass()

    def state_dict(self) -> dict[str, Any]:
        return self._optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._optimizer.load_state_dict(state_dict)
