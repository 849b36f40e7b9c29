"""A comparative study: every (method x seed) run on one problem, and its summary.

The one study path of ``samkit.compare(...)`` and ``samkit compare``:

1. :func:`check_study` validates everything before any training: it loads the
   first seed's data, builds the model, runs it on one batch (the loss and
   every metric must work on its output), builds every method on a copy of
   it (so ``looksam:k=0`` or SAM-ON on a model without normalisation layers
   fail now, not after an hour), checks each method can run under the chosen
   mixed precision, data kind and task, and reads every training-state file
   it would resume from;
2. :func:`run_study` trains each (method, seed) run with
   :func:`~samkit.experiments.trainer.train`, holding the folder's lock;
3. :func:`finish` writes ``results.json`` (valid JSON: NaN becomes null) and
   ``report.html``, with the SGD-to-SAM interpolation and a one-sentence
   paired verdict per method.

The run folder::

    config.json                   the study's settings
    runs/<label>-seed<k>.json     one run's result, written atomically when it ends
    runs/<label>-seed<k>.jsonl    its per-epoch metrics, appended as they come
    runs/<label>-seed<k>.pt       its final model (samkit checkpoint; none if it diverged)
    results.json                  all runs + the summary table, written at the end
    report.html                   the table, the verdicts, the plots

A run whose result file exists *and* was made with the same settings is not
trained again, so an interrupted study resumes where it stopped; a run cut
off mid-way continues from its training-state file with the same numbers.

Protocol (paired): for a given seed every method sees the same validation
split, the same noisy labels, the same initial weights and the same batches
in the same order, so per-seed differences between methods are paired. A
run whose loss (training, or on any evaluated split) or weights become NaN
or infinite is marked *diverged*: it is shown as
such, left out of the means, the verdicts, the interpolation and the
sharpness measures, and the study goes on.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .._atomic import write_json_atomic as _write_json_atomic
from .engine import Cell, Executor, InProcess, make_executor, normalise, run_cells
from .folder import describe_differences, differences, study_folder
from .problem import Data, Problem, first_sample
from .registry import build_method, method_info
from .settings import MethodSpec, StudyConfig, TrainConfig
from .stats import finite_number as _finite
from .stats import paired_verdicts
from .stats import stats as _stats
from .trainer import (
    ResumeError,
    eval_batches,
    finite,
    load_state,
    resolve_device,
    seed_everything,
    steps_per_epoch,
    train,
    train_batches,
)

__all__ = [
    "MethodSpec",
    "StudyConfig",
    "TrainConfig",
    "RunResult",
    "check_study",
    "run_study",
    "finish",
    "summarize",
    "paired_verdicts",
    "write_json_atomic",
    "sharpness_available",
    "SHARPNESS_KEYS",
    "PROBLEM_KEYS",
    "problem_identity",
    "check_problem",
    "resume_plan",
]

SHARPNESS_KEYS = ("hessian_top_eig", "hessian_trace", "worst_case_sharpness")


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as strict JSON (NaN and infinities as null), atomically."""
    _write_json_atomic(path, finite(obj))


@dataclass
class RunResult:
    key: str
    label: str
    seed: int
    record: dict[str, Any]  # what is stored in runs/<key>.json
    executed: bool  # False when loaded from a finished run


def run_key(label: str, seed: int) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_.=+-]', '_', label)}-seed{seed}"


def sharpness_available() -> bool:
    """True when :mod:`samkit.sharpness` provides ``summary``."""
    try:
        import samkit.sharpness as sh
    except ImportError:
        return False
    return callable(getattr(sh, "summary", None))


def _mean_loss(problem: Problem) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def mean_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return problem.loss_fn(output, target).mean()

    return mean_loss


def sharpness_batches(
    data: Any, samples: int, batch_size: int = 250, device: torch.device | None = None
) -> list[tuple[Any, torch.Tensor]]:
    """The first ``samples`` training samples (the labels trained on), in fixed batches."""
    out: list[tuple[Any, torch.Tensor]] = []
    n = 0
    source = data.train
    if isinstance(source, (torch.utils.data.Dataset, torch.utils.data.IterableDataset)):
        batches: Any = eval_batches(source, batch_size)
    else:
        batches = ((x, y) for x, y, _ in train_batches(source, batch_size, 0, 0))
    for x, y in batches:
        take = min(int(y.shape[0]), samples - n)
        x, y = x[:take], y[:take]
        if device is not None:
            x, y = x.to(device), y.to(device)
        out.append((x, y))
        n += take
        if n >= samples:
            break
    return out


#: settings of samkit.sharpness.summary under ``sharpness_cheap`` (passed when it takes them)
CHEAP_SHARPNESS = {"trace_samples": 4, "max_iter": 30, "ascent_steps": 3}


def _measure_sharpness(
    model: torch.nn.Module,
    problem: Problem,
    data: Data,
    samples: int,
    seed: int,
    cheap: bool = False,
) -> dict[str, float]:
    import inspect

    import samkit.sharpness as sh

    model.eval()
    device = next(model.parameters()).device
    kwargs: dict[str, Any] = {}
    if cheap:
        params = inspect.signature(sh.summary).parameters
        kwargs = {k: v for k, v in CHEAP_SHARPNESS.items() if k in params}
    batches = sharpness_batches(data, samples, device=device)
    out = sh.summary(model, _mean_loss(problem), batches, seed=seed, **kwargs)
    return {k: float(v) for k, v in out.items()}


def _train_identity(train_config: TrainConfig) -> dict[str, Any]:
    d = asdict(train_config)
    # settings added after 0.1 are left out at their defaults, so runs finished
    # before them are still recognised
    if d.get("amp") is None:
        d.pop("amp", None)
    if d.get("eval_train") is True:
        d.pop("eval_train", None)
    return d


def _run_config(
    config: StudyConfig, spec: MethodSpec, seed: int, threads: int | None = None
) -> dict[str, Any]:
    """The settings a run's result depends on (a change retrains it); ``threads``:
    the torch threads it trains on, when pinned (``--threads``, ``--jobs``)."""
    cfg = {
        "method": spec.to_dict(),
        "seed": seed,
        "dataset": config.dataset,
        "model": config.model,
        "model_kwargs": config.model_kwargs,
        "noise": config.noise,
        "val_fraction": config.val_fraction,
        "train_size": config.train_size,
        "train": _train_identity(config.train),
        "sharpness": config.sharpness and sharpness_available(),
        "sharpness_samples": config.sharpness_samples,
    }
    if config.sharpness_cheap and cfg["sharpness"]:
        cfg["sharpness_cheap"] = True
    full = config.to_dict()
    for key in ("task", "loss", "metrics", "data", "model_factory"):
        if key in full:
            cfg[key] = full[key]
    if threads is not None:
        cfg["threads"] = threads
    return cfg


_normalise = normalise  # the engine's: as a record reads back from its JSON file


# ------------------------------------------------------------------ checks
def _first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:300]


def check_study(
    config: StudyConfig,
    *,
    problem: Problem | None = None,
    drop_unfit: bool = False,
    out_dir: str | os.PathLike[str] | None = None,
) -> Problem:
    """Validate the whole study before any training; ValueError naming what is wrong.

    ``drop_unfit``: leave out (into ``config.skipped``) the methods that cannot
    run on this model or data instead of failing (the default method list).
    """
    problem = problem or config.problem()
    device = resolve_device(config.device)
    seed = config.seeds[0]
    data = problem.load(seed)
    if not problem.builtin_data:
        first_sample(data.train)  # labels that are strings fail in torch's batching, mid-run
    seed_everything(seed)
    model = problem.build_model(data).to(device)
    try:
        x, y, _ = next(iter(train_batches(data.train, config.train.batch_size, seed, 0)))
    except StopIteration:
        raise ValueError("Invalid train value: the training data yields no batch") from None
    x, y = _move(x, device), _move(y, device)
    amp = config.train.amp
    output = _forward(config, model, x, device, "the data")
    _check_output(problem, output, y)
    _check_labels(problem, data.train, output, "training")  # not only its first batch
    per_sample = _check_loss_and_metrics(problem, output, y)
    # the evaluation splits must fit too: they are read after the first epoch trained
    for name, split in (("val", data.val), ("test", data.test)):
        if split is None:
            continue
        try:
            xs, ys = _move(next(iter(eval_batches(split, config.train.batch_size))), device)
        except StopIteration:
            raise ValueError(f"Invalid data value: the {name} split yields no batch") from None
        except Exception as exc:  # noqa: BLE001 - a user split that cannot be read
            raise ValueError(
                f"Invalid data value: the {name} split cannot be read: {_first_line(exc)}"
            ) from exc
        if ys.dtype != y.dtype and (ys.is_floating_point() or y.is_floating_point()):
            raise ValueError(
                f"Invalid data value: the {name} targets are {ys.dtype}, the training "
                f"targets {y.dtype}"
            )
        out = _forward(config, model, xs, device, f"the {name} split")
        _check_labels(problem, split, out, name)
        try:
            _check_output(problem, out, ys)
            _check_loss_and_metrics(problem, out, ys)
        except ValueError as exc:
            raise ValueError(f"{exc} (the {name} split)") from exc

    n_steps = steps_per_epoch(data.train, config.train.batch_size, seed)
    tspec_kw = {
        "total_steps": n_steps * config.train.epochs,
        "steps_per_epoch": n_steps,
        "epochs": config.train.epochs,
    }
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


def _move(x: Any, device: torch.device) -> Any:
    if torch.is_tensor(x):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(_move(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _move(v, device) for k, v in x.items()}
    return x


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
            f"(x {_shape(x)}): {_first_line(exc)}"
        ) from exc


def _split_labels(split: Any) -> torch.Tensor | None:
    """The labels of an in-memory split (a TensorDataset, a built-in split, or a subset of
    either), without reading it sample by sample; None for any other source."""
    from .datasets import Split
    from .problem import IndexedSubset

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
        raise ValueError(
            f"Invalid loss value: it fails on the model's output {_shape(output)} and targets "
            f"{_shape(y)}: {_first_line(exc)}"
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
                f"Invalid metrics value: {name!r} fails on the model's output: {_first_line(exc)}"
            ) from exc
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
    return _normalise(identity)


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
    """Every training-state file this study would resume from must be readable now."""
    runs = out / "runs"
    for spec in config.methods:
        for seed in config.seeds:
            state = runs / f"{run_key(spec.label, seed)}.state.pt"
            if state.is_file():
                load_state(state)


# ------------------------------------------------------------------- runs
@dataclass
class CompareRun:
    """One (method, seed) run of a comparative study: the task the engine executes.

    Picklable (the study's settings, the method, the seed), so a worker
    process or a Ray node can train it; the problem is built once per
    process (``context.cache``) from the settings.
    """

    config: StudyConfig
    spec: MethodSpec
    seed: int
    key: str
    run_cfg: dict[str, Any]
    do_sharp: bool
    problem_key: str

    def __call__(self, folder: Path, ctx: Any) -> dict[str, Any]:
        problem = ctx.cache.get(self.problem_key)
        if problem is None:
            problem = ctx.cache[self.problem_key] = self.config.problem()
        data = problem.load(self.seed)
        return _execute(
            self.config,
            problem,
            self.spec,
            self.seed,
            data,
            self.key,
            folder,
            self.run_cfg,
            self.do_sharp,
            ctx.progress,
            ctx.log,
            resolve_device(self.config.device),
        )


def study_cells(config: StudyConfig, runs_dir: Path, *, threads: int | None = None) -> list[Cell]:
    """The study's runs as engine cells, seed by seed (a run's identity: :func:`_run_config`,
    with ``threads`` when the runs are pinned to a number of torch threads)."""
    do_sharp = config.sharpness and sharpness_available()
    problem_key = "compare:" + json.dumps(_normalise(config.to_dict()), sort_keys=True)
    cells = []
    for seed in config.seeds:
        for spec in config.methods:
            key = run_key(spec.label, seed)
            run_cfg = _normalise(_run_config(config, spec, seed, threads))
            task = CompareRun(config, spec, seed, key, run_cfg, do_sharp, problem_key)
            cells.append(
                Cell(
                    f"{spec.label} seed {seed}",
                    runs_dir,
                    key,
                    run_cfg,
                    task,
                    cleanup=(f"{key}.state.pt",),
                )
            )
    return cells


def run_study(
    config: StudyConfig,
    out_dir: str | os.PathLike[str],
    *,
    progress: bool | None = None,
    log: Callable[[str], None] | None = print,
    problem: Problem | None = None,
    jobs: int | str = 1,
    threads: int | None = None,
    ray: str | None = None,
    gpus_per_run: float | None = None,
    executor: Executor | None = None,
) -> list[RunResult]:
    """Run (or resume) every (method x seed) run; returns them in grid order.

    ``log`` receives one line per run (None: silent); ``progress`` controls
    the per-epoch progress bar (default: when stderr is a TTY). Holds the
    folder's lock while it runs. ``jobs``, ``threads``, ``ray`` and
    ``gpus_per_run`` choose the executor (:func:`~samkit.experiments.engine.make_executor`);
    a run pinned to a number of torch threads records it in its config.
    """
    problem = problem or config.problem()
    if executor is None:
        executor = make_executor(
            jobs, threads, ray=ray, gpus_per_run=gpus_per_run, progress=progress, log=log
        )
    with study_folder(out_dir) as out:
        runs_dir = out / "runs"
        runs_dir.mkdir(parents=True, exist_ok=True)
        cells = study_cells(config, runs_dir, threads=executor.threads)
        executor.check(cells[0])  # the runs can go where they are sent, before any file
        grid = [(spec, seed) for seed in config.seeds for spec in config.methods]
        if log:
            for line in resume_plan(config, out, grid, threads=executor.threads):
                log(line)
        write_json_atomic(
            out / "config.json", {**config.to_dict(), "problem": problem_identity(config, problem)}
        )
        if isinstance(executor, InProcess):
            for cell in cells:  # this process's problem (checked, and the user's objects)
                executor.cache.setdefault(cell.task.problem_key, problem)
        m = problem.primary

        def describe(record: dict[str, Any]) -> str:
            f = record["final"]
            what = (
                "DIVERGED (non-finite loss or weights), left out of the summary"
                if record["diverged"]
                else f"test {m} {_num(f.get(f'test_{m}'))}"
            )
            return f"{what}, {record['time_per_epoch']:.2f} s/epoch"

        outcomes = run_cells(
            cells, executor=executor, log=log, describe=describe, write=write_json_atomic
        )
        results = []
        for o in outcomes:
            task = o.cell.task
            if o.record is None:
                continue  # failed (the engine said why); left out of the summary
            results.append(RunResult(task.key, task.spec.label, task.seed, o.record, o.executed))
    return results


def _finished_record(path: Path) -> dict[str, Any] | None:
    """A finished run's result file, or None (absent or unreadable: trained again)."""
    if not path.is_file():
        return None
    try:
        done = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return done if isinstance(done, dict) else None


def _runs_text(cells: list[tuple[str, int]], seeds: list[int], limit: int = 6) -> str:
    """``"sgd (all seeds), sam (seeds 0, 1)"``: runs grouped by method, cut at ``limit``."""
    by_label: dict[str, list[int]] = {}
    for label, seed in cells:
        by_label.setdefault(label, []).append(seed)
    parts = []
    for label, mine in by_label.items():
        if len(seeds) > 1 and mine == seeds:
            parts.append(f"{label} (all seeds)")
        else:
            listed = ", ".join(map(str, mine[:5])) + (", ..." if len(mine) > 5 else "")
            parts.append(f"{label} (seed{'s' if len(mine) > 1 else ''} {listed})")
    more = len(parts) - limit
    return ", ".join(parts[:limit]) + (f" and {more} more methods" if more > 0 else "")


def resume_plan(
    config: StudyConfig,
    out: Path,
    grid: list[tuple[MethodSpec, int]] | None = None,
    *,
    threads: int | None = None,
) -> list[str]:
    """What rerunning into ``out`` does with the runs already there, in a few short
    lines: which are kept, which are retrained because their settings changed (and
    which settings), which are new. Empty for a folder without finished runs."""
    grid = grid or [(spec, seed) for seed in config.seeds for spec in config.methods]
    runs_dir = out / "runs"
    finished = {p.stem for p in runs_dir.glob("*.json")} if runs_dir.is_dir() else set()
    if not finished:
        return []
    kept: list[tuple[str, int]] = []
    changed: list[tuple[str, int]] = []
    new: list[tuple[str, int]] = []
    changes: list[tuple[str, Any, Any]] = []
    for spec, seed in grid:
        key = run_key(spec.label, seed)
        done = _finished_record(runs_dir / f"{key}.json") if key in finished else None
        finished.discard(key)
        if done is None:
            new.append((spec.label, seed))
            continue
        run_cfg = _normalise(_run_config(config, spec, seed, threads))
        diffs = differences(done.get("config"), run_cfg)
        if not diffs:
            kept.append((spec.label, seed))
            continue
        changed.append((spec.label, seed))
        changes += [d for d in diffs if d not in changes]
    seeds = list(config.seeds)
    lines = [
        f"samkit compare: {out} holds finished runs: {len(kept)} kept, "
        f"{len(changed)} retrained with other settings, {len(new)} new"
    ]
    if kept:
        lines.append(f"  kept: {_runs_text(kept, seeds)}")
    if changed:
        lines.append(f"  retrained ({describe_differences(changes, 3)}): ")
        lines[-1] += _runs_text(changed, seeds)
    if new:
        lines.append(f"  new: {_runs_text(new, seeds)}")
    if finished:
        lines.append(f"  {len(finished)} other finished run(s) in the folder are left as they are")
    return lines


def _num(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) and math.isfinite(v) else "-"


def _execute(
    config, problem, spec, seed, data, key, runs_dir, run_cfg, do_sharp, progress, log, device
) -> dict[str, Any]:
    seed_everything(seed)
    model = problem.build_model(data)
    n_steps = steps_per_epoch(data.train, config.train.batch_size, seed)
    tspec = spec.train_spec(
        total_steps=n_steps * config.train.epochs,
        steps_per_epoch=n_steps,
        epochs=config.train.epochs,
    )
    method = build_method(spec.method, model, tspec, **spec.options)
    t0 = time.perf_counter()
    res = train(
        model,
        method,
        data,
        config.train,
        seed=seed,
        loss_fn=problem.loss_fn,
        metrics=problem.metrics,
        maximize=problem.maximize,
        device=device,
        num_workers=config.num_workers,
        metrics_path=runs_dir / f"{key}.jsonl",
        state_path=runs_dir / f"{key}.state.pt",
        checkpoint_path=runs_dir / f"{key}.pt",
        model_spec=problem.model_spec(data),
        meta={"method": spec.to_dict(), "label": spec.label},
        progress=progress,
        desc=f"{spec.label} s{seed}",
        epoch_steps=n_steps,
    )
    wall = time.perf_counter() - t0
    epochs_run = len(res.history)
    record: dict[str, Any] = {
        "key": key,
        "label": spec.label,
        "method": spec.method,
        "seed": seed,
        "config": run_cfg,
        "final": res.final,
        "epochs_run": epochs_run,
        "steps": res.steps,
        "passes": res.passes,
        "passes_per_step": res.passes / max(1, res.steps),
        "train_time": res.train_time,
        "time_per_epoch": res.train_time / max(1, epochs_run),
        "wall_time": wall,
        "stopped_early": res.stopped_early,
        "diverged": res.diverged,
        "n_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "checkpoint": None if res.diverged else f"{key}.pt",
        "metrics": f"{key}.jsonl",
        "metric": problem.primary,
        "torch": torch.__version__,
    }
    if do_sharp and not res.diverged:
        try:
            t1 = time.perf_counter()
            record["sharpness"] = _measure_sharpness(
                model, problem, data, config.sharpness_samples, seed, config.sharpness_cheap
            )
            record["sharpness_time"] = time.perf_counter() - t1
        except Exception as exc:  # noqa: BLE001 - a failing instrument must not lose the run
            record["sharpness_error"] = _first_line(exc)
            if log:
                log(f"  sharpness of {spec.label} seed {seed} failed: {record['sharpness_error']}")
    return record


# ---------------------------------------------------------------- summary
def summarize(
    records: list[dict[str, Any]], labels: list[str] | None = None, *, metric: str = "acc"
) -> list[dict[str, Any]]:
    """One row per label (in ``labels`` order): means over seeds and costs relative to SGD.

    Diverged runs are counted (``diverged``) but left out of every mean
    (``n`` counts the runs that are in). The reference for the cost columns is
    the label ``"sgd"`` if present, else the first label. ``cost_time`` is the
    ratio of training time per epoch, ``cost_passes`` the ratio of
    forward/backward passes per step.
    """
    by_label: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_label.setdefault(r["label"], []).append(r)
    order = labels if labels is not None else list(by_label)
    rows = []
    for label in order:
        every = by_label.get(label, [])
        if not every:
            continue
        rs = [r for r in every if not r.get("diverged")]
        acc = _stats([r["final"].get(f"test_{metric}") for r in rs])
        row: dict[str, Any] = {
            "label": label,
            "method": every[0]["method"],
            "metric": metric,
            "n": len(rs),
            "runs": len(every),
            "diverged": len(every) - len(rs),
            f"test_{metric}_mean": acc[0],
            f"test_{metric}_std": acc[1],
            f"test_{metric}_sem": acc[2],
            f"val_{metric}_mean": _stats([r["final"].get(f"val_{metric}") for r in rs])[0],
            "train_loss_mean": _stats([r["final"].get("train_loss") for r in rs])[0],
            f"train_{metric}_mean": _stats([r["final"].get(f"train_{metric}") for r in rs])[0],
            "time_per_epoch": _stats([r["time_per_epoch"] for r in every])[0],
            "passes_per_step": _stats([r["passes_per_step"] for r in every])[0],
        }
        for k in SHARPNESS_KEYS:
            vals = [r["sharpness"][k] for r in rs if k in (r.get("sharpness") or {})]
            if vals:
                row[k] = _stats(vals)[0]
        rows.append(row)
    ref = next((r for r in rows if r["label"] == "sgd"), rows[0] if rows else None)
    for row in rows:
        row["cost_reference"] = ref["label"] if ref else None
        row["cost_time"] = (
            row["time_per_epoch"] / ref["time_per_epoch"]
            if ref and _finite(ref["time_per_epoch"]) and ref["time_per_epoch"] > 0
            else float("nan")
        )
        row["cost_passes"] = (
            row["passes_per_step"] / ref["passes_per_step"]
            if ref and _finite(ref["passes_per_step"]) and ref["passes_per_step"] > 0
            else float("nan")
        )
    return rows


def finish(
    config: StudyConfig,
    results: list[RunResult],
    out: str | os.PathLike[str],
    *,
    log: Callable[[str], None] | None = None,
    problem: Problem | None = None,
) -> dict[str, Any]:
    """Aggregate the runs into results.json and write report.html; returns the summary."""
    from .report import write_report

    out = Path(out)
    problem = problem or config.problem()
    metric, maximize = problem.primary, problem.maximize
    records = [r.record for r in results]
    labels = [m.label for m in config.methods]
    rows = summarize(records, labels, metric=metric)
    verdicts = paired_verdicts(
        records, labels, config.baseline_label, metric=metric, maximize=maximize
    )
    histories: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        path = out / "runs" / r["metrics"]
        try:
            histories[r["key"]] = [
                json.loads(line) for line in path.read_text().splitlines() if line.strip()
            ]
        except (OSError, ValueError):
            histories[r["key"]] = []
    interp = _interpolation(config, problem, records, out, log) if config.sharpness else None
    summary = {
        "format": "samkit-compare",
        "version": 2,
        "settings": config.to_dict(),
        "problem": problem.describe(),
        "summary": rows,
        "verdicts": verdicts,
        "runs": records,
        "interpolation": interp,
        "executed_runs": sum(r.executed for r in results),
    }
    with study_folder(out, clean=False):
        write_json_atomic(out / "results.json", summary)
        title = f"samkit compare: {config.dataset} / {config.model}" + (
            f", {config.noise:.0%} label noise" if config.noise else ""
        )
        write_report(
            out / "report.html",
            title=title,
            rows=rows,
            records=records,
            histories=histories,
            settings={k: v for k, v in config.to_dict().items() if k != "methods"}
            | {"methods": labels},
            interpolation=interp,
            verdicts=[v["sentence"] for v in verdicts],
            notes=[
                f"Test {metric}: mean +- sample standard deviation over seeds (diverged runs left "
                "out); error bars: standard error. Cost: time per training epoch, and "
                "forward/backward passes per step, relative to SGD."
            ],
            metric=metric,
        )
    return finite(summary)


def _load_weights(problem: Problem, data: Data, path: Path) -> torch.nn.Module:
    from .checkpoint import load_checkpoint

    ck = load_checkpoint(path)
    state = ck.get("state_dict")
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"Invalid checkpoint {str(path)!r}: no state dict")
    if not all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point()):
        raise ValueError(f"Invalid checkpoint {str(path)!r}: non-finite weights")
    model = problem.build_model(data)
    model.load_state_dict(state)
    model.eval()
    return model


def _interpolation(
    config: StudyConfig,
    problem: Problem,
    records: list[dict[str, Any]],
    out: Path,
    log: Callable[[str], None] | None,
) -> dict[str, Any] | None:
    """Loss along the line from the SGD model to the best SAM model (first seed, finished runs)."""
    try:
        from ..sharpness import landscape
    except ImportError:
        return None
    if not callable(getattr(landscape, "interpolate", None)):
        return None
    seed = config.seeds[0]
    ok = [r for r in records if r["seed"] == seed and not r.get("diverged") and r.get("checkpoint")]
    a = next((r for r in ok if r["label"] == "sgd"), None)
    metric, sign = problem.primary, (1.0 if problem.maximize else -1.0)
    sam_like = [r for r in ok if r["method"] == "sam"]
    b = (
        max(sam_like, key=lambda r: sign * (r["final"].get(f"test_{metric}") or -math.inf))
        if sam_like
        else None
    )
    if a is None or b is None:
        return None
    try:
        data = problem.load(seed)
        device = resolve_device(config.device)
        models = [
            _load_weights(problem, data, out / "runs" / r["checkpoint"]).to(device) for r in (a, b)
        ]
        alphas, losses = landscape.interpolate(
            models[0],
            models[1],
            _mean_loss(problem),
            sharpness_batches(data, config.sharpness_samples, device=device),
            n_points=config.interpolation_points,
        )
    except Exception as exc:  # noqa: BLE001 - an instrument failure must not lose the study
        if log:
            log(f"samkit compare: interpolation failed: {_first_line(exc)}")
        return None
    return {
        "a": a["label"],
        "b": b["label"],
        "seed": seed,
        "alphas": [float(x) for x in alphas],
        "losses": [float(x) for x in losses],
    }


__all__ += ["ResumeError", "run_key", "sharpness_batches"]
