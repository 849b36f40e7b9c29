"""TensorFlow backend: one ``tf.GradientTape`` per pass, watching the weights' values."""

from __future__ import annotations

import contextlib
from typing import Any

import tensorflow as tf

from ._common import first_leaf, static_bounds
from ._stateful import Backend, forward


def check_strategy() -> None:
    """Refuse tf.distribute: per-replica ascent and state updates are not tested."""
    if tf.distribute.has_strategy():
        raise NotImplementedError(
            "samkit.keras.SAMModel does not support tf.distribute strategies "
            f"({type(tf.distribute.get_strategy()).__name__}); train without a strategy "
            "scope, or use the JAX backend with keras.distribution (untested)"
        )


def _gradients(model: Any, weights: list[Any], state: list[Any], metrics: list[Any], x, y, sw):
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(weights)
        loss, y_pred, state, metrics = forward(model, weights, state, metrics, x, y, sw)
        scaled = model.optimizer.scale_loss(loss)
    return loss, y_pred, state, metrics, tape.gradient(scaled, weights)


def _bounds(x: Any, splits: int) -> tuple[list[tuple[Any, Any]], list[Any], bool]:
    rows = first_leaf(x).shape[0]
    if rows is not None:
        return static_bounds(int(rows), splits)
    # Keras' TensorFlow datasets leave the batch size unknown in the traced
    # step: the same near-equal split with tensors, always `splits` pieces, of
    # which those beyond a batch of fewer rows are empty (masked by the caller).
    n = tf.shape(first_leaf(x))[0]
    base, extra = n // splits, n % splits
    bounds, start = [], tf.constant(0, n.dtype)
    for k in range(splits):
        stop = start + base + tf.cast(k < extra, n.dtype)
        bounds.append((start, stop))
        start = stop
    nf = tf.cast(n, tf.float32)
    return bounds, [tf.cast(b - a, tf.float32) / nf for a, b in bounds], True


def _apply(model: Any, grads: list[Any], variables: list[Any]) -> None:
    model.optimizer.apply_gradients(zip(grads, variables))


BACKEND = Backend(
    read=lambda v: v.value,
    gradients=_gradients,
    bounds=_bounds,
    batch_size=lambda t: tf.shape(t)[0],
    apply=_apply,
    no_grad=contextlib.nullcontext,
)
