"""What a model sees: the batches of a split in a fixed order, and its evaluation.

The data order is a fixed function of ``(seed, epoch)`` (a seeded permutation
of a map-style dataset; an ``IterableDataset`` is told the epoch through its
``set_epoch``; a factory is called as ``train(seed=, epoch=)``), so runs with
the same seed see the same batches in the same order whatever the method.
The last partial training batch is dropped, so every step costs the same.
:func:`evaluate` scores a model on a whole split (the loss and every metric).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .problem import accuracy, default_loss
from .registry import Amp
from .userdata import batch_indexable, source_kind

__all__ = [
    "train_batches",
    "eval_batches",
    "steps_per_epoch",
    "schedule",
    "evaluate",
    "to_device",
]

LossFn = Callable[[Tensor, Tensor], Tensor]


def _batches(n: int, batch_size: int, seed: int, epoch: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g)
    # drop the last partial batch: every step then has the same size (and cost)
    return [perm[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)] or [perm]


def _pair(item: Any) -> tuple[Any, Tensor]:
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise ValueError(
            f"Invalid batch value: each batch must be a pair (x, y), got {type(item).__name__}"
        )
    x, y = item
    if not torch.is_tensor(y):
        y = torch.as_tensor(np.asarray(y))
    if not torch.is_tensor(x) and isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    return x, y


def _loader_kwargs(num_workers: int, pin: bool, seed: int) -> dict[str, Any]:
    # An explicit generator: the loader then never draws from torch's global RNG
    # (dropout's), and worker RNGs (random augmentations) follow the run's seed and epoch.
    return {
        "num_workers": num_workers,
        "pin_memory": pin,
        "generator": torch.Generator().manual_seed(seed),
    }


def train_batches(
    source: Any,
    batch_size: int,
    seed: int,
    epoch: int,
    *,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[tuple[Any, Tensor, Tensor]]:
    """``(x, y, idx)`` for one epoch; the order depends on ``(seed, epoch)`` only."""
    kind = source_kind(source)
    kw = _loader_kwargs(num_workers, pin_memory, seed * 100_003 + epoch)
    if kind == "map":
        batches = _batches(len(source), batch_size, seed, epoch)
        if batch_indexable(source) and num_workers == 0 and not pin_memory:
            # in-memory tensors, no workers: a DataLoader would only add its per-batch cost
            loader: Any = (source[idx] for idx in batches)
        elif batch_indexable(source):
            loader = DataLoader(source, sampler=batches, batch_size=None, **kw)
        else:
            loader = DataLoader(source, batch_sampler=[b.tolist() for b in batches], **kw)
        for item, idx in zip(loader, batches):
            x, y = _pair(item)
            yield x, y, idx
        return
    if kind == "iterable":
        if callable(getattr(source, "set_epoch", None)):
            source.set_epoch(epoch)
        it: Any = DataLoader(source, batch_size=batch_size, drop_last=True, **kw)
    else:
        it = source(seed=seed, epoch=epoch)
    start = 0
    for item in it:
        x, y = _pair(item)
        idx = torch.arange(start, start + y.shape[0])
        start += y.shape[0]
        yield x, y, idx


def eval_batches(
    source: Any, batch_size: int, *, num_workers: int = 0, pin_memory: bool = False
) -> Iterator[tuple[Any, Tensor]]:
    """The whole split in order, ``batch_size`` samples at a time."""
    kw = _loader_kwargs(num_workers, pin_memory, 0)
    if source_kind(source) == "map":
        n = len(source)
        if batch_indexable(source):
            chunks = [torch.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
            if num_workers == 0 and not pin_memory:
                loader: Any = (source[c] for c in chunks)
            else:
                loader = DataLoader(source, sampler=chunks, batch_size=None, **kw)
        else:
            loader = DataLoader(source, batch_size=batch_size, shuffle=False, **kw)
    elif source_kind(source) == "iterable":
        loader = DataLoader(source, batch_size=batch_size, **kw)
    else:  # a factory: its own batches, in its epoch-0 order (the order does not matter here)
        loader = source(seed=0, epoch=0)
    for item in loader:
        yield _pair(item)


def steps_per_epoch(source: Any, batch_size: int, seed: int = 0) -> int:
    """Steps in one epoch: exact for map-style data, else counted on epoch 0."""
    if source_kind(source) == "map":
        return len(_batches(len(source), batch_size, seed, 0))
    if source_kind(source) == "iterable":
        with contextlib.suppress(TypeError):
            return max(1, len(DataLoader(source, batch_size=batch_size, drop_last=True)))
    return max(1, sum(1 for _ in train_batches(source, batch_size, seed, 0)))


def schedule(source: Any, batch_size: int, epochs: int, seed: int) -> dict[str, int]:
    """A run's length as a method's :class:`~samkit.experiments.types.TrainSpec` is told
    it: ``total_steps``, ``steps_per_epoch`` and ``epochs``."""
    n_steps = steps_per_epoch(source, batch_size, seed)
    return {"total_steps": n_steps * epochs, "steps_per_epoch": n_steps, "epochs": epochs}


def to_device(x: Any, device: torch.device) -> Any:
    if torch.is_tensor(x):
        return x.to(device, non_blocking=True)
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


@torch.no_grad()
def evaluate(
    model: nn.Module,
    source: Any,
    loss_fn: LossFn | None = None,
    metrics: dict[str, Callable[..., Any]] | None = None,
    *,
    batch_size: int = 2000,
    device: torch.device | str | None = None,
    amp: Amp | None = None,
    num_workers: int = 0,
) -> dict[str, float]:
    """Mean loss and metrics of ``model`` on ``source`` (eval mode).

    Metrics are means over the samples: each batch's value is weighted by its
    size. Default: cross-entropy and accuracy (``acc``). An empty or missing
    split gives NaN.
    """
    loss_fn = loss_fn or default_loss("classification", 0.0)
    metrics = {"acc": accuracy} if metrics is None else metrics
    out: dict[str, float] = {"loss": float("nan"), **{k: float("nan") for k in metrics}}
    if source is None:
        return out
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = {k: torch.zeros((), dtype=torch.float64, device=dev) for k in ("loss", *metrics)}
    n = 0
    try:
        for x, y in eval_batches(source, batch_size, num_workers=num_workers):
            x, y = to_device(x, dev), to_device(y, dev)
            if amp is not None:
                with torch.autocast(amp.device_type, dtype=amp.dtype):
                    output = model(x)
                output = output.float()
            else:
                output = model(x)
            b = int(y.shape[0])
            losses = loss_fn(output, y).double()
            sums["loss"] += losses.sum() if losses.dim() == 1 else losses * b
            for k, fn in metrics.items():
                v = fn(output, y)
                sums[k] += (v.double() if torch.is_tensor(v) else float(v)) * b
            n += b
    finally:
        model.train(was_training)
    if n == 0:
        return out
    return {k: float(v) / n for k, v in sums.items()}
