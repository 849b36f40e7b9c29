r"""SAM in the Hugging Face ``transformers.Trainer``: :class:`SAMTrainer`.

SAM (Foret et al., arXiv 2010.01412) takes each step from the gradient at the
perturbed weights :math:`w + e`, :math:`e = \rho\, g / \lVert g \rVert`,
:math:`g = \nabla L(w)`. The Trainer (through accelerate) calls
``optimizer.step()`` without a closure, back-propagates the micro-batches of
an accumulated batch one by one, and on an fp16 overflow asks the optimizer
wrapper whether the step was skipped. :class:`SAMTrainer` is a drop-in
``Trainer`` that fits SAM into those places through the Trainer's own
extension points:

* ``create_optimizer``: the optimizer the Trainer would build (``args.optim``,
  weight-decay groups, or the one passed as ``optimizers=(opt, sched)``) is
  wrapped in :class:`samkit.SAM` (``model=`` the model, so BatchNorm-type
  statistics move once per step). A SAM passed in is used as it is.
* ``training_step``: each micro-batch runs at ``w`` as usual. On the last one
  of the step (``accelerator.sync_gradients``) ``.grad`` holds the gradient
  of the accumulated batch; ``first_step`` (unscaling it first under fp16)
  moves the weights to ``w + e`` and every micro-batch of the step is run
  again there. The loss returned (and logged) is the one at ``w``.
* the Trainer then clips (``max_grad_norm``: the gradient at ``w + e``, which
  the base step uses) and calls ``optimizer.step()``, which restores ``w``
  exactly and takes the base step (through the GradScaler under fp16: an
  overflow in either pass skips the step and backs the scale off).
* an internal ``TrainerCallback`` (``on_optimizer_step``) reports a step the
  GradScaler skipped as skipped, so the LR scheduler does not advance
  (accelerate alone would report it as taken: SAM lets the scaler call its
  ``step()`` on overflow too, to restore the weights).

Resume from a Trainer checkpoint (``train(resume_from_checkpoint=...)``)
restores samkit's state with the optimizer's (``optimizer.pt``).

ESAM and mSAM (their own ``step(closure)`` forms) and DeepSpeed / FSDP (the
ascent norm of one shard is not the norm of the gradient) are refused. DDP
is handled like the Trainer's own accumulation (all micro-batches but the
last under ``no_sync``: the ascent uses the all-reduced gradient) but not
tested here.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from .._extras import reraise_missing

try:
    import transformers
    from transformers import TrainerCallback
except ImportError as error:  # the framework is an extra: say which
    reraise_missing(
        error,
        "samkit.integrations.huggingface",
        "transformers",
        "pip install 'samkit[huggingface]'",
    )

from .._checks import check_nonneg
from ..optim.rho import RhoController
from ..optim.sam import SAM

__all__ = ["SAMTrainer"]

_OWN = ("model", "max_grad_norm")


class SAMTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose every optimizer step is a SAM step.

    Takes the Trainer's arguments, plus:

    Args:
        sam_rho: the ascent radius (default 0.05), a ``RhoController``, or
            ``"auto"`` / ``"auto:<name>"`` (a self-tuning rho, told each
            evaluation's ``eval_loss``).
        sam_adaptive: ASAM (arXiv 2102.11600) instead of SAM (default False).
        sam_class: :class:`samkit.SAM` (default) or a variant built the same
            way (``samkit.GSAM``, ``samkit.LookSAM``).
        sam_kwargs: any other keyword of ``sam_class`` (``eta``, ``policy``,
            ``mix``, ``perturbation``, ``ascent_eps``, ...). Not ``model`` (the
            Trainer's model is given) nor ``max_grad_norm`` (use
            ``TrainingArguments.max_grad_norm``).

    Example::

        trainer = SAMTrainer(model=model, args=TrainingArguments(...),
                             train_dataset=ds, sam_rho=0.05)
        trainer.train()
    """

    def __init__(
        self,
        *args: Any,
        sam_rho: float | str | RhoController = 0.05,
        sam_adaptive: bool = False,
        sam_class: type[SAM] = SAM,
        sam_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if sam_kwargs is not None and not isinstance(sam_kwargs, dict):
            raise ValueError(f"Invalid sam_kwargs value: {sam_kwargs!r} (a dict of SAM keywords)")
        sam_kwargs = dict(sam_kwargs or {})
        for name, own in (("rho", "sam_rho"), ("adaptive", "sam_adaptive")):
            if name in sam_kwargs:  # it silently overrode the argument of its own
                raise ValueError(
                    f"Invalid sam_kwargs value: {name!r} has its own argument; pass {own}="
                )
        if not (isinstance(sam_class, type) and issubclass(sam_class, SAM)):
            raise ValueError(
                f"Invalid sam_class value: {sam_class!r} (expected samkit.SAM or a subclass)"
            )
        if sam_class.step is not SAM.step:
            raise ValueError(
                f"Invalid sam_class value: {sam_class.__name__} takes its own step(closure) form, which the "
                f"Trainer's optimizer step cannot give it; use samkit.SAM, GSAM or LookSAM, or train "
                f"{sam_class.__name__} in a plain loop"
            )
        for name in _OWN:
            if name in sam_kwargs:
                raise ValueError(
                    f"Invalid sam_kwargs value: {name!r} is set by SAMTrainer "
                    + (
                        "(the Trainer's model)"
                        if name == "model"
                        else "(use TrainingArguments.max_grad_norm)"
                    )
                )
        if isinstance(sam_rho, str):  # a self-tuning rho: "auto" or "auto:<name>"
            from ..optim.autorho import controller_from_name

            try:
                controller_from_name(sam_rho)
            except ValueError as exc:
                raise ValueError(str(exc).replace("Invalid rho", "Invalid sam_rho", 1)) from None
        elif not isinstance(sam_rho, RhoController):
            check_nonneg("sam_rho", sam_rho)  # the rest is checked when the optimizer is built
        if not isinstance(sam_adaptive, bool):
            raise ValueError(
                f"Invalid sam_adaptive value: {sam_adaptive!r} (expected True or False)"
            )
        self.sam_settings = {"rho": sam_rho, "adaptive": sam_adaptive, **sam_kwargs}
        self.sam_class = sam_class
        self._sam_window: list[tuple[Any, Any]] = []
        self._sam_first_pass_unscaled = False
        super().__init__(*args, **kwargs)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError(
                "Invalid TrainingArguments value: SAMTrainer does not support DeepSpeed or FSDP (the ascent "
                "norm must be that of the whole gradient, not of one shard); train on one device or with DDP"
            )
        self.add_callback(_ReportSkippedSteps(self))

    # ------------------------------------------------------------ optimizer
    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, wrapped in ``sam_class`` (a SAM passed in is kept)."""
        base = super().create_optimizer(model)
        opt_model = self.model if model is None else model
        inner = base.base_optimizer if isinstance(base, SAM) else base
        if callable(getattr(inner, "train", None)) or callable(getattr(inner, "eval", None)):
            # The Trainer switches such optimizers (schedule-free) between modes
            # that move the weights; SAM's ascent and restore would interleave.
            raise ValueError(
                f"Invalid optimizer value: {type(inner).__name__} has train()/eval() modes (a "
                "schedule-free optimizer?), which SAMTrainer does not support; use an optimizer "
                "without them (args.optim='adamw_torch', 'sgd', ...)"
            )
        if isinstance(base, SAM):
            if base.model is None:
                base.model = opt_model
        else:
            self.optimizer = self.sam_class(base, model=opt_model, **self.sam_settings)
        return self.optimizer

    @property
    def sam(self) -> SAM:
        """The :class:`samkit.SAM` inside the Trainer's (accelerate-wrapped) optimizer."""
        opt = self.optimizer
        while opt is not None and not isinstance(opt, SAM):
            opt = getattr(opt, "optimizer", None)
        if opt is None:
            raise RuntimeError("SAMTrainer.sam: the optimizer is not created yet (call train())")
        return opt

    # ----------------------------------------------------------------- step
    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """The Trainer's step at ``w``; on the last micro-batch, the ascent and the pass at ``w + e``."""
        self._sam_window.append((inputs, num_items_in_batch))
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not self.accelerator.gradient_state.sync_gradients:
            return loss  # an earlier micro-batch: its gradient at w is accumulated
        window, self._sam_window = self._sam_window, []
        sam, scaler = self.sam, self.accelerator.scaler
        ascended = sam.first_step(zero_grad=True, scaler=scaler)
        # A step without ascent keeps its first-pass gradients, which first_step
        # unscaled already: the Trainer's clipping must not unscale them again.
        self._sam_first_pass_unscaled = not ascended and scaler is not None
        if ascended:
            try:
                for i, (micro_inputs, micro_items) in enumerate(window):
                    sync = i == len(window) - 1
                    with contextlib.nullcontext() if sync else self.accelerator.no_sync(model):
                        super().training_step(model, micro_inputs, micro_items)
            except BaseException:
                sam.abort_step()
                raise
        return loss

    def _clip_grad_norm(self, model: torch.nn.Module) -> Any:
        if self._sam_first_pass_unscaled:
            return torch.nn.utils.clip_grad_norm_(model.parameters(), self.args.max_grad_norm)
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> Any:
        if grad_norm is None and self._sam_first_pass_unscaled:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        return super()._get_grad_norm(model, grad_norm=grad_norm)


class _ReportSkippedSteps(TrainerCallback):
    """Keep SAMTrainer's step bookkeeping in line with the Trainer's loop.

    Above all, tell the Trainer a step the GradScaler skipped was skipped (the scale backed off).

    GradScaler lowers its scale in ``update()`` exactly when it found an
    inf/NaN in the step, and SAM reports an overflow in either pass to it.
    """

    def __init__(self, trainer: SAMTrainer) -> None:
        self.trainer = trainer
        self.scale_before: float | None = None

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # The first micro-batch of a step: forget any left by a step that was cut short.
        self.trainer._sam_window.clear()

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        scaler = self.trainer.accelerator.scaler
        self.scale_before = scaler.get_scale() if scaler is not None else None
        self.trainer._sam_first_pass_unscaled = False

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # A self-tuning rho (sam_rho="auto") learns from the evaluation loss; a fixed one ignores it.
        metrics = kwargs.get("metrics") or {}
        loss = metrics.get("eval_loss")
        if loss is None:  # an eval_dataset dict: one evaluation per set, eval_<name>_loss
            named = [v for k, v in metrics.items() if k.startswith("eval_") and k.endswith("_loss")]
            loss = named[0] if len(named) == 1 else None
        if loss is not None and self.trainer.optimizer is not None:
            self.trainer.sam.observe_validation(float(loss))

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        scaler = self.trainer.accelerator.scaler
        if scaler is None or self.scale_before is None:
            return
        skipped = scaler.get_scale() < self.scale_before
        # accelerate's wrapper records a skip in _is_overflow (its step_was_skipped).
        self.trainer.optimizer._is_overflow = skipped
