r"""LookSAM: SAM every k steps, reusing its direction in between
(Liu et al., CVPR 2022, arXiv 2203.02714).

On every k-th step (steps 0, k, 2k, ...) LookSAM takes a full SAM step and
keeps the part of the SAM gradient :math:`g_s = \nabla f(w + e)` that is
orthogonal to the plain gradient :math:`g = \nabla f(w)`:

.. math:: g_v = g_s - \frac{\langle g_s, g \rangle}{\lVert g \rVert^2}\, g

On the k - 1 steps in between it pays for **one** forward/backward pass only
and adds the stored component back, scaled to the current gradient:

.. math:: \tilde g = g + \alpha \frac{\lVert g \rVert}{\lVert g_v \rVert}\, g_v

The base optimizer (momentum SGD, Adam, ...) receives :math:`g_s` on full
steps and :math:`\tilde g` in between, through ``.grad``, so its own state
is handled by itself. Cost: :math:`(1 + 1/k)` passes per step; the closure
runs ``steps + ceil(steps / k)`` times.

LookSAM is SAM with a policy (:class:`~samkit.optim.policy.EveryK`, rho not
scaled) and a mix (:class:`~samkit.optim.mix.ReuseOrthogonal`); this module
only assembles them.

Choosing ``alpha``: the reused term has norm exactly :math:`\alpha \lVert g \rVert`,
whatever the size of the orthogonal part of SAM's own gradient
(:math:`\lVert g_v \rVert` at the full steps). When that part is small next
to :math:`\lVert g \rVert` -- a small rho, a small model -- the paper's
``alpha=0.7`` pushes along :math:`g_v` several times harder than SAM itself,
much like SAM with a larger rho. On the MNIST-1D CNN (1000 samples, SGD
lr 0.1 momentum 0.9, rho 0.05, k 5) :math:`\lVert g_v \rVert / \lVert g \rVert`
is about 0.1 to 0.3, and ``alpha=0.7`` underfits (about 55 % training
accuracy after 60 epochs, where SGD reaches 100 %; SAM with rho 0.3 and
LookSAM recomputing :math:`g_v` on every step underfit too, so the cause is
the size of the term, not a stale :math:`g_v`), while ``alpha=0.2`` trains
normally. Pick ``alpha`` near the ratio seen at the full steps, or tune it.
The default is 0.2 (samkit 0.3; it was the paper's 0.7, which is the
paper's value for ViTs on ImageNet: pass ``alpha=0.7`` there).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .._checks import check_int
from .mix import ReuseOrthogonal
from .policy import EveryK
from .sam import SAM

if TYPE_CHECKING:  # pragma: no cover
    from torch.optim.optimizer import ParamsT

__all__ = ["LookSAM"]


class LookSAM(SAM):
    r"""LookSAM (arXiv 2203.02714); see the module docstring.

    Args:
        params_or_optimizer, base_optimizer: as :class:`~samkit.SAM`.
        rho: the SAM radius on full steps (default 0.05; not scaled with k).
        k: the interval between full SAM steps (default 5; the paper uses 5
            to 10). ``k=1`` is SAM.
        alpha: weight of the reused component (default 0.2, which matched
            SAM's gain on the small built-in models; the paper's 0.7, for
            ViTs on ImageNet, put the MNIST-1D CNN 23-34 points below SGD:
            docs/variants.md).
        **kwargs: the other :class:`~samkit.SAM` arguments, except ``policy``
            and ``mix`` (LookSAM's are its own).

    Works with a ``GradScaler`` and DDP (after a local first pass ``g`` is
    averaged over DDP's process group before ``g_v`` is formed, so all
    replicas store the same ``g_v``). The stored ``g_v`` is part of
    :meth:`state_dict`, so a resumed run takes the same in-between steps as
    one that never stopped.
    """

    mix: ReuseOrthogonal  # (typing only: its reuse mix, set by __init__)

    def __init__(
        self,
        params_or_optimizer: ParamsT | torch.optim.Optimizer,
        base_optimizer: type[torch.optim.Optimizer] | None = None,
        *,
        rho: float | str = 0.05,
        k: int = 5,
        alpha: float = 0.2,
        **kwargs: Any,
    ) -> None:
        for name in ("policy", "mix"):
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"Invalid {name} value: LookSAM chooses its own steps (every k) and mix; "
                    "pass k and alpha instead, or build SAM(..., policy=..., mix=ReuseOrthogonal(alpha))"
                )
            kwargs.pop(name, None)
        k = check_int("k", k, 1)
        mix = ReuseOrthogonal(alpha)  # validates alpha
        super().__init__(
            params_or_optimizer,
            base_optimizer,
            rho=rho,
            policy=EveryK(k, scale_rho=False),
            mix=mix,
            **kwargs,
        )
        self.k = k

    @property
    def alpha(self) -> float:
        return self.mix.alpha

    @property
    def reused(self) -> int:
        """In-between steps that added the stored component."""
        return self.mix.reused

    def __repr__(self) -> str:
        return f"LookSAM(rho={self._sam_defaults['rho']}, k={self.k}, alpha={self.alpha}, base={self.base_optimizer!r})"
