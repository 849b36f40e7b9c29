"""The one training loop every command uses.

:func:`train` runs a :class:`~samkit.experiments.methods.Method` on a
:class:`~samkit.experiments.datasets.Dataset` for a number of epochs:

* the data order is a fixed function of ``(seed, epoch)``, so runs with the
  same seed see the same batches whatever the method, and a resumed run sees
  the batches it would have seen;
* the learning rate follows a per-step schedule (constant, or cosine decay
  to zero, with optional linear warm-up), set on the method's optimizer;
* after each epoch the model is evaluated on train / validation / test, the
  record is appended to a JSONL file (``metrics_path``) and passed to the
  callbacks; a training-state file (``state_path``, atomic) lets an
  interrupted run continue where it stopped, with the same numbers;
* with ``early_stopping=p`` training stops after ``p`` epochs without a
  better validation accuracy, and the best-validation weights are kept;
* the final (or best) model is saved as a samkit checkpoint
  (:mod:`samkit.experiments.checkpoint`) for the sharpness instruments.

Call :func:`seed_everything` before building the model so that its
initialisation is reproducible too.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import atomic_torch_save, save_checkpoint
from .datasets import Dataset, Split
from .methods import Method

__all__ = [
    "TrainConfig",
    "TrainResult",
    "train",
    "evaluate",
    "seed_everything",
    "deterministic",
    "lr_factor",
]

Callback = Callable[[dict[str, Any]], None]


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def deterministic(enabled: bool = True) -> Iterator[None]:
    """``torch.use_deterministic_algorithms`` inside the block (warn-only, so an
    operation without a deterministic kernel still runs), restored after."""
    prev, prev_warn = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


@dataclass
class TrainConfig:
    """How long and how to train (the method holds the optimizer's settings)."""

    epochs: int = 30
    batch_size: int = 100
    schedule: str = "cosine"  # "cosine" (to zero) or "constant"
    warmup_epochs: float = 0.0
    early_stopping: int | None = None  # patience, in epochs, on validation accuracy
    label_smoothing: float = 0.0
    eval_batch_size: int = 2000
    eval_every: int = 1  # evaluate every k epochs (and always after the last one)
    deterministic: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "eval_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Invalid {name} value: {v!r} (must be an int >= 1)")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(
                f"Invalid schedule value: {self.schedule!r} (expected 'cosine' or 'constant')"
            )
        if not (
            isinstance(self.warmup_epochs, (int, float)) and 0 <= self.warmup_epochs <= self.epochs
        ):
            raise ValueError(
                f"Invalid warmup_epochs value: {self.warmup_epochs!r} (must be in [0, epochs])"
            )
        es = self.early_stopping
        if es is not None and (isinstance(es, bool) or not isinstance(es, int) or es < 1):
            raise ValueError(
                f"Invalid early_stopping value: {es!r} (a patience in epochs >= 1, or None)"
            )
        if not (isinstance(self.label_smoothing, (int, float)) and 0 <= self.label_smoothing < 1):
            raise ValueError(
                f"Invalid label_smoothing value: {self.label_smoothing!r} (must be in [0, 1))"
            )


@dataclass
class TrainResult:
    """What a run produced: the per-epoch history and the final numbers."""

    history: list[dict[str, Any]]
    final: dict[str, Any]
    passes: float
    steps: int
    train_time: float  # seconds spent in training steps (evaluation excluded)
    stopped_early: bool = False
    diverged: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lr_factor(step: int, total: int, schedule: str, warmup: int) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, *, batch_size: int = 2000) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``split`` (eval mode)."""
    n = len(split)
    if n == 0:
        return float("nan"), float("nan")
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.int64)
    for start in range(0, n, batch_size):
        x, y = split.x[start : start + batch_size], split.y[start : start + batch_size]
        out = model(x)
        loss_sum += F.cross_entropy(out, y, reduction="sum").double()
        correct += (out.argmax(1) == y).sum()
    model.train(was_training)
    return float(loss_sum) / n, float(correct) / n


def _batches(n: int, batch_size: int, seed: int, epoch: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g)
    # drop the last partial batch: every step then has the same size (and cost)
    return [perm[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)] or [perm]


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()


def train(
    model: nn.Module,
    method: Method,
    data: Dataset,
    config: TrainConfig,
    *,
    seed: int = 0,
    metrics_path: str | os.PathLike[str] | None = None,
    state_path: str | os.PathLike[str] | None = None,
    checkpoint_path: str | os.PathLike[str] | None = None,
    model_spec: tuple[str, dict[str, Any]] | None = None,
    meta: dict[str, Any] | None = None,
    callbacks: Sequence[Callback] = (),
    progress: bool | None = None,
    desc: str = "",
) -> TrainResult:
    """Train ``model`` with ``method`` on ``data``; see the module docstring.

    Args:
        seed: fixes the data order (call :func:`seed_everything` yourself
            before building the model).
        metrics_path: JSONL file; one record per epoch is appended as it comes
            (the file is restarted when training starts from epoch 0).
        state_path: training-state file written atomically after each epoch;
            if it exists, training resumes from it. Delete it when done.
        checkpoint_path: where the final model goes (needs ``model_spec``,
            ``(name, kwargs)`` for :func:`~samkit.experiments.models.build_model`).
        meta: stored in the checkpoint's ``meta``.
        callbacks: called with each epoch's record (may raise to abort, e.g.
            an Optuna pruner).
        progress: show a progress bar (default: when stderr is a TTY).
    """
    if config.early_stopping is not None and len(data.val) == 0:
        raise ValueError(
            "Invalid early_stopping value: early stopping needs a validation split (val_fraction > 0)"
        )
    if checkpoint_path is not None and model_spec is None:
        raise ValueError("Invalid model_spec value: None (needed to write a checkpoint)")
    n = len(data.train)
    steps_per_epoch = len(_batches(n, config.batch_size, seed, 0))
    total = steps_per_epoch * config.epochs
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    base_lrs = [g["lr"] for g in method.optimizer.param_groups]

    def loss_fn(logits: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(logits, y, reduction="none", label_smoothing=config.label_smoothing)

    history: list[dict[str, Any]] = []
    start_epoch, train_time = 0, 0.0
    best: tuple[float, int, dict[str, Tensor] | None] = (-1.0, -1, None)
    bad_epochs = 0
    if state_path is not None and Path(state_path).is_file():
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(st["model"])
        method.load_state_dict(st["method"])
        history, train_time = st["history"], st["train_time"]
        start_epoch = len(history)
        best = (st["best"][0], st["best"][1], st["best"][2])
        bad_epochs = st["bad_epochs"]
        if metrics_path is not None:
            # the log may hold an epoch that ended after the last saved state: rewrite it
            from .report import write_text_atomic

            write_text_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in history))
    elif metrics_path is not None:
        Path(metrics_path).parent.mkdir(parents=True, exist_ok=True)
        Path(metrics_path).write_text("")

    show = sys.stderr.isatty() if progress is None else progress
    bar = None
    if show:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=config.epochs,
                initial=start_epoch,
                desc=desc or method.name,
                leave=False,
                unit="ep",
            )
        except ImportError:  # pragma: no cover
            bar = None

    stopped, diverged = False, False
    step = start_epoch * steps_per_epoch
    try:
        with deterministic(config.deterministic):
            model.train()
            for epoch in range(start_epoch, config.epochs):
                loss_sum = torch.zeros((), dtype=torch.float64)
                t0 = time.perf_counter()
                batches = _batches(n, config.batch_size, seed, epoch)
                for idx in batches:
                    f = lr_factor(step, total, config.schedule, warmup)
                    for g, lr in zip(method.optimizer.param_groups, base_lrs):
                        g["lr"] = lr * f
                    loss_sum += method.step(
                        model, data.train.x[idx], data.train.y[idx], idx, loss_fn
                    ).double()
                    step += 1
                method.on_epoch_end(epoch, model)
                epoch_time = time.perf_counter() - t0
                train_time += epoch_time
                train_loss = float(loss_sum) / len(batches)

                record: dict[str, Any] = {"epoch": epoch + 1, "train_loss": train_loss}
                do_eval = (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs
                for split_name in ("train", "val", "test") if do_eval else ():
                    loss, acc = evaluate(
                        model, getattr(data, split_name), batch_size=config.eval_batch_size
                    )
                    if split_name == "train":
                        record["train_eval_loss"], record["train_acc"] = loss, acc
                    else:
                        record[f"{split_name}_loss"], record[f"{split_name}_acc"] = loss, acc
                record.update(
                    lr=method.optimizer.param_groups[0]["lr"],
                    epoch_time=epoch_time,
                    passes=method.passes,
                    steps=step,
                )
                history.append(record)
                if metrics_path is not None:
                    _append_jsonl(Path(metrics_path), record)
                for cb in callbacks:
                    cb(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{train_loss:.3f}", test=f"{record.get('test_acc', math.nan):.3f}"
                    )

                if not math.isfinite(train_loss):
                    diverged = True
                    break
                if config.early_stopping is not None and do_eval:
                    if record["val_acc"] > best[0]:
                        best = (record["val_acc"], epoch, copy.deepcopy(model.state_dict()))
                        bad_epochs = 0
                    else:
                        bad_epochs += 1
                    if bad_epochs >= config.early_stopping:
                        stopped = True
                if state_path is not None:
                    atomic_torch_save(
                        {
                            "model": model.state_dict(),
                            "method": method.state_dict(),
                            "history": history,
                            "train_time": train_time,
                            "best": list(best),
                            "bad_epochs": bad_epochs,
                        },
                        state_path,
                    )
                if stopped:
                    break
    finally:
        if bar is not None:
            bar.close()

    final = dict(history[-1]) if history else {}
    if config.early_stopping is not None and best[2] is not None:
        model.load_state_dict(best[2])
        final = dict(history[best[1]])
    final["best_epoch"] = final.get("epoch", 0)
    if checkpoint_path is not None and model_spec is not None:
        save_checkpoint(
            checkpoint_path,
            model,
            model_name=model_spec[0],
            model_kwargs=model_spec[1],
            dataset=data.spec,
            meta={
                **(meta or {}),
                "seed": seed,
                "epoch": final.get("epoch", 0),
                "test_acc": final.get("test_acc"),
            },
        )
    return TrainResult(
        history=history,
        final=final,
        passes=method.passes,
        steps=step,
        train_time=train_time,
        stopped_early=stopped,
        diverged=diverged,
    )
