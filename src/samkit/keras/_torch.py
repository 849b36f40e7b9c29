"""PyTorch backend: gradients by ``torch.autograd.grad`` on leaf views of the weights."""

from __future__ import annotations

from typing import Any

import keras
import torch

from ._common import first_leaf, static_bounds
from ._stateful import Backend, forward


def _detach(t: Any) -> Any:
    # Keep unchanged tensors as they are (the step assigns only what changed).
    return t.detach() if isinstance(t, torch.Tensor) and t.requires_grad else t


def _gradients(model: Any, weights: list[Any], state: list[Any], metrics: list[Any], x, y, sw):
    leaves = [w.detach().requires_grad_(True) for w in weights]  # views, no copies
    loss, y_pred, state, metrics = forward(model, leaves, state, metrics, x, y, sw)
    grads = torch.autograd.grad(model.optimizer.scale_loss(loss), leaves, allow_unused=True)
    return (
        loss.detach(),
        keras.tree.map_structure(_detach, y_pred),
        [_detach(s) for s in state],
        [_detach(m) for m in metrics],
        list(grads),
    )


def _apply(model: Any, grads: list[Any], variables: list[Any]) -> None:
    with torch.no_grad():
        model.optimizer.apply(grads, variables)


BACKEND = Backend(
    read=lambda v: v.value,
    gradients=_gradients,
    bounds=lambda x, splits: static_bounds(int(first_leaf(x).shape[0]), splits),
    batch_size=lambda t: t.shape[0],
    apply=_apply,
    no_grad=torch.no_grad,
)
