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


def _same_draws(grad_fn: Any) -> Any:
    """Pass 2 of each micro-batch draws what its pass 1 drew: Keras's dropout without a
    ``seed`` draws from torch's global generator (not from the seed state both passes
    start from), so pass 2 got new masks and the generator advanced twice a step. The
    passes alternate (1, 2, 1, 2, ...): the generator's state is kept before each first
    pass and put back before its second, and ends where one pass leaves it, as in
    ``fit`` without SAM."""
    kept: list[Any] = []

    def draws() -> Any:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        return torch.get_rng_state(), cuda

    def run(*args: Any) -> Any:
        if kept:
            cpu, cuda = kept.pop()
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)
        else:
            kept.append(draws())
        return grad_fn(*args)

    return run


BACKEND = Backend(
    read=lambda v: v.value,
    gradients=_gradients,
    bounds=lambda x, splits: static_bounds(int(first_leaf(x).shape[0]), splits),
    batch_size=lambda t: t.shape[0],
    apply=_apply,
    no_grad=torch.no_grad,
    same_draws=_same_draws,
)
