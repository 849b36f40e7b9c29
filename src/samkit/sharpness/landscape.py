r"""Loss landscapes: 1-D curves, 2-D surfaces and the path between two models.

Random directions are *filter-normalised* (Li et al., "Visualizing the Loss
Landscape of Neural Nets", arXiv 1712.09913): a Gaussian direction
:math:`d` is rescaled filter by filter (each slice along the first axis of a
weight: a conv output channel, a row of a linear layer) to the norm of the
same filter of the weights,

.. math::

    d_{i,j} \leftarrow \frac{d_{i,j}}{\lVert d_{i,j} \rVert}\, \lVert w_{i,j} \rVert ,

so a step of 1 along :math:`d` is comparable across layers and scale-invariant
networks. Biases and normalisation parameters (every parameter with one
dimension or fewer) get a zero direction, as in the paper's default. Buffers
(BatchNorm running statistics) stay fixed. Curves are
:math:`L(w + \alpha d)`, surfaces :math:`L(w + \alpha d_1 + \beta d_2)`.

:func:`interpolate` walks the straight line
:math:`(1-\alpha) w_a + \alpha w_b` between two trained models (Goodfellow et
al., arXiv 1412.6544), from slightly before :math:`\alpha=0` to slightly after
:math:`\alpha=1` (default -0.25 to 1.25 with both ends on the grid); floating
point buffers are interpolated the same way.

The models passed in are never modified (weights are substituted through
:func:`torch.func.functional_call`; train/eval flags are restored).
Results are NumPy arrays.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .hessian import _check_int, _generator
from .hvp import HessianOperator, LossFn, _trainable

__all__ = ["filter_normalized_direction", "loss_curve", "loss_surface", "interpolate"]


def _progress(total: int, enabled: bool, desc: str) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bars are optional
        return None
    return tqdm(total=total, desc=desc, disable=None, leave=False)


def filter_normalized_direction(
    model: nn.Module,
    *,
    seed: int | torch.Generator | None = 0,
    ignore_1d: bool = True,
    params: Sequence[str] | None = None,
) -> Tensor:
    """A random filter-normalised direction as one flat vector.

    The order is that of the trainable parameters (as in
    :class:`~samkit.sharpness.hvp.HessianOperator`). With ``ignore_1d=False``
    one-dimensional parameters are kept and normalised as a single filter.
    Zero filters of the weights give zero directions.
    """
    gen = _generator(seed)
    parts = []
    for _, p in _trainable(model, params):
        w = p.detach()
        d = torch.randn(w.shape, generator=gen, dtype=w.dtype).to(w.device)
        if w.dim() <= 1:
            if ignore_1d:
                d = torch.zeros_like(w)
            else:
                d = d * (w.norm() / d.norm().clamp_min(1e-30))
        else:
            wf = w.reshape(w.shape[0], -1).norm(dim=1)
            df = d.reshape(d.shape[0], -1).norm(dim=1).clamp_min(1e-30)
            d = d * (wf / df).view(-1, *([1] * (w.dim() - 1)))
        parts.append(d.reshape(-1))
    return torch.cat(parts)


def _alphas(name: str, values: Any) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size < 1 or not np.all(np.isfinite(arr)):
        raise ValueError(f"Invalid {name} value: expected a non-empty sequence of finite numbers")
    return arr


def _direction(
    op: HessianOperator, name: str, d: Tensor | None, model: nn.Module, seed: Any, params
) -> Tensor:
    if d is None:
        return filter_normalized_direction(model, seed=seed, params=params)
    if not isinstance(d, Tensor) or d.shape != (op.dim,):
        raise ValueError(f"Invalid {name} value: expected a flat tensor of length {op.dim}")
    return d.to(device=op.device, dtype=op.dtype)


def loss_curve(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    alphas: Sequence[float] | np.ndarray | None = None,
    direction: Tensor | None = None,
    seed: int | None = 0,
    params: Sequence[str] | None = None,
    max_batch_size: int | None = 2048,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """``L(w + alpha d)`` for each alpha (default 25 points in [-1, 1]) along
    ``direction`` (default: a random filter-normalised one). Returns
    ``(alphas, losses)``."""
    al = _alphas("alphas", np.linspace(-1.0, 1.0, 25) if alphas is None else alphas)
    op = HessianOperator(
        model, loss_fn, batches, params=params, max_batch_size=max_batch_size, cache_graph=False
    )
    d = _direction(op, "direction", direction, model, seed, params)
    bar = _progress(al.size, progress, "landscape 1-D")
    losses = np.empty_like(al)
    for i, a in enumerate(al):
        losses[i] = op.loss(op.w + float(a) * d)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return al, losses


def loss_surface(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    xs: Sequence[float] | np.ndarray | None = None,
    ys: Sequence[float] | np.ndarray | None = None,
    directions: tuple[Tensor, Tensor] | None = None,
    seed: int | None = 0,
    params: Sequence[str] | None = None,
    max_batch_size: int | None = 2048,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``L(w + x d1 + y d2)`` on a grid (default 25 x 25 over [-1, 1]^2;
    the paper uses 51 x 51). Two independent random filter-normalised
    directions unless given. Returns ``(xs, ys, losses)`` with
    ``losses[j, i]`` at ``(xs[i], ys[j])`` (the layout ``contour`` expects)."""
    xa = _alphas("xs", np.linspace(-1.0, 1.0, 25) if xs is None else xs)
    ya = _alphas("ys", np.linspace(-1.0, 1.0, 25) if ys is None else ys)
    op = HessianOperator(
        model, loss_fn, batches, params=params, max_batch_size=max_batch_size, cache_graph=False
    )
    if directions is None:
        gen = _generator(seed)
        d1 = filter_normalized_direction(model, seed=gen, params=params)
        d2 = filter_normalized_direction(model, seed=gen, params=params)
    else:
        if not (isinstance(directions, (tuple, list)) and len(directions) == 2):
            raise ValueError("Invalid directions value: expected a pair of flat tensors")
        d1 = _direction(op, "directions[0]", directions[0], model, seed, params)
        d2 = _direction(op, "directions[1]", directions[1], model, seed, params)
    bar = _progress(xa.size * ya.size, progress, "landscape 2-D")
    losses = np.empty((ya.size, xa.size))
    for j, b in enumerate(ya):
        for i, a in enumerate(xa):
            losses[j, i] = op.loss(op.w + float(a) * d1 + float(b) * d2)
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    return xa, ya, losses


def interpolate(
    model_a: nn.Module,
    model_b: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[tuple[Tensor, Tensor]],
    n_points: int = 25,
    *,
    alpha_range: tuple[float, float] = (-0.25, 1.25),
    alphas: Sequence[float] | np.ndarray | None = None,
    interpolate_buffers: bool = True,
    max_batch_size: int | None = 2048,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    r"""Loss along :math:`(1-\alpha) w_a + \alpha w_b` (model A at 0, B at 1).

    ``n_points`` values of alpha evenly spaced over ``alpha_range`` (default
    -0.25 to 1.25: with 25 points, 0 and 1 fall exactly on the grid), or the
    ``alphas`` given. Floating-point buffers (BatchNorm statistics) are
    interpolated too unless ``interpolate_buffers=False`` (then A's are used);
    frozen parameters (``requires_grad=False``) always are, so both ends are
    exactly the two models. The models must have the same architecture;
    neither is modified.
    Returns ``(alphas, losses)``.
    """
    if not (isinstance(model_a, nn.Module) and isinstance(model_b, nn.Module)):
        raise ValueError("Invalid model_a/model_b value: expected two nn.Module instances")
    if alphas is None:
        n_points = _check_int("n_points", n_points, 2)
        lo, hi = alpha_range
        if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
            raise ValueError(f"Invalid alpha_range value: {alpha_range!r} (need finite lo < hi)")
        al = np.linspace(lo, hi, n_points)
    else:
        al = _alphas("alphas", alphas)
    na = [(n, p.shape) for n, p in model_a.named_parameters() if p.requires_grad]
    nb = [(n, p.shape) for n, p in model_b.named_parameters() if p.requires_grad]
    if na != nb:
        raise ValueError(
            "Invalid model_b value: its parameters do not match model_a's (names and shapes)"
        )
    ba = dict(model_a.named_buffers())
    bb = dict(model_b.named_buffers())
    if {k: v.shape for k, v in ba.items()} != {k: v.shape for k, v in bb.items()}:
        raise ValueError(
            "Invalid model_b value: its buffers do not match model_a's (names and shapes)"
        )
    # frozen parameters are weights too: interpolated, so that both ends are the two models
    fa = {n: p.detach() for n, p in model_a.named_parameters() if not p.requires_grad}
    fb = {n: p.detach() for n, p in model_b.named_parameters() if not p.requires_grad}
    if {k: v.shape for k, v in fa.items()} != {k: v.shape for k, v in fb.items()}:
        raise ValueError(
            "Invalid model_b value: its frozen parameters do not match model_a's (names, "
            "shapes and requires_grad)"
        )
    op = HessianOperator(
        model_a, loss_fn, batches, max_batch_size=max_batch_size, cache_graph=False
    )
    wa = op.w
    wb = torch.cat(
        [p.detach().reshape(-1) for n, p in model_b.named_parameters() if p.requires_grad]
    )
    wb = wb.to(device=op.device, dtype=op.dtype)
    bar = _progress(al.size, progress, "interpolation")
    losses = np.empty_like(al)
    for i, a in enumerate(al):
        a = float(a)
        mixed = {**(ba if interpolate_buffers else {}), **fa}
        bufs = {
            k: ((1 - a) * v + a * {**bb, **fb}[k].to(v.device)) if v.is_floating_point() else v
            for k, v in mixed.items()
        }
        losses[i] = op.loss((1 - a) * wa + a * wb, buffers=bufs or None)  # exact at both ends
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return al, losses
