"""Training methods: a registry of optimizers the trainer and the study can run.

A *method* owns its optimizer and does one training step. The trainer calls::

    method = build_method("sam", model, TrainSpec(lr=0.05, ...), rho=0.05)
    loss = method.step(model, x, y, idx, loss_fn)   # one step on one batch

Contract for a method (subclass :class:`Method`; helper modules such as
``variant_methods.py`` register more with :func:`register_method`):

* ``step(model, x, y, idx, loss_fn) -> Tensor`` does one full training step
  on the batch ``(x, y)`` and returns the *mean loss at the weights before the
  update*, as a detached 0-d tensor (no ``.item()`` needed). ``idx`` holds the
  batch's indices into the training set (int64, same length as ``y``), for
  methods that keep per-sample state (SAF keeps past outputs per index).
  ``loss_fn(logits, y)`` returns **per-sample** losses, shape ``(batch,)``;
  take ``.mean()`` for the usual loss, or select samples (ESAM). The method
  calls the model itself, as many times as it needs; the model is already in
  train mode and the gradients are zero (``set_to_none``) on entry.
* ``passes`` (float) counts the forward+backward passes paid so far, in units
  of one pass over the whole batch: plain SGD adds 1 per step, SAM 2, a second
  pass on half of the batch 0.5. :meth:`Method.closure` counts for you. The
  study divides by SGD's to give the "cost relative to SGD" column.
* ``optimizer`` is the object whose ``param_groups`` carry ``"lr"``; the
  trainer sets the learning rate of every group each step (its schedule).
* ``state_dict()`` / ``load_state_dict()`` hold everything needed to resume
  (optimizer state, ``passes``, any per-sample memory).
* ``on_epoch_end(epoch, model)`` is called after each epoch (0-based); use it
  for epoch-level state (SAF's output memory, late-SAM switches). Default: no-op.

A *builder* is ``builder(model, spec: TrainSpec, **options) -> Method``.
``spec`` carries the hyper-parameters every method shares (base optimizer,
learning rate, momentum, weight decay, the number of steps and epochs);
``options`` are the method's own (``rho``, ``eta``, ``k`` ...), with the
defaults given at registration. A builder raises ``TypeError`` or
``ValueError`` on an option it does not know; :func:`build_method` turns both
into one ``ValueError`` naming the method.

Methods registered here: ``sgd`` and ``adam`` (plain optimizers), ``sam``
(Foret et al., arXiv 2010.01412) and ``asam`` (Kwon et al., arXiv 2102.11600)
around a base optimizer chosen by ``spec.base`` (``"sgd"``: SGD with
momentum, ``"adam"``, ``"adamw"``).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..optim import SAM

__all__ = [
    "TrainSpec",
    "Method",
    "OptimizerMethod",
    "SAMMethod",
    "MethodInfo",
    "register_method",
    "build_method",
    "list_methods",
    "method_info",
    "make_base_optimizer",
    "BASE_DEFAULTS",
]

LossFn = Callable[[Tensor, Tensor], Tensor]

#: Learning rate, momentum and weight decay used when the study does not set them,
#: per base optimizer. Found on MNIST-1D with the paper's CNN (docs/compare.md).
BASE_DEFAULTS: dict[str, dict[str, float]] = {
    "sgd": {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
    "adam": {"lr": 1e-2, "momentum": 0.9, "weight_decay": 0.0},
    "adamw": {"lr": 1e-2, "momentum": 0.9, "weight_decay": 1e-2},
}


@dataclass
class TrainSpec:
    """Hyper-parameters shared by every method.

    ``momentum`` is SGD's momentum, or Adam's beta1.
    """

    base: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    total_steps: int = 1
    steps_per_epoch: int = 1
    epochs: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.base not in BASE_DEFAULTS:
            raise ValueError(
                f"Invalid base value: {self.base!r} (choose from {', '.join(BASE_DEFAULTS)})"
            )
        for name in ("lr", "momentum", "weight_decay"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
                raise ValueError(f"Invalid {name} value: {v!r} (must be a finite number >= 0)")
        if not self.lr > 0:
            raise ValueError(f"Invalid lr value: {self.lr!r} (must be > 0)")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"Invalid momentum value: {self.momentum!r} (must be in [0, 1))")

    def replace(self, **changes: Any) -> TrainSpec:
        return dataclasses.replace(self, **changes)


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


class Method:
    """Base class; see the module docstring for the contract."""

    name = "method"

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.passes = 0.0

    def closure(
        self, model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn, *, fraction: float = 1.0
    ):
        """A closure doing forward + backward of the mean loss; each call adds
        ``fraction`` to :attr:`passes`."""

        def run() -> Tensor:
            loss = loss_fn(model(x), y).mean()
            loss.backward()
            self.passes += fraction
            return loss

        return run

    def step(self, model: nn.Module, x: Tensor, y: Tensor, idx: Tensor, loss_fn: LossFn) -> Tensor:
        raise NotImplementedError

    def on_epoch_end(self, epoch: int, model: nn.Module) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "passes": self.passes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.passes = float(state.get("passes", 0.0))


class OptimizerMethod(Method):
    """A plain torch optimizer: one forward/backward pass per step."""

    def __init__(self, optimizer: torch.optim.Optimizer, name: str) -> None:
        super().__init__(optimizer)
        self.name = name

    def step(self, model, x, y, idx, loss_fn):
        loss = self.closure(model, x, y, loss_fn)()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


class SAMMethod(Method):
    """A :class:`samkit.SAM` optimizer: two passes on the steps that ascend."""

    def __init__(self, optimizer: SAM, name: str) -> None:
        super().__init__(optimizer)
        self.name = name

    def step(self, model, x, y, idx, loss_fn):
        loss = self.optimizer.step(self.closure(model, x, y, loss_fn))
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


@dataclass(frozen=True)
class MethodInfo:
    name: str
    builder: Callable[..., Method]
    description: str
    defaults: dict[str, Any]
    base: str | None  # default base optimizer; None: the method fixes its own
    rho_scale: float = 1.0  # --rho r gives this method rho = rho_scale * r

    @property
    def uses_rho(self) -> bool:
        return "rho" in self.defaults


_REGISTRY: dict[str, MethodInfo] = {}


def register_method(
    name: str,
    builder: Callable[..., Method],
    *,
    description: str,
    defaults: dict[str, Any] | None = None,
    base: str | None = "sgd",
    rho_scale: float = 1.0,
) -> None:
    """Add a method to the registry (replacing one of the same name).

    Args:
        name: lower-case name used on the command line (``"gsam"``).
        builder: ``builder(model, spec, **options) -> Method``.
        description: one line for ``samkit compare --list``.
        defaults: the method's own options and their defaults; a ``"rho"``
            entry marks the method as sharpness-aware (``--rho`` applies to it).
        base: the base optimizer used when the study sets none (``"sgd"``,
            ``"adam"``, ``"adamw"``), or None when the method fixes its own.
        rho_scale: how this method's rho compares with SAM's: a study run
            with ``--rho r`` gives it ``rho = rho_scale * r`` (ASAM: 10).
    """
    if not name or name != name.lower() or any(c.isspace() or c in ",:=" for c in name):
        raise ValueError(
            f"Invalid name value: {name!r} (lower case, no spaces, commas, colons or '=')"
        )
    if base is not None and base not in BASE_DEFAULTS:
        raise ValueError(f"Invalid base value: {base!r} (choose from {', '.join(BASE_DEFAULTS)})")
    if not (isinstance(rho_scale, (int, float)) and rho_scale > 0):
        raise ValueError(f"Invalid rho_scale value: {rho_scale!r} (must be > 0)")
    _REGISTRY[name] = MethodInfo(
        name, builder, description, dict(defaults or {}), base, float(rho_scale)
    )


def list_methods() -> dict[str, str]:
    """Registered method names and their descriptions."""
    return {name: info.description for name, info in _REGISTRY.items()}


def method_info(name: str) -> MethodInfo:
    if name not in _REGISTRY:
        raise ValueError(f"Invalid method value: {name!r} (choose from {', '.join(_REGISTRY)})")
    return _REGISTRY[name]


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


# ----------------------------------------------------------------- builders
def _sgd(model: nn.Module, spec: TrainSpec) -> Method:
    return OptimizerMethod(make_base_optimizer(model.parameters(), spec.replace(base="sgd")), "sgd")


def _adam(model: nn.Module, spec: TrainSpec) -> Method:
    base = spec.base if spec.base in ("adam", "adamw") else "adam"
    return OptimizerMethod(make_base_optimizer(model.parameters(), spec.replace(base=base)), base)


def _sam(model: nn.Module, spec: TrainSpec, *, rho: float) -> Method:
    opt = SAM(make_base_optimizer(model.parameters(), spec), rho=rho, model=model)
    return SAMMethod(opt, "sam")


def _asam(model: nn.Module, spec: TrainSpec, *, rho: float, eta: float) -> Method:
    opt = SAM(
        make_base_optimizer(model.parameters(), spec), rho=rho, adaptive=True, eta=eta, model=model
    )
    return SAMMethod(opt, "asam")


register_method("sgd", _sgd, description="SGD with momentum (one pass per step)", base="sgd")
register_method("adam", _adam, description="Adam (one pass per step)", base="adam")
register_method(
    "sam",
    _sam,
    description="SAM, Foret et al. 2021 (arXiv 2010.01412): two passes per step",
    defaults={"rho": 0.05},
)
register_method(
    "asam",
    _asam,
    description="ASAM, Kwon et al. 2021 (arXiv 2102.11600): scale-invariant ascent",
    defaults={"rho": 0.5, "eta": 0.01},
    rho_scale=10.0,
)

# Variants built elsewhere register themselves on import; that module is optional.
try:
    importlib.import_module(f"{__package__}.variant_methods")
except ModuleNotFoundError as _exc:  # pragma: no cover - depends on what is installed
    if _exc.name != f"{__package__}.variant_methods":
        raise
