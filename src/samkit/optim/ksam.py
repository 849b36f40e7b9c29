r"""K-SAM: both SAM gradients on the k highest-loss samples only
(Ni, Chiang, Geiping, Goldblum, Wilson and Goldstein, 2022, arXiv 2210.12864).

SAM's two gradients cost two forward/backward passes over the batch ``B``.
K-SAM ranks the samples by their loss at ``w`` with one forward pass (no
backward), keeps the ``k`` highest, ``B_k``, and computes *both* gradients
on ``B_k`` alone:

.. math::

    B_k = \operatorname{top}_k \{\ell_i(w)\}_{i \in B}, \qquad
    e = \rho \frac{\nabla L_{B_k}(w)}{\lVert \nabla L_{B_k}(w) \rVert}, \qquad
    w \leftarrow \mathrm{BaseStep}\big(w, \nabla L_{B_k}(w + e)\big)

with :math:`L_{B_k}` the mean loss over ``B_k``. Cost per step: one forward
over the batch and two forward/backward passes over ``k`` of its samples,
``1/3 + 2 k/|B|`` passes (a forward alone counted as 1/3 of a pass). With
``k = |B|/3`` that is one pass, SGD's.

Because the selection needs per-sample losses, K-SAM takes ESAM's closure:
``closure(index)`` returns the per-sample losses of the samples ``index``
(``None``: the whole batch) *without* calling backward; K-SAM does the
backward passes. Built on SAM's public protocol (``first_pass``,
``first_step``, ``second_step``, ``abort_step``).

Where the batch has many wrong labels, its highest losses are mostly theirs:
K-SAM then spends both gradients on the mislabelled samples.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .._checks import check_unit_interval
from . import _args, _compile, _feedback
from .batchnorm import freeze_bn_stats
from .esam import backward_mean
from .sam import SAM

if TYPE_CHECKING:  # pragma: no cover
    from torch.optim.optimizer import ParamsT

__all__ = ["KSAM"]


_NO_FRACTION = (
    "Invalid fraction value: None; K-SAM needs fraction, the share of each batch (the highest "
    "losses) both its gradients are computed on. That selection is the method and it costs "
    "accuracy: at the paper's 1/3, 2-22 points below the base optimizer in short runs of "
    "samkit's MNIST-1D CNN, GRU and ResNet (on the CNN after 30 epochs 4-10 with SGD, 1-22 "
    "with Adam), where fraction=1 is SAM plus a forward pass. Pass fraction=1/3 for the "
    "paper's K-SAM, or a larger share (docs/variants.md, Defaults)"
)


class KSAM(SAM):
    r"""K-SAM (arXiv 2210.12864); see the module docstring.

    Args:
        params_or_optimizer, base_optimizer: as :class:`~samkit.SAM`.
        rho: the radius (default 0.05, SAM's).
        fraction: ``k / |B|``, the share of each batch whose gradients are
            computed, in (0, 1]; required (the paper's 1/3, so that a step costs
            one pass, as its title promises: ``1/3 + 2/3``; see ``_NO_FRACTION``
            for why there is no default). ``k`` is
            ``ceil(fraction * |B|)``, at least 1. 1 is SAM plus a forward pass (the same
            weights, bit for bit).
        **kwargs: the other :class:`~samkit.SAM` arguments.

    Use :meth:`step` with a per-sample closure (as ESAM's)::

        def closure(index=None):
            xb, yb = (x, y) if index is None else (x[index], y[index])
            return F.cross_entropy(model(xb), yb, reduction="none")

        loss = opt.step(closure)   # mean loss over the whole batch at w

    With ``model=`` the BatchNorm statistics come from the selection pass
    (the whole batch, at ``w``) only. Works with DDP (each replica selects
    among its own samples), ``scaler=`` (fp16 AMP) and the policies (a
    declined step is a base step on the ``k`` selected samples).
    """

    def hold_back(self, losses: Tensor, ids: Any, fraction: float = 0.1, **kw: Any) -> Tensor:
        raise _feedback.refuse_hold_back("K-SAM")

    def __init__(
        self,
        params_or_optimizer: ParamsT | torch.optim.Optimizer,
        base_optimizer: type[torch.optim.Optimizer] | None = None,
        *,
        rho: float = 0.05,
        fraction: float | None = None,
        **kwargs: Any,
    ) -> None:
        if fraction is None:
            raise ValueError(_NO_FRACTION)
        fraction = check_unit_interval("fraction", fraction, closed_low=False, closed_high=True)
        super().__init__(params_or_optimizer, base_optimizer, rho=rho, **kwargs)
        self.fraction = fraction
        self.last_selected: Tensor | None = None  # indices of the last step's top-k

    def __repr__(self) -> str:
        return (
            f"KSAM(rho={self.defaults[self.rho_key]}, fraction={self.fraction}, "
            f"base={self.base_optimizer!r})"
        )

    def select(self, losses: Tensor) -> Tensor:
        """Indices of the ``ceil(fraction * n)`` samples with the highest loss."""
        n = losses.numel()
        k = max(1, math.ceil(self.fraction * n))
        if k == n:  # the whole batch, in its order: the same sums as SAM's, bit for bit
            return torch.arange(n, device=losses.device)
        return torch.topk(losses.reshape(-1), k, sorted=False).indices

    @_compile.disable_frame
    def step(  # type: ignore[override]
        self,
        closure: Callable[..., Tensor] | None = None,
        *,
        scaler: torch.amp.GradScaler | None = None,
    ) -> Tensor | None:
        """One K-SAM step; returns the mean loss over the whole batch at ``w`` (detached).

        ``closure(index)`` returns per-sample losses (shape ``[n]``) for the
        samples ``index`` (``None``: the whole batch) and does not call
        backward. It is called three times: the whole batch without
        gradients (the selection), then the top ``k`` at ``w`` and at ``w + e``.
        """
        if closure is None:
            return super().step(None)
        # gradients left in .grad would join the first pass (SAM.step refuses them too)
        _args.existing_grads(self._all_params(), "error")
        sign = _args.objective_sign(self.param_groups, "K-SAM")

        def backward(losses: Tensor) -> None:
            backward_mean(losses, scaler, method="K-SAM")

        with torch.no_grad():
            before = closure(None).detach()
        if before.dim() != 1:
            backward(before)  # raises the closure-shape error
        # (maximize=True: the samples with the lowest value of the objective climbed)
        index = self.select(sign * before)
        self.last_selected = index
        # the selection pass updated BatchNorm's statistics, at w: the top-k pass must not
        frozen = freeze_bn_stats(self.model) if self.model is not None else contextlib.nullcontext()
        with torch.enable_grad():
            with self.first_pass(), frozen:
                backward(closure(index))
            try:
                if self.first_step(zero_grad=True, scaler=scaler):
                    backward(closure(index))
            except BaseException:
                self.abort_step()  # never leave perturbed weights behind
                raise
        if scaler is not None and scaler.is_enabled():
            scaler.step(self)
        else:
            self.second_step()
        return before.mean()
