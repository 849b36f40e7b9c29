"""Backend-neutral pieces of the SAM step, written with ``keras.ops``.

The backend modules (``_stateful`` for TensorFlow and PyTorch, ``_jax``) call
these on the active backend's native tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
from keras import ops


def ascent(
    weights: list[Any],
    grads: list[Any],
    *,
    rho: float,
    adaptive: bool,
    eta: float,
    eps: float,
) -> list[Any]:
    r"""The ascent vector ``e`` for each weight (``None`` where the gradient is).

    SAM (arXiv 2010.01412) and ASAM (arXiv 2102.11600, ``T = |w| + eta``)::

        SAM:   e = rho * g / (||g|| + eps)
        ASAM:  e = rho * T^2 g / (||T g|| + eps)

    The norm is global over all weights and taken in float32, so a float16
    gradient neither overflows the sum of squares nor loses ``eps``. A zero
    gradient gives ``e = 0`` exactly (``rho / eps`` times zero), never NaN.
    """
    pairs = [(w, g) for w, g in zip(weights, grads) if g is not None]
    if not pairs:
        return [None] * len(weights)
    scaled = []
    total = None
    for w, g in pairs:
        g32 = ops.cast(g, "float32")
        if adaptive:
            t = ops.abs(ops.cast(w, "float32")) + eta
            u = t * g32
            direction = t * u  # T^2 g
        else:
            u = direction = g32
        sq = ops.sum(ops.square(u))
        total = sq if total is None else total + sq
        scaled.append(direction)
    factor = rho / (ops.sqrt(total) + eps)
    out: list[Any] = []
    it = iter(scaled)
    for w, g in zip(weights, grads):
        if g is None:
            out.append(None)
        else:
            out.append(ops.cast(factor * next(it), keras.backend.standardize_dtype(w.dtype)))
    return out


def first_leaf(structure: Any) -> Any:
    """The first tensor of a nested input (what Keras counts the batch on)."""
    return next(t for t in keras.tree.flatten(structure) if t is not None)


def take(structure: Any, start: Any, stop: Any) -> Any:
    """Rows ``start:stop`` of every tensor in a nested structure (``None`` kept)."""
    if structure is None:
        return None
    return keras.tree.map_structure(lambda t: None if t is None else t[start:stop], structure)


def static_bounds(n: int, splits: int) -> tuple[list[tuple[int, int]], list[float], bool]:
    """Row ranges and weights ``n_k / n`` of near-equal micro-batches, for a known ``n``.

    The first ``n % splits`` micro-batches hold one row more (as
    ``numpy.array_split``), so a last, smaller batch of an epoch still splits;
    a batch of fewer than ``splits`` rows is split into one-row micro-batches.
    The last value (False) says no micro-batch is empty.
    """
    splits = min(splits, n)
    base, extra = divmod(n, splits)
    bounds, start = [], 0
    for k in range(splits):
        stop = start + base + (1 if k < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds, [(b - a) / n for a, b in bounds], False


def concat(parts: list[Any]) -> Any:
    """Concatenate nested predictions of the micro-batches along the batch axis."""
    if len(parts) == 1:
        return parts[0]
    return keras.tree.map_structure(lambda *ts: ops.concatenate(list(ts), axis=0), *parts)


def is_float(variable: Any) -> bool:
    return keras.backend.is_float_dtype(variable.dtype)


def average_state(
    start: list[Any], finals: list[list[Any]], fractions: list[Any], floats: list[bool]
) -> list[Any]:
    r"""One step's worth of non-trainable state from the micro-batches' first passes.

    Float state (BatchNorm moving statistics) becomes
    ``s0 + sum_k f_k (s_k - s0)``: a moving average updated once with the
    micro-batches' statistics averaged (weights ``f_k = n_k / n``), as
    synchronised data-parallel replicas would. State no pass changed is
    passed through untouched (the same tensor). Other state (random-seed
    counters) is chained through the micro-batches: the last one's.
    """
    if len(finals) == 1:
        return list(finals[0])
    out = []
    for i, (s0, is_f) in enumerate(zip(start, floats)):
        if not is_f or all(final[i] is s0 for final in finals):
            out.append(finals[-1][i])
            continue
        delta = None
        for f, final in zip(fractions, finals):
            d = ops.cast(f, s0.dtype) * (final[i] - s0)
            delta = d if delta is None else delta + d
        out.append(s0 + delta)
    return out


def _keep_if(keep: Any, new: list[Any], old: list[Any]) -> list[Any]:
    """``new`` where ``keep`` else ``old``; untouched entries stay the same tensor."""
    return [n if n is o else ops.where(keep, n, o) for n, o in zip(new, old)]


def sam_gradient(
    model: Any,
    grad_fn: Callable[..., tuple[Any, Any, list[Any], list[Any], list[Any]]],
    weights: list[Any],
    state: list[Any],
    metrics: list[Any],
    data: tuple[Any, Any, Any],
    bounds: Callable[[Any, int], tuple[list[tuple[Any, Any]], list[Any], bool]],
    no_grad: Callable[[], Any],
) -> tuple[list[Any], list[Any], list[Any], Any, Any]:
    """The SAM gradient of one batch, functionally, on any backend.

    ``grad_fn(weights, state, metrics, x, y, sample_weight)`` runs one forward
    pass in training mode through ``stateless_call`` and returns
    ``(loss, y_pred, new_state, new_metrics, gradient)``; nothing is assigned.

    Per micro-batch k (the whole batch without ``num_batch_splits``), from the
    state ``s`` it starts at:

    1. pass 1 at ``w``: loss, predictions, gradient ``g_k`` and the state it
       leaves (BatchNorm statistics, advanced seeds): these are kept;
    2. pass 2 at ``w + e_k`` from the same ``s``: the same function (the same
       dropout masks); only its gradient ``h_k`` is kept.

    The weights themselves are never moved, so nothing needs restoring.
    ``bounds(x, splits)`` gives the micro-batches' row ranges, their weights
    and whether some may be empty (TensorFlow, when the batch size is only
    known at run time and smaller than ``splits``): an empty micro-batch's
    NaN loss, gradient and state are then masked out with ``where``.
    Returns ``(sum_k (n_k/n) h_k, new_state, new_metrics, loss at w, y_pred at w)``.
    """
    x, y, sample_weight = data
    splits = model.num_batch_splits or 1
    floats = [is_float(v) for v in model.non_trainable_variables]
    guarded = False
    if splits == 1:
        batches, fractions = [(x, y, sample_weight)], [1.0]
    else:
        spans, fractions, guarded = bounds(x, splits)
        batches = [(take(x, a, b), take(y, a, b), take(sample_weight, a, b)) for a, b in spans]

    total: list[Any] | None = None
    losses, preds, finals = [], [], []
    chained = state
    for k, (xb, yb, swb) in enumerate(batches):
        # Float state starts every micro-batch at s0 (averaged at the end);
        # seed counters run on through the micro-batches.
        start = state if k == 0 else [s if f else c for s, c, f in zip(state, chained, floats)]
        loss, y_pred, after, new_metrics, g = grad_fn(weights, start, metrics, xb, yb, swb)
        with no_grad():
            e = model._ascent(weights, g)
            perturbed = [w if ek is None else w + ek for w, ek in zip(weights, e)]
        *_, h = grad_fn(perturbed, start, new_metrics, xb, yb, swb)
        with no_grad():
            if guarded:
                keep = fractions[k] > 0
                h = [None if hk is None else ops.where(keep, hk, ops.zeros_like(hk)) for hk in h]
                loss = ops.where(keep, loss, ops.zeros_like(loss))
                after = _keep_if(keep, after, start)
                new_metrics = _keep_if(keep, new_metrics, metrics)
            metrics = new_metrics
            if splits > 1:
                h = [None if hk is None else ops.cast(fractions[k], hk.dtype) * hk for hk in h]
            total = (
                h
                if total is None
                else [a if b is None else (b if a is None else a + b) for a, b in zip(total, h)]
            )
        losses.append(loss)
        preds.append(y_pred)
        finals.append(list(after))
        chained = finals[-1]

    with no_grad():
        new_state = average_state(state, finals, fractions, floats)
        loss = losses[0]
        if splits > 1:
            loss = sum(
                (ops.cast(f, lk.dtype) * lk for f, lk in zip(fractions[1:], losses[1:])),
                ops.cast(fractions[0], loss.dtype) * loss,
            )
    return total, new_state, metrics, loss, concat(preds)
