"""Every setting of a study, its type and its validation, in one place.

Types:

* :class:`TrainSpec`: the hyper-parameters every method shares (base
  optimizer, learning rate, momentum, weight decay, the run's length);
* :class:`TrainConfig`: how long and how to train (epochs, batch size,
  schedule, early stopping, mixed precision);
* :class:`MethodSpec`: one column of the comparison (a registered method, its
  base optimizer, hyper-parameters, options and label);
* :class:`StudyConfig`: the whole study (methods x seeds on one problem: a
  built-in dataset and model, or the user's own).

Sources, later ones winning: :data:`DEFAULTS` (or the ``--quick`` preset)
< a TOML file (:func:`load_toml`) < command-line flags, merged by
:func:`merge` into a flat dict that :func:`build_study` turns into a
:class:`StudyConfig`. The keys::

    dataset, data, model, model_kwargs, task, noise, val_fraction, train_size,
    seeds (a count or a list), epochs, batch_size, schedule, warmup_epochs,
    early_stopping, label_smoothing, sharpness, sharpness_samples, sharpness_cheap,
    optimizers (names or "name:key=value,..." specs), rho (list, SAM's scale),
    lr, momentum, weight_decay (applied to every method that does not set its own),
    methods (a list of tables: method, label, base, lr, momentum, weight_decay, <options>),
    device, num_workers, amp, baseline, out

Every check raises ``ValueError("Invalid <setting> value: <value> (<why>)")``
before anything is trained; the bounds (:data:`LIMITS`) keep a typo such as
``seeds = 1000000000`` from turning into an hour of work or a MemoryError.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, from PyPI (samkit[experiments])
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ModuleNotFoundError:  # only --config needs it: say so there
        tomllib = None  # type: ignore[assignment]

__all__ = [
    "BASE_DEFAULTS",
    "LIMITS",
    "TrainSpec",
    "TrainConfig",
    "MethodSpec",
    "StudyConfig",
    "DEFAULTS",
    "QUICK",
    "KEYS",
    "CORE_METHODS",
    "load_toml",
    "merge",
    "parse_method",
    "build_study",
    "default_out_dir",
    "check_int",
    "check_float",
    "check_bool",
    "plain",
]

from .types import (  # the shared types and checks (a leaf module), re-exported
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
    val_fraction: float = 0.1
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
            d["model_factory"] = _callable_fingerprint(self.model_factory)
        return d


def _callable_name(fn: Any) -> str:
    mod = getattr(fn, "__module__", None) or type(fn).__module__
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{mod}:{name}"


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


# --------------------------------------------------- presets, TOML, flags
CORE_METHODS = ["sgd", "adam", "sam", "asam"]

DEFAULTS: dict[str, Any] = {
    "dataset": "mnist1d",
    "data": None,  # "module:function" or "path.npz": the user's data
    "model": "cnn",  # a built-in name or "module:function"
    "model_kwargs": {},
    "task": None,
    "noise": 0.0,
    "val_fraction": 0.1,
    "train_size": None,
    "seeds": 3,
    "epochs": 40,
    "batch_size": 100,
    "schedule": "cosine",
    "warmup_epochs": 0.0,
    "early_stopping": None,
    "label_smoothing": 0.0,
    "sharpness": True,
    "sharpness_samples": 500,
    "sharpness_cheap": False,
    "optimizers": None,  # None: the core methods and every registered variant in the default study
    "rho": None,
    "lr": None,
    "momentum": None,
    "weight_decay": None,
    "methods": [],
    "device": "auto",
    "num_workers": 0,
    "amp": None,
    "baseline": None,
    "out": None,
    # how the runs are executed (not what they compute; not in config.json):
    "jobs": 1,  # runs at once: a number or "auto" (one per GPU, else per physical core)
    "threads": None,  # torch threads per run (None: not pinned); recorded in each run's config
    "ray": None,  # a Ray cluster's address: the runs as Ray tasks
}

#: the settings that choose the executor, not the study (see :func:`execution`)
EXECUTION_KEYS = ("jobs", "threads", "ray")


def execution(s: dict[str, Any]) -> dict[str, Any]:
    """``jobs``, ``threads`` and ``ray`` of merged settings, checked (ValueError naming
    the setting): the keyword arguments of :func:`~samkit.experiments.engine.make_executor`."""
    from .engine import check_jobs
    from .engine.executors import check_threads

    ray = s.get("ray")
    if ray is not None and (not isinstance(ray, str) or not ray.strip()):
        raise ValueError(f"Invalid ray value: {ray!r} (a cluster address, host:port or 'auto')")
    return {
        "jobs": check_jobs(1 if s.get("jobs") is None else s["jobs"]),
        "threads": check_threads(s.get("threads")),
        "ray": ray,
    }


#: ``--quick``: two seeds, fewer epochs, the core methods, cheap sharpness.
QUICK: dict[str, Any] = {
    "seeds": 2,
    "epochs": 30,
    "optimizers": CORE_METHODS,
    "sharpness_samples": 250,
    "sharpness_cheap": True,
}

KEYS = frozenset(DEFAULTS)
_SPEC_FIELDS = ("label", "base", "lr", "momentum", "weight_decay")


def load_toml(path: str | os.PathLike[str], keys: frozenset[str] = KEYS) -> dict[str, Any]:
    """Read a settings file; ValueError naming the file on any problem.

    ``keys``: the settings the file may hold (default: the comparative
    study's; ``samkit rl`` and ``samkit gan`` pass their own)."""
    if tomllib is None:
        from .._extras import install

        raise ValueError(
            f"Invalid config value: reading {str(path)!r} needs tomli on Python 3.10 "
            f"({install('tomli')})"
        )
    p = Path(path)
    try:
        text = p.read_bytes()
    except OSError as exc:
        raise ValueError(
            f"Invalid config value: cannot read {str(path)!r} ({exc.strerror or exc})"
        ) from exc
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(
            f"Invalid config value: {str(path)!r} is not valid TOML ({reason})"
        ) from exc
    unknown = sorted(set(data) - keys)
    if unknown:
        raise ValueError(
            f"Invalid config value: unknown setting(s) {', '.join(unknown)} in {str(path)!r}"
        )
    return data


def check_one_data_source(*sources: dict[str, Any] | None) -> None:
    """``dataset`` (a built-in data set) and ``data`` (your own) are two answers to
    one question: given together, ``dataset`` was silently ignored."""
    dataset = next((s["dataset"] for s in sources if s and s.get("dataset") is not None), None)
    if dataset is not None and any(s and s.get("data") is not None for s in sources):
        raise ValueError(
            f"Invalid dataset value: {dataset!r} (a built-in data set; with your own data "
            "(--data, data= or train=) leave dataset out)"
        )


def merge(
    *sources: dict[str, Any] | None, defaults: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Later sources win; ``None`` values do not override. ``defaults``: the
    starting point and the known keys (default: the comparative study's)."""
    defaults = DEFAULTS if defaults is None else defaults
    out = dict(defaults)
    for src in sources:
        for k, v in (src or {}).items():
            if k not in defaults:
                raise ValueError(f"Invalid setting: {k!r}")
            if v is not None:
                out[k] = v
    return out


_FLOAT_OPTIONS = ("lr", "momentum", "weight_decay", "rho", "eta")


def _value(key: str, text: str) -> Any:
    """A value of a ``name:key=value`` spec: int, float, boolean, none or string."""
    if key in ("label", "base"):
        return text
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        if key not in _FLOAT_OPTIONS and re.fullmatch(r"[+-]?\d+", text):
            return int(text)
        return float(text)
    except ValueError:
        return text


def parse_method(token: str | dict[str, Any]) -> dict[str, Any]:
    """``"sam:rho=0.1,base=adam"`` (or a TOML table) -> a dict with ``method`` and settings."""
    if isinstance(token, dict):
        d = dict(token)
        if not isinstance(d.get("method"), str):
            raise ValueError(f"Invalid methods value: {token!r} (each table needs a 'method' key)")
        d["method"] = d["method"].strip().lower()
        return d
    if not isinstance(token, str) or not token.strip():
        raise ValueError(f"Invalid optimizer value: {token!r}")
    name, _, rest = token.strip().partition(":")
    d: dict[str, Any] = {"method": name.strip().lower()}
    if rest:
        for item in rest.split(","):
            key, eq, val = item.partition("=")
            key = key.strip()
            if not eq or not key:
                raise ValueError(
                    f"Invalid optimizer value: {token!r} (expected name:key=value,...)"
                )
            if key in d:
                raise ValueError(f"Invalid optimizer value: {token!r} ({key!r} given twice)")
            d[key] = _value(key, val.strip())
    return d


def _method_tokens(value: Any) -> list[str | dict[str, Any]]:
    from .registry import list_methods, method_info

    if value is None:
        return [m for m in list_methods() if method_info(m).in_default_study]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, (str, dict)) for v in value):
        raise ValueError(
            f"Invalid optimizers value: {value!r} (a list of names or 'name:key=value,...' specs)"
        )
    if value == ["all"]:
        return list(list_methods())
    tokens: list[str | dict[str, Any]] = []
    for v in value:
        if not isinstance(v, str):
            tokens.append(v)
            continue
        # "sgd,sam,sam:rho=auto,base=adam": a comma starts a new method unless what
        # follows is a key=value of the spec before it (options always have an "=")
        first = True
        for item in (s.strip() for s in v.split(",")):
            if not item:
                continue
            spec_before = not first and isinstance(tokens[-1], str) and ":" in tokens[-1]
            if spec_before and "=" in item.partition(":")[0]:
                tokens[-1] = f"{tokens[-1]},{item}"
            else:
                tokens.append(item)
            first = False
    if not tokens:
        raise ValueError(f"Invalid optimizers value: {value!r} (no method named)")
    return tokens


def _rho_list(value: Any) -> list[float] | None:
    if value is None:
        return None
    rhos = value if isinstance(value, list) else [value]
    if not rhos:
        raise ValueError("Invalid rho value: [] (give at least one value, or leave rho out)")
    if len(rhos) > LIMITS["rho"]:
        raise ValueError(f"Invalid rho value: {len(rhos)} values (at most {LIMITS['rho']})")
    return [check_float("rho", r, 0.0) for r in rhos]


def unused_rho(rhos: list[float], methods: list[str]) -> str:
    """The message for a rho list that no method takes (it was silently ignored)."""
    return (
        f"Invalid rho value: {', '.join(f'{r:g}' for r in rhos)} (no method here takes it: "
        f"{', '.join(methods)}; give a SAM-type method that does not set its own rho, or "
        "leave rho out)"
    )


def _method_specs(s: dict[str, Any]) -> list[MethodSpec]:
    from .registry import method_info

    rhos = _rho_list(s["rho"])
    if not isinstance(s["methods"] or [], list):
        raise ValueError(f"Invalid methods value: {s['methods']!r} (a list of tables)")
    entries = [parse_method(t) for t in _method_tokens(s["optimizers"])]
    entries += [parse_method(t) for t in (s["methods"] or [])]
    specs: list[MethodSpec] = []
    rho_used = False
    for e in entries:
        e = dict(e)
        name = e.pop("method")
        info = method_info(name)  # ValueError on unknown names
        fields = {k: e.pop(k) for k in _SPEC_FIELDS if k in e}
        for k in ("lr", "momentum", "weight_decay"):
            if k not in fields and s[k] is not None:
                fields[k] = s[k]
        options = e
        if info.uses_rho and "rho" not in options and rhos:
            rho_used = True
            for r in rhos:
                label = fields.get("label") or name
                if len(rhos) > 1:
                    label = f"{label}(rho={info.rho_scale * r:g})"
                specs.append(
                    MethodSpec(
                        method=name,
                        options={**options, "rho": info.rho_scale * r},
                        **{**fields, "label": label},
                    )
                )
        else:
            rho = options.get("rho")
            if isinstance(rho, str) and "label" not in fields:
                # a self-tuning rho stands beside the grid: "sam(rho=auto)", not a second "sam"
                fields["label"] = f"{name}(rho={rho.replace(':', '-')})"
            specs.append(MethodSpec(method=name, options=options, **fields))
    if rhos and not rho_used:
        raise ValueError(unused_rho(rhos, sorted({m.method for m in specs})))
    return specs


def _seeds(value: Any) -> list[int]:
    if _is_int(value):
        return list(range(check_int("seeds", value, 1, LIMITS["seeds"])))
    if isinstance(value, list):
        return value  # StudyConfig checks the entries
    raise ValueError(f"Invalid seeds value: {value!r} (a count or a list of ints)")


def build_study(s: dict[str, Any], **user: Any) -> StudyConfig:
    """A :class:`StudyConfig` from merged settings (no file is read, nothing is built).

    ``user`` holds what a settings file cannot: ``user_data``,
    ``model_factory``, ``loss``, ``metrics`` (from the Python API or from the
    CLI's ``module:function`` loaders).
    """
    s = plain(s)
    if s.get("out") is not None and (not isinstance(s["out"], str) or not s["out"].strip()):
        raise ValueError(f"Invalid out value: {s['out']!r} (a folder path)")
    es = s["early_stopping"]
    es = None if es is None or (es == 0 and not isinstance(es, bool)) else es
    train = TrainConfig(
        epochs=s["epochs"],
        batch_size=s["batch_size"],
        schedule=s["schedule"],
        warmup_epochs=s["warmup_epochs"],
        early_stopping=es,
        label_smoothing=s["label_smoothing"],
        amp=s["amp"],
    )
    model = s["model"]
    if user.get("model_factory") is not None and not isinstance(model, str):
        model = "user-model"
    return StudyConfig(
        methods=_method_specs(s),
        seeds=_seeds(s["seeds"]),
        dataset=s["dataset"],
        model=model,
        model_kwargs=s["model_kwargs"],
        noise=s["noise"],
        val_fraction=s["val_fraction"],
        train_size=s["train_size"],
        train=train,
        sharpness=check_bool("sharpness", s["sharpness"]),
        sharpness_samples=s["sharpness_samples"],
        sharpness_cheap=check_bool("sharpness_cheap", s["sharpness_cheap"]),
        task=s["task"],
        baseline=s["baseline"],
        device=s["device"],
        num_workers=s["num_workers"],
        **user,
    )


def default_out_dir(config: StudyConfig, prefix: str = "compare") -> Path:
    """``samkit-runs/<prefix>-<dataset>-<model>-<hash>``: the same settings give
    the same folder, so rerunning a command resumes it."""
    digest = hashlib.sha1(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
    noise = f"-noise{config.noise:g}" if config.noise else ""
    safe = lambda t: re.sub(r"[^A-Za-z0-9_.-]", "_", t)[:40]  # noqa: E731
    return (
        Path("samkit-runs")
        / f"{prefix}-{safe(config.dataset)}-{safe(config.model)}{noise}-{digest}"
    )
