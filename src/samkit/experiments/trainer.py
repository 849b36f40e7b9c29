"""The one training loop every command uses.

:func:`train` runs a :class:`~samkit.experiments.registry.Method` on a
problem's data for a number of epochs, streaming batches from DataLoaders:

* the data order is a fixed function of ``(seed, epoch)`` (a seeded
  permutation of a map-style dataset; an ``IterableDataset`` is told the epoch
  through its ``set_epoch``; a factory is called as ``train(seed=, epoch=)``),
  so runs with the same seed see the same batches in the same order whatever
  the method, and a resumed run sees the batches it would have seen. The last
  partial batch is dropped, so every step costs the same;
* the learning rate follows a per-step schedule (constant, or cosine decay
  to zero, with optional linear warm-up), set on the method's optimizer;
* after each evaluation the model is scored on train / validation / test
  (the loss and every metric), the record is appended to a JSONL file
  (``metrics_path``) and passed to the callbacks; the optimizer hears the
  validation loss (``optimizer.observe_validation(val_loss)``, when it has
  that method), and its ``rho`` is recorded when its first group has one;
* a training-state file (``state_path``, atomic, after every epoch) lets an
  interrupted run continue with the same numbers: model, method, RNG states,
  the early-stopping bookkeeping and whether the run already stopped;
* with ``early_stopping=p`` training stops after ``p`` evaluations without a
  better validation score (the primary metric), and the best weights are kept;
* a run whose training loss or weights become NaN or infinite, or whose loss
  on an evaluated split is not finite (a model that gives NaN in eval mode
  only, or on the test inputs only), is stopped and marked ``diverged``; it
  writes no checkpoint;
* the final (or best) model is saved as a samkit checkpoint
  (:mod:`samkit.experiments.checkpoint`) for the sharpness instruments.

Call :func:`seed_everything` before building the model so that its
initialisation is reproducible too. The batches and :func:`evaluate` live in
:mod:`~samkit.experiments.batches`, the training-state file in
:mod:`~samkit.experiments.trainstate` (both re-exported here).
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
from torch import Tensor, nn

from .._atomic import append_line, finite, write_text_atomic
from .batches import eval_batches, evaluate, steps_per_epoch, to_device, train_batches
from .checkpoint import save_checkpoint
from .engine.core import state_saved
from .problem import accuracy, default_loss
from .registry import Amp, Method
from .settings import TrainConfig
from .trainstate import ResumeError, _set_rng_state, load_state, save_state
from .userdata import source_kind

__all__ = [
    "TrainConfig",
    "TrainResult",
    "ResumeError",
    "train",
    "evaluate",
    "seed_everything",
    "deterministic",
    "lr_factor",
    "resolve_device",
    "train_batches",
    "eval_batches",
    "steps_per_epoch",
    "load_state",
    "finite",
]

Callback = Callable[[dict[str, Any]], None]
LossFn = Callable[[Tensor, Tensor], Tensor]


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


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``: CUDA, then MPS, then CPU; an explicit device must exist."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"Invalid device value: {str(device)!r} (CUDA is not available here)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"Invalid device value: {str(device)!r} (this machine has "
                f"{torch.cuda.device_count()} CUDA device(s))"
            )
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"Invalid device value: {str(device)!r} (MPS is not available here)")
    return dev


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


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    append_line(path, json.dumps(finite(record), allow_nan=False))


def train(
    model: nn.Module,
    method: Method,
    data: Any,
    config: TrainConfig,
    *,
    seed: int = 0,
    loss_fn: LossFn | None = None,
    metrics: dict[str, Callable[..., Any]] | None = None,
    maximize: bool | None = None,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    metrics_path: str | os.PathLike[str] | None = None,
    state_path: str | os.PathLike[str] | None = None,
    checkpoint_path: str | os.PathLike[str] | None = None,
    model_spec: tuple[str, dict[str, Any]] | None = None,
    meta: dict[str, Any] | None = None,
    callbacks: Sequence[Callback] = (),
    progress: bool | None = None,
    desc: str = "",
    epoch_steps: int | None = None,
    state_tag: Any = None,
) -> TrainResult:
    """Train ``model`` with ``method`` on ``data`` (``.train``, ``.val``, ``.test``); see
    the module docstring.

    Args:
        seed: fixes the data order (call :func:`seed_everything` yourself
            before building the model).
        loss_fn: per-sample loss ``loss_fn(output, y)`` (default: cross-entropy
            with the config's label smoothing).
        metrics: ``name -> metric(output, y)``, batch means (default: ``acc``);
            the first is the primary one (early stopping, best weights).
        maximize: whether a larger primary metric is better (default: True for
            the default accuracy, else :func:`~samkit.experiments.problem.higher_is_better`).
        device: where to train (``"auto"``: CUDA, MPS, CPU; default: where the
            model is). ``num_workers``: DataLoader worker processes.
        metrics_path: JSONL file; one record per epoch is appended as it comes
            (the file is restarted when training starts from epoch 0).
        state_path: training-state file written atomically after each epoch;
            if it exists, training resumes from it. Delete it when done.
        state_tag: what the run is (its settings, plain data), saved in the state:
            a state left by a run with another tag (an interrupted run whose
            settings changed since) is not resumed from; the run starts afresh.
        checkpoint_path: where the final model goes (needs ``model_spec``,
            ``(name, kwargs)`` of the model).
        meta: stored in the checkpoint's ``meta``.
        callbacks: called with each epoch's record (may raise to abort, e.g.
            an Optuna pruner).
        progress: show a progress bar (default: when stderr is a TTY).
        epoch_steps: steps per epoch when the caller has counted them already
            (streamed data is otherwise counted by reading epoch 0 once).
    """
    from .problem import higher_is_better

    if data.val is None and config.early_stopping is not None:
        raise ValueError(
            "Invalid early_stopping value: early stopping needs a validation split (val_fraction > 0)"
        )
    if data.val is not None and source_kind(data.val) == "map" and len(data.val) == 0:
        if config.early_stopping is not None:
            raise ValueError(
                "Invalid early_stopping value: early stopping needs a validation split "
                "(val_fraction > 0)"
            )
    if checkpoint_path is not None and model_spec is None:
        raise ValueError("Invalid model_spec value: None (needed to write a checkpoint)")
    loss_fn = loss_fn or default_loss("classification", config.label_smoothing)
    metrics = {"acc": accuracy} if metrics is None else dict(metrics)
    primary = next(iter(metrics))
    if maximize is None:
        maximize = higher_is_better(primary, metrics[primary])
    dev = resolve_device(device) if device is not None else next(model.parameters()).device
    model.to(dev)
    amp = None
    if config.amp is not None:
        dtype = torch.bfloat16 if config.amp == "bf16" else torch.float16
        scaler = torch.amp.GradScaler(dev.type) if config.amp == "fp16" else None
        amp = Amp(dev.type, dtype, scaler)
    method.amp = amp
    pin = dev.type == "cuda"
    val_source = (
        data.val
        if data.val is not None and (source_kind(data.val) != "map" or len(data.val) > 0)
        else None
    )

    n_steps = epoch_steps or steps_per_epoch(data.train, config.batch_size, seed)
    total = n_steps * config.epochs
    warmup = int(round(config.warmup_epochs * n_steps))
    base_lrs = [g["lr"] for g in method.optimizer.param_groups]
    sign = 1.0 if maximize else -1.0

    history: list[dict[str, Any]] = []
    start_epoch, train_time = 0, 0.0
    best: tuple[float, int, dict[str, Tensor] | None] = (-math.inf, -1, None)
    bad_epochs = 0
    stopped, diverged = False, False
    st = load_state(state_path) if state_path is not None and Path(state_path).is_file() else None
    if st is not None and (
        (state_tag is not None and st.get("tag") != state_tag) or len(st["history"]) > config.epochs
    ):
        st = None  # another run's state (its settings changed since it stopped): start afresh
    if st is not None:
        assert state_path is not None
        try:
            model.load_state_dict(st["model"])
            method.load_state_dict(st["method"])
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise ResumeError(
                f"Invalid training state: {str(state_path)!r} does not fit this run "
                f"({str(exc).splitlines()[0][:200]}); delete it to restart this run"
            ) from exc
        history, train_time = st["history"], float(st["train_time"])
        start_epoch = len(history)
        best = (float(st["best"][0]), int(st["best"][1]), st["best"][2])
        bad_epochs = int(st["bad_epochs"])
        stopped, diverged = bool(st.get("stopped", False)), bool(st.get("diverged", False))
        try:
            _set_rng_state(st.get("rng", {}), dev)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise ResumeError(
                f"Invalid training state: {str(state_path)!r} holds an unusable RNG state "
                f"({str(exc).splitlines()[0][:200]}); delete it to restart this run"
            ) from exc
        if metrics_path is not None:
            # the log may hold an epoch that ended after the last saved state: rewrite it
            write_text_atomic(
                metrics_path,
                "".join(json.dumps(finite(r), allow_nan=False) + "\n" for r in history),
            )
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

    def evaluate_split(source: Any) -> dict[str, float]:
        return evaluate(
            model,
            source,
            loss_fn,
            metrics,
            batch_size=config.eval_batch_size,
            device=dev,
            amp=amp,
            num_workers=num_workers,
        )

    step = start_epoch * n_steps
    try:
        with deterministic(config.deterministic):
            model.train()
            epoch = start_epoch
            while epoch < config.epochs and not (stopped or diverged):
                loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
                t0 = time.perf_counter()
                n_batches = 0
                for x, y, idx in train_batches(
                    data.train,
                    config.batch_size,
                    seed,
                    epoch,
                    num_workers=num_workers,
                    pin_memory=pin,
                ):
                    f = lr_factor(step, total, config.schedule, warmup)
                    for g, lr in zip(method.optimizer.param_groups, base_lrs):
                        g["lr"] = lr * f
                    loss_sum += method.step(
                        model, to_device(x, dev), to_device(y, dev), idx, loss_fn
                    ).double()
                    step += 1
                    n_batches += 1
                if n_batches == 0:
                    raise ValueError(
                        f"Invalid train value: epoch {epoch + 1} had no batch of "
                        f"{config.batch_size} samples"
                    )
                method.on_epoch_end(epoch, model)
                epoch_time = time.perf_counter() - t0
                train_time += epoch_time
                train_loss = float(loss_sum) / n_batches
                weights_ok = all(bool(torch.isfinite(p).all()) for p in model.parameters())

                record: dict[str, Any] = {"epoch": epoch + 1, "train_loss": train_loss}
                do_eval = (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs
                if do_eval:
                    if config.eval_train:
                        ev = evaluate_split(data.train)
                        record["train_eval_loss"] = ev.pop("loss")
                        record.update({f"train_{k}": v for k, v in ev.items()})
                    for split_name, source in (("val", val_source), ("test", data.test)):
                        if source is None:
                            continue
                        ev = evaluate_split(source)
                        record.update({f"{split_name}_{k}": v for k, v in ev.items()})
                    if val_source is not None:
                        observe = getattr(method.optimizer, "observe_validation", None)
                        # (a NaN loss is a diverged model, which the study reports as such)
                        if callable(observe) and math.isfinite(record["val_loss"]):
                            observe(record["val_loss"])
                record.update(
                    lr=method.optimizer.param_groups[0]["lr"],
                    epoch_time=epoch_time,
                    passes=method.passes,
                    steps=step,
                )
                rho = method.optimizer.param_groups[0].get("rho")
                if isinstance(rho, (int, float)) and not isinstance(rho, bool):
                    record["rho"] = float(rho)
                elif torch.is_tensor(rho) and rho.numel() == 1:
                    record["rho"] = float(rho)
                history.append(record)
                if metrics_path is not None:
                    _append_jsonl(Path(metrics_path), record)
                if bar is not None:
                    bar.update(1)
                    shown = record.get(f"test_{primary}", record.get(f"val_{primary}", math.nan))
                    bar.set_postfix(loss=f"{train_loss:.3f}", **{primary: f"{shown:.3f}"})

                # any evaluated loss too: a model that is finite in training but NaN in
                # eval mode (or on the test inputs) scored its NaN logits as class 0
                losses_ok = all(math.isfinite(v) for k, v in record.items() if k.endswith("_loss"))
                if not (losses_ok and weights_ok):
                    diverged = True
                elif config.early_stopping is not None and do_eval:
                    score = sign * record[f"val_{primary}"]
                    if math.isfinite(score) and score > best[0]:
                        best = (score, epoch, copy.deepcopy(model.state_dict()))
                        bad_epochs = 0
                    else:
                        bad_epochs += 1
                    if bad_epochs >= config.early_stopping:
                        stopped = True
                if state_path is not None:
                    save_state(
                        state_path,
                        model,
                        method,
                        history=history,
                        train_time=train_time,
                        best=best,
                        bad_epochs=bad_epochs,
                        stopped=stopped,
                        diverged=diverged,
                        device=dev,
                        tag=state_tag,
                    )
                    state_saved(Path(state_path), record["epoch"])
                # callbacks see the record once its state is safe (an Optuna pruner may raise)
                for cb in callbacks:
                    cb(record)
                epoch += 1
    finally:
        if bar is not None:
            bar.close()

    final = dict(history[-1]) if history else {}
    restored = config.early_stopping is not None and best[2] is not None
    if restored:
        model.load_state_dict(best[2])
        final = dict(history[best[1]])
    final["best_epoch"] = final.get("epoch", 0)
    # a diverged run writes no checkpoint (its weights measure nothing, even when still
    # finite but giving a NaN loss), unless early stopping gave back its best, finite, weights
    weights_ok = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    if (
        checkpoint_path is not None
        and model_spec is not None
        and weights_ok
        and (restored or not diverged)
    ):
        save_checkpoint(
            checkpoint_path,
            model,
            model_name=model_spec[0],
            model_kwargs=model_spec[1],
            dataset=getattr(data, "spec", None) or {"name": f"user:{getattr(data, 'name', '')}"},
            meta={
                **(meta or {}),
                "seed": seed,
                "epoch": final.get("epoch", 0),
                f"test_{primary}": final.get(f"test_{primary}"),
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
