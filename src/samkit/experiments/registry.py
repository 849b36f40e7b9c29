"""The method registry: what ``samkit compare`` can train, declared where each is defined.

A *method* owns its optimizer and does one training step. The trainer calls::

    method = build_method("sam", model, TrainSpec(lr=0.05, ...), rho=0.05)
    loss = method.step(model, x, y, idx, loss_fn)   # one step on one batch

Every method is defined in :mod:`samkit.experiments.methods` by one builder
under the :func:`register` decorator, which is its whole registration::

    @register("sam", description="SAM, Foret et al. (arXiv 2010.01412)", defaults={"rho": 0.05})
    def _sam(model, spec, *, rho):
        return SAMMethod(SAM(make_base_optimizer(model.parameters(), spec), rho=rho, model=model))

Contract for a method (subclass :class:`Method`):

* ``step(model, x, y, idx, loss_fn) -> Tensor`` does one full training step
  on the batch ``(x, y)`` and returns the *mean loss at the weights before the
  update*, as a detached 0-d tensor (no ``.item()`` needed). ``idx`` holds the
  batch's indices into the training set (int64, same length as ``y``), for
  methods that keep per-sample state (SAF keeps past outputs per index).
  ``loss_fn(output, y)`` returns **per-sample** losses, shape ``(batch,)``
  (or a 0-d mean when the user's loss gives only that; methods flagged
  ``per_sample_loss`` are then refused before training). Call the model
  through :meth:`Method.forward` and backpropagate through
  :meth:`Method.backward`, so mixed precision (autocast, GradScaler) applies;
  the model is already in train mode and the gradients are zero on entry.
* ``passes`` (float) counts the forward+backward passes paid so far, in units
  of one pass over the whole batch: plain SGD adds 1 per step, SAM 2, a second
  pass on half of the batch 0.5. :meth:`Method.closure` counts for you.
* ``optimizer`` is the object whose ``param_groups`` carry ``"lr"``; the
  trainer sets the learning rate of every group each step (its schedule).
* ``state_dict()`` / ``load_state_dict()`` hold everything needed to resume.
* ``on_epoch_end(epoch, model)`` is called after each epoch (0-based).

A *builder* is ``builder(model, spec: TrainSpec, **options) -> Method``; it
raises ``TypeError`` or ``ValueError`` on a bad option, which
:func:`build_method` turns into one ``ValueError`` naming the method.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .types import BASE_DEFAULTS, MethodDef, TrainSpec

__all__ = [
    "Amp",
    "Method",
    "OptimizerMethod",
    "SAMMethod",
    "MethodInfo",
    "register",
    "register_method",
    "build_method",
    "list_methods",
    "method_info",
    "make_base_optimizer",
]

LossFn = Callable[[Tensor, Tensor], Tensor]


def make_base_optimizer(params: Any, spec: TrainSpec) -> torch.optim.Optimizer:
    """The base optimizer named by ``spec.base`` over ``params``."""
    if spec.base == "sgd":
        return torch.optim.SGD(
            params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
        )
    if spec.base == "adam":
        return torch.optim.Adam(
            params, lr=spec.lr, betas=(spec.momentum, 0.999), weight_decay=spec.weight_decay
        )
    return torch.optim.AdamW(
        params, lr=spec.lr, betas=(spec.momentum, 0.999), weight_decay=spec.weight_decay
    )


@dataclass
class Amp:
    """Mixed precision for a method: autocast to ``dtype`` on ``device_type``,
    and a GradScaler for fp16 (None for bf16)."""

    device_type: str
    dtype: torch.dtype
    scaler: Any = None


class Method:
    """Base class; see the module docstring for the contract."""

    name = "method"

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.passes = 0.0
        self.amp: Amp | None = None

    # mixed precision: forward under autocast, losses in float32, scaled backward
    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.amp.device_type, dtype=self.amp.dtype)

    def forward(self, model: nn.Module, x: Any) -> Tensor:
        """``model(x)``, under autocast when mixed precision is on (output in float32)."""
        if self.amp is None:
            return model(x)
        with self.autocast():
            out = model(x)
        return out.float() if torch.is_tensor(out) and out.is_floating_point() else out

    @property
    def scaler(self) -> Any:
        return self.amp.scaler if self.amp is not None else None

    def backward(self, loss: Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def closure(
        self, model: nn.Module, x: Any, y: Tensor, loss_fn: LossFn, *, fraction: float = 1.0
    ) -> Callable[[], Tensor]:
        """A closure doing forward + backward of the mean loss; each call adds
        ``fraction`` to :attr:`passes`."""

        def run() -> Tensor:
            loss = loss_fn(self.forward(model, x), y).mean()
            self.backward(loss)
            self.passes += fraction
            return loss

        return run

    def step(self, model: nn.Module, x: Any, y: Tensor, idx: Tensor, loss_fn: LossFn) -> Tensor:
        raise NotImplementedError

    def base_step(self) -> None:
        """The plain optimizer step (through the scaler under fp16)."""
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def on_epoch_end(self, epoch: int, model: nn.Module) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        sd = {"optimizer": self.optimizer.state_dict(), "passes": self.passes}
        if self.scaler is not None:
            sd["scaler"] = self.scaler.state_dict()
        return sd

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.passes = float(state.get("passes", 0.0))
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


class OptimizerMethod(Method):
    """A plain torch optimizer: one forward/backward pass per step."""

    def __init__(self, optimizer: torch.optim.Optimizer, name: str) -> None:
        super().__init__(optimizer)
        self.name = name

    def step(self, model, x, y, idx, loss_fn):
        loss = self.closure(model, x, y, loss_fn)()
        self.base_step()
        return loss.detach()


class SAMMethod(Method):
    """A :class:`samkit.SAM` optimizer (or a variant of it): two passes on the steps that ascend."""

    def __init__(self, optimizer: torch.optim.Optimizer, name: str) -> None:
        super().__init__(optimizer)
        self.name = name

    def step(self, model, x, y, idx, loss_fn):
        closure = self.closure(model, x, y, loss_fn)
        if self.scaler is not None:
            loss = self.optimizer.step(closure, scaler=self.scaler)
            self.scaler.update()
        else:
            loss = self.optimizer.step(closure)
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


@dataclass(frozen=True, kw_only=True)
class MethodInfo(MethodDef):
    """A registered method and what the study needs to know about it: a
    :class:`~samkit.experiments.types.MethodDef` (``description``, ``defaults``,
    ``rho_scale``, ``uses_rho``; the one description of a method every study shares)
    plus its name, builder and capabilities.

    ``base``: the base optimizer used when the study sets none (None: the
    method fixes its own). ``in_default_study``: part of a plain
    ``samkit compare`` (the slowest are left to ``--optimizers all``).
    Capabilities, checked before any training: ``supports_scaler`` (fp16 AMP),
    ``needs_index`` (per-sample memory: map-style training data only),
    ``per_sample_loss`` (a loss returning one value per sample),
    ``classification_only`` (the method's loss term reads class logits).
    """

    name: str
    builder: Callable[..., Method]
    base: str | None
    in_default_study: bool = True
    supports_scaler: bool = True
    needs_index: bool = False
    per_sample_loss: bool = False
    classification_only: bool = False


_REGISTRY: dict[str, MethodInfo] = {}


def register(
    name: str,
    *,
    description: str,
    defaults: dict[str, Any] | None = None,
    base: str | None = "sgd",
    rho_scale: float = 1.0,
    in_default_study: bool = True,
    supports_scaler: bool = True,
    needs_index: bool = False,
    per_sample_loss: bool = False,
    classification_only: bool = False,
) -> Callable[[Callable[..., Method]], Callable[..., Method]]:
    """Decorator: register ``builder(model, spec, **options) -> Method`` as ``name``.

    Args:
        name: lower-case name used on the command line (``"gsam"``).
        description: one line for ``samkit compare --list`` (name the paper).
        defaults: the method's own options and their defaults; a ``"rho"``
            entry marks the method as sharpness-aware (``--rho`` applies to it).
        base, rho_scale, in_default_study, supports_scaler, needs_index,
        per_sample_loss, classification_only: see :class:`MethodInfo`.
    """

    def decorate(builder: Callable[..., Method]) -> Callable[..., Method]:
        register_method(
            name,
            builder,
            description=description,
            defaults=defaults,
            base=base,
            rho_scale=rho_scale,
            in_default_study=in_default_study,
            supports_scaler=supports_scaler,
            needs_index=needs_index,
            per_sample_loss=per_sample_loss,
            classification_only=classification_only,
        )
        return builder

    return decorate


def register_method(
    name: str,
    builder: Callable[..., Method],
    *,
    description: str,
    defaults: dict[str, Any] | None = None,
    base: str | None = "sgd",
    rho_scale: float = 1.0,
    **capabilities: bool,
) -> None:
    """Add a method to the registry (replacing one of the same name); the
    function form of :func:`register`, for methods defined outside samkit."""
    if (
        not isinstance(name, str)
        or not name
        or name != name.lower()
        or any(c.isspace() or c in ",:=" for c in name)
    ):
        raise ValueError(
            f"Invalid name value: {name!r} (lower case, no spaces, commas, colons or '=')"
        )
    if not callable(builder):
        raise ValueError(f"Invalid builder value: {builder!r} (a callable)")
    if base is not None and base not in BASE_DEFAULTS:
        raise ValueError(f"Invalid base value: {base!r} (choose from {', '.join(BASE_DEFAULTS)})")
    if not (
        isinstance(rho_scale, (int, float)) and not isinstance(rho_scale, bool) and rho_scale > 0
    ):
        raise ValueError(f"Invalid rho_scale value: {rho_scale!r} (must be > 0)")
    known = {
        "in_default_study",
        "supports_scaler",
        "needs_index",
        "per_sample_loss",
        "classification_only",
    }
    for key, value in capabilities.items():
        if key not in known:
            raise ValueError(
                f"Invalid capability: {key!r} (choose from {', '.join(sorted(known))})"
            )
        if not isinstance(value, bool):
            raise ValueError(f"Invalid {key} value: {value!r} (a boolean)")
    _REGISTRY[name] = MethodInfo(
        description,
        dict(defaults or {}),
        float(rho_scale),
        name=name,
        builder=builder,
        base=base,
        **capabilities,
    )


def _registry() -> dict[str, MethodInfo]:
    # samkit's own methods register themselves when their module is imported;
    # importing it here means any lookup sees them, whoever imports first.
    from . import methods  # noqa: F401

    return _REGISTRY


def list_methods() -> dict[str, str]:
    """Registered method names and their descriptions."""
    return {name: info.description for name, info in _registry().items()}


def method_info(name: str) -> MethodInfo:
    reg = _registry()
    if not isinstance(name, str) or name not in reg:
        raise ValueError(f"Invalid method value: {name!r} (choose from {', '.join(reg)})")
    return reg[name]


def build_method(name: str, model: nn.Module, spec: TrainSpec, **options: Any) -> Method:
    """Build the method ``name`` for ``model``; ``options`` override its defaults."""
    info = method_info(name)
    unknown = sorted(set(options) - set(info.defaults))
    if unknown:
        raise ValueError(
            f"Invalid option for method {name!r}: {', '.join(unknown)} "
            f"(it takes {', '.join(sorted(info.defaults)) or 'no options'})"
        )
    opts = {**info.defaults, **options}
    try:
        return info.builder(model, spec, **opts)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"Invalid settings for method {name!r}: {exc}") from exc


@contextlib.contextmanager
def temporary_method(name: str, builder: Callable[..., Method], **kwargs: Any) -> Iterator[None]:
    """Register a method for the duration of a block (tests, notebooks)."""
    previous = _registry().get(name)
    register_method(name, builder, **kwargs)
    try:
        yield
    finally:
        if previous is None:
            _REGISTRY.pop(name, None)
        else:
            _REGISTRY[name] = previous
