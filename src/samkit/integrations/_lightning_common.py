"""The Lightning integration's logic, shared by ``lightning`` and ``pytorch_lightning``.

Lightning ships under two names (``lightning.pytorch`` and the standalone
``pytorch_lightning``, the same code). This module imports neither: it
recognises Lightning's objects by what the Trainer hands it, and
:mod:`samkit.integrations.lightning` / :mod:`samkit.integrations.pytorch_lightning`
bind :class:`SAMCallbackMixin` to each package's ``Callback``. See
:mod:`samkit.integrations.lightning` for what it does.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..optim.sam import SAM

__all__ = ["SAMCallbackMixin", "perturbed"]

# Strategies by class name (the same classes exist in both packages).
_SUPPORTED_STRATEGIES = ("SingleDeviceStrategy", "DDPStrategy")


def perturbed(module: Any) -> bool:
    """True while a SAM optimizer of ``module``'s trainer holds the weights at ``w + e``.

    Code in ``training_step`` with side effects other than ``self.log`` (metric
    updates, counters) can skip them on the second pass::

        if not perturbed(self):
            self.train_accuracy.update(logits, y)

    ``self.optimizers().perturbed`` says the same for one optimizer.
    """
    try:
        trainer = module.trainer
    except RuntimeError:  # not attached to a Trainer
        return False
    return any(isinstance(opt, SAM) and opt.perturbed for opt in trainer.optimizers)


@dataclass
class _State:
    """What the extended precision plugin needs during one fit."""

    owner: SAMCallbackMixin
    original_class: type
    drop_perturbed_logs: bool
    micro_batches: list[tuple[Any, int]] = field(default_factory=list)
    open_steps: dict[int, bool] = field(default_factory=dict)  # id(sam) -> ascended


class SAMCallbackMixin:
    """The callback's hooks; ``SAMCallback`` adds the package's ``Callback`` base."""

    def __init__(self, *, drop_perturbed_logs: bool = True) -> None:
        if not isinstance(drop_perturbed_logs, bool):
            raise ValueError(
                f"Invalid drop_perturbed_logs value: {drop_perturbed_logs!r} (expected True or False)"
            )
        self.drop_perturbed_logs = drop_perturbed_logs

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
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

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        state = self._state(trainer)
        if state is not None:
            state.micro_batches.clear()

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
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

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        state = self._state(trainer)
        if state is None:
            return
        precision = trainer.strategy.precision_plugin
        precision.__class__ = state.original_class
        del precision._samkit
        for wrapper in trainer.strategy._lightning_optimizers:
            if isinstance(wrapper, _SAMLightningOptimizer):
                wrapper.__class__ = type(wrapper).__bases__[1]

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        # A self-tuning rho (rho="auto") learns from the validation loss: report the
        # logged "val_loss" to every SAM (a fixed rho ignores it). Not the sanity check's.
        if trainer.sanity_checking or self._state(trainer) is None:
            return
        metrics = trainer.callback_metrics
        value = metrics.get("val_loss")
        if value is None:  # several validation dataloaders: val_loss/dataloader_idx_<k>
            parts = [
                float(v) for k, v in metrics.items() if k.startswith("val_loss/dataloader_idx_")
            ]
            if not parts:
                return
            value = sum(parts) / len(parts)  # their mean, one report
        for opt in trainer.optimizers:
            if isinstance(opt, SAM):
                opt.observe_validation(float(value))

    def _state(self, trainer: Any) -> _State | None:
        state = getattr(trainer.strategy.precision_plugin, "_samkit", None)
        return state if isinstance(state, _State) and state.owner is self else None


def _check_supported(trainer: Any, sams: list[SAM]) -> None:
    for sam in sams:
        if type(sam).step is not SAM.step:
            raise ValueError(
                f"Invalid optimizer value: {type(sam).__name__} takes its own step(closure) form, which "
                "Lightning's optimizer step cannot give it; use samkit.SAM, GSAM or LookSAM under "
                f"Lightning, or train {type(sam).__name__} in a plain loop (examples/plain_loop.py)"
            )
    strategy = trainer.strategy
    if type(strategy).__name__ not in _SUPPORTED_STRATEGIES:
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

    def clip_gradients(self, optimizer: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(optimizer, SAM):
            # The SAM step unscales the gradients before the clipping hook
            # (MixedPrecision refuses optimizers that unscale in step(); SAM
            # does not need that refusal): clip as the base Precision does.
            base = next(
                c
                for c in type(self).__mro__
                if c.__name__ == "Precision" and not issubclass(c, _SAMPrecision)
            )
            return base.clip_gradients(self, optimizer, *args, **kwargs)
        return super().clip_gradients(optimizer, *args, **kwargs)  # type: ignore[misc]


def _enabled_scaler(precision: Any) -> Any:
    scaler = getattr(precision, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def _sam_step(precision: Any, sam: SAM, model: Any, closure: Callable[[], Any]) -> Any:
    state: _State = precision._samkit
    scaler = _enabled_scaler(precision)
    if id(sam) in state.open_steps:  # second_step() on the wrapper: finish what first_step began
        ascended = state.open_steps.pop(id(sam))
        closure()
        _finish(precision, sam, model, scaler, ascended)
        return None
    if (
        getattr(closure, "__name__", None) == "do_nothing_closure"
    ):  # LightningOptimizer.step()  # opt.step() without a closure, no first_step() before
        raise RuntimeError(
            "SAM under Lightning: opt.step() without a closure cannot run the pass at w + e; call "
            "opt.step(closure) with a closure that runs the forward and self.manual_backward(loss) "
            "and returns the loss, or opt.first_step() / opt.second_step() around the second backward"
        )
    micro_batches, state.micro_batches = state.micro_batches[:-1], []
    with sam.first_pass():
        loss = closure()
    if loss is None and model.automatic_optimization:
        return None  # training_step returned None: no step, as Lightning's own AMP path does
    # Lightning's automatic-optimization Closure keeps its last result for the loop.
    first_result = (
        getattr(closure, "_result", None) if type(closure).__name__ == "Closure" else None
    )
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


def _replay(trainer: Any, sam: SAM, batch: Any, batch_idx: int) -> None:
    """Run an earlier micro-batch of this step again (training_step + backward), as Lightning did."""
    epoch_loop = trainer.fit_loop.epoch_loop
    automatic = epoch_loop.automatic_optimization
    result = automatic._make_step_fn(epoch_loop._build_kwargs(OrderedDict(), batch, batch_idx))()
    backward = automatic._make_backward_fn(sam)
    if backward is not None and result.closure_loss is not None:
        backward(result.closure_loss)


@contextlib.contextmanager
def _quiet(module: Any, drop: bool) -> Iterator[None]:
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
        super().step()  # type: ignore[misc]  # LightningOptimizer.step: counted, then _sam_step
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
