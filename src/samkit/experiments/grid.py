"""A grid of runs (condition x method x seed) in one run folder: what the RL and GAN studies share.

``samkit rl`` (environments x methods x seeds) and ``samkit gan`` (data sets x
methods x seeds) are built on the comparative study's machinery rather than on
a copy of it:

* settings: the checks of :mod:`~samkit.experiments.settings` (``check_int``,
  ``check_float``, ...), its TOML reader and its merge of defaults < preset <
  file < flags, with each study's own keys;
* methods: ``"name"`` or ``"name:key=value,..."`` specs parsed by
  :func:`~samkit.experiments.settings.parse_method` against a small table of
  :class:`MethodDef` (options and their defaults); a ``--rho`` list runs each
  sharpness-aware method once per value, as in ``samkit compare``;
* the run folder: the folder lock (:func:`~samkit.experiments.folder.study_folder`),
  atomic JSON (:func:`~samkit.experiments.study.write_json_atomic`), run names
  (:func:`~samkit.experiments.study.run_key`), and resume: a run whose result
  file holds the same settings (:func:`finished`) is not run again;
* the summary: means over seeds with the sample standard deviation, and the
  paired verdicts of :func:`~samkit.experiments.stats.paired_verdicts` (the
  difference to the baseline seed by seed, its standard error and ``|z| > 2``);
* the report: :func:`~samkit.experiments.report.write_page`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._checks import is_number
from .engine import finished, normalise
from .settings import LIMITS, check_float, check_label, parse_method, plain, unused_rho
from .stats import paired_verdicts, stats

__all__ = [
    "MethodDef",
    "Variant",
    "variants",
    "seed_list",
    "finished",
    "normalise",
    "stats",
    "verdicts",
    "default_out",
    "check_names",
    "open_study",
    "run_cells",
    "StudyResult",
]


@dataclass(frozen=True)
class MethodDef:
    """A method of a study: one line of description and its options with their defaults.

    ``rho_scale``: ``--rho r`` gives the method ``rho = rho_scale * r`` (ASAM: 10).
    """

    description: str
    defaults: dict[str, Any] = field(default_factory=dict)
    rho_scale: float = 1.0

    @property
    def uses_rho(self) -> bool:
        return "rho" in self.defaults


@dataclass(frozen=True)
class Variant:
    """One column of a study: a method with its options (defaults filled in) and a label."""

    label: str
    method: str
    options: dict[str, Any]

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
        name = entry.pop("method")
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
                lab = label or name
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
            out.append(Variant(check_label(label or name), name, {**info.defaults, **options}))
    if rho_values and not rho_used:
        raise ValueError(unused_rho(rho_values, sorted({v.method for v in out})))
    labels = [v.label for v in out]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"Invalid {what} value: duplicate labels {', '.join(dup)}")
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


@contextlib.contextmanager
def open_study(folder: Path, check: Callable[[Path], None]) -> Iterator[Path]:
    """Lock ``folder`` and run ``check(folder)`` (a ValueError before any training), then yield it."""
    from .folder import study_folder

    with study_folder(folder) as locked:
        check(locked)
        yield locked


def run_cells(
    folder: Path,
    settings: dict[str, Any],
    cells: Sequence[tuple[str, Variant, int]],
    *,
    identity: Callable[[str, Variant, int], dict[str, Any]],
    task: Callable[[str, Variant, int, str, dict[str, Any]], Callable[..., dict[str, Any]]],
    describe: Callable[[dict[str, Any]], str],
    log: Callable[[str], None] | None,
    cleanup: Callable[[str], tuple[str, ...]] | None = None,
    executor: Any = None,
) -> tuple[list[dict[str, Any]], int]:
    """Run, or read back, every ``(condition, variant, seed)`` cell of a study in ``folder``.

    The study engine (:func:`~samkit.experiments.engine.run_cells`) for
    ``samkit rl`` and ``samkit gan``. Call it holding the folder's lock.
    ``settings`` go to ``config.json``; a cell's result is
    ``runs/<condition>/<run key>.json``, reused when it holds
    ``identity(condition, variant, seed)`` (with ``threads`` when the
    executor pins them); otherwise ``task(condition, variant, seed, run key,
    identity)`` (called with the runs folder and a run context) makes the
    record, which the driver writes atomically before it removes the files
    ``cleanup(run key)`` names. Returns the records (as they read back) and
    how many cells ran.
    """
    from .engine import Cell, InProcess
    from .engine import run_cells as engine_run
    from .study import run_key, write_json_atomic

    executor = executor or InProcess(log=log)
    write_json_atomic(folder / "config.json", settings)
    engine_cells = []
    for condition, variant, seed in cells:
        key = run_key(variant.label, seed)
        wanted = identity(condition, variant, seed)
        if executor.threads is not None:
            wanted = {**wanted, "threads": executor.threads}
        wanted = normalise(wanted)
        engine_cells.append(
            Cell(
                f"{condition} {variant.label} seed {seed}",
                folder / "runs" / condition,
                key,
                wanted,
                task(condition, variant, seed, key, wanted),
                cleanup=cleanup(key) if cleanup is not None else (),
            )
        )
    outcomes = engine_run(
        engine_cells, executor=executor, log=log, describe=describe, write=write_json_atomic
    )
    records = [o.record for o in outcomes if o.record is not None]
    return records, sum(o.executed and o.record is not None for o in outcomes)


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
