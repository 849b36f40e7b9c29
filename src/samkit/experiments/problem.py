"""What a study trains on: the data, the model factory, the loss and the metrics.

A :class:`Problem` is built from a :class:`~samkit.experiments.settings.StudyConfig`:
either a built-in dataset and model (by name), or the user's own:

* data (:class:`UserData`): ``train``, optional ``val`` and ``test``, each a
  map-style ``torch.utils.data.Dataset`` (``len`` and ``ds[i] -> (x, y)``), a
  pair of arrays ``(x, y)``, or, for data that does not fit in memory, an
  ``IterableDataset`` or a factory ``train(seed=, epoch=) -> iterable of
  (x, y) batches``. Without ``val`` a validation split of ``val_fraction`` is
  drawn from a map-style ``train`` per seed;
* a model factory: a callable returning a fresh ``nn.Module``, called with
  ``model_kwargs`` once per run after seeding (a built-in model on the
  user's arrays gets ``in_len`` and ``num_classes`` from the data);
* ``task``: ``"classification"`` (cross-entropy, accuracy ``acc``) or
  ``"regression"`` (mean squared error; metrics ``mse`` and ``mae``);
* ``loss(output, target)``: any callable; a torch loss module is switched to
  ``reduction="none"`` so methods that need per-sample losses (ESAM) get them;
* ``metrics``: a dict ``name -> metric(output, target)`` returning the mean
  over the batch; the first is the study's primary metric (higher is better
  for ``acc``, ``accuracy``, ``f1``, ``auc``, ``r2``, ``precision``, ``recall``,
  or when the callable has ``higher_is_better = True``; lower otherwise).

The CLI reads the user's code from ``module:function`` (a module importable
from the current folder or an installed package, or ``path/to/file.py``) and
data from ``path.npz`` (arrays ``x_train, y_train, x_test, y_test``, optional
``x_val, y_val``; read without pickle): :mod:`~samkit.experiments.userdata`
(re-exported here).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from .userdata import (  # the user's data and code (re-exported: their home until 0.3)
    IndexedSubset,
    UserData,
    _numbers,
    _where,
    as_source,
    load_callable,
    load_user_data,
    source_kind,
    user_code_error,
)

__all__ = [
    "UserData",
    "Problem",
    "Data",
    "load_callable",
    "load_user_data",
    "as_source",
    "accuracy",
    "mse",
    "mae",
    "IndexedSubset",
    "user_code_error",
]

#: the words of a metric's name that say which way is better (``balanced_accuracy``,
#: ``top1_acc``, ``roc_auc``, ``val_loss``, ``rmse``): the name split at anything but a
#: letter or digit, each part looked up here
HIGHER_IS_BETTER = {
    "acc", "accuracy", "f1", "auc", "auroc", "roc", "aupr", "ap", "map", "r2", "precision",
    "recall", "top1", "top5", "iou", "miou", "dice", "jaccard", "bleu", "rouge", "kappa",
    "mcc", "sensitivity", "specificity", "corr", "correlation", "pearson", "spearman",
    "score", "top",
}  # fmt: skip
LOWER_IS_BETTER = {
    "loss", "error", "err", "mse", "mae", "rmse", "msle", "mape", "nll", "ce", "xent",
    "perplexity", "ppl", "brier", "ece", "hamming", "distance", "dist", "regret", "drop",
    "gap", "decrease",
}  # fmt: skip


# ------------------------------------------------------------------ metrics
def accuracy(output: Tensor, target: Tensor) -> Tensor:
    """Fraction of samples whose largest logit is the target class."""
    return (output.argmax(1) == target).double().mean()


accuracy.higher_is_better = True  # type: ignore[attr-defined]


def _match(output: Tensor, target: Tensor) -> Tensor:
    if output.shape != target.shape:
        if output.numel() != target.numel():
            raise ValueError(
                f"Invalid output value: the model's output has shape {tuple(output.shape)}, "
                f"the targets {tuple(target.shape)} (a regression needs one output per target)"
            )
        output = output.reshape(target.shape)
    return output


def mse(output: Tensor, target: Tensor) -> Tensor:
    """Mean squared error (the output reshaped to the target's shape)."""
    output = _match(output, target)
    return (output - target.to(output.dtype)).square().mean()


def mae(output: Tensor, target: Tensor) -> Tensor:
    """Mean absolute error."""
    output = _match(output, target)
    return (output - target.to(output.dtype)).abs().mean()


def _per_sample_mse(output: Tensor, target: Tensor) -> Tensor:
    output = _match(output, target)
    err = (output - target.to(output.dtype)).square()
    return err.reshape(err.shape[0], -1).mean(1) if err.dim() > 1 else err


def higher_is_better(name: str, metric: Any) -> bool:
    """Which way the metric ``name`` improves: its ``higher_is_better`` flag, else the words
    of its name; a ValueError where neither says (it was taken as lower-is-better, so a
    ``balanced_accuracy`` tuned to chance and its verdicts were upside down)."""
    flag = getattr(metric, "higher_is_better", None)
    if isinstance(flag, bool):
        return flag
    words = set(re.split(r"[^a-z0-9]+", str(name).lower())) - {""}
    up, down = bool(words & HIGHER_IS_BETTER), bool(words & LOWER_IS_BETTER)
    if up != down:
        return up != bool(words & {"neg", "negative", "minus"})  # (neg_mse: higher is better)
    raise ValueError(
        f"Invalid metrics value: cannot tell whether a higher {name!r} is better "
        f"({'its name says both ways' if up else 'its name does not say'}): give the "
        f"function an attribute, {getattr(metric, '__name__', 'metric')}.higher_is_better = "
        "True (or False), or name it after what it is (..._acc, ..._auc, ..._loss, ..._mse)"
    )


# ------------------------------------------------------------------ problem
@dataclass
class Data:
    """One seed's data as the trainer reads it."""

    name: str
    train: Any
    val: Any
    test: Any
    spec: dict[str, Any] | None = None  # rebuilds built-in data (checkpoints); None for the user's
    in_len: int | None = None
    num_classes: int | None = None


def first_sample(source: Any) -> tuple[Any, Any]:
    """The first ``(x, y)`` of a training source; ValueError when it is not a pair
    or holds strings or objects where numbers belong."""
    kind = source_kind(source)
    if kind == "map":
        item = source[0]
    else:
        it = iter(source(seed=0, epoch=0) if kind == "factory" else source)
        item = next(it, None)
        if item is None:
            raise ValueError("Invalid train value: it yields no data")
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise ValueError(
            f"Invalid train value: each item must be a pair (x, y), got {type(item).__name__}"
        )
    x, y = item
    _numbers("train y", y)  # string labels would fail inside torch's batching, mid-run
    if isinstance(x, (str, bytes)) or (isinstance(x, np.ndarray) and x.dtype.kind not in "biuf"):
        _numbers("train x", x)
    return x, y


def default_loss(task: str, label_smoothing: float) -> Callable[[Tensor, Tensor], Tensor]:
    if task == "classification":

        def cross_entropy(output: Tensor, target: Tensor) -> Tensor:
            return F.cross_entropy(
                output, target, reduction="none", label_smoothing=label_smoothing
            )

        return cross_entropy
    return _per_sample_mse


def per_sample_loss(loss: Callable[..., Any]) -> Callable[[Tensor, Tensor], Tensor]:
    """The user's loss, giving one value per sample where it can (torch loss modules).

    A torch loss module is switched to ``reduction="none"``, and its values are scaled so
    that their plain mean is what the module itself would have returned: its ``"sum"``,
    and the weighted mean of ``CrossEntropyLoss``/``NLLLoss`` with class weights or
    ignored targets (divided by the weights of the targets counted, not by the batch).
    A module whose output and targets broadcast into a matrix is refused.
    """
    module = isinstance(loss, nn.modules.loss._Loss)
    reduction = getattr(loss, "reduction", "mean") if module else "none"
    weighted = isinstance(loss, (nn.CrossEntropyLoss, nn.NLLLoss))
    if module and reduction != "none":
        loss = copy.copy(loss)
        loss.reduction = "none"

    def fn(output: Tensor, target: Tensor) -> Tensor:
        value = loss(output, target)
        if not torch.is_tensor(value):
            raise ValueError(
                f"Invalid loss value: it returned {type(value).__name__}, not a tensor"
            )
        # (a class dimension reduced away: CrossEntropyLoss on (N, C, H, W) gives (N, H, W))
        shapes = (output.shape, target.shape, output.shape[:1] + output.shape[2:])
        if module and value.dim() > 1 and value.shape not in shapes:
            # MSELoss on (B, 1) outputs and (B,) targets: torch broadcasts to (B, B), every
            # output against every target (a model that learns the mean), with a warning
            raise ValueError(
                f"Invalid loss value: {type(loss).__name__} broadcasts the model's output "
                f"{tuple(output.shape)} against the targets {tuple(target.shape)} into "
                f"{tuple(value.shape)}; give them one shape (e.g. output.squeeze(1), or "
                "targets of shape (N, 1))"
            )
        # scaled element by element, before each sample's elements are averaged: the plain
        # mean over samples of the result is the module's own reduction
        if reduction == "sum":
            value = value * value.numel()
        elif reduction == "mean" and weighted and not target.is_floating_point():
            value = _as_weighted_mean(loss, value, target)
        if value.dim() > 1:
            value = value.reshape(value.shape[0], -1).mean(1)
        return value

    fn.__name__ = getattr(loss, "__name__", type(loss).__name__)
    return fn


def _as_weighted_mean(loss: Any, value: Tensor, target: Tensor) -> Tensor:
    """Element-wise ``value`` (one per target) scaled so that its plain mean is the
    module's weighted mean: torch divides by the summed class weights of the targets not
    ignored, not by their count."""
    counted = target != loss.ignore_index
    weight = loss.weight
    if weight is None and bool(counted.all()):
        return value  # (the plain mean already)
    w = counted.to(value.dtype)
    if weight is not None:  # (an ignored target may be any index, 255 too: not looked up)
        w = w * weight.to(value.device, value.dtype)[torch.where(counted, target, 0)]
    return value * (value.numel() / w.sum())


class Problem:
    """Data source, model factory, loss and metrics of one study (see the module docstring)."""

    def __init__(self, config: Any, task: str) -> None:
        self.config = config
        self.task = task
        self.builtin_data = config.user_data is None
        self.builtin_model = config.model_factory is None
        if config.loss is not None:
            self.loss_fn = per_sample_loss(config.loss)
        else:
            self.loss_fn = default_loss(task, config.train.label_smoothing)
        if config.metrics is not None:
            self.metrics = dict(config.metrics)
        elif task == "classification":
            self.metrics = {"acc": accuracy}
        else:
            self.metrics = {"mse": mse, "mae": mae}
        self.primary = next(iter(self.metrics))
        self.maximize = higher_is_better(self.primary, self.metrics[self.primary])
        self._cache: dict[int, Data] = {}

    @classmethod
    def from_config(cls, config: Any) -> Problem:
        task = config.task
        if task is None:
            if config.user_data is None:
                task = "classification"
            else:
                _, y = first_sample(config.user_data.train)
                y = torch.as_tensor(np.asarray(y)) if not torch.is_tensor(y) else y
                task = "regression" if y.is_floating_point() else "classification"
        return cls(config, task)

    @property
    def streaming(self) -> bool:
        return not self.builtin_data and self.config.user_data.kind != "map"

    def load(self, seed: int) -> Data:
        if seed in self._cache:
            return self._cache[seed]
        cfg = self.config
        if self.builtin_data:
            d = cfg_load_builtin(cfg, seed)
            data = Data(d.name, d.train, d.val, d.test, d.spec, d.in_len, d.num_classes)
        else:
            data = self._load_user(seed)
        self._cache.clear()  # keep one seed's data: a large user dataset is held once
        self._cache[seed] = data
        return data

    def _load_user(self, seed: int) -> Data:
        cfg, ud = self.config, self.config.user_data
        train, val = ud.train, ud.val
        if ud.kind == "map":
            n = len(train)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(10_007 * seed + 3))
            if val is None and cfg.val_fraction > 0:
                n_val = int(round(cfg.val_fraction * n))
                if n_val < 1 or n_val >= n:
                    raise ValueError(
                        f"Invalid val_fraction value: {cfg.val_fraction!r} leaves "
                        f"{n_val} of {n} samples for validation"
                    )
                val = IndexedSubset(train, order[:n_val].sort().values)
                keep = order[n_val:]
            else:
                keep = order
            if cfg.train_size is not None:
                if cfg.train_size > len(keep):
                    raise ValueError(
                        f"Invalid train_size value: {cfg.train_size} (your training data has "
                        f"{len(keep)} samples"
                        + (" after the validation split" if len(keep) < n else "")
                        + "; leave train_size out to use them all)"
                    )
                keep = keep[: cfg.train_size]
            if val is not None or cfg.train_size is not None:
                train = IndexedSubset(train, keep.sort().values)
        elif cfg.train_size is not None:
            raise ValueError(
                "Invalid train_size value: it applies to map-style training data only "
                "(not an IterableDataset or a factory)"
            )
        in_len = num_classes = None
        base = train.base if isinstance(train, IndexedSubset) else train
        if isinstance(base, TensorDataset):
            x, y = base.tensors
            in_len = int(math.prod(x.shape[1:])) if x.dim() > 1 else 1
            if self.task == "classification":
                num_classes = int(y.max()) + 1 if y.numel() else 0
            else:
                num_classes = int(math.prod(y.shape[1:])) if y.dim() > 1 else 1
        return Data(ud.name, train, val, ud.test, None, in_len, num_classes)

    def model_kwargs(self, data: Data) -> dict[str, Any]:
        kwargs = dict(self.config.model_kwargs)
        if self.builtin_model:
            if data.in_len is None or data.num_classes is None:
                raise ValueError(
                    f"Invalid model value: {self.config.model!r} (a built-in model on your own data "
                    "needs array data (x, y) to size it; give your model as module:function)"
                )
            kwargs = {"in_len": data.in_len, "num_classes": data.num_classes, **kwargs}
        return kwargs

    def build_model(self, data: Data) -> nn.Module:
        """A fresh model (call :func:`~samkit.experiments.trainer.seed_everything` first)."""
        kwargs = self.model_kwargs(data)
        if self.builtin_model:
            from .models import build_model

            try:
                return build_model(self.config.model, **kwargs)
            except ValueError:
                raise
            except Exception as exc:  # noqa: BLE001 - e.g. a negative width from model_kwargs
                raise ValueError(
                    f"Invalid model_kwargs value: {self.config.model_kwargs!r} for model "
                    f"{self.config.model!r} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                ) from exc
        try:
            model = self.config.model_factory(**kwargs)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - the user's factory raised (or exited)
            raise ValueError(
                f"Invalid model value: {self.config.model!r} raised {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}{_where(exc)}"
            ) from exc
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"Invalid model value: {self.config.model!r} returned {type(model).__name__} "
                "(expected a fresh torch.nn.Module)"
            )
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(
                f"Invalid model value: {self.config.model!r} has no trainable parameters"
            )
        return model

    def model_spec(self, data: Data) -> tuple[str, dict[str, Any]]:
        """(name, kwargs) stored in checkpoints; user models are marked so no tool imports them."""
        kwargs = self.model_kwargs(data)
        if self.builtin_model:
            return self.config.model, kwargs
        return f"user:{self.config.model}", kwargs

    def describe(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "metric": self.primary,
            "maximize": self.maximize,
            "metrics": list(self.metrics),
            "loss": getattr(self.loss_fn, "__name__", "loss"),
        }


def cfg_load_builtin(cfg: Any, seed: int) -> Any:
    from .datasets import load_dataset

    return load_dataset(
        cfg.dataset,
        seed=seed,
        noise=cfg.noise,
        val_fraction=cfg.val_fraction,
        train_size=cfg.train_size,
    )


_default_loss = default_loss  # its name before 0.3
