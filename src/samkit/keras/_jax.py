"""JAX backend: ``jax.value_and_grad`` of Keras' own stateless loss function.

Keras' JAX trainer hands ``train_step`` the values of all variables and
expects new values back; ``compute_loss_and_updates`` is its stateless
forward pass (``stateless_call`` + ``stateless_compute_loss``).
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import keras

from ._common import first_leaf, sam_gradient, static_bounds


def train_step(model: Any, state: Any, data: Any) -> tuple[dict[str, Any], Any]:
    trainable, non_trainable, optimizer_vars, metrics_vars = state
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    value_and_grad = jax.value_and_grad(model.compute_loss_and_updates, has_aux=True)

    def gradients(weights, state, metrics, xb, yb, swb):
        (_, (loss, y_pred, state, metrics)), grads = value_and_grad(
            weights,
            state,
            metrics,
            xb,
            yb,
            swb,
            training=True,
            optimizer_variables=optimizer_vars,
        )
        return loss, y_pred, list(state), list(metrics), grads

    total, non_trainable, metrics_vars, loss, y_pred = sam_gradient(
        model,
        gradients,
        list(trainable),
        list(non_trainable),
        list(metrics_vars),
        (x, y, sample_weight),
        lambda x, splits: static_bounds(int(first_leaf(x).shape[0]), splits),
        contextlib.nullcontext,
    )
    trainable, optimizer_vars = model.optimizer.stateless_apply(optimizer_vars, total, trainable)
    logs, metrics_vars = model._update_metrics_variables(
        metrics_vars, loss, x, y, y_pred, sample_weight
    )
    return logs, (trainable, non_trainable, optimizer_vars, metrics_vars)
