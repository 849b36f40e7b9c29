r"""mSAM: micro-batch-averaged SAM (Behdin et al., 2023, arXiv 2302.09693).

SAM's "m-sharpness" (Foret et al., Sec. 4.1): perturbing with the gradient of
a small sub-batch generalises better than with the whole batch's. mSAM makes
that explicit on one device: the batch is split into ``m`` micro-batches,
each gets its own ascent, and the perturbed gradients are averaged:

.. math::

    e_j = \rho \frac{g_j}{\lVert g_j \rVert}, \quad g_j = \nabla L_j(w),
    \qquad \tilde g = \frac{1}{m} \sum_{j=1}^{m} \nabla L_j(w + e_j)

Cost: two passes over the batch, as SAM, but in ``m`` pieces (smaller
kernels; no extra memory beyond SAM's weight backup and one gradient
accumulator). Under DDP, plain SAM with ``ddp_ascent="local"`` already gives
per-replica m-sharpness.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .. import functional as F
from .sam import SAM

__all__ = ["MSAM"]


class MSAM(SAM):
    r"""mSAM (arXiv 2302.09693); see the module docstring.

    Args:
        params_or_optimizer, base_optimizer: as :class:`~samkit.SAM`.
        rho: the radius of each micro-batch's ascent (default 0.05).
        micro_batches: ``m``, the number of micro-batches (default 4).
        **kwargs: the other :class:`~samkit.SAM` arguments except ``policy``.

    The closure takes the micro-batch number ``j`` (0 to m - 1), runs forward
    and backward on that micro-batch (mean loss) and returns the loss::

        xs, ys = x.chunk(4), y.chunk(4)
        def closure(j):
            loss = F.cross_entropy(model(xs[j]), ys[j])
            loss.backward()
            return loss

        loss = opt.step(closure)   # mean of the micro-batch losses at w

    Works with ``model=`` (BatchNorm statistics are updated by the first pass
    of every micro-batch, not by the perturbed passes). Not supported, with a
    ``ValueError``: a ``policy`` (each micro-batch would consult it), a
    ``GradScaler`` (the micro-batch gradients would be mixed across scale
    updates), and an initialised multi-process group (use SAM with
    ``ddp_ascent="local"``, which is mSAM across replicas).
    """

    def __init__(
        self,
        params_or_optimizer: Any,
        base_optimizer: type[torch.optim.Optimizer] | None = None,
        *,
        rho: float = 0.05,
        micro_batches: int = 4,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("policy") is not None:
            raise ValueError(
                "Invalid policy value: mSAM ascends on every micro-batch; policies are not supported"
            )
        kwargs.pop("policy", None)
        if (
            isinstance(micro_batches, bool)
            or not isinstance(micro_batches, int)
            or micro_batches < 1
        ):
            raise ValueError(
                f"Invalid micro_batches value: {micro_batches!r} (must be an int >= 1)"
            )
        super().__init__(params_or_optimizer, base_optimizer, rho=rho, **kwargs)
        self.micro_batches = micro_batches
        self._acc: dict[Tensor, Tensor] = {}

    def __repr__(self) -> str:
        return f"MSAM(rho={self._sam_defaults['rho']}, micro_batches={self.micro_batches}, base={self.base_optimizer!r})"

    def _accumulate(self) -> None:
        for _, params, grads in self._gather():
            accs = []
            for p, g in zip(params, grads):
                a = self._acc.get(p)
                if a is None:
                    a = self._acc[p] = torch.zeros_like(g, memory_format=torch.preserve_format)
                accs.append(a)
            for (_, _), (as_, gs) in F.group_by_device(accs, grads).items():
                F.add_(as_, gs, foreach=self.foreach)

    def step(  # type: ignore[override]
        self,
        closure: Callable[[int], Tensor] | None = None,
        *,
        scaler: torch.amp.GradScaler | None = None,
    ) -> Tensor | None:
        """One mSAM step over ``micro_batches`` calls of ``closure(j)``; returns the mean loss at ``w``."""
        if closure is None:
            raise RuntimeError(
                "MSAM.step() needs a closure(j) that does forward + backward on micro-batch j"
            )
        if scaler is not None and scaler.is_enabled():
            raise ValueError(
                "Invalid scaler value: mSAM does not support a GradScaler (fp16 AMP); use bfloat16 autocast"
            )
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError(
                "mSAM under DDP is not supported: use SAM(..., model=ddp_model, ddp_ascent='local'), "
                "where each replica's ascent already uses its own micro-batch"
            )
        closure = torch.enable_grad()(closure)
        m = self.micro_batches
        losses = []
        skip = False
        used: set[Tensor] = set()
        if m > 1:
            for a in self._acc.values():
                a.zero_()
        try:
            for j in range(m):
                self.zero_grad()
                losses.append(closure(j).detach())
                if self.first_step(zero_grad=True):
                    closure(j)
                if j < m - 1:
                    skip = skip or self._skip
                    # w back exactly, no base step: SAM's restore
                    self._restore()
                    self._pending, self._skip = False, False
                    self._accumulate()
                    used.update(p for _, ps, _ in self._gather() for p in ps)
        except BaseException:
            self._restore()
            self._pending, self._skip, self._unscaled = False, False, False
            raise
        # last micro-batch: its gradient is in .grad; add the others and average
        if m > 1:
            last = {p for _, ps, _ in self._gather() for p in ps}
            for p in used - last:  # a parameter unused by the last micro-batch
                p.grad = torch.zeros_like(p)
            for _, params, grads in self._gather():
                accs = [self._acc[p] for p in params if p in self._acc]
                gs = [g for p, g in zip(params, grads) if p in self._acc]
                for (_, _), (g_, a_) in F.group_by_device(gs, accs).items():
                    F.add_(g_, a_, foreach=self.foreach)
                for (_, _), (g_,) in F.group_by_device(grads).items():
                    F.mul_(g_, 1.0 / m, foreach=self.foreach)
        self._skip = self._skip or skip
        self.second_step()
        return torch.stack(losses).mean()
