"""A grid of runs (condition x method x seed) in one run folder: what the RL and GAN studies share.

``samkit rl`` (environments x methods x seeds) and ``samkit gan`` (data sets x
methods x seeds) are built on the comparative study's machinery rather than on
a copy of it:

* settings: the checks of :mod:`~samkit.experiments.settings` (``check_int``,
  ``check_float``, ...), its TOML reader and its merge of defaults < preset <
  file < flags, with each study's own keys;
* methods: ``"name"`` or ``"name:key=value,..."`` specs parsed by
  :func:`~samkit.experiments.settings.parse_method` against a small table of
  :class:`MethodDef` (options and their defaults; the same class ``samkit
  compare``'s registry entries extend); a ``--rho`` list runs each
  sharpness-aware method once per value, as in ``samkit compare``; a renamed
  method's old name (:data:`RENAMED`) is read as the new one, with a FutureWarning;
* the run folder: the folder lock (:func:`~samkit.experiments.folder.study_folder`),
  atomic JSON (:func:`~samkit.experiments.study.write_json_atomic`), run names
  (:func:`~samkit.experiments.study.run_key`), and resume: a run whose result
  file holds the same settings (:func:`finished`) is not run again, nor one
  written under a method's old name; the running itself is in
  :mod:`~samkit.experiments.grid_run` (``run_study``, ``call_study``);
* the summary: means over seeds with the sample standard deviation, and the
  paired verdicts of :func:`~samkit.experiments.stats.paired_verdicts` (the
  difference to the baseline seed by seed, its standard error and ``|z| > 2``),
  one row head (:func:`summary_row`) and one verdict loop (:func:`paired_by_seed`);
* the report: :func:`~samkit.experiments.report.study_sections` and
  :func:`~samkit.experiments.report.write_page`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._checks import is_number
from .engine import finished, normalise
from .runfiles import check_run_files
from .settings import (
    LIMITS,
    check_device,
    check_float,
    check_label,
    parse_method,
    plain,
    unused_rho,
)
from .stats import paired_verdicts, stats
from .types import MethodDef

__all__ = [
    "MethodDef",
    "RENAMED",
    "current_name",
    "Variant",
    "variants",
    "seed_list",
    "finished",
    "normalise",
    "stats",
    "verdicts",
    "default_out",
    "check_names",
    "baseline_and_device",
    "check_device_works",
    "summary_row",
    "cost_ratio",
    "paired_by_seed",
    "StudyResult",
]


#: Method names renamed since 0.2 (old -> new). The old name is still accepted,
#: with a FutureWarning; its runs keep their label, and a run folder written under
#: the old name is reused (:func:`~samkit.experiments.grid_run.accept_renamed`).
RENAMED = {"everyk": "sam_every_k"}


def current_name(method: str, *, stacklevel: int = 3) -> str:
    """``method``'s name now (a FutureWarning naming the new one for a renamed method)."""
    new = RENAMED.get(method)
    if new is None:
        return method
    warnings.warn(
        f"method {method!r} is now called {new!r} (the old name still works, for now)",
        FutureWarning,
        stacklevel=stacklevel,
    )
    return new


@dataclass(frozen=True)
class Variant:
    """One column of a study: a method with its options (defaults filled in) and a label."""

    label: str
    method: str
    options: dict[str, Any]

    def __post_init__(self) -> None:
        if self.method in RENAMED:  # Variant(label, "everyk", ...) built by hand
            object.__setattr__(self, "method", current_name(self.method, stacklevel=4))

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "method": self.method, "options": dict(self.options)}


def _option(method: str, key: str, value: Any) -> Any:
    if not is_number(value):  # numbers are numbers (NumPy's too); a bool or a string is not
        raise ValueError(f"Invalid {key} value: {value!r} for method {method!r} (a number)")
    if not math.isfinite(float(value)):
        raise ValueError(
            f"Invalid {key} value: {value!r} for method {method!r} (must be a finite number)"
        )
    return plain(value)


def variants(
    tokens: Any, rhos: Any, registry: dict[str, MethodDef], *, what: str = "methods"
) -> list[Variant]:
    """The study's columns from method specs (names, ``"name:key=value,..."``, or tables).

    Each option must be one the method takes (its defaults fill the rest);
    ``rhos`` (a list, SAM's scale) runs each method with a ``rho`` option once
    per value, labelled ``name(rho=r)`` when there are several; a ``rhos`` list
    that no method takes is refused (it would be ignored). Labels must be
    unique. ValueError naming the setting on any problem.
    """
    if isinstance(tokens, str):
        tokens = [t for t in (s.strip() for s in tokens.split(",")) if t]
    if not isinstance(tokens, list) or not tokens:
        raise ValueError(f"Invalid {what} value: {tokens!r} (a non-empty list of method names)")
    if len(tokens) > LIMITS["methods"]:
        raise ValueError(
            f"Invalid {what} value: {len(tokens)} methods (at most {LIMITS['methods']})"
        )
    expanded: list[Any] = []
    for t in tokens:
        if isinstance(t, str) and ":" not in t:
            expanded.extend(s for s in (u.strip() for u in t.split(",")) if s)
        else:
            expanded.append(t)
    rho_values: list[float] | None = None
    if rhos is not None:
        rho_values = rhos if isinstance(rhos, list) else [rhos]
        if not rho_values or len(rho_values) > LIMITS["rho"]:
            raise ValueError(f"Invalid rho value: {rhos!r} (1 to {LIMITS['rho']} values)")
        rho_values = [check_float("rho", r, 0.0) for r in rho_values]
    out: list[Variant] = []
    rho_used = False
    for token in expanded:
        entry = parse_method(token)
        name = written = entry.pop("method")
        if name not in registry and RENAMED.get(name) in registry:
            name = current_name(written)
        if name not in registry:
            raise ValueError(f"Invalid method value: {name!r} (choose from {', '.join(registry)})")
        info = registry[name]
        label = entry.pop("label", None)
        unknown = sorted(set(entry) - set(info.defaults))
        if unknown:
            raise ValueError(
                f"Invalid option for method {name!r}: {', '.join(map(str, unknown))} "
                f"(it takes {', '.join(sorted(info.defaults)) or 'no options'})"
            )
        options = {k: _option(name, k, v) for k, v in entry.items()}
        if "rho" in options:
            check_float("rho", options["rho"], 0.0)
        if info.uses_rho and "rho" not in options and rho_values:
            rho_used = True
            for r in rho_values:
                lab = label or written
                if len(rho_values) > 1:
                    lab = f"{lab}(rho={info.rho_scale * r:g})"
                out.append(
                    Variant(
                        check_label(lab),
                        name,
                        {**info.defaults, **options, "rho": info.rho_scale * r},
                    )
                )
        else:
            out.append(Variant(check_label(label or written), name, {**info.defaults, **options}))
    if rho_values and not rho_used:
        raise ValueError(unused_rho(rho_values, sorted({v.method for v in out})))
    labels = [v.label for v in out]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"Invalid {what} value: duplicate labels {', '.join(dup)}")
    check_run_files(labels, what)
    return out


def seed_list(value: Any) -> list[int]:
    """A seed count (``5`` is seeds 0..4) or a list of distinct seeds; ValueError otherwise."""
    value = plain(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if not 1 <= value <= LIMITS["seeds"]:
            raise ValueError(
                f"Invalid seeds value: {value!r} (must be an int in [1, {LIMITS['seeds']}])"
            )
        return list(range(value))
    if (
        not isinstance(value, list)
        or not value
        or len(value) > LIMITS["seeds"]
        or any(
            isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= LIMITS["seed"]
            for s in value
        )
    ):
        raise ValueError(
            f"Invalid seeds value: {value!r} (a count, or a non-empty list of at most "
            f"{LIMITS['seeds']} ints in [0, {LIMITS['seed']}])"
        )
    if len(set(value)) != len(value):
        raise ValueError(f"Invalid seeds value: {value!r} (duplicates)")
    return list(value)


def check_names(name: str, value: Any, known: dict[str, Any]) -> list[str]:
    """A non-empty list of distinct names from ``known`` (a comma-separated string is split)."""
    if isinstance(value, str):
        value = [t for t in (s.strip() for s in value.split(",")) if t]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(
            f"Invalid {name} value: {value!r} (a non-empty list; choose from {', '.join(known)})"
        )
    for v in value:
        if v not in known:
            raise ValueError(f"Invalid {name} value: {v!r} (choose from {', '.join(known)})")
    if len(set(value)) != len(value):
        raise ValueError(f"Invalid {name} value: {value!r} (duplicates)")
    return list(value)


def verdicts(
    values: dict[str, dict[int, float | None]],
    baseline: str,
    *,
    metric: str,
    unit: str,
    maximize: bool = True,
) -> list[dict[str, Any]]:
    """Paired verdicts (:func:`~samkit.experiments.stats.paired_verdicts`) of one
    scalar per (label, seed): ``values[label][seed]``. A missing or non-finite
    value counts as a run that did not finish."""
    records = [
        {
            "label": label,
            "seed": seed,
            "final": {f"test_{metric}": v},
            "diverged": v is None or not math.isfinite(v),
        }
        for label, by_seed in values.items()
        for seed, v in by_seed.items()
    ]
    return paired_verdicts(
        records, list(values), baseline, metric=metric, maximize=maximize, unit=unit
    )


def default_out(prefix: str, settings: dict[str, Any], *parts: str) -> Path:
    """``samkit-runs/<prefix>-<parts>-<hash>``: the same settings give the same
    folder, so rerunning a command resumes it."""
    digest = hashlib.sha1(json.dumps(normalise(settings), sort_keys=True).encode()).hexdigest()[:8]
    safe = [re.sub(r"[^A-Za-z0-9_.-]", "_", p)[:40] for p in parts]
    return Path("samkit-runs") / "-".join([prefix, *safe, digest])


def baseline_and_device(s: dict[str, Any], labels: list[str], preferred: str) -> tuple[str, str]:
    """The checked ``baseline`` (default: ``preferred`` when it is a label, else the
    first label) and ``device`` of merged settings; the ``out`` setting checked too."""
    baseline = s["baseline"]
    if baseline is None:
        baseline = preferred if preferred in labels else labels[0]
    elif baseline not in labels:
        raise ValueError(
            f"Invalid baseline value: {baseline!r} (one of the labels: {', '.join(labels)})"
        )
    device = check_device(s["device"])
    if s.get("out") is not None and (not isinstance(s["out"], str) or not s["out"].strip()):
        raise ValueError(f"Invalid out value: {s['out']!r} (a folder path)")
    return baseline, device


def check_device_works(device: str) -> None:
    """ValueError naming ``device`` when this machine cannot train on it."""
    from .trainer import resolve_device

    try:
        resolve_device(device)
    except ValueError as exc:
        if str(exc).startswith("Invalid device value"):
            raise  # (already names it: wrapping it again doubled the message)
        raise ValueError(f"Invalid device value: {device!r} ({exc})") from exc
    except RuntimeError as exc:
        raise ValueError(f"Invalid device value: {device!r} ({exc})") from exc


def summary_row(label: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The head of a summary row: the label's method, its runs, how many finished and diverged."""
    n = sum(not r.get("diverged") for r in runs)
    return {
        "label": label,
        "method": runs[0]["method"],
        "runs": len(runs),
        "n": n,
        "diverged": len(runs) - n,
    }


def cost_ratio(value: float | None, base: float | None) -> float:
    """``value / base`` (a cost relative to the baseline's); NaN without a positive base."""
    return value / base if base and base > 0 else math.nan


def paired_by_seed(
    records: list[dict[str, Any]],
    labels: list[str],
    baseline: str,
    value: Callable[[dict[str, Any]], float | None],
    *,
    metric: str,
    unit: str,
    maximize: bool = True,
    where: tuple[str, str] | None = None,
) -> list[dict[str, Any]]:
    """:func:`verdicts` of ``value(run)`` for the runs of each label (a diverged run
    counts as unfinished). ``where=(key, condition)``: each verdict gets
    ``v[key] = condition`` and its sentence starts with ``"<condition>: "``."""
    values = {
        label: {
            r["seed"]: (None if r.get("diverged") else value(r))
            for r in records
            if r["label"] == label
        }
        for label in labels
    }
    out = verdicts(values, baseline, metric=metric, unit=unit, maximize=maximize)
    if where is not None:
        key, condition = where
        for v in out:
            v[key] = condition
            v["sentence"] = f"{condition}: {v['sentence']}"
    return out


@dataclass
class StudyResult:
    """What a study returns: its summary (``results.json``) and where the files are.

    ``table`` is each study's own; the rest is common to ``samkit compare``,
    ``samkit rl`` and ``samkit gan``.
    """

    out: Path
    summary: dict[str, Any]

    @property
    def rows(self) -> list[dict[str, Any]]:
        """One dict per method (and condition): means over seeds, costs."""
        return self.summary["summary"]

    @property
    def verdicts(self) -> list[str]:
        """One sentence per method: its paired difference from the baseline."""
        return [v["sentence"] for v in self.summary["verdicts"]]

    @property
    def failed(self) -> list[dict[str, Any]]:
        """The runs that failed on every retry (a worker killed, out of memory, a lost
        node), left out of the table and the verdicts: ``run``, ``key``, ``reason``."""
        return list(self.summary.get("failed") or [])

    @property
    def table(self) -> str:
        raise NotImplementedError

    @property
    def results_path(self) -> Path:
        return self.out / "results.json"

    @property
    def report_path(self) -> Path:
        return self.out / "report.html"

    def to_dict(self) -> dict[str, Any]:
        """The content of ``results.json``."""
        return self.summary

    def __str__(self) -> str:
        return "\n".join([self.table, "", *self.verdicts])
