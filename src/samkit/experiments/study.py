"""A comparative study: every (method x seed) run on one dataset and model.

:func:`run_study` trains each run with :func:`~samkit.experiments.trainer.train`
and writes, in the study folder::

    config.json                   the study's settings
    runs/<label>-seed<k>.json     one run's result, written atomically when it ends
    runs/<label>-seed<k>.jsonl    its per-epoch metrics, appended as they come
    runs/<label>-seed<k>.pt       its final model (samkit checkpoint)
    results.json                  all runs + the summary table, written at the end

A run whose result file exists *and* was made with the same settings is not
trained again, so an interrupted study resumes where it stopped; a run cut
off mid-way continues from its training-state file. Changing a setting of the
study retrains the affected runs only.

The summary has one row per method label: test accuracy (mean, sample std
and standard error over seeds), final train loss, time per epoch, and the
cost relative to SGD, both as a wall-time ratio and as a ratio of
forward/backward passes per step; plus the sharpness measures of
:mod:`samkit.sharpness` when they were computed.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .._atomic import write_json_atomic as _write_json_atomic
from .datasets import Dataset, load_dataset
from .methods import BASE_DEFAULTS, TrainSpec, build_method, method_info
from .models import build_model, count_parameters
from .trainer import TrainConfig, seed_everything, train

__all__ = [
    "MethodSpec",
    "StudyConfig",
    "RunResult",
    "run_study",
    "summarize",
    "write_json_atomic",
    "sharpness_available",
    "SHARPNESS_KEYS",
]

SHARPNESS_KEYS = ("hessian_top_eig", "hessian_trace", "worst_case_sharpness")


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as JSON to a temporary file beside ``path``, then rename it over."""
    _write_json_atomic(path, obj)


@dataclass
class MethodSpec:
    """One column of the comparison: a registered method with its settings.

    ``lr``, ``momentum`` and ``weight_decay`` default to those of the base
    optimizer (:data:`~samkit.experiments.methods.BASE_DEFAULTS`).
    """

    method: str
    label: str = ""
    base: str = ""
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        info = method_info(self.method)
        if not self.base:
            self.base = info.base or "sgd"
        if self.base not in BASE_DEFAULTS:
            raise ValueError(
                f"Invalid base value: {self.base!r} (choose from {', '.join(BASE_DEFAULTS)})"
            )
        unknown = sorted(set(self.options) - set(info.defaults))
        if unknown:
            raise ValueError(
                f"Invalid option for method {self.method!r}: {', '.join(unknown)} "
                f"(it takes {', '.join(sorted(info.defaults)) or 'no options'})"
            )
        rho = self.options.get("rho")
        if rho is not None and (
            isinstance(rho, bool)
            or not isinstance(rho, (int, float))
            or not 0 <= rho < float("inf")
        ):
            raise ValueError(f"Invalid rho value: {rho!r} (must be a finite number >= 0)")
        defaults = BASE_DEFAULTS[self.base]
        for name in ("lr", "momentum", "weight_decay"):
            if getattr(self, name) is None:
                setattr(self, name, defaults[name])
        self.train_spec()  # validates lr / momentum / weight decay
        if not self.label:
            self.label = self.method
        if not re.fullmatch(r"[A-Za-z0-9_.()=,+-]+", self.label):
            raise ValueError(
                f"Invalid label value: {self.label!r} (letters, digits and _.()=,+- only)"
            )

    def train_spec(self, **changes: Any) -> TrainSpec:
        return TrainSpec(
            base=self.base,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            **changes,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        # Record the method's defaults too, so a finished run is reused only if
        # every option it trained with (not just those given) is unchanged.
        d["options"] = {**method_info(self.method).defaults, **self.options}
        return d


@dataclass
class StudyConfig:
    """Everything that defines a study (and so the folder it resumes from)."""

    methods: list[MethodSpec]
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    dataset: str = "mnist1d"
    model: str = "cnn"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    noise: float = 0.0
    val_fraction: float = 0.1
    train_size: int | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    sharpness: bool = True
    sharpness_samples: int = 1000  # training samples the sharpness measures look at
    sharpness_cheap: bool = False  # fewer probes / iterations (for --quick)
    interpolation_points: int = 25
    skipped: list[str] = field(default_factory=list)  # methods left out (cannot run on this model)

    def __post_init__(self) -> None:
        if not self.methods:
            raise ValueError("Invalid methods value: [] (give at least one method)")
        labels = [m.label for m in self.methods]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"Invalid methods value: duplicate labels {', '.join(dup)}")
        if not self.seeds or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds
        ):
            raise ValueError(f"Invalid seeds value: {self.seeds!r} (non-empty list of ints >= 0)")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"Invalid seeds value: {self.seeds!r} (duplicates)")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["methods"] = [m.to_dict() for m in self.methods]
        return d

    def load(self, seed: int) -> Dataset:
        return load_dataset(
            self.dataset,
            seed=seed,
            noise=self.noise,
            val_fraction=self.val_fraction,
            train_size=self.train_size,
        )


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


def _mean_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y)


def sharpness_batches(
    data: Dataset, samples: int, batch_size: int = 250
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed training batches (the labels trained on) for the sharpness measures."""
    n = min(samples, len(data.train))
    return [
        (data.train.x[i : min(i + batch_size, n)], data.train.y[i : min(i + batch_size, n)])
        for i in range(0, n, batch_size)
    ]


#: settings of samkit.sharpness.summary under ``sharpness_cheap`` (passed when it takes them)
CHEAP_SHARPNESS = {"trace_samples": 4, "max_iter": 30, "ascent_steps": 3}


def _measure_sharpness(
    model: torch.nn.Module, data: Dataset, samples: int, seed: int, cheap: bool = False
) -> dict[str, float]:
    import inspect

    import samkit.sharpness as sh

    model.eval()
    kwargs: dict[str, Any] = {}
    if cheap:
        params = inspect.signature(sh.summary).parameters
        kwargs = {k: v for k, v in CHEAP_SHARPNESS.items() if k in params}
    out = sh.summary(model, _mean_loss, sharpness_batches(data, samples), seed=seed, **kwargs)
    return {k: float(v) for k, v in out.items()}


def _run_config(config: StudyConfig, spec: MethodSpec, seed: int) -> dict[str, Any]:
    """The settings a run's result depends on (a change retrains it)."""
    cfg = {
        "method": spec.to_dict(),
        "seed": seed,
        "dataset": config.dataset,
        "model": config.model,
        "model_kwargs": config.model_kwargs,
        "noise": config.noise,
        "val_fraction": config.val_fraction,
        "train_size": config.train_size,
        "train": asdict(config.train),
        "sharpness": config.sharpness and sharpness_available(),
        "sharpness_samples": config.sharpness_samples,
    }
    if config.sharpness_cheap and cfg["sharpness"]:
        cfg["sharpness_cheap"] = True
    return cfg


def _normalise(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def run_study(
    config: StudyConfig,
    out_dir: str | os.PathLike[str],
    *,
    progress: bool | None = None,
    log: Callable[[str], None] | None = print,
) -> list[RunResult]:
    """Run (or resume) every (method x seed) run; returns them in grid order.

    ``log`` receives one line per run (None: silent); ``progress`` controls
    the per-epoch progress bar (default: when stderr is a TTY).
    """
    out = Path(out_dir)
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "config.json", config.to_dict())
    do_sharp = config.sharpness and sharpness_available()
    grid = [(spec, seed) for seed in config.seeds for spec in config.methods]
    results: list[RunResult] = []
    datasets: dict[int, Dataset] = {}
    for i, (spec, seed) in enumerate(grid, 1):
        key = run_key(spec.label, seed)
        result_path = runs_dir / f"{key}.json"
        run_cfg = _normalise(_run_config(config, spec, seed))
        if result_path.is_file():
            try:
                done = json.loads(result_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                done = None
            if done is not None and done.get("config") == run_cfg:
                results.append(RunResult(key, spec.label, seed, done, executed=False))
                if log:
                    log(f"[{i}/{len(grid)}] {spec.label} seed {seed}: done before, skipped")
                continue
        if seed not in datasets:
            datasets[seed] = config.load(seed)
        data = datasets[seed]
        record = _execute(config, spec, seed, data, key, runs_dir, run_cfg, do_sharp, progress, log)
        write_json_atomic(result_path, record)
        state = runs_dir / f"{key}.state.pt"
        if state.exists():
            state.unlink()
        results.append(RunResult(key, spec.label, seed, record, executed=True))
        if log:
            f = record["final"]
            log(
                f"[{i}/{len(grid)}] {spec.label} seed {seed}: test acc {f.get('test_acc', float('nan')):.4f}, "
                f"{record['time_per_epoch']:.2f} s/epoch"
            )
    return results


def _execute(
    config, spec, seed, data, key, runs_dir, run_cfg, do_sharp, progress, log
) -> dict[str, Any]:
    model_kwargs = {"in_len": data.in_len, "num_classes": data.num_classes, **config.model_kwargs}
    seed_everything(seed)
    model = build_model(config.model, **model_kwargs)
    n_train = len(data.train)
    steps_per_epoch = max(1, n_train // config.train.batch_size)
    tspec = spec.train_spec(
        total_steps=steps_per_epoch * config.train.epochs,
        steps_per_epoch=steps_per_epoch,
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
        metrics_path=runs_dir / f"{key}.jsonl",
        state_path=runs_dir / f"{key}.state.pt",
        checkpoint_path=runs_dir / f"{key}.pt",
        model_spec=(config.model, model_kwargs),
        meta={"method": spec.to_dict(), "label": spec.label},
        progress=progress,
        desc=f"{spec.label} s{seed}",
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
        "n_params": count_parameters(model),
        "checkpoint": f"{key}.pt",
        "metrics": f"{key}.jsonl",
        "torch": torch.__version__,
    }
    if do_sharp and not res.diverged:
        try:
            t1 = time.perf_counter()
            record["sharpness"] = _measure_sharpness(
                model, data, config.sharpness_samples, seed, config.sharpness_cheap
            )
            record["sharpness_time"] = time.perf_counter() - t1
        except Exception as exc:  # noqa: BLE001 - a failing instrument must not lose the run
            record["sharpness_error"] = f"{type(exc).__name__}: {exc}"
            if log:
                log(f"  sharpness of {spec.label} seed {seed} failed: {record['sharpness_error']}")
    return record


def _stats(values: list[float]) -> tuple[float, float, float]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan"), float("nan")
    mean = statistics.fmean(vals)
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return mean, std, std / math.sqrt(len(vals))


def summarize(
    records: list[dict[str, Any]], labels: list[str] | None = None
) -> list[dict[str, Any]]:
    """One row per label (in ``labels`` order): means over seeds and costs relative to SGD.

    The reference for the cost columns is the label ``"sgd"`` if present, else
    the first label. ``cost_time`` is the ratio of training time per epoch,
    ``cost_passes`` the ratio of forward/backward passes per step.
    """
    by_label: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_label.setdefault(r["label"], []).append(r)
    order = labels if labels is not None else list(by_label)
    rows = []
    for label in order:
        rs = by_label.get(label, [])
        if not rs:
            continue
        acc = _stats([r["final"].get("test_acc") for r in rs])
        row: dict[str, Any] = {
            "label": label,
            "method": rs[0]["method"],
            "n": len(rs),
            "test_acc_mean": acc[0],
            "test_acc_std": acc[1],
            "test_acc_sem": acc[2],
            "val_acc_mean": _stats([r["final"].get("val_acc") for r in rs])[0],
            "train_loss_mean": _stats([r["final"].get("train_loss") for r in rs])[0],
            "train_acc_mean": _stats([r["final"].get("train_acc") for r in rs])[0],
            "time_per_epoch": _stats([r["time_per_epoch"] for r in rs])[0],
            "passes_per_step": _stats([r["passes_per_step"] for r in rs])[0],
            "diverged": sum(bool(r.get("diverged")) for r in rs),
        }
        for k in SHARPNESS_KEYS:
            vals = [r["sharpness"][k] for r in rs if k in r.get("sharpness", {})]
            if vals:
                row[k] = _stats(vals)[0]
        rows.append(row)
    ref = next((r for r in rows if r["label"] == "sgd"), rows[0] if rows else None)
    for row in rows:
        row["cost_time"] = (
            row["time_per_epoch"] / ref["time_per_epoch"]
            if ref and ref["time_per_epoch"] > 0
            else float("nan")
        )
        row["cost_passes"] = (
            row["passes_per_step"] / ref["passes_per_step"]
            if ref and ref["passes_per_step"] > 0
            else float("nan")
        )
    return rows
