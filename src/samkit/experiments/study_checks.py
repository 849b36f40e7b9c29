"""The checks of a comparative study, all made before any training
(:func:`check_study`), and the problem a run folder holds (:func:`check_problem`).

:func:`check_study` loads the first seed's data, builds the model, runs it on
one batch of every split (the loss and every metric must work on its output),
builds every method on a copy of it (so ``looksam:k=0`` or SAM-ON on a model
without normalisation layers fail now, not after an hour), checks each method
can run under the chosen mixed precision, data kind and task, and reads every
training-state file it would resume from.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from .batches import eval_batches, schedule, to_device, train_batches
from .configs import StudyConfig
from .engine import normalise
from .folder import describe_differences, differences
from .problem import Problem, first_sample
from .registry import build_method, method_info
from .runfiles import first_line, run_key
from .trainer import resolve_device, seed_everything
from .trainstate import load_state
from .userdata import IndexedSubset, source_kind

__all__ = ["check_study", "PROBLEM_KEYS", "problem_identity", "check_problem"]


def check_study(
    config: StudyConfig,
    *,
    problem: Problem | None = None,
    drop_unfit: bool = False,
    out_dir: str | os.PathLike[str] | None = None,
    need_test: bool = False,
) -> Problem:
    """Validate the whole study before any training; ValueError naming what is wrong.

    ``drop_unfit``: leave out (into ``config.skipped``) the methods that cannot
    run on this model or data instead of failing (the default method list).
    ``need_test``: warn, before any training, where the data has no test split (a
    comparison's table and verdicts read it: a study without one trained every run to
    show a table of "-", without a word).
    """
    problem = problem or config.problem()
    device = resolve_device(config.device)
    seed = config.seeds[0]
    data = problem.load(seed)
    if need_test and data.test is None:
        warnings.warn(
            "the data has no test split: the table's test columns and the verdicts, which "
            "read it, will be empty (an .npz holds x_test and y_test; a data function returns "
            "(train, test) or (train, val, test); samkit.compare takes test=)",
            RuntimeWarning,
            stacklevel=2,
        )
    if not problem.builtin_data:
        first_sample(data.train)  # labels that are strings fail in torch's batching, mid-run
    seed_everything(seed)
    model = problem.build_model(data)
    if not problem.builtin_model:
        _check_fresh_model(problem, data, seed, model)
    model = model.to(device)
    try:
        x, y, _ = next(iter(train_batches(data.train, config.train.batch_size, seed, 0)))
    except StopIteration:
        raise ValueError("Invalid train value: the training data yields no batch") from None
    except Exception as exc:  # noqa: BLE001 - samples that do not batch (ragged, odd types)
        raise ValueError(
            f"Invalid data value: the training split cannot be batched: {first_line(exc)}"
        ) from exc
    x, y = to_device(x, device), to_device(y, device)
    amp = config.train.amp
    output = _forward(config, model, x, device, "the data")
    _check_output(problem, output, y)
    _check_labels(problem, data.train, output, "training")  # not only its first batch
    per_sample = _check_loss_and_metrics(problem, output, y)
    # the evaluation splits must fit too: they are read after the first epoch trained
    for name, split in (("val", data.val), ("test", data.test)):
        if split is None or (name == "val" and source_kind(split) == "map" and len(split) == 0):
            continue  # (val_fraction=0: no validation split, as the trainer reads it)
        try:
            xs, ys = to_device(
                next(iter(eval_batches(split, config.train.eval_batch_size))), device
            )
        except StopIteration:
            raise ValueError(f"Invalid data value: the {name} split yields no batch") from None
        except Exception as exc:  # noqa: BLE001 - a user split that cannot be read
            raise ValueError(
                f"Invalid data value: the {name} split cannot be read: {first_line(exc)}"
            ) from exc
        if ys.dtype != y.dtype and (ys.is_floating_point() or y.is_floating_point()):
            raise ValueError(
                f"Invalid data value: the {name} targets are {ys.dtype}, the training "
                f"targets {y.dtype}"
            )
        try:
            out = _forward(config, model, xs, device, f"the {name} split")
        except ValueError as exc:
            if torch.is_tensor(xs) and torch.is_tensor(x) and xs.shape[1:] != x.shape[1:]:
                # (a model may take samples of any size: only where it fails on them are
                # they the data's fault, not the model's, as the message said)
                raise ValueError(
                    f"Invalid data value: the {name} split's samples have shape "
                    f"{tuple(xs.shape[1:])}, the training split's {tuple(x.shape[1:])}, "
                    f"and the model fails on them: {str(exc).split(': ', 1)[-1]}"
                ) from exc
            raise
        _check_labels(problem, split, out, name)
        try:
            _check_output(problem, out, ys)
            _check_loss_and_metrics(problem, out, ys)
        except ValueError as exc:
            raise ValueError(f"{exc} (the {name} split)") from exc

    tspec_kw = schedule(data.train, config.train.batch_size, config.train.epochs, seed)
    kept, skipped = [], []
    for spec in config.methods:
        info = method_info(spec.method)
        reason = None
        if amp == "fp16" and not info.supports_scaler:
            reason = "does not support --amp fp16 (a GradScaler); use --amp bf16"
        elif info.needs_index and problem.streaming:
            reason = "keeps per-sample memory: it needs map-style training data (a Dataset)"
        elif info.per_sample_loss and not per_sample:
            reason = "needs per-sample losses: give a loss with reduction='none'"
        elif info.classification_only and problem.task != "classification":
            reason = "is for classification only"
        else:
            try:
                build_method(
                    spec.method, copy.deepcopy(model), spec.train_spec(**tspec_kw), **spec.options
                )
            except ValueError as exc:
                reason = str(exc)
        if reason is None:
            kept.append(spec)
        elif drop_unfit:
            skipped.append(spec.label)
        else:
            raise ValueError(
                reason
                if reason.startswith("Invalid")
                else f"Invalid method value: {spec.label!r} {reason}"
            )
    if not kept:
        raise ValueError("Invalid methods value: none of the methods can run on this problem")
    config.methods, config.skipped = kept, skipped
    if config.train.early_stopping is not None and data.val is None:
        raise ValueError(
            "Invalid early_stopping value: early stopping needs a validation split "
            "(val_fraction > 0 or your own val data)"
        )
    if out_dir is not None:
        check_problem(config, problem, Path(out_dir))
        _check_states(config, Path(out_dir))
    return problem


def _check_fresh_model(problem: Problem, data: Any, seed: int, first: torch.nn.Module) -> None:
    """The user's factory, called again after the same seeding, must give a new module with
    the same architecture and the same weights: every method must start from the same
    weights for a seed. A factory returning one instance made each run continue from the
    last run's weights (Adam "+10 points" from a warm start); one returning other widths,
    or weights from a source samkit does not seed, compared different models."""
    seed_everything(seed)
    second = problem.build_model(data)
    what = f"Invalid model value: {problem.config.model!r}"
    if second is first:
        raise ValueError(
            f"{what} returns the same module object each call, so every run would continue "
            "from the previous run's weights: build a new module inside the function"
        )
    a, b = first.state_dict(), second.state_dict()
    shapes = {k: tuple(v.shape) for k, v in a.items()}
    if shapes != {k: tuple(v.shape) for k, v in b.items()}:
        raise ValueError(
            f"{what} returns another architecture on another call (parameter names or "
            "shapes differ): every method must train the same model"
        )
    # (the parameters only: a buffer may be left uninitialised, torch.empty, until used)
    pa, pb = dict(first.named_parameters()), dict(second.named_parameters())
    bad = [k for k, v in pa.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # (NaN != NaN: it read as "other initial weights", which is not the problem)
        raise ValueError(
            f"{what} returns a model whose initial weights hold NaN or infinite values "
            f"({bad[0]}): nothing can train from them"
        )
    differ = [k for k in pa if not torch.equal(pa[k].detach(), pb[k].detach())]
    if differ:
        raise ValueError(
            f"{what} returns other initial weights for the same seed ({differ[0]} differs): "
            "it draws from a random source samkit does not seed (torch, numpy and random are "
            "seeded before each call); seed it from torch's generator, or load fixed weights"
        )


def _shape(x: Any) -> str:
    return str(tuple(x.shape)) if torch.is_tensor(x) else type(x).__name__


def _forward(
    config: StudyConfig, model: torch.nn.Module, x: Any, device: torch.device, what: str
) -> Any:
    amp = config.train.amp
    try:
        with torch.no_grad():
            if amp is not None:
                dtype = torch.bfloat16 if amp == "bf16" else torch.float16
                with torch.autocast(device.type, dtype=dtype):
                    return model(x).float()
            return model(x)
    except Exception as exc:  # noqa: BLE001 - the model does not fit the data
        raise ValueError(
            f"Invalid model value: {config.model!r} fails on a batch of {what} "
            f"(x {_shape(x)}): {first_line(exc)}"
        ) from exc


def _split_labels(split: Any) -> torch.Tensor | None:
    """The labels of an in-memory split (a TensorDataset, a built-in split, or a subset of
    either), without reading it sample by sample; None for any other source."""
    from .datasets import Split

    if isinstance(split, IndexedSubset):
        y = _split_labels(split.base)
        return None if y is None else y[split.indices]
    if isinstance(split, Split):
        return split.y
    tensors = getattr(split, "tensors", None)
    return tensors[-1] if tensors and torch.is_tensor(tensors[-1]) else None


def _check_labels(problem: Problem, split: Any, output: Any, name: str) -> None:
    """Every class label of an in-memory split is one of the model's outputs."""
    if not (problem.task == "classification" and problem.config.loss is None):
        return
    y = _split_labels(split)
    if y is not None and not y.is_floating_point():
        outside = _labels_outside(y, output.shape[1])
        if outside:
            # the training split's arguments as for its first batch; val/test: that data
            what = outside[0] if name == "training" else "data"
            raise ValueError(f"Invalid {what} value: {name} {outside[1]}")
        if name == "training" and problem.builtin_model:
            _warn_sparse_labels(y, output.shape[1])


def _warn_sparse_labels(y: torch.Tensor, classes: int) -> None:
    """A built-in model gets one output per label value up to the largest: labels that use
    few of them (one stray 255 among 0..9) size it for classes that never occur. Warned,
    not refused: data whose labels keep their ids (a subset of a larger label set) is
    legitimate."""
    used = int(torch.unique(y).numel())
    if classes > 2 and used <= classes // 2:
        warnings.warn(
            f"the training labels use {used} of the {classes} classes 0..{classes - 1} "
            f"(largest label {int(y.max())}): the model gets {classes} outputs, "
            f"{classes - used} for classes that never occur; if that is not meant, encode the "
            "labels as 0..K-1 (np.unique(y, return_inverse=True)[1])",
            UserWarning,
            stacklevel=2,
        )


def _labels_outside(y: torch.Tensor, classes: int) -> tuple[str, str] | None:
    """What is wrong with class labels ``y`` for ``classes`` logits: (the argument to
    blame, the reason), or None. The reason starts with the labels, never the model:
    "labels must be in 0..2 (the model gives 3 logits): found -1"."""
    if y.dtype == torch.bool:
        return "data", f"labels are booleans: class labels are integers 0..{classes - 1} (y.long())"
    if not y.numel():
        return None
    lo, hi = int(y.min()), int(y.max())
    if lo >= 0 and hi < classes:
        return None
    found = ", ".join(str(v) for v in (lo, hi) if v < 0 or v >= classes)
    logits = f"{classes} logit{'' if classes == 1 else 's'}"
    # a negative label is always the data's; one too large may be the model's (too few logits)
    return (
        "data" if lo < 0 else "model",
        f"labels must be in 0..{classes - 1} (the model gives {logits}): found {found}",
    )


def _check_output(problem: Problem, output: Any, y: torch.Tensor) -> None:
    if not torch.is_tensor(output):
        raise ValueError(
            f"Invalid model value: it returned {type(output).__name__}, not a tensor of outputs"
        )
    if output.shape[:1] != y.shape[:1]:
        raise ValueError(
            f"Invalid model value: {output.shape[0] if output.dim() else 1} outputs for a batch of "
            f"{y.shape[0]} samples"
        )
    if problem.task == "classification" and problem.config.loss is None:
        if y.is_floating_point():
            raise ValueError(
                "Invalid task value: 'classification' needs integer class labels; the targets "
                "are floats (use --task regression)"
            )
        if output.dim() != 2:
            raise ValueError(
                f"Invalid model value: a classifier must return logits of shape (batch, classes), "
                f"got {_shape(output)}"
            )
        outside = _labels_outside(y, output.shape[1])
        if outside:
            raise ValueError(f"Invalid {outside[0]} value: {outside[1]}")


def _check_loss_and_metrics(problem: Problem, output: torch.Tensor, y: torch.Tensor) -> bool:
    try:
        losses = problem.loss_fn(output, y)
    except Exception as exc:  # noqa: BLE001 - the loss does not fit the outputs
        hint = ""
        if problem.task == "classification" and y.dim() == 2 and y.shape[1] == 1:
            hint = "; class labels are one per sample: flatten them (y.reshape(-1))"
        raise ValueError(
            f"Invalid loss value: it fails on the model's output {_shape(output)} and targets "
            f"{_shape(y)}: {first_line(exc)}{hint}"
        ) from exc
    if (
        not torch.is_tensor(losses)
        or losses.dim() > 1
        or (losses.dim() == 1 and losses.shape[0] != y.shape[0])
    ):
        raise ValueError(
            f"Invalid loss value: it must return per-sample losses (batch,) or their mean, "
            f"got {_shape(losses)}"
        )
    for name, fn in problem.metrics.items():
        try:
            v = fn(output, y)
            v = float(v)
        except Exception as exc:  # noqa: BLE001
            raise ValueError(
                f"Invalid metrics value: {name!r} fails on the model's output: {first_line(exc)}"
            ) from exc
        if not math.isfinite(v):
            # an epoch's value is the mean over its batches: one NaN made every epoch NaN
            # (early stopping then stopped at its patience; the verdict blamed the test
            # split). Warned, not refused: an untrained model's constant output can make a
            # correlation or an F1 undefined on a batch that training later makes finite.
            warnings.warn(
                f"metric {name!r} returned {v} on a batch of the untrained model's output; "
                "an epoch's value is the mean over its batches, so if it stays so, every "
                f"epoch's {name} is {v} (early stopping and the verdicts then have nothing to "
                "compare): make it return a finite number on any batch",
                UserWarning,
                stacklevel=2,
            )
    return losses.dim() == 1


#: What a study is *about*; a run folder holds one: the data (the data set or your
#: own data, its label noise, training size and validation split), the model (with
#: its arguments, or your factory), the task and the loss. Everything else (methods,
#: rho, seeds, epochs, learning rate, batch size, ...) only adds or retrains runs.
PROBLEM_KEYS = (
    "dataset",
    "data",
    "noise",
    "train_size",
    "val_fraction",
    "model",
    "model_kwargs",
    "model_factory",
    "task",
    "loss",
)


def problem_identity(config: StudyConfig, problem: Problem | None = None) -> dict[str, Any]:
    """The study's problem (:data:`PROBLEM_KEYS`), as it reads back from ``config.json``;
    with ``problem``, the task as resolved (inferred from the targets if not given)."""
    d = config.to_dict()
    identity = {k: d[k] for k in PROBLEM_KEYS if k in d}
    if problem is not None:
        identity["task"] = problem.task
    return normalise(identity)


def _saved_problem(out: Path) -> dict[str, Any] | None:
    """The problem of the runs already in ``out`` (None: none there, or not readable)."""
    sources: list[Any] = []
    with contextlib.suppress(OSError, ValueError):
        sources.append(json.loads((out / "config.json").read_text(encoding="utf-8")))
    saved = sources[0] if sources and isinstance(sources[0], dict) else None
    if saved is not None and isinstance(saved.get("problem"), dict):
        return saved["problem"]
    if saved is None or "dataset" not in saved:  # no config.json: ask a finished run
        runs = sorted((out / "runs").glob("*.json")) if (out / "runs").is_dir() else []
        for path in runs:
            with contextlib.suppress(OSError, ValueError):
                record = json.loads(path.read_text(encoding="utf-8"))
                if isinstance(record, dict) and isinstance(record.get("config"), dict):
                    saved = record["config"]
                    break
    if saved is None or "dataset" not in saved or "model" not in saved:
        return None
    # written by a samkit before 0.3: the task is known only where it was given
    identity = {k: saved[k] for k in PROBLEM_KEYS if k in saved}
    if "task" not in identity and "data" not in identity:
        identity["task"] = "classification"  # the built-in data sets
    return identity


def check_problem(config: StudyConfig, problem: Problem, out: Path) -> None:
    """Refuse a run folder that holds another problem's runs (ValueError naming only
    the settings that differ). Rerunning them under this one would overwrite finished
    runs, checkpoints included, with another data set's or model's."""
    saved = _saved_problem(out)
    if saved is None:
        return
    now = problem_identity(config, problem)
    if "task" not in saved:
        now.pop("task")
    diffs = differences(saved, now)
    if diffs:
        raise ValueError(
            f"Invalid out value: {str(out)!r} holds a study of another problem "
            f"({describe_differences(diffs)}); give another --out, or delete it to start over"
        )


def _check_states(config: StudyConfig, out: Path) -> None:
    """Every training-state file this study would resume from must be readable now, and
    every file a run writes must be writable as a file (a folder in its place failed at
    the end of the run, with a traceback)."""
    runs = out / "runs"
    if runs.exists() and not runs.is_dir():
        raise ValueError(f"Invalid out value: {str(runs)!r} is not a folder; move it away")
    for spec in config.methods:
        for seed in config.seeds:
            key = run_key(spec.label, seed)
            for suffix in (".json", ".jsonl", ".pt", ".state.pt"):
                path = runs / f"{key}{suffix}"
                if path.exists() and not path.is_file():
                    raise ValueError(
                        f"Invalid out value: {str(path)!r} is not a file; move it away"
                    )
            state = runs / f"{key}.state.pt"
            if state.is_file():
                load_state(state)
