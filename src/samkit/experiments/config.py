"""Study settings from presets, a TOML file and command-line flags.

Settings are a flat dict; later sources override earlier ones:
defaults (or the ``--quick`` preset) < TOML file < flags. The keys::

    dataset, model, model_kwargs, noise, val_fraction, train_size,
    seeds (a count or a list), epochs, batch_size, schedule, warmup_epochs,
    early_stopping, label_smoothing, sharpness, sharpness_samples, sharpness_cheap,
    optimizers (names or "name:key=value,..." specs), rho (list, SAM's scale),
    lr, momentum, weight_decay (applied to every method that does not set its own),
    methods (a list of tables: method, label, base, lr, momentum, weight_decay, <options>),
    out

A method spec ``"sam:base=adam,lr=0.01,rho=0.1,label=sam-adam"`` sets a
method's base optimizer, hyper-parameters and options. ``rho`` is a list on
SAM's scale: every sharpness-aware method that does not set its own rho runs
once per value (ASAM at 10x, see ``register_method(rho_scale=...)``).

Any error is a ``ValueError`` whose message names the setting and the value.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, from PyPI
    import tomli as tomllib  # type: ignore[no-redef]

from .methods import list_methods, method_info
from .study import MethodSpec, StudyConfig
from .trainer import TrainConfig

__all__ = [
    "DEFAULTS",
    "QUICK",
    "KEYS",
    "load_toml",
    "merge",
    "build_study",
    "parse_method",
    "default_out_dir",
]

CORE_METHODS = ["sgd", "adam", "sam", "asam"]
#: Left out of the default study to keep it near 10 minutes on a laptop CPU
#: (each costs 4-8x SGD per epoch here); ``--optimizers all`` includes them.
SLOW_METHODS = ("msam", "mesa")

DEFAULTS: dict[str, Any] = {
    "dataset": "mnist1d",
    "model": "cnn",
    "model_kwargs": {},
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
    "optimizers": None,  # None: the core methods and every registered variant
    "rho": None,
    "lr": None,
    "momentum": None,
    "weight_decay": None,
    "methods": [],
    "out": None,
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


def load_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a settings file; ValueError naming the file on any problem."""
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
        raise ValueError(f"Invalid config value: {str(path)!r} is not valid TOML ({exc})") from exc
    unknown = sorted(set(data) - KEYS)
    if unknown:
        raise ValueError(
            f"Invalid config value: unknown setting(s) {', '.join(unknown)} in {str(path)!r}"
        )
    return data


def merge(*sources: dict[str, Any] | None) -> dict[str, Any]:
    """Later sources win; ``None`` values do not override."""
    out = dict(DEFAULTS)
    for src in sources:
        for k, v in (src or {}).items():
            if k not in KEYS:
                raise ValueError(f"Invalid setting: {k!r}")
            if v is not None:
                out[k] = v
    return out


def _number(key: str, text: str) -> Any:
    if key in ("label", "base"):
        return text
    try:
        return (
            int(text)
            if key not in ("lr", "momentum", "weight_decay", "rho", "eta") and text.isdigit()
            else float(text)
        )
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return {"true": True, "false": False}.get(text.lower(), text)


def parse_method(token: str | dict[str, Any]) -> dict[str, Any]:
    """``"sam:rho=0.1,base=adam"`` (or a TOML table) -> a dict with ``method`` and settings."""
    if isinstance(token, dict):
        d = dict(token)
        if "method" not in d:
            raise ValueError(f"Invalid methods value: {token!r} (each table needs a 'method' key)")
        return d
    if not isinstance(token, str) or not token.strip():
        raise ValueError(f"Invalid optimizer value: {token!r}")
    name, _, rest = token.strip().partition(":")
    d: dict[str, Any] = {"method": name.strip().lower()}
    if rest:
        for item in rest.split(","):
            key, eq, val = item.partition("=")
            if not eq or not key.strip():
                raise ValueError(
                    f"Invalid optimizer value: {token!r} (expected name:key=value,...)"
                )
            d[key.strip()] = _number(key.strip(), val.strip())
    return d


def _method_tokens(value: Any) -> list[str | dict[str, Any]]:
    if value is None:
        rest = [m for m in list_methods() if m not in CORE_METHODS and m not in SLOW_METHODS]
        return [*CORE_METHODS, *rest]
    if isinstance(value, str):
        value = [value]
    if value == ["all"]:
        return [*CORE_METHODS, *[m for m in list_methods() if m not in CORE_METHODS]]
    tokens: list[str | dict[str, Any]] = []
    for v in value:
        if isinstance(v, str) and ":" not in v:
            tokens.extend(t for t in (s.strip() for s in v.split(",")) if t)
        else:
            tokens.append(v)
    return tokens


def _fmt_rho(r: float) -> str:
    return f"{r:g}"


def _method_specs(s: dict[str, Any]) -> list[MethodSpec]:
    rhos = s["rho"]
    if rhos is not None:
        if not isinstance(rhos, list):
            rhos = [rhos]
        for r in rhos:
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < float("inf"):
                raise ValueError(f"Invalid rho value: {r!r} (must be a finite number >= 0)")
    entries = [parse_method(t) for t in _method_tokens(s["optimizers"])]
    entries += [parse_method(t) for t in (s["methods"] or [])]
    specs: list[MethodSpec] = []
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
            for r in rhos:
                label = fields.get("label") or name
                if len(rhos) > 1:
                    label = f"{label}(rho={_fmt_rho(info.rho_scale * r)})"
                specs.append(
                    MethodSpec(
                        method=name,
                        options={**options, "rho": info.rho_scale * r},
                        **{**fields, "label": label},
                    )
                )
        else:
            specs.append(MethodSpec(method=name, options=options, **fields))
    return specs


def _int(key: str, v: Any, lo: int = 1, none_ok: bool = False) -> int | None:
    if v is None and none_ok:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"Invalid {key} value: {v!r} (must be an int >= {lo})")
    return v


def build_study(s: dict[str, Any]) -> StudyConfig:
    """A :class:`StudyConfig` from merged settings."""
    from .datasets import list_datasets
    from .models import list_models

    if s["dataset"] not in list_datasets():
        raise ValueError(
            f"Invalid dataset value: {s['dataset']!r} (choose from {', '.join(list_datasets())})"
        )
    if s["model"] not in list_models():
        raise ValueError(
            f"Invalid model value: {s['model']!r} (choose from {', '.join(list_models())})"
        )
    seeds = s["seeds"]
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = list(range(_int("seeds", seeds)))
    elif not isinstance(seeds, list):
        raise ValueError(f"Invalid seeds value: {seeds!r} (a count or a list of ints)")
    noise = s["noise"]
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise <= 1:
        raise ValueError(f"Invalid noise value: {noise!r} (must be in [0, 1])")
    vf = s["val_fraction"]
    if isinstance(vf, bool) or not isinstance(vf, (int, float)) or not 0 <= vf < 1:
        raise ValueError(f"Invalid val_fraction value: {vf!r} (must be in [0, 1))")
    es = s["early_stopping"]
    es = None if es in (None, 0) else _int("early_stopping", es)
    if es is not None and vf == 0:
        raise ValueError(
            "Invalid early_stopping value: needs a validation split (val_fraction > 0)"
        )
    if not isinstance(s["model_kwargs"], dict):
        raise ValueError(f"Invalid model_kwargs value: {s['model_kwargs']!r} (a table)")
    train = TrainConfig(
        epochs=_int("epochs", s["epochs"]),
        batch_size=_int("batch_size", s["batch_size"]),
        schedule=s["schedule"],
        warmup_epochs=s["warmup_epochs"],
        early_stopping=es,
        label_smoothing=s["label_smoothing"],
    )
    cfg = StudyConfig(
        methods=_method_specs(s),
        seeds=seeds,
        dataset=s["dataset"],
        model=s["model"],
        model_kwargs=dict(s["model_kwargs"]),
        noise=float(noise),
        val_fraction=float(vf),
        train_size=_int("train_size", s["train_size"], none_ok=True),
        train=train,
        sharpness=bool(s["sharpness"]),
        sharpness_samples=_int("sharpness_samples", s["sharpness_samples"]),
        sharpness_cheap=bool(s["sharpness_cheap"]),
    )
    # fail now, not after an hour of training, if the model does not take the kwargs
    from .models import build_model

    model = build_model(cfg.model, **{"in_len": 40, "num_classes": 10, **cfg.model_kwargs})
    if (s["optimizers"] is None or s["optimizers"] in (["all"], "all")) and not s["methods"]:
        # "all methods": leave out those that cannot run on this model (SAM-ON
        # needs normalisation layers), rather than fail the whole study
        kept = [m for m in cfg.methods if _buildable(m, model)]
        cfg.skipped = [m.label for m in cfg.methods if m not in kept]
        cfg.methods = kept
    return cfg


def _buildable(spec: MethodSpec, model: Any) -> bool:
    import copy

    from .methods import build_method

    try:
        build_method(spec.method, copy.deepcopy(model), spec.train_spec(), **spec.options)
    except ValueError:
        return False
    return True


def default_out_dir(config: StudyConfig, prefix: str = "compare") -> Path:
    """``samkit-runs/<prefix>-<dataset>-<model>-<hash>``: the same settings give
    the same folder, so rerunning a command resumes it."""
    digest = hashlib.sha1(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
    noise = f"-noise{config.noise:g}" if config.noise else ""
    return Path("samkit-runs") / f"{prefix}-{config.dataset}-{config.model}{noise}-{digest}"
