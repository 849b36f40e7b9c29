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
from torch.utils.data import DataLoader, IterableDataset

from .._atomic import append_line, finite, write_text_atomic
from .checkpoint import atomic_torch_save, save_checkpoint
from .engine.core import fault_point
from .problem import accuracy, batch_indexable
from .registry import Amp, Method
from .settings import TrainConfig

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


class ResumeError(ValueError):
    """A training-state file that cannot be resumed from."""


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


# ------------------------------------------------------------------ batches
def _batches(n: int, batch_size: int, seed: int, epoch: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g)
    # drop the last partial batch: every step then has the same size (and cost)
    return [perm[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)] or [perm]


def _kind(source: Any) -> str:
    if isinstance(source, IterableDataset):
        return "iterable"
    if isinstance(source, torch.utils.data.Dataset):
        return "map"
    return "factory"


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
    kind = _kind(source)
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
    if _kind(source) == "map":
        n = len(source)
        if batch_indexable(source):
            chunks = [torch.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
            if num_workers == 0 and not pin_memory:
                loader: Any = (source[c] for c in chunks)
            else:
                loader = DataLoader(source, sampler=chunks, batch_size=None, **kw)
        else:
            loader = DataLoader(source, batch_size=batch_size, shuffle=False, **kw)
    elif _kind(source) == "iterable":
        loader = DataLoader(source, batch_size=batch_size, **kw)
    else:  # a factory: its own batches, in its epoch-0 order (the order does not matter here)
        loader = source(seed=0, epoch=0)
    for item in loader:
        yield _pair(item)


def steps_per_epoch(source: Any, batch_size: int, seed: int = 0) -> int:
    """Steps in one epoch: exact for map-style data, else counted on epoch 0."""
    if _kind(source) == "map":
        return len(_batches(len(source), batch_size, seed, 0))
    if _kind(source) == "iterable":
        with contextlib.suppress(TypeError):
            return max(1, len(DataLoader(source, batch_size=batch_size, drop_last=True)))
    return max(1, sum(1 for _ in train_batches(source, batch_size, seed, 0)))


def _to(x: Any, device: torch.device) -> Any:
    if torch.is_tensor(x):
        return x.to(device, non_blocking=True)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def _default_loss(label_smoothing: float) -> LossFn:
    def cross_entropy(output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output, target, reduction="none", label_smoothing=label_smoothing)

    return cross_entropy


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
    loss_fn = loss_fn or _default_loss(0.0)
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
            x, y = _to(x, dev), _to(y, dev)
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


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    append_line(path, json.dumps(finite(record), allow_nan=False))


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


_STATE_KEYS = ("model", "method", "history", "train_time", "best", "bad_epochs")


def load_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a training-state file; :class:`ResumeError` if it cannot be resumed."""
    hint = "delete it to restart this run from its first epoch"
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every unreadable file is the same user error
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ResumeError(
            f"Invalid training state: {str(path)!r} cannot be read ({reason[:200]}); {hint}"
        ) from exc
    if not isinstance(st, dict) or any(k not in st for k in _STATE_KEYS):
        raise ResumeError(f"Invalid training state: {str(path)!r} is incomplete; {hint}")
    if (
        not isinstance(st["history"], list)
        or not all(isinstance(r, dict) for r in st["history"])
        or not isinstance(st["best"], (list, tuple))
        or len(st["best"]) != 3
    ):
        raise ResumeError(f"Invalid training state: {str(path)!r} is malformed; {hint}")
    return st


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
    if data.val is not None and _kind(data.val) == "map" and len(data.val) == 0:
        if config.early_stopping is not None:
            raise ValueError(
                "Invalid early_stopping value: early stopping needs a validation split "
                "(val_fraction > 0)"
            )
    if checkpoint_path is not None and model_spec is None:
        raise ValueError("Invalid model_spec value: None (needed to write a checkpoint)")
    loss_fn = loss_fn or _default_loss(config.label_smoothing)
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
        if data.val is not None and (_kind(data.val) != "map" or len(data.val) > 0)
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
    if state_path is not None and Path(state_path).is_file():
        st = load_state(state_path)
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
        _set_rng_state(st.get("rng", {}), dev)
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
                    loss_sum += method.step(model, _to(x, dev), _to(y, dev), idx, loss_fn).double()
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
                        if callable(observe):
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
                    atomic_torch_save(
                        {
                            "model": model.state_dict(),
                            "method": method.state_dict(),
                            "history": history,
                            "train_time": train_time,
                            "best": list(best),
                            "bad_epochs": bad_epochs,
                            "stopped": stopped,
                            "diverged": diverged,
                            "rng": _rng_state(dev),
                        },
                        state_path,
                    )
                    fault_point(Path(state_path).name, record["epoch"])
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
