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
(:class:`~samkit.optim.schedule.ProportionalRho`): ``rho_t = rho_min +
(rho - rho_min) (lr_t - lr_min) / (lr_max - lr_min)``.

Cost: two passes, as SAM, plus one weight-sized buffer for ``g``.

This module also holds the small helpers that the gradient-mixing variants
(GSAM, LookSAM) share: a once-allocated copy of the first-pass gradients, and
the checks for what they do not support.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import functional as F
from .sam import SAM
from .schedule import ProportionalRho

__all__ = ["GSAM"]


def _reject_scaler(name: str, scaler: Any) -> None:
    if scaler is not None and getattr(scaler, "is_enabled", lambda: True)():
        raise ValueError(
            f"Invalid scaler value: {name} does not support a GradScaler (fp16 AMP): it mixes first- and "
            "second-pass gradients, which the scaler would leave in different units. Use bfloat16 autocast, "
            "which needs no scaler, or plain SAM for fp16."
        )


def _reject_amp_step(name: str, opt: SAM) -> None:
    """``scaler.step(opt)`` after a first_step without the scaler: undo and refuse."""
    if getattr(opt, "grad_scale", None) is not None:
        opt._restore()  # never leave the weights perturbed
        opt._pending, opt._skip, opt._unscaled = False, False, False
        _reject_scaler(name, True)


def _dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """Sum over tensors of <a_i, b_i> (a 0-d tensor on the first tensor's device).

    Accumulated in float32, or float64 when the tensors are float64.
    """
    dev = a[0].device
    parts = []
    for x, y in zip(a, b):
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        parts.append(torch.dot(x.reshape(-1).to(dt), y.reshape(-1).to(dt)).to(dev))
    total = parts[0]
    for p in parts[1:]:
        total = total + p.to(total.dtype) if p.dtype != torch.float64 else total.double() + p
    return total


class _GradCopy:
    """Copies of the gradients of some parameters, in buffers allocated once."""

    def __init__(self) -> None:
        self.buf: dict[Tensor, Tensor] = {}
        self.params: list[Tensor] = []  # the parameters captured by the last capture()

    def capture(self, opt: SAM, allreduce: bool) -> None:
        self.params = []
        bufs, grads = [], []
        for _, params, gs in opt._gather():
            for p, g in zip(params, gs):
                b = self.buf.get(p)
                if b is None:
                    b = self.buf[p] = torch.empty_like(g, memory_format=torch.preserve_format)
                self.params.append(p)
                bufs.append(b)
                grads.append(g)
        for (_, _), (bs, gs) in F.group_by_device(bufs, grads).items():
            F.copy_(bs, gs, foreach=opt.foreach)
        if allreduce and bufs:
            # the first pass ran under no_sync: average it, so every replica
            # mixes the same g into its update and the weights stay equal
            dist = torch.distributed
            for b in bufs:
                dist.all_reduce(b)
            F.mul_(bufs, 1.0 / dist.get_world_size(), foreach=opt.foreach)

    def pairs(self) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """(params, copies, current grads) for the captured parameters that still have a gradient."""
        params, copies, grads = [], [], []
        for p in self.params:
            if p.grad is not None:
                params.append(p)
                copies.append(self.buf[p])
                grads.append(p.grad)
        return params, copies, grads


class GSAM(SAM):
    r"""Surrogate-gap guided SAM (arXiv 2203.08065); see the module docstring.

    Args:
        params_or_optimizer, base_optimizer: as :class:`~samkit.SAM`.
        rho: the radius at the peak learning rate (default 0.05).
        alpha: weight of the ascent along :math:`g_\perp` (default 0.1; the
            paper tunes it per model; ``alpha=0`` is SAM with the rho schedule).
        follow_lr: tie rho to the learning rate (default True). Each step,
            before the ascent, every group's rho is set from its current lr.
        rho_min: rho at ``lr_min`` (default 0).
        lr_min: the learning rate at which rho reaches ``rho_min`` (default 0).
        **kwargs: the other :class:`~samkit.SAM` arguments.

    Not supported: a ``GradScaler`` (fp16 AMP) -- raises ``ValueError``;
    bfloat16 autocast works. Under DDP with ``ddp_ascent="local"`` the
    first-pass gradient is all-reduced before mixing, so replicas agree.

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

    def __init__(
        self,
        params_or_optimizer: Any,
        base_optimizer: type[torch.optim.Optimizer] | None = None,
        *,
        rho: float = 0.05,
        alpha: float = 0.1,
        follow_lr: bool = True,
        rho_min: float = 0.0,
        lr_min: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, (int, float))
            or not 0.0 <= alpha < float("inf")
        ):
            raise ValueError(f"Invalid alpha value: {alpha!r} (must be a finite number >= 0)")
        super().__init__(params_or_optimizer, base_optimizer, rho=rho, **kwargs)
        self.alpha = float(alpha)
        self._g = _GradCopy()
        self._rho_schedule: ProportionalRho | None = None
        if follow_lr:
            try:
                self._rho_schedule = ProportionalRho(self, rho_min=rho_min, lr_min=lr_min)
            except ValueError as err:
                raise ValueError(f"{err} -- or pass follow_lr=False to keep rho fixed") from None

    def __repr__(self) -> str:
        return f"GSAM(rho={self._sam_defaults['rho']}, alpha={self.alpha}, base={self.base_optimizer!r})"

    @torch.no_grad()
    def first_step(
        self, zero_grad: bool = True, *, scaler: torch.amp.GradScaler | None = None
    ) -> bool:
        _reject_scaler("GSAM", scaler)
        if not self._pending:  # else SAM raises its own error below
            if self._rho_schedule is not None:
                self._rho_schedule.step()
            self._g.capture(self, allreduce=self._local_first_pass)
        return super().first_step(zero_grad, scaler=scaler)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        _reject_amp_step("GSAM", self)
        if self._pending and self._perturbed is not None and not self._skip and self.alpha:
            self._mix()
        super().second_step(zero_grad)

    def _mix(self) -> None:
        _, g, gp = self._g.pairs()
        if not gp:
            return
        fe = self.foreach
        dot = _dot(g, gp)
        coef = dot / (_dot(gp, gp) + self.eps)  # g_par = coef * g_p
        # g_p - alpha (g - coef g_p) = (1 + alpha coef) g_p - alpha g
        factor = 1.0 + self.alpha * coef
        for (dev, _), (cs, gs) in F.group_by_device(g, gp).items():
            f = factor.to(dev)
            F.mul_(gs, float(f) if dev.type == "cpu" else f, foreach=fe)
            F.add_(gs, cs, alpha=-self.alpha, foreach=fe)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        sd = super().state_dict()
        sd["samkit"]["gsam"] = {
            "alpha": self.alpha,
            "rho_schedule": self._rho_schedule.state_dict()
            if self._rho_schedule is not None
            else None,
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        super().load_state_dict(state_dict)
        own = (state_dict.get("samkit") or {}).get("gsam")
        if (
            own is not None
            and own.get("rho_schedule") is not None
            and self._rho_schedule is not None
        ):
            self._rho_schedule.load_state_dict(dict(own["rho_schedule"]))
