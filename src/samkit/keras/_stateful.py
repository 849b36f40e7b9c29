"""The SAM step on the stateful backends (TensorFlow and PyTorch).

Keras' JAX trainer is functional: ``train_step`` gets the variables' values
and returns new ones. This module gives TensorFlow and PyTorch the same
shape, so all three share :func:`samkit.keras._common.sam_gradient`: the
variables are read (no copies), both passes run through
``Model.stateless_call``, and only at the end are the changed non-trainable
state and metric variables assigned and the base optimizer applied. The
weights are never moved for the ascent, so nothing is restored and nothing
can drift.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import keras

from ._common import first_leaf, sam_gradient


@dataclass(frozen=True)
class Backend:
    read: Callable[[Any], Any]  # a variable's current value, without copying it
    gradients: Callable[..., tuple[Any, Any, list[Any], list[Any], list[Any]]]
    bounds: Callable[[Any, int], tuple[list[tuple[Any, Any]], list[Any], bool]]
    batch_size: Callable[[Any], Any]
    apply: Callable[[Any, list[Any], list[Any]], None]  # (model, grads, variables)
    no_grad: Callable[[], Any]
    #: wraps the step's gradient function so that each second pass draws the random
    #: numbers its first pass drew, where layers draw from a global generator (torch's
    #: unseeded dropout) rather than from the seed state the passes share; None: nothing
    same_draws: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None


def forward(
    model: Any, weights: list[Any], state: list[Any], metrics: list[Any], x: Any, y: Any, sw: Any
) -> tuple[Any, Any, list[Any], list[Any]]:
    """One training-mode pass with the given values; returns loss, y_pred, state, metrics.

    The same sequence as Keras' JAX trainer (``compute_loss_and_updates``):
    layer losses collected by ``stateless_call`` are handed to
    ``compute_loss`` through ``_losses_override``.
    """
    y_pred, state, losses = model.stateless_call(
        weights, state, x, return_losses=True, training=True
    )
    if losses:
        model._losses_override = losses
    try:
        loss, (_, state, metrics) = model.stateless_compute_loss(
            weights, state, metrics, x=x, y=y, y_pred=y_pred, sample_weight=sw, training=True
        )
    finally:
        if losses:
            model._losses_override = []
    return loss, y_pred, list(state), list(metrics)


def train_step(model: Any, data: Any, backend: Backend) -> dict[str, Any]:
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    params = list(model.trainable_variables)
    state_vars = list(model.non_trainable_variables)
    metric_vars = list(model.metrics_variables)
    state = [backend.read(v) for v in state_vars]
    metrics = [backend.read(v) for v in metric_vars]
    grad_fn = partial(backend.gradients, model)
    if backend.same_draws is not None:
        grad_fn = backend.same_draws(grad_fn)
    total, new_state, new_metrics, loss, y_pred = sam_gradient(
        model,
        grad_fn,
        [backend.read(v) for v in params],
        state,
        metrics,
        (x, y, sample_weight),
        backend.bounds,
        backend.no_grad,
    )
    with backend.no_grad():
        # Only what a pass changed (BatchNorm statistics, seeds, loss trackers):
        # frozen weights pass through stateless_call as the very same tensors.
        for variables, old, new in (
            (state_vars, state, new_state),
            (metric_vars, metrics, new_metrics),
        ):
            for variable, before, after in zip(variables, old, new):
                if after is not before:
                    variable.assign(after)
    backend.apply(model, total, params)
    model._loss_tracker.update_state(loss, sample_weight=backend.batch_size(first_leaf(x)))
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
