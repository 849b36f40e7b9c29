r"""Momentum-SAM: SAM at SGD's cost (Becker, Altrock and Risse, 2024, arXiv 2401.12033).

SAM spends a second forward/backward pass on the ascent direction
:math:`g_t / \lVert g_t \rVert`. Momentum-SAM takes the direction
from the base optimizer's momentum :math:`v_t` instead, which exists already:

.. math::

    \tilde w_t = w_t - \rho \frac{v_t}{\lVert v_t \rVert}, \qquad
    g_t = \nabla L_{B_t}(\tilde w_t), \qquad
    w_{t+1} = \mathrm{BaseStep}(w_t, g_t)

so one step costs one forward/backward pass, at the perturbed point, plus a
few passes over the weights (the norm of ``v``, the backup, the restore).
For SGD with momentum ``v`` is the momentum buffer (``-lr v`` is the update,
so ``-v`` points where the optimizer is heading: a normalised Nesterov
look-ahead of length rho); for Adam it is the first moment ``m``, the
paper's rule for Adam (its AdamW variant; normalised, the bias correction of
``m`` drops out). The norm runs over every perturbed parameter group, as
SAM's does.

Step 0, before the base optimizer has made a buffer, is a plain base step
at ``w`` (``opt.ascents`` stays 0); a zero ``v`` gives ``e = 0``. This is
what the paper's implementation does (its buffer starts at zero).

Unlike the paper's code, which keeps the weights at ``w~`` between steps and
moves them by adding and subtracting ``rho v / ||v||``, the weights rest at
``w`` (copied back bit for bit, as in every samkit method), so evaluation
and checkpoints see ``w``; the base optimizer's weight decay therefore acts
on ``w``, where the paper's SGD applies it at ``w~`` (a difference of
``wd * e``).

The paper's radius is much larger than SAM's: rho = 3 in every experiment
(CIFAR-100 WideResNet and ResNet-50, ImageNet ResNet-50 and ViT with AdamW),
where SAM uses 0.2 on the same tasks (its repository's commands). It is an
absolute length, so no one value fits models of every size: on a
5k-parameter CNN (initial weight norm 5.5) rho = 3 destroys training and
0.5-0.75 works best (samkit's variants benchmark, docs/variants.md). So
``rho`` has no default: a value left out is a ``ValueError`` that says how
to pick one.

MomentumSAM is :class:`~samkit.SAM` with the :class:`~samkit.Momentum`
perturbation, whose ``needs_gradient = False`` makes ``step(closure)`` move
the weights first and run the closure once; this module only picks the
buffer for the base optimizer and checks that there is one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .perturbation import Momentum
from .sam import SAM

if TYPE_CHECKING:  # pragma: no cover
    from torch.optim.optimizer import ParamsT

__all__ = ["MomentumSAM", "momentum_buffer_key"]

#: base optimizers whose first moment is ``exp_avg`` (the paper's rule for Adam)
_FIRST_MOMENT = tuple(
    getattr(torch.optim, name)
    for name in ("Adam", "AdamW", "NAdam", "RAdam", "Adamax")
    if hasattr(torch.optim, name)
)
#: base optimizers with a ``momentum_buffer`` when their ``momentum`` is > 0
_MOMENTUM = (torch.optim.SGD, torch.optim.RMSprop)


def momentum_buffer_key(base: torch.optim.Optimizer, rho_key: str = "rho") -> str:
    """The state key of ``base``'s momentum; ``ValueError`` when it keeps none.

    SGD and RMSprop: ``"momentum_buffer"``, and every group with ``rho > 0``
    must have ``momentum > 0`` (torch keeps no buffer otherwise). The Adam
    family: ``"exp_avg"``. Any other optimizer: pass ``buffer=`` yourself.
    """
    if isinstance(base, _FIRST_MOMENT):
        return "exp_avg"
    if isinstance(base, _MOMENTUM):
        for i, group in enumerate(base.param_groups):
            if group.get(rho_key, 1.0) > 0 and not group.get("momentum", 0.0) > 0:
                raise ValueError(
                    f"Invalid base_optimizer value: {type(base).__name__} param group {i} has "
                    f"momentum={group.get('momentum', 0.0)!r}, so it keeps no momentum buffer for "
                    "Momentum-SAM to follow; give it momentum > 0 (e.g. 0.9)"
                )
        return "momentum_buffer"
    raise ValueError(
        f"Invalid base_optimizer value: Momentum-SAM knows the momentum of SGD, RMSprop and the "
        f"Adam family, not of {type(base).__name__}; pass buffer=<its state key> "
        "(the per-parameter state entry holding its momentum)"
    )


_NO_RHO = (
    "Invalid rho value: None; Momentum-SAM needs its radius (rho=...): an absolute length, so "
    "no one value fits every model. The paper uses rho=3.0 for ResNet-50 and WideResNet on "
    "CIFAR/ImageNet; on samkit's 5k-parameter MNIST-1D CNN and 28k-parameter ResNet 3.0 puts "
    "training near chance and 0.25-0.5 works with SGD (0.05-0.1 with Adam on the CNN). Check a "
    "few values against SAM once, or search with `samkit tune` (docs/variants.md)"
)


class MomentumSAM(SAM):
    r"""Momentum-SAM (arXiv 2401.12033); see the module docstring.

    Args:
        params_or_optimizer, base_optimizer: as :class:`~samkit.SAM`. The base
            optimizer needs a momentum: SGD or RMSprop with ``momentum > 0``,
            or Adam, AdamW, NAdam, RAdam, Adamax.
        rho: the radius, ``||e|| = rho``; required (no default since 0.3,
            which had the paper's 3.0). It is absolute, so it depends on the
            model: the paper's 3.0 for ResNet-50 / WideResNet on CIFAR and
            ImageNet (and ViTs), 0.5 on the 5k-parameter MNIST-1D CNN, where 3
            puts training at chance (docs/variants.md). Tune it once against
            SAM (``samkit tune``).
        buffer: the state key holding the momentum, for another optimizer
            (default: chosen from the base optimizer's type; for SGD, RMSprop
            and the Adam family only their own key is accepted). A key the
            base optimizer's state turns out not to hold is refused at the
            first step after the base optimizer has stepped.
        **kwargs: the other :class:`~samkit.SAM` arguments, except
            ``perturbation``, ``adaptive``, ``mix`` and ``ascent_weight_decay``
            (no first-pass gradient to mix or decay) and a policy that reads
            the gradient (:class:`~samkit.GradNormTrigger`). Policies on the
            step count work: ``policy=Late(...)`` is Momentum-SAM late in
            training only, ``EveryK(k)`` one step in k.

    ``step(closure)`` runs the closure once, at ``w + e``, and returns the
    loss there. The two-step form calls :meth:`first_step` *before* the
    forward pass::

        opt.first_step()
        loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)

    Works with ``model=`` (BatchNorm statistics come from the pass at
    ``w + e``, the only one), a ``GradScaler``, DDP (the pass is a normal
    all-reduced one; the momentum, hence ``e``, is the same on every replica)
    and ``state_dict`` (the momentum is the base optimizer's state).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = MomentumSAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=3.0)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> def closure():
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> for _ in range(2):
        ...     _ = opt.step(closure); opt.zero_grad()
        >>> opt.steps, opt.ascents   # step 0 has no momentum yet: a plain step
        (2, 1)
    """

    perturbation: Momentum  # (typing only: its momentum perturbation, set by __init__)

    def __init__(
        self,
        params_or_optimizer: ParamsT | torch.optim.Optimizer,
        base_optimizer: type[torch.optim.Optimizer] | None = None,
        *,
        rho: float | None = None,
        buffer: str | None = None,
        **kwargs: Any,
    ) -> None:
        if rho is None:
            raise ValueError(_NO_RHO)
        for name in ("perturbation", "adaptive", "mix"):
            if kwargs.get(name):
                raise ValueError(
                    f"Invalid {name} value: Momentum-SAM's ascent is the momentum direction; "
                    "use SAM(..., perturbation=samkit.Momentum(buffer)) to build another combination"
                )
            kwargs.pop(name, None)
        if kwargs.get("ascent_weight_decay"):
            raise ValueError(
                f"Invalid ascent_weight_decay value: {kwargs['ascent_weight_decay']!r}; Momentum-SAM "
                "ascends along the base optimizer's momentum, which already carries its weight decay"
            )
        kwargs.pop("ascent_weight_decay", None)
        perturbation = Momentum(buffer if buffer is not None else "momentum_buffer")
        super().__init__(
            params_or_optimizer, base_optimizer, rho=rho, perturbation=perturbation, **kwargs
        )
        base = self.base_optimizer
        if buffer is None:
            perturbation.buffer = momentum_buffer_key(base, self.rho_key)
        elif type(base) in _FIRST_MOMENT + _MOMENTUM:
            known = momentum_buffer_key(base, self.rho_key)
            if buffer != known:
                raise ValueError(
                    f"Invalid buffer value: {buffer!r} ({type(base).__name__} keeps its momentum "
                    f"under {known!r}; pass buffer={known!r} or leave buffer=None)"
                )

    @property
    def buffer(self) -> str:
        """The state key of the momentum the ascent follows."""
        return self.perturbation.buffer

    def __repr__(self) -> str:
        return (
            f"MomentumSAM(rho={self.defaults[self.rho_key]}, buffer={self.buffer!r}, "
            f"policy={self.policy!r}, base={self.base_optimizer!r})"
        )
