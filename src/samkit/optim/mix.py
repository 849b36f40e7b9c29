r"""What the base step receives from the first- and second-pass gradients.

The third axis of a SAM variant, beside the perturbation (how ``e`` is made)
and the policy (which steps ascend). Plain SAM (``mix=None``) hands the base
optimizer the gradient at ``w + e`` on ascending steps and the first-pass
gradient on the others. A :class:`Mix` changes that, through three hooks:

* :meth:`Mix.before_ascent`: an ascending step, before the ascent; the
  first-pass gradients ``g`` are in ``view.gradients`` (unscaled). Keep what
  is needed (:class:`GradientStore`).
* :meth:`Mix.after_ascent`: the weights are back at ``w`` and ``.grad``
  holds the second-pass gradient ``g_s`` (unscaled); edit it in place.
* :meth:`Mix.after_plain`: a step that did not ascend; ``.grad`` holds the
  first-pass gradient; edit it in place.

Skipped steps (non-finite gradients) call neither of the last two.

==========================  ==============================================
mix                         base step receives
==========================  ==============================================
``None`` (SAM)              ``g_s``
:class:`SurrogateGap`       ``g_s - alpha g_perp`` (GSAM)
:class:`ReuseOrthogonal`    ``g_s`` on full steps, ``g + alpha ||g|| g_v/||g_v||``
                            in between (LookSAM)
:class:`~samkit.optim.vsam.ReusePSF`
                            ``g_s`` on SAM steps, ``g + beta^j (g_s - g)`` on
                            the ``j``-th step after (vSAM)
==========================  ==============================================
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import functional
from .._checks import check_nonneg
from .view import StepView

__all__ = ["Mix", "GradientStore", "SurrogateGap", "ReuseOrthogonal", "dot"]


def dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """Sum over tensors of ``<a_i, b_i>`` (a 0-d tensor on the first tensor's device).

    Accumulated in float32, or float64 when the tensors are float64.
    """
    device = a[0].device
    parts = []
    for x, y in zip(a, b):
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        parts.append(torch.dot(x.reshape(-1).to(dtype), y.reshape(-1).to(dtype)).to(device))
    total = parts[0]
    for part in parts[1:]:
        total = (
            total + part.to(total.dtype) if part.dtype != torch.float64 else total.double() + part
        )
    return total


def _as_factor(value: Tensor, device: torch.device) -> float | Tensor:
    """A 0-d tensor as a float on CPU (a plain load, fused into the kernel), a tensor elsewhere."""
    value = value.to(device)
    return float(value) if device.type == "cpu" else value


class GradientStore:
    """Copies of the gradients of some parameters, in buffers allocated once."""

    def __init__(self) -> None:
        self.buffers: dict[Tensor, Tensor] = {}
        self.params: list[Tensor] = []  # the parameters captured by the last capture()

    def capture(self, view: StepView) -> None:
        """Copy the first-pass gradients; average them over replicas after a local pass.

        Averaged, every replica mixes the same ``g`` into its update, so the
        weights stay equal; on DDP's own process group, never the default one.
        """
        self.params = [p for _, params, _ in view.gradients for p in params]
        grads = [g for _, _, group_grads in view.gradients for g in group_grads]
        # reallocated when a gradient changed dtype, device or shape (model.double(), .to())
        copies = functional.buffers_like(self.buffers, self.params, grads)
        for (_, _), (bucket_copies, bucket_grads) in functional.group_by_device(
            copies, grads
        ).items():
            functional.copy_(bucket_copies, bucket_grads, foreach=view.foreach)
        view.average_(copies)

    def pairs(self) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """(params, copies, current grads) for the captured parameters that still have a gradient."""
        params, copies, grads = [], [], []
        for p in self.params:
            if p.grad is not None:
                params.append(p)
                copies.append(self.buffers[p])
                grads.append(p.grad)
        return params, copies, grads


class Mix:
    """Base class: plain SAM (the base step receives the gradient it finds in ``.grad``)."""

    name = "plain"

    def before_ascent(self, view: StepView) -> None:
        return None

    def after_ascent(self, view: StepView) -> None:
        return None

    def after_plain(self, view: StepView) -> None:
        return None

    def state_dict(self, params: list[Tensor]) -> dict[str, Any]:
        """State for resuming; ``params`` lists every parameter of the optimizer, in order."""
        return {}

    def load_state_dict(self, state: dict[str, Any], params: list[Tensor]) -> None:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def load_vectors(what: str, table: Any, params: list[Tensor]) -> dict[Tensor, Tensor]:
    """A mix's stored vectors, ``{parameter index: tensor}`` as saved, checked: each names
    a parameter and has its shape, finite (a (1,)-shaped one broadcast silently into every
    later gradient). ValueError naming ``what`` otherwise."""
    if not isinstance(table, dict):
        raise ValueError(f"Invalid state value: {what} is missing or not a table")
    out = {}
    for i, v in table.items():
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(params):
            raise ValueError(
                f"Invalid state value: {what} entry {i!r} names no parameter (0..{len(params) - 1})"
            )
        p = params[i]
        if not isinstance(v, Tensor) or v.shape != p.shape or not bool(torch.isfinite(v).all()):
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(
                f"Invalid state value: {what} entry {i} is {shape} (its parameter is "
                f"{tuple(p.shape)}, finite)"
            )
        out[p] = v.detach().to(device=p.device, dtype=p.dtype).clone()
    return out


class SurrogateGap(Mix):
    r"""GSAM's surrogate-gap ascent (Zhuang et al., ICLR 2022, arXiv 2203.08065).

    Splits the first-pass gradient :math:`g` into its component along the
    perturbed gradient :math:`g_s = \nabla f(w + e)` and the rest,

    .. math:: g_\parallel = \frac{\langle g, g_s \rangle}{\lVert g_s \rVert^2} g_s,
              \qquad g_\perp = g - g_\parallel,

    and feeds the base optimizer :math:`g_s - \alpha\, g_\perp`: an ascent on
    :math:`f` along :math:`g_\perp`, which shrinks the surrogate gap
    :math:`f(w + e) - f(w)` while leaving the descent on :math:`f(w + e)`
    untouched to first order. Costs one gradient-sized buffer.
    """

    name = "surrogate_gap"

    def __init__(self, alpha: float = 0.1) -> None:
        self.alpha = check_nonneg("alpha", alpha)
        self.first = GradientStore()

    def before_ascent(self, view: StepView) -> None:
        self.first.capture(view)

    def after_ascent(self, view: StepView) -> None:
        if not self.alpha:
            return
        _, g, g_s = self.first.pairs()
        if not g_s:
            return
        coef = dot(g, g_s) / (dot(g_s, g_s) + view.eps)  # g_par = coef * g_s
        # g_s - alpha (g - coef g_s) = (1 + alpha coef) g_s - alpha g
        factor = 1.0 + self.alpha * coef
        for (device, _), (first, second) in functional.group_by_device(g, g_s).items():
            functional.mul_(second, _as_factor(factor, device), foreach=view.foreach)
            functional.add_(second, first, alpha=-self.alpha, foreach=view.foreach)

    def __repr__(self) -> str:
        return f"SurrogateGap(alpha={self.alpha})"


class ReuseOrthogonal(Mix):
    r"""LookSAM's reuse of SAM's direction between full steps (Liu et al., CVPR 2022, arXiv 2203.02714).

    On a full (ascending) step it keeps the part of the SAM gradient
    :math:`g_s` orthogonal to the plain gradient :math:`g`,

    .. math:: g_v = g_s - \frac{\langle g_s, g \rangle}{\lVert g \rVert^2}\, g,

    and on the steps in between (one pass each) it adds it back, scaled to
    the current gradient: :math:`g + \alpha \frac{\lVert g \rVert}{\lVert g_v \rVert} g_v`.
    Pair it with a policy that ascends every k steps (:class:`~samkit.LookSAM`
    does). ``g_v`` is saved in the state dict. ``alpha`` defaults to 0.2, as
    LookSAM's (the paper's 0.7 is for ViTs; see :mod:`samkit.optim.looksam`).
    """

    name = "reuse_orthogonal"

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha = check_nonneg("alpha", alpha)
        self.first = GradientStore()
        self.orthogonal: dict[Tensor, Tensor] = {}  # g_v per parameter
        self.orthogonal_norm: Tensor | None = None
        self.reused = 0  # in-between steps that added g_v

    def before_ascent(self, view: StepView) -> None:
        self.first.capture(view)

    def after_ascent(self, view: StepView) -> None:
        params, g, g_s = self.first.pairs()
        if not g_s:
            return
        coef = dot(g_s, g) / (dot(g, g) + view.eps)
        stored = functional.buffers_like(self.orthogonal, params, g_s)
        for (device, _), (out, second, first) in functional.group_by_device(stored, g_s, g).items():
            c = coef.to(device)
            functional.copy_(out, first, foreach=view.foreach)
            functional.mul_(out, -float(c) if device.type == "cpu" else -c, foreach=view.foreach)
            functional.add_(out, second, foreach=view.foreach)  # g_s - coef g
        self.orthogonal_norm = dot(stored, stored).sqrt()

    def after_plain(self, view: StepView) -> None:
        if self.orthogonal_norm is None or not self.alpha:
            return
        stored, grads = [], []
        for _, params, group_grads in view.gradients:
            for p, g in zip(params, group_grads):
                v = self.orthogonal.get(p)
                if v is not None:
                    if v.dtype != g.dtype or v.device != g.device:  # model.double(), .to()
                        v = self.orthogonal[p] = v.to(g)
                    stored.append(v)
                    grads.append(g)
        if not grads:
            return
        grad_norm = dot(grads, grads).sqrt()
        scale = self.alpha * grad_norm / (self.orthogonal_norm.to(grad_norm.device) + view.eps)
        for (device, _), (bucket_grads, bucket_stored) in functional.group_by_device(
            grads, stored
        ).items():
            s = scale.to(device)
            if device.type == "cpu":
                functional.add_(bucket_grads, bucket_stored, alpha=float(s), foreach=view.foreach)
            else:  # no host sync: scale a temporary copy
                scaled = (
                    torch._foreach_mul(bucket_stored, s)
                    if view.foreach
                    else [v * s for v in bucket_stored]
                )
                functional.add_(bucket_grads, scaled, foreach=view.foreach)
        self.reused += 1

    def state_dict(self, params: list[Tensor]) -> dict[str, Any]:
        index = {p: i for i, p in enumerate(params)}
        return {
            "gv": {index[p]: v.clone() for p, v in self.orthogonal.items() if p in index},
            "gv_norm": None if self.orthogonal_norm is None else self.orthogonal_norm.clone(),
            "reused": self.reused,
        }

    def load_state_dict(self, state: dict[str, Any], params: list[Tensor]) -> None:
        if not state:
            return
        orthogonal = load_vectors("LookSAM's gv", state.get("gv"), params)
        norm = state.get("gv_norm")
        if norm is not None and not (
            isinstance(norm, Tensor) and norm.numel() == 1 and bool(torch.isfinite(norm).all())
        ):
            raise ValueError(f"Invalid state value: LookSAM's gv_norm = {norm!r} (a number)")
        reused = state.get("reused", 0)
        if not (isinstance(reused, int) and not isinstance(reused, bool) and reused >= 0):
            raise ValueError(f"Invalid state value: LookSAM's reused = {reused!r} (a count)")
        self.orthogonal = orthogonal
        self.orthogonal_norm = None if norm is None else norm.detach().clone()
        self.reused = reused

    def __repr__(self) -> str:
        return f"ReuseOrthogonal(alpha={self.alpha})"
