"""``samkit.compare(...)``: the comparative study from Python, on built-in or your own problem.

The API and the ``samkit compare`` command share one path: settings are
merged and checked by :mod:`~samkit.experiments.settings`, the whole study is
validated by :func:`~samkit.experiments.study.check_study` before anything
trains, the run folder is locked (:mod:`~samkit.experiments.folder`), the runs
are trained by :func:`~samkit.experiments.study.run_study` and summarised by
:func:`~samkit.experiments.study.finish`. Both write the same run folder.

>>> import samkit, torch
>>> from torch.utils.data import TensorDataset
>>> x = torch.randn(256, 8); y = (x[:, 0] > 0).long()
>>> result = samkit.compare(                                       # doctest: +SKIP
...     model=lambda: torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
...                                       torch.nn.Linear(16, 2)),
...     train=TensorDataset(x[:200], y[:200]), test=TensorDataset(x[200:], y[200:]),
...     methods=["sgd", "sam"], seeds=2, epochs=5, batch_size=32, out="runs/toy")
>>> print(result)                                                  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import settings as st
from .folder import refuse_other_kind, run_folder, study_folder
from .grid import StudyResult
from .problem import Problem, UserData, load_callable, load_user_data
from .settings import MethodSpec, StudyConfig

__all__ = [
    "compare",
    "CompareResult",
    "OpenStudy",
    "open_study",
    "study_from_settings",
    "headline",
]


class CompareResult(StudyResult):
    """What :func:`compare` returns: the summary, the verdicts and where the files are."""

    @property
    def table(self) -> str:
        from .report import format_table

        return format_table(self.rows)


def _spec_entry(m: Any) -> Any:
    if isinstance(m, MethodSpec):
        return {
            "method": m.method,
            "label": m.label,
            "base": m.base,
            "lr": m.lr,
            "momentum": m.momentum,
            "weight_decay": m.weight_decay,
            **m.options,
        }
    return m


def _user_parts(
    model: Any, data: Any, train: Any, val: Any, test: Any, settings: dict[str, Any]
) -> dict[str, Any]:
    """Resolve the user's model and data (objects or ``module:function`` / ``.npz``)."""
    user: dict[str, Any] = {}
    if isinstance(model, str) and ":" in model:
        user["model_factory"] = load_callable(model, "model")
        settings["model"] = model
    elif callable(model) and not isinstance(model, str):
        user["model_factory"] = model
        name = getattr(model, "__qualname__", None) or type(model).__qualname__
        settings["model"] = f"{getattr(model, '__module__', '') or ''}:{name}".strip(":")
    elif model is not None:
        settings["model"] = model
    if data is not None and train is not None:
        raise ValueError("Invalid data value: give data= or train=/val=/test=, not both")
    if isinstance(data, UserData):
        user["user_data"] = data
    elif data is not None:
        user["user_data"] = load_user_data(data)
    elif train is not None:
        user["user_data"] = UserData("user-data", train, val, test)
    elif val is not None or test is not None:
        raise ValueError("Invalid train value: None (val= and test= need train=)")
    if "user_data" in user:
        st.check_one_data_source(settings, {"data": user["user_data"]})
        settings["dataset"] = user["user_data"].name
    return user


def study_from_settings(settings: dict[str, Any], **user: Any) -> StudyConfig:
    """A StudyConfig from merged settings, loading ``model``/``data`` given as
    ``module:function`` or ``.npz`` (the CLI's and the TOML file's form)."""
    settings = dict(settings)
    model = settings.get("model")
    if "model_factory" not in user and isinstance(model, str) and ":" in model:
        user["model_factory"] = load_callable(model, "model")
    if "user_data" not in user and settings.get("data") is not None:
        user["user_data"] = load_user_data(settings["data"])
        settings["dataset"] = user["user_data"].name
    for key in ("loss", "metrics"):
        if user.get(key) is None:
            user.pop(key, None)
    return st.build_study(settings, **user)


class OpenStudy:
    """A validated study holding its folder's lock; :meth:`run` trains and summarises."""

    def __init__(self, config: StudyConfig, out: Path, problem: Problem) -> None:
        self.config, self.out, self.problem = config, out, problem

    def run(
        self,
        *,
        progress: bool | None = None,
        log: Callable[[str], None] | None = None,
        jobs: int | str = 1,
        threads: int | None = None,
        ray: str | None = None,
    ) -> CompareResult:
        """Train (or resume) every run, ``jobs`` at once (see
        :func:`~samkit.experiments.engine.make_executor`), and summarise."""
        from .engine import warn_failed
        from .study import finish, run_study

        failed: list[dict[str, Any]] = []
        results = run_study(
            self.config,
            self.out,
            progress=progress,
            log=log,
            problem=self.problem,
            jobs=jobs,
            threads=threads,
            ray=ray,
            failed=failed,
        )
        summary = finish(
            self.config, results, self.out, log=log, problem=self.problem, failed=failed
        )
        warn_failed(failed)
        return CompareResult(self.out, summary)


@contextlib.contextmanager
def open_study(
    config: StudyConfig, out: str | os.PathLike[str] | None = None, *, drop_unfit: bool = False
) -> Iterator[OpenStudy]:
    """Lock the run folder and validate everything (ValueError on any problem), then yield."""
    from .study import check_study

    folder = run_folder(out, lambda: st.default_out_dir(config))
    with study_folder(folder) as path:
        refuse_other_kind(path, "compare")
        problem = check_study(config, drop_unfit=drop_unfit, out_dir=path, need_test=True)
        yield OpenStudy(config, path, problem)


def check_flags(**flags: Any) -> None:
    """The API's switches are booleans (``progress`` may be None): ``quiet="no"`` is
    truthy, so it was taken as quiet."""
    for name, value in flags.items():
        if not (value is None and name == "progress"):
            st.check_bool(name, value)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def compare(
    model: Any = None,
    train: Any = None,
    val: Any = None,
    test: Any = None,
    *,
    data: Any = None,
    loss: Callable[..., Any] | None = None,
    metrics: dict[str, Callable[..., Any]] | None = None,
    task: str | None = None,
    methods: Any = None,
    seeds: int | list[int] | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    rho: float | list[float] | None = None,
    lr: float | None = None,
    momentum: float | None = None,
    weight_decay: float | None = None,
    out: str | os.PathLike[str] | None = None,
    device: str | None = None,
    amp: str | None = None,
    num_workers: int | None = None,
    progress: bool | None = None,
    quiet: bool = False,
    jobs: int | str | None = None,
    threads: int | None = None,
    ray: str | None = None,
    **settings: Any,
) -> CompareResult:
    """Compare SGD, Adam, SAM and its variants on a model and data, paired over seeds.

    Args:
        model: a callable returning a fresh ``nn.Module`` (called with
            ``model_kwargs`` once per run, after seeding), ``"module:function"``,
            or a built-in model name (``"cnn"``, ``"gru"``, ``"mlp"``, ``"resnet"``).
        train, val, test: the data: map-style Datasets, pairs ``(x, y)`` of
            arrays, an ``IterableDataset`` or a factory ``train(seed=, epoch=)``
            for data that does not fit in memory. Without ``val`` a validation
            split of ``val_fraction`` is drawn from ``train`` per seed. Without
            any data: the built-in ``dataset`` (MNIST-1D by default).
        data: instead of ``train``/``val``/``test``: ``"path.npz"``,
            ``"module:function"``, or a :class:`~samkit.experiments.problem.UserData`.
        loss: any ``loss(output, target)`` (default: cross-entropy, or mean
            squared error for regression).
        metrics: ``name -> metric(output, target)`` (batch means); the first is
            the primary one (default: ``acc``, or ``mse`` and ``mae``).
        task: ``"classification"`` or ``"regression"`` (default: from the targets' dtype).
        methods: names, ``"name:key=value,..."`` specs, dicts or
            :class:`~samkit.experiments.settings.MethodSpec` (default: the full study).
        seeds: a count or a list of seeds. ``rho``: values on SAM's scale (each
            SAM-type method runs once per value).
        out: the run folder (default ``samkit-runs/compare-<dataset>-<model>-<hash>``);
            rerunning with the same settings resumes it.
        device: ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda:1"``, ...
        amp: ``"bf16"`` or ``"fp16"`` mixed precision (None: float32).
        num_workers: DataLoader worker processes.
        progress: per-epoch progress bars (default: on a terminal). ``quiet``:
            no log lines on stderr.
        jobs: runs trained at once: 1 (default, in this process), N worker
            processes, or ``"auto"`` (one per GPU, else one per physical core).
        threads: torch threads per run (default: not pinned with one job, an
            even share of the cores with several); recorded in each run's config.
        ray: the address of a Ray cluster: the runs as Ray tasks there (without
            ``jobs``, as many at once as the cluster holds).
        **settings: any other study setting (``dataset``, ``model_kwargs``,
            ``noise``, ``val_fraction``, ``train_size``, ``schedule``,
            ``warmup_epochs``, ``early_stopping``, ``label_smoothing``,
            ``sharpness``, ``sharpness_samples``, ``sharpness_cheap``, ``baseline``).

    Returns:
        a :class:`CompareResult` (``rows``, ``verdicts``, ``table``,
        ``to_dict()``, ``results_path``, ``report_path``).

    Raises:
        ValueError: any bad setting, model, data, loss or metric, found before
            any training starts.
    """
    unknown = sorted((set(settings) - st.KEYS) | ({"optimizers", "data", "out"} & set(settings)))
    if unknown:  # (only those: a valid setting beside them is not named)
        hint = " (the methods are methods=)" if "optimizers" in unknown else ""
        raise ValueError(f"Invalid setting: {', '.join(unknown)}{hint}")
    check_flags(quiet=quiet, progress=progress)
    flat: dict[str, Any] = dict(settings)
    flat.update(
        task=task,
        seeds=seeds,
        epochs=epochs,
        batch_size=batch_size,
        rho=rho,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        device=device,
        amp=amp,
        num_workers=num_workers,
        jobs=jobs,
        threads=threads,
        ray=ray,
    )
    if methods is not None:
        flat["optimizers"] = [
            _spec_entry(m) for m in ([methods] if isinstance(methods, str) else list(methods))
        ]
    user = _user_parts(model, data, train, val, test, flat)
    merged = st.merge(flat)
    how = st.execution(merged)
    default_methods = methods is None and not merged["methods"]
    config = st.build_study(merged, loss=loss, metrics=metrics, **user)
    log = None if quiet else _stderr
    with open_study(config, out, drop_unfit=default_methods) as study:
        if log:
            log(headline(study))
        return study.run(progress=progress, log=log, **how)


def headline(study: OpenStudy) -> str:
    """The log line that opens a study: problem, methods, seeds, folder."""
    c = study.config
    labels = ", ".join(m.label for m in c.methods)
    line = (
        f"samkit compare: {c.dataset} / {c.model} ({study.problem.task}), "
        f"{len(c.seeds)} seed(s) x [{labels}], {c.train.epochs} epochs -> {study.out}"
    )
    if c.skipped:
        line += f"\nsamkit compare: left out (cannot run on this problem): {', '.join(c.skipped)}"
    return line
