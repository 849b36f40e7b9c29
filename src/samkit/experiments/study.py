"""A comparative study: every (method x seed) run on one problem, and its summary.

The one study path of ``samkit.compare(...)`` and ``samkit compare``:

1. :func:`check_study` (:mod:`~samkit.experiments.study_checks`) validates
   everything before any training: the model on every split, every method on
   this model, data kind and task, every training-state file it would resume from;
2. :func:`run_study` (this module) trains each (method, seed) run with
   :func:`~samkit.experiments.trainer.train` through the study engine
   (:mod:`~samkit.experiments.engine`), holding the folder's lock, and
   measures its sharpness (:mod:`~samkit.experiments.study_sharpness`);
3. :func:`finish` (:mod:`~samkit.experiments.study_summary`) writes
   ``results.json`` (valid JSON: NaN becomes null) and ``report.html``, with the
   SGD-to-SAM interpolation and a one-sentence paired verdict per method.

Everything is importable from here, as before the split.

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

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .batches import schedule
from .configs import MethodSpec, StudyConfig, TrainConfig
from .engine import Cell, Executor, InProcess, failures, make_executor, normalise, run_cells
from .engine.core import sort_finished
from .folder import describe_differences, study_folder
from .problem import Problem
from .registry import build_method, method_info  # noqa: F401 - method_info: reached from here
from .runfiles import RunResult, first_line, run_key, write_json_atomic
from .stats import finite_number, paired_verdicts
from .study_checks import PROBLEM_KEYS, check_problem, check_study, problem_identity
from .study_sharpness import (
    CHEAP_SHARPNESS,
    SHARPNESS_KEYS,
    sharpness_available,
    sharpness_batches,
)
from .study_sharpness import measure_sharpness as _measure_sharpness
from .study_summary import finish, summarize
from .trainer import ResumeError, resolve_device, seed_everything, train

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
    "ResumeError",
    "run_key",
    "sharpness_batches",
    "CHEAP_SHARPNESS",
]


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


@dataclass(frozen=True)
class RunRecordCheck:
    """A finished compare record is reused only if it is this run's and well formed: its
    key, label and seed; metrics finite numbers or null (accuracies in [0, 1]); flags
    booleans; times and counts
    finite and >= 0; its checkpoint and log this run's own files (a record pointing
    elsewhere would have the report read another run's weights)."""

    key: str
    label: str
    seed: int
    #: where the run's files are: its checkpoint must be a whole one (a truncated .pt was kept
    #: as a finished run, and only the report's interpolation failed on it, at the end)
    runs_dir: Path | None = None

    def __call__(self, rec: dict[str, Any]) -> bool:
        numbers = ("epochs_run", "steps", "passes", "passes_per_step", "train_time")
        checkpoint = rec.get("checkpoint")
        if self.runs_dir is not None and checkpoint == f"{self.key}.pt":
            if not _whole_zip(self.runs_dir / checkpoint):
                return False
        return (
            (rec.get("key"), rec.get("label"), rec.get("seed")) == (self.key, self.label, self.seed)
            and isinstance(rec.get("final"), dict)
            and all(v is None or finite_number(v) for v in rec["final"].values())
            and all(  # an accuracy is a fraction
                v is None or 0 <= v <= 1 for k, v in rec["final"].items() if k.endswith("_acc")
            )
            and all(isinstance(rec.get(k), bool) for k in ("diverged", "stopped_early"))
            and all(finite_number(rec.get(k)) and rec[k] >= 0 for k in (*numbers, "time_per_epoch"))
            and rec.get("checkpoint") in (None, f"{self.key}.pt")
            and rec.get("metrics") == f"{self.key}.jsonl"
            and (
                not isinstance(rec.get("sharpness"), dict)
                or all(v is None or finite_number(v) for v in rec["sharpness"].values())
            )
        )


def _whole_zip(path: Path) -> bool:
    """Whether ``path`` is a whole zip archive (torch.save's format): its directory, at the
    file's end, reads, and names entries that lie within the file. Cheap (no entry is read)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            size = path.stat().st_size
            return all(
                info.header_offset + info.compress_size <= size for info in archive.infolist()
            )
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


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
                    valid=RunRecordCheck(key, spec.label, seed, runs_dir),
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
    failed: list[dict[str, Any]] | None = None,
) -> list[RunResult]:
    """Run (or resume) every (method x seed) run; returns them in grid order.

    ``log`` receives one line per run (None: silent); ``progress`` controls
    the per-epoch progress bar (default: when stderr is a TTY). Holds the
    folder's lock while it runs. ``jobs``, ``threads``, ``ray`` and
    ``gpus_per_run`` choose the executor (:func:`~samkit.experiments.engine.make_executor`);
    a run pinned to a number of torch threads records it in its config. The runs that
    failed on every retry are left out, and listed in ``failed`` if given.
    """
    problem = problem or config.problem()
    if executor is None:
        executor = make_executor(
            jobs,
            threads,
            ray=ray,
            gpus_per_run=gpus_per_run,
            progress=progress,
            log=log,
            loaders=config.num_workers,
        )
    with study_folder(out_dir) as out:
        runs_dir = out / "runs"
        runs_dir.mkdir(parents=True, exist_ok=True)
        cells = study_cells(config, runs_dir, threads=executor.threads)
        executor.check(cells[0])  # the runs can go where they are sent, before any file
        grid = [(spec, seed) for seed in config.seeds for spec in config.methods]
        if log:
            for line in resume_plan(config, out, cells, grid):
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
        if failed is not None:
            failed.extend(failures(outcomes))
        results = []
        for o in outcomes:
            task = o.cell.task
            if o.record is None:
                continue  # failed (the engine said why); left out of the summary
            results.append(RunResult(task.key, task.spec.label, task.seed, o.record, o.executed))
    return results


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
    config: StudyConfig, out: Path, cells: list[Cell], grid: list[tuple[MethodSpec, int]]
) -> list[str]:
    """What rerunning into ``out`` does with the runs already there, in a few short
    lines: which are kept, which are retrained because their settings changed (and
    which settings), which are new. Empty for a folder without finished runs.
    ``cells[i]`` is the run of ``grid[i]`` (:func:`study_cells`' order)."""
    runs_dir = out / "runs"
    finished = {p.stem for p in runs_dir.glob("*.json")} if runs_dir.is_dir() else set()
    if not finished:
        return []
    finished -= {cell.stem for cell in cells}  # (what is left: other runs in the folder)
    kept_at, changed_at, new_at, changes = sort_finished(cells)
    kept, changed, new = (
        [(grid[i][0].label, grid[i][1]) for i in at] for at in (kept_at, changed_at, new_at)
    )
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
    length = schedule(data.train, config.train.batch_size, config.train.epochs, seed)
    method = build_method(spec.method, model, spec.train_spec(**length), **spec.options)
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
        state_tag=run_cfg,  # a state left by this run with other settings is not resumed
        checkpoint_path=runs_dir / f"{key}.pt",
        model_spec=problem.model_spec(data),
        meta={"method": spec.to_dict(), "label": spec.label},
        progress=progress,
        desc=f"{spec.label} s{seed}",
        epoch_steps=length["steps_per_epoch"],
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
            record["sharpness_error"] = first_line(exc)
            if log:
                log(f"  sharpness of {spec.label} seed {seed} failed: {record['sharpness_error']}")
    return record
