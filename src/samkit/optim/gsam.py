r"""GSAM: surrogate-gap guided SAM (Zhuang et al., ICLR 2022, arXiv 2203.08065).

SAM minimises the perturbed loss :math:`f_p(w) = f(w + e(w))`. GSAM also
shrinks the *surrogate gap* :math:`h = f_p - f` without undoing that: it
splits the first-pass gradient :math:`g = \nabla f(w)` into its component
along the perturbed gradient :math:`g_p = \nabla f(w + e)` and the rest,

.. math::

    g_\parallel = \frac{\langle g, g_p \rangle}{\lVert g_p \rVert^2}\, g_p,
    \qquad g_\perp = g - g_\parallel,

and feeds the base optimizer

.. math:: \tilde g = g_p - \alpha\, g_\perp

i.e. a gradient *ascent* on :math:`f` along :math:`g_\perp`, which lowers
:math:`h` while leaving the descent on :math:`f_p` untouched to first order.
As in the paper, rho follows the learning-rate schedule by default
(:class:`~samkit.optim.rho.FollowLR`): ``rho_t = rho_min +
(rho - rho_min) (lr_t - lr_min) / (lr_max - lr_min)``.

GSAM is SAM with a mix (:class:`~samkit.optim.mix.SurrogateGap`) and, by
default, a rho controller; this module only assembles them.
Cost: two passes, as SAM, plus one weight-sized buffer for ``g``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .._checks import check_flag, check_nonneg, check_rho
from .mix import SurrogateGap
from .rho import FollowLR, LrRangeError, RhoController
from .sam import SAM

if TYPE_CHECKING:  # pragma: no cover
    from torch.optim.optimizer import ParamsT

__all__ = ["GSAM"]


class GSAM(SAM):
    r"""Surrogate-gap guided SAM (arXiv 2203.08065); see the module docstring.

    Args:
        params_or_optimizer, base_optimizer: as :class:`~samkit.SAM`.
        rho: the radius at the peak learning rate (default 0.05), or ``"auto"``
            or a rho controller (:mod:`samkit.optim.autorho`; it then sets rho
            instead of the lr schedule: ``follow_lr`` is ignored, and ``rho_min``,
            ``lr_min`` and ``lr_max`` are refused).
        alpha: weight of the ascent along :math:`g_\perp` (default 0.1; the
            paper tunes it per model; ``alpha=0`` is SAM with the rho schedule).
        follow_lr: tie rho to the learning rate (default True). Each step,
            before the ascent, every group's rho is set from its current lr.
        rho_min: rho at ``lr_min`` (default 0).
        lr_min: the learning rate at which rho reaches ``rho_min`` (default 0).
        lr_max: the peak learning rate (default: each group's, from its LR scheduler:
            ``OneCycleLR``'s ``max_lr``, else ``initial_lr``, else its lr at construction;
            give it under ``CyclicLR``, which records no peak).
        **kwargs: the other :class:`~samkit.SAM` arguments (not ``mix``).

    Works with a ``GradScaler`` (both passes are unscaled before mixing) and
    DDP (after a local first pass ``g`` is averaged over DDP's process group
    before mixing, so replicas agree).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = GSAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05, alpha=0.1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> def closure():
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> _ = opt.step(closure); opt.steps
        1
    """

    mix: SurrogateGap  # (typing only: its surrogate-gap mix, set by __init__)

    def __init__(
        self,
        params_or_optimizer: ParamsT | torch.optim.Optimizer,
        base_optimizer: type[torch.optim.Optimizer] | None = None,
        *,
        rho: float | str | RhoController = 0.05,
        alpha: float = 0.1,
        follow_lr: bool = True,
        rho_min: float = 0.0,
        lr_min: float = 0.0,
        lr_max: float | None = None,
        **kwargs: Any,
    ) -> None:
        mix = SurrogateGap(alpha)  # validates alpha
        follow_lr = bool(check_flag("follow_lr", follow_lr))
        if kwargs.get("mix") is not None:
            raise ValueError(
                "Invalid mix value: GSAM's mix is its surrogate-gap term; use SAM(..., mix=...)"
            )
        kwargs.pop("mix", None)
        rho_min, lr_min = check_nonneg("rho_min", rho_min), check_nonneg("lr_min", lr_min)
        # "auto" or a controller: it sets the radius instead of the lr schedule
        controlled = isinstance(rho, (str, RhoController))
        if (controlled or not follow_lr) and (rho_min or lr_min or lr_max is not None):
            name, value = (
                ("rho_min", rho_min) if rho_min else ("lr_min", lr_min) if lr_min
                else ("lr_max", lr_max)
            )  # fmt: skip
            off = f"rho={rho!r}" if controlled else "follow_lr=False"
            raise ValueError(
                f"Invalid {name} value: {value!r} shapes GSAM's rho-follows-lr schedule, which "
                f"{off} turns off (it would be ignored)"
            )
        radius: float | str | RhoController = rho
        if not isinstance(rho, (str, RhoController)):
            check_rho("rho", rho)
            radius = (
                FollowLR(rho, rho_min=rho_min, lr_min=lr_min, lr_max=lr_max) if follow_lr else rho
            )
        try:
            super().__init__(params_or_optimizer, base_optimizer, rho=radius, mix=mix, **kwargs)
        except LrRangeError as err:  # only FollowLR raises it: a group's lr is not above lr_min
            raise ValueError(f"{err} -- or pass follow_lr=False to keep rho fixed") from None

    @property
    def alpha(self) -> float:
        return self.mix.alpha

    def __repr__(self) -> str:
        rho = self.rho_controller  # "auto" or an instance shows as its controller
        shown = (
            rho if rho is not None and not isinstance(rho, FollowLR) else self._sam_defaults["rho"]
        )
        return f"GSAM(rho={shown}, alpha={self.alpha}, base={self.base_optimizer!r})"
