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
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import functional as F
from .gsam import _dot, _GradCopy, _reject_amp_step, _reject_scaler
from .policy import EveryK
from .sam import SAM

__all__ = ["LookSAM"]


class LookSAM(SAM):
    r"""LookSAM (arXiv 2203.02714); see the module docstring.

    Args:
        params_or_optimizer, base_optimizer: as :class:`~samkit.SAM`.
        rho: the SAM radius on full steps (default 0.05; not scaled with k).
        k: the interval between full SAM steps (default 5; the paper uses 5
            to 10). ``k=1`` is SAM.
        alpha: weight of the reused component (default 0.7).
        **kwargs: the other :class:`~samkit.SAM` arguments, except ``policy``
            (LookSAM's schedule is its own).

    Not supported: a ``GradScaler`` (fp16 AMP) -- raises ``ValueError``;
    bfloat16 autocast works. Under DDP with ``ddp_ascent="local"`` the
    first-pass gradient of full steps is all-reduced before ``g_v`` is formed,
    so all replicas store the same ``g_v``.

    The stored ``g_v`` is part of :meth:`state_dict`, so a resumed run takes
    the same in-between steps as one that never stopped.
    """

    def __init__(
        self,
        params_or_optimizer: Any,
        base_optimizer: type[torch.optim.Optimizer] | None = None,
        *,
        rho: float = 0.05,
        k: int = 5,
        alpha: float = 0.7,
        **kwargs: Any,
    ) -> None:
        if "policy" in kwargs and kwargs["policy"] is not None:
            raise ValueError(
                "Invalid policy value: LookSAM chooses its own steps (every k); pass k instead"
            )
        kwargs.pop("policy", None)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"Invalid k value: {k!r} (must be an int >= 1)")
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, (int, float))
            or not 0.0 <= alpha < float("inf")
        ):
            raise ValueError(f"Invalid alpha value: {alpha!r} (must be a finite number >= 0)")
        super().__init__(
            params_or_optimizer,
            base_optimizer,
            rho=rho,
            policy=EveryK(k, scale_rho=False),
            **kwargs,
        )
        self.k = k
        self.alpha = float(alpha)
        self._g = _GradCopy()
        self._gv: dict[Tensor, Tensor] = {}  # the stored orthogonal component
        self._gv_norm: Tensor | None = None
        self.reused = 0  # in-between steps that added g_v

    def __repr__(self) -> str:
        return f"LookSAM(rho={self._sam_defaults['rho']}, k={self.k}, alpha={self.alpha}, base={self.base_optimizer!r})"

    @torch.no_grad()
    def first_step(
        self, zero_grad: bool = True, *, scaler: torch.amp.GradScaler | None = None
    ) -> bool:
        _reject_scaler("LookSAM", scaler)
        if not self._pending and self.steps % self.k == 0:
            self._g.capture(self, allreduce=self._local_first_pass)
        return super().first_step(zero_grad, scaler=scaler)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        _reject_amp_step("LookSAM", self)
        if self._pending and not self._skip:
            if self._perturbed is not None:
                self._store()
            elif self._gv_norm is not None and self.alpha:
                self._reuse()
        super().second_step(zero_grad)

    def _store(self) -> None:
        params, g, gs = self._g.pairs()
        if not gs:
            return
        fe = self.foreach
        coef = _dot(gs, g) / (_dot(g, g) + self.eps)
        gv = []
        for p, gi in zip(params, gs):
            b = self._gv.get(p)
            if b is None:
                b = self._gv[p] = torch.empty_like(gi, memory_format=torch.preserve_format)
            gv.append(b)
        for (dev, _), (vs, xs, cs) in F.group_by_device(gv, gs, g).items():
            c = coef.to(dev)
            F.copy_(vs, cs, foreach=fe)
            F.mul_(vs, -(float(c)) if dev.type == "cpu" else -c, foreach=fe)  # -coef g
            F.add_(vs, xs, foreach=fe)  # g_s - coef g
        self._gv_norm = _dot(gv, gv).sqrt()

    def _reuse(self) -> None:
        vs, gs = [], []
        for _, params, grads in self._gather():
            for p, g in zip(params, grads):
                v = self._gv.get(p)
                if v is not None:
                    vs.append(v)
                    gs.append(g)
        if not gs:
            return
        fe = self.foreach
        gnorm = _dot(gs, gs).sqrt()
        scale = self.alpha * gnorm / (self._gv_norm.to(gnorm.device) + self.eps)
        for (dev, _), (xs, ys) in F.group_by_device(gs, vs).items():
            s = scale.to(dev)
            if dev.type == "cpu":
                F.add_(xs, ys, alpha=float(s), foreach=fe)
            else:  # no host sync: scale a temporary copy
                tmp = torch._foreach_mul(ys, s) if fe else [y * s for y in ys]
                F.add_(xs, tmp, foreach=fe)
        self.reused += 1

    # ---------------------------------------------------------------- state
    def _index(self) -> dict[Tensor, int]:
        return {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        sd = super().state_dict()
        index = self._index()
        sd["samkit"]["looksam"] = {
            "gv": {index[p]: v.clone() for p, v in self._gv.items() if p in index},
            "gv_norm": None if self._gv_norm is None else self._gv_norm.clone(),
            "reused": self.reused,
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        super().load_state_dict(state_dict)
        own = (state_dict.get("samkit") or {}).get("looksam")
        if own is None:
            return
        params = list(self._index())
        self._gv = {}
        for i, v in own["gv"].items():
            p = params[int(i)]
            self._gv[p] = v.detach().to(device=p.device, dtype=p.dtype).clone()
        norm = own.get("gv_norm")
        self._gv_norm = None if norm is None else norm.detach().clone()
        self.reused = int(own.get("reused", 0))
