"""The settings of a study as types, each checked when it is made.

* :class:`TrainConfig`: how long and how to train (epochs, batch size,
  schedule, early stopping, mixed precision);
* :class:`MethodSpec`: one column of the comparison (a registered method, its
  base optimizer, hyper-parameters, options and label);
* :class:`StudyConfig`: the whole study (methods x seeds on one problem: a
  built-in dataset and model, or the user's own).

They are made from presets, TOML files and flags by
:mod:`~samkit.experiments.settings` (which re-exports them: import them from
there); the hyper-parameters every method shares (:class:`TrainSpec`) and the
checks live in the leaf module :mod:`~samkit.experiments.types`.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .runfiles import check_run_files
from .types import (
    _LABEL,
    AMP,
    BASE_DEFAULTS,
    LIMITS,
    SCHEDULES,
    TASKS,
    TrainSpec,
    _is_int,
    _is_number,
    check_bool,
    check_choice,
    check_device,
    check_float,
    check_int,
    check_label,
    plain,
)

__all__ = ["TrainConfig", "MethodSpec", "StudyConfig", "DEFAULT_VAL_FRACTION"]

#: The validation split carved out of training data that has none.
DEFAULT_VAL_FRACTION = 0.1


@dataclass
class TrainConfig:
    """How long and how to train (the method holds the optimizer's settings).

    ``amp``: ``None`` (float32), ``"bf16"`` (autocast, no scaler) or ``"fp16"``
    (autocast + GradScaler; only for methods that support a scaler).
    ``eval_train``: also evaluate the whole training split after each
    evaluation (the report's train accuracy; costs one forward pass over it).
    """

    epochs: int = 30
    batch_size: int = 100
    schedule: str = "cosine"  # "cosine" (to zero) or "constant"
    warmup_epochs: float = 0.0
    early_stopping: int | None = None  # patience, in epochs, on the validation metric
    label_smoothing: float = 0.0
    eval_batch_size: int = 2000
    eval_every: int = 1  # evaluate every k epochs (and always after the last one)
    deterministic: bool = True
    amp: str | None = None
    eval_train: bool = True

    def __post_init__(self) -> None:
        self.epochs = check_int("epochs", self.epochs, 1, LIMITS["epochs"])
        self.batch_size = check_int("batch_size", self.batch_size, 1, LIMITS["batch_size"])
        self.eval_batch_size = check_int(
            "eval_batch_size", self.eval_batch_size, 1, LIMITS["batch_size"]
        )
        self.eval_every = check_int("eval_every", self.eval_every, 1, LIMITS["epochs"])
        check_choice("schedule", self.schedule, SCHEDULES)
        self.warmup_epochs = plain(self.warmup_epochs)
        check_float("warmup_epochs", self.warmup_epochs, 0.0, float(self.epochs))
        if self.early_stopping is not None:
            try:
                self.early_stopping = check_int(
                    "early_stopping", self.early_stopping, 1, LIMITS["epochs"]
                )
            except ValueError:
                raise ValueError(
                    f"Invalid early_stopping value: {self.early_stopping!r} "
                    "(a patience in epochs >= 1, or None)"
                ) from None
        self.label_smoothing = plain(self.label_smoothing)
        check_float("label_smoothing", self.label_smoothing, 0.0, 1.0, hi_open=True)
        check_bool("deterministic", self.deterministic)
        check_choice("amp", self.amp, AMP, none_ok=True)
        check_bool("eval_train", self.eval_train)


def _check_option(method: str, key: str, value: Any) -> None:
    """Method options are plain scalars; a NaN or an infinity is never meant."""
    if value is None or isinstance(value, (bool, str)):
        return
    if _is_number(value):
        if not math.isfinite(float(value)):
            raise ValueError(
                f"Invalid {key} value: {value!r} for method {method!r} (must be a finite number)"
            )
        return
    raise ValueError(
        f"Invalid {key} value: {value!r} for method {method!r} (a number, a boolean or a string)"
    )


@dataclass
class MethodSpec:
    """One column of the comparison: a registered method with its settings.

    ``lr``, ``momentum`` and ``weight_decay`` default to those of the base
    optimizer (:data:`BASE_DEFAULTS`).
    """

    method: str
    label: str = ""
    base: str = ""
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from .registry import method_info

        info = method_info(self.method)
        if not self.base:
            self.base = info.base or "sgd"
        check_choice("base", self.base, tuple(BASE_DEFAULTS))
        if not isinstance(self.options, dict):
            raise ValueError(f"Invalid options value: {self.options!r} (a dict)")
        self.options = plain(self.options)
        self.lr, self.momentum, self.weight_decay = plain(
            (self.lr, self.momentum, self.weight_decay)
        )
        unknown = sorted(set(self.options) - set(info.defaults))
        if unknown:
            raise ValueError(
                f"Invalid option for method {self.method!r}: {', '.join(map(str, unknown))} "
                f"(it takes {', '.join(sorted(info.defaults)) or 'no options'})"
            )
        for key, value in self.options.items():
            _check_option(self.method, key, value)
        rho = self.options.get("rho")
        if rho is not None and not isinstance(rho, str):  # a string ("auto") is the builder's
            check_float("rho", rho, 0.0)
        defaults = BASE_DEFAULTS[self.base]
        for name in ("lr", "momentum", "weight_decay"):
            if getattr(self, name) is None:
                setattr(self, name, defaults[name])
        self.train_spec()  # validates lr / momentum / weight decay
        if not self.label:
            self.label = self.method
        check_label(self.label)

    def train_spec(self, **changes: Any) -> TrainSpec:
        return TrainSpec(
            base=self.base,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            **changes,
        )

    def to_dict(self) -> dict[str, Any]:
        from .registry import method_info

        d = asdict(self)
        # Record the method's defaults too, so a finished run is reused only if
        # every option it trained with (not just those given) is unchanged.
        d["options"] = {**method_info(self.method).defaults, **self.options}
        return d


@dataclass
class StudyConfig:
    """Everything that defines a study (and so the folder it resumes from).

    The problem is a built-in one (``dataset`` and ``model`` by name), or the
    user's: ``user_data`` (a :class:`~samkit.experiments.problem.UserData`)
    and/or ``model_factory`` (a callable returning a fresh ``nn.Module``,
    called with ``model_kwargs`` once per run after seeding); ``dataset`` and
    ``model`` then hold their names. ``task`` is ``"classification"`` or
    ``"regression"`` (``None``: classification for the built-in data, else
    inferred from the targets' dtype); ``loss`` and ``metrics`` override the
    task's defaults. ``baseline`` is the label the report's paired verdicts
    compare against (default ``sgd`` if present, else the first method).
    ``device`` and ``num_workers`` change where and how fast, not what, so
    they are not part of a run's identity.
    """

    methods: list[MethodSpec]
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    dataset: str = "mnist1d"
    model: str = "cnn"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    noise: float = 0.0
    val_fraction: float = DEFAULT_VAL_FRACTION
    train_size: int | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    sharpness: bool = True
    sharpness_samples: int = 1000  # training samples the sharpness measures look at
    sharpness_cheap: bool = False  # fewer probes / iterations (for --quick)
    interpolation_points: int = 25
    skipped: list[str] = field(default_factory=list)  # methods left out (cannot run on this model)
    task: str | None = None
    loss: Callable[..., Any] | None = None
    metrics: dict[str, Callable[..., Any]] | None = None
    user_data: Any = None
    model_factory: Callable[..., Any] | None = None
    baseline: str | None = None
    device: str = "auto"
    num_workers: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.methods, list) or not self.methods:
            raise ValueError("Invalid methods value: [] (give at least one method)")
        if len(self.methods) > LIMITS["methods"]:
            raise ValueError(f"Invalid methods value: {len(self.methods)} methods (at most 1000)")
        labels = [m.label for m in self.methods]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"Invalid methods value: duplicate labels {', '.join(dup)}")
        check_run_files(labels)
        if (
            not isinstance(self.seeds, list)
            or not self.seeds
            or len(self.seeds) > LIMITS["seeds"]
            or any(not _is_int(s) or not 0 <= s <= LIMITS["seed"] for s in self.seeds)
        ):
            raise ValueError(
                f"Invalid seeds value: {self.seeds!r} (a non-empty list of at most "
                f"{LIMITS['seeds']} ints in [0, {LIMITS['seed']}])"
            )
        self.seeds = [int(s) for s in self.seeds]
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"Invalid seeds value: {self.seeds!r} (duplicates)")
        if not isinstance(self.train, TrainConfig):
            raise ValueError(f"Invalid train value: {self.train!r} (a TrainConfig)")
        for name in ("dataset", "model"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v:
                raise ValueError(f"Invalid {name} value: {v!r} (a non-empty string)")
        if self.user_data is None:
            from .datasets import list_datasets

            check_choice("dataset", self.dataset, tuple(list_datasets()))
        if self.model_factory is None:
            from .models import list_models

            check_choice("model", self.model, tuple(list_models()))
        elif not callable(self.model_factory):
            raise ValueError(f"Invalid model value: {self.model_factory!r} (a callable)")
        else:
            from torch import nn

            if isinstance(self.model_factory, nn.Module):
                # callable (its forward), it passed for a factory and failed at the first
                # call with forward()'s message; each run needs fresh initial weights
                raise ValueError(
                    f"Invalid model value: a {type(self.model_factory).__name__} instance; pass "
                    "a function that returns a fresh nn.Module (every method and seed starts "
                    "from its own initial weights), e.g. model=lambda: MyNet() or --model "
                    "mymodule:make_model"
                )
        if not isinstance(self.model_kwargs, dict) or any(
            not isinstance(k, str) for k in self.model_kwargs
        ):
            raise ValueError(f"Invalid model_kwargs value: {self.model_kwargs!r} (a table)")
        self.model_kwargs = plain(self.model_kwargs)
        self.noise = check_float("noise", self.noise, 0.0, 1.0)
        if self.noise and self.user_data is not None:
            raise ValueError(
                f"Invalid noise value: {self.noise!r} (label noise applies to the built-in "
                "datasets only; corrupt your own labels yourself)"
            )
        self.val_fraction = check_float("val_fraction", self.val_fraction, 0.0, 1.0, hi_open=True)
        if (
            self.user_data is not None
            and self.user_data.val is not None
            and self.val_fraction != DEFAULT_VAL_FRACTION
        ):
            raise ValueError(
                f"Invalid val_fraction value: {self.val_fraction!r} (your data has its own "
                "validation split, which is used as it is; val_fraction carves one out of the "
                "training data only when there is none)"
            )
        self.train_size = check_int(
            "train_size", self.train_size, 1, LIMITS["train_size"], none_ok=True
        )
        if (
            self.train.early_stopping is not None
            and self.val_fraction == 0
            and not (self.user_data is not None and self.user_data.val is not None)
        ):
            raise ValueError(
                "Invalid early_stopping value: early stopping needs a validation split "
                "(val_fraction > 0)"
            )
        check_bool("sharpness", self.sharpness)
        self.sharpness_samples = check_int(
            "sharpness_samples", self.sharpness_samples, 1, LIMITS["sharpness_samples"]
        )
        check_bool("sharpness_cheap", self.sharpness_cheap)
        self.interpolation_points = check_int(
            "interpolation_points", self.interpolation_points, 2, 1001
        )
        check_choice("task", self.task, TASKS, none_ok=True)
        if self.user_data is None and self.task == "regression":
            raise ValueError(
                f"Invalid task value: 'regression' (the built-in dataset {self.dataset!r} is "
                "a classification problem)"
            )
        if self.loss is not None and not callable(self.loss):
            raise ValueError(f"Invalid loss value: {self.loss!r} (a callable)")
        if self.metrics is not None:
            if (
                not isinstance(self.metrics, dict)
                or not self.metrics
                or not all(isinstance(k, str) and _LABEL.fullmatch(k) for k in self.metrics)
                or not all(callable(f) for f in self.metrics.values())
            ):
                raise ValueError(
                    f"Invalid metrics value: {self.metrics!r} (a non-empty dict of name -> callable)"
                )
        if self.baseline is not None and self.baseline not in labels:
            raise ValueError(
                f"Invalid baseline value: {self.baseline!r} (one of the labels: {', '.join(labels)})"
            )
        check_device(self.device)
        self.num_workers = check_int("num_workers", self.num_workers, 0, LIMITS["num_workers"])

    @property
    def baseline_label(self) -> str:
        labels = [m.label for m in self.methods]
        if self.baseline is not None:
            return self.baseline
        return "sgd" if "sgd" in labels else labels[0]

    def problem(self) -> Any:
        """The :class:`~samkit.experiments.problem.Problem` this study trains on."""
        from .problem import Problem

        return Problem.from_config(self)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able settings; the user's callables and data by name and fingerprint."""
        d: dict[str, Any] = {
            "methods": [m.to_dict() for m in self.methods],
            "seeds": list(self.seeds),
            "dataset": self.dataset,
            "model": self.model,
            "model_kwargs": dict(self.model_kwargs),
            "noise": self.noise,
            "val_fraction": self.val_fraction,
            "train_size": self.train_size,
            "train": asdict(self.train),
            "sharpness": self.sharpness,
            "sharpness_samples": self.sharpness_samples,
            "sharpness_cheap": self.sharpness_cheap,
            "interpolation_points": self.interpolation_points,
            "skipped": list(self.skipped),
        }
        # Keys that only the user's own problems have: absent otherwise, so the
        # built-in studies keep the folder names and run identities they had.
        if self.task is not None:
            d["task"] = self.task
        if self.loss is not None:
            d["loss"] = _callable_name(self.loss)
        if self.metrics is not None:
            d["metrics"] = {k: _callable_name(f) for k, f in self.metrics.items()}
        if self.user_data is not None:
            d["data"] = self.user_data.fingerprint()
        if self.model_factory is not None:
            d["model_factory"] = {
                **_callable_fingerprint(self.model_factory),
                "built": self._built_fingerprint,
            }
        return d

    @functools.cached_property
    def _built_fingerprint(self) -> str | None:
        """What the factory builds, once per config: its parameter names and shapes and the
        source of its own (non-torch) module classes. The factory's own source was all the
        run identity held, so a class edited in its file (a hidden layer 4 wide, then 256)
        kept the old runs beside new ones, compared as one model."""
        return _model_fingerprint(self.model_factory, self.model_kwargs)


def _callable_name(fn: Any) -> str:
    mod = getattr(fn, "__module__", None) or type(fn).__module__
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{mod}:{name}"


def _model_fingerprint(factory: Any, kwargs: dict[str, Any]) -> str | None:
    import torch

    try:
        model = factory(**kwargs)
        shapes = [[k, list(v.shape)] for k, v in model.state_dict().items() if torch.is_tensor(v)]
        classes = {type(m) for m in model.modules()}
    except Exception:  # noqa: BLE001 - the study's checks name what is wrong with it
        return None
    from .userdata import code_source

    sources = sorted(
        {
            code_source(cls)
            for cls in classes
            if cls.__module__.split(".")[0] not in ("torch", "samkit")
        }
    )
    text = repr([shapes, sources])
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _callable_fingerprint(fn: Any) -> dict[str, Any]:
    """Name and a hash of the source: edit the function and its finished runs are retrained."""
    import inspect

    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        source = ""
    return {
        "name": _callable_name(fn),
        "source_sha1": hashlib.sha1(source.encode()).hexdigest()[:12] if source else None,
    }
