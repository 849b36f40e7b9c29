"""Every setting of a study: presets, TOML files and flags, and their validation.

The types (re-exported here, so import them from this module):

* :class:`TrainSpec`: the hyper-parameters every method shares (base
  optimizer, learning rate, momentum, weight decay, the run's length), and
  the checks, in the leaf module :mod:`~samkit.experiments.types`;
* :class:`TrainConfig`, :class:`MethodSpec` and :class:`StudyConfig` (how to
  train, one column of the comparison, the whole study), in
  :mod:`~samkit.experiments.configs`.

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
import os
import re
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

from .configs import MethodSpec, StudyConfig, TrainConfig  # the types, re-exported
from .types import (  # noqa: F401 - the shared types and checks (a leaf module), re-exported
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
    # runs at once: a number or "auto" (one per GPU, else per physical core); None: 1,
    # or as many as the Ray cluster holds with ``ray``
    "jobs": None,
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
    jobs = s.get("jobs")
    if jobs is None:  # not given: one at a time here, the whole cluster on Ray
        jobs = 1 if ray is None else "auto"
    return {
        "jobs": check_jobs(jobs),
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
    for key in ("model", "data"):
        if isinstance(data.get(key), str):
            data[key] = _beside(data[key], p.parent)
    return data


def _beside(spec: str, folder: Path) -> str:
    """A relative file in a config's ``model``/``data`` (``mymod.py:make``, ``arrays.npz``)
    as the file beside the config when there is one there: it was read from the current
    folder only, so a config run from elsewhere took another folder's file of that name,
    silently. One that is only in the current folder is kept (as before)."""
    module, colon, function = spec.rpartition(":") if ":" in spec else (spec, "", "")
    if colon and not (module.endswith(".py") or "/" in module or os.sep in module):
        return spec  # an importable module name
    if not module or Path(module).is_absolute():
        return spec
    beside = folder / module
    if not beside.is_file():
        return spec
    return f"{beside}{colon}{function}"


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
    # [[methods]] tables without an optimizers list are the methods: the default list is
    # not added to them (its unfit methods, SAM-ON on a model without normalisation, failed)
    tables_only = s["optimizers"] is None and bool(s["methods"])
    entries = [] if tables_only else [parse_method(t) for t in _method_tokens(s["optimizers"])]
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
