"""``samkit.tune(...)``: search a SAM-type method's rho (and optionally lr) with Optuna.

Each trial trains the method on the training split and is scored by the
primary metric on the validation split (mean over the seeds), never on the
test set. The search is Optuna's TPE sampler, or a grid. Trials live in an
Optuna journal in the run folder, so an interrupted search resumes:

* trials left RUNNING by a killed process, and trials stopped by Ctrl-C, are
  marked FAIL (``redone`` in ``tune.json``) and their parameters queued
  again, so no trial stays stuck and none is lost;
* the sampler is seeded from ``sampler_seed`` *and the number of trials
  already in the journal*, so a resumed search does not propose again the
  values its first, uninterrupted part proposed (a sampler reseeded with the
  same seed would); a grid keeps ``sampler_seed`` (it knows which of its
  points are done);
* the folder is locked (one search per folder at a time).

The recommendation is the best trial; among trials within 0.1 point (or
1e-3 relative, for other metrics) of it, the smallest rho.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import settings as st
from .folder import (
    TUNE_SETTINGS,
    describe_differences,
    differences,
    refuse_other_kind,
    run_folder,
    study_folder,
)
from .problem import Problem
from .registry import MethodInfo, build_method, method_info
from .settings import MethodSpec, StudyConfig, check_float, check_int
from .tune_search import OpenTune, TuneResult, auto_note  # noqa: F401 - auto_note: the CLI

__all__ = ["tune", "TuneResult", "TuneSpec", "open_tune", "QUICK"]

#: ``samkit tune --quick``
QUICK = {"seeds": 1, "epochs": 15, "sharpness": False}
MAX_TRIALS = 10_000
MAX_SAMPLER_SEED = 2**32 - 1


@dataclass
class TuneSpec:
    """What to search: the method, its ranges, the number of trials (all validated)."""

    method: str = "sam"
    trials: int | None = None
    rho_range: tuple[float, float] | None = None
    grid: list[float] | None = None
    tune_lr: bool = False
    sampler_seed: int = 0
    base: str | None = None
    #: self-tuning radii trained beside the search (``"auto"``, ``"auto:<name>"``)
    auto: list[str] | None = None

    def __post_init__(self) -> None:
        info = method_info(self.method)
        if not info.uses_rho:
            raise ValueError(f"Invalid method value: {self.method!r} has no rho to tune")
        self.trials = check_int("trials", self.trials, 1, MAX_TRIALS, none_ok=True)
        if self.rho_range is not None:
            if not isinstance(self.rho_range, (tuple, list)) or len(self.rho_range) != 2:
                raise ValueError(f"Invalid rho_range value: {self.rho_range!r} (expected (LO, HI))")
            lo = check_float("rho_range", self.rho_range[0], 0.0, lo_open=True)
            hi = check_float("rho_range", self.rho_range[1], 0.0, lo_open=True)
            if not lo < hi:
                raise ValueError(f"Invalid rho_range value: {self.rho_range!r} (need 0 < LO < HI)")
            self.rho_range = (lo, hi)
        if self.grid is not None:
            if (
                not isinstance(self.grid, (list, tuple))
                or not self.grid
                or len(self.grid) > MAX_TRIALS
            ):
                raise ValueError(
                    f"Invalid grid value: {self.grid!r} (1 to {MAX_TRIALS} rho values)"
                )
            self.grid = [check_float("grid", r, 0.0) for r in self.grid]
            if len(set(self.grid)) != len(self.grid):
                raise ValueError(f"Invalid grid value: {self.grid!r} (duplicates)")
            # a grid trains exactly its values: a number of trials or a range would be ignored
            for name in ("trials", "rho_range"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"Invalid {name} value: {getattr(self, name)!r} (a grid trains exactly "
                        f"its values, {len(self.grid)} trials; give a grid or {name}, not both)"
                    )
        st.check_bool("tune_lr", self.tune_lr)
        if self.grid is not None and self.tune_lr:
            raise ValueError(
                "Invalid tune_lr value: True (a grid lists rho values only; search the "
                "learning rate without a grid, over --trials)"
            )
        self.sampler_seed = check_int("sampler_seed", self.sampler_seed, 0, MAX_SAMPLER_SEED)
        if self.base is not None:
            st.check_choice("base", self.base, tuple(st.BASE_DEFAULTS))
        if self.auto is not None:
            from ..optim.autorho import controller_from_name

            if not isinstance(self.auto, (list, tuple)) or not self.auto:
                raise ValueError(
                    f"Invalid auto value: {self.auto!r} (a list such as ['auto', 'auto:loss_equated'])"
                )
            for name in self.auto:
                try:
                    controller_from_name(name)
                except ValueError as exc:
                    raise ValueError(f"Invalid auto value: {name!r} ({exc})") from None
            if len(set(self.auto)) != len(self.auto):
                raise ValueError(f"Invalid auto value: {self.auto!r} (duplicates)")
            self.auto = list(self.auto)

    @property
    def info(self) -> MethodInfo:
        return method_info(self.method)

    def range(self) -> tuple[float, float]:
        scale = self.info.rho_scale
        return self.rho_range or (0.005 * scale, 1.0 * scale)

    def n_trials(self, quick: bool = False) -> int:
        return len(self.grid) if self.grid else (self.trials or (6 if quick else 20))


@contextlib.contextmanager
def open_tune(
    config: StudyConfig,
    spec: TuneSpec,
    out: str | os.PathLike[str] | None = None,
    *,
    quick: bool = False,
    lr: float | None = None,
    weight_decay: float | None = None,
) -> Iterator[OpenTune]:
    """Validate the search and lock its folder (ValueError on any problem), then yield."""
    try:
        import optuna  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ValueError(
            "Invalid method value: samkit tune needs optuna (pip install 'samkit[tune]')"
        ) from exc
    from .study_checks import check_study

    base = MethodSpec(method=spec.method, base=spec.base or "", lr=lr, weight_decay=weight_decay)
    config.methods = [base]
    config.sharpness = False
    if config.val_fraction == 0 and not (
        config.user_data is not None and config.user_data.val is not None
    ):
        raise ValueError("Invalid val_fraction value: 0 (tuning needs a validation split)")
    ud = config.user_data
    if ud is not None and ud.val is None and ud.kind != "map":
        # (a split is drawn from map-style data only: every trial trained, then "no trial
        # completed" blamed the lr and the range)
        raise ValueError(
            f"Invalid val value: None (tuning needs a validation split, and streamed training "
            f"data, {'an IterableDataset' if ud.kind == 'iterable' else 'a batch factory'}, "
            "gets none drawn from it: give val=)"
        )
    folder = run_folder(out, lambda: st.default_out_dir(config, prefix=f"tune-{spec.method}"))
    with study_folder(folder) as path:
        refuse_other_kind(path, "tune")
        problem = check_study(config)
        lo, hi = spec.range()
        # the extremes of the search must build too (a rho the method refuses fails now)
        for rho in [*(spec.grid or []), lo, hi, *(spec.auto or [])]:
            _check_rho(config, problem, spec, base, rho)
        _claim_folder(path, config, spec, base)
        yield OpenTune(config, spec, base, path, problem, spec.n_trials(quick))


def _claim_folder(path: Path, config: StudyConfig, spec: TuneSpec, base: MethodSpec) -> None:
    """Record what the search's trials depend on; refuse a folder that holds another search.

    Its trials (Optuna's journal) were trained with those settings: resuming
    them under other ones (another method, lr, epochs, data) would report old
    trials as new ones.
    """
    from .engine import normalise
    from .runfiles import write_json_atomic
    from .study import _run_config

    identity = normalise(
        {
            "runs": [_run_config(config, base, seed) for seed in config.seeds],
            "search": {
                "method": spec.method,
                "base": spec.base,
                "rho_range": list(spec.rho_range) if spec.rho_range else None,
                "grid": spec.grid,
                "tune_lr": spec.tune_lr,
                "sampler_seed": spec.sampler_seed,
            },
        }
    )
    record = path / TUNE_SETTINGS
    if record.exists():
        try:
            saved = json.loads(record.read_text())
        except (OSError, ValueError):
            saved = None
        if saved != identity:
            what = (
                describe_differences(differences(_readable(saved), _readable(identity)))
                if isinstance(saved, dict)
                else f"its {TUNE_SETTINGS} cannot be read"
            )
            raise ValueError(
                f"Invalid out value: {str(path)!r} holds a search with other settings "
                f"({what}); give another --out, or delete it to start over"
            )
        return
    if (path / "optuna-journal.log").exists():
        raise ValueError(
            f"Invalid out value: {str(path)!r} holds a search whose settings were not recorded "
            "(an older samkit); give another --out, or delete it to start over"
        )
    write_json_atomic(record, identity)


def _readable(identity: dict[str, Any]) -> dict[str, Any]:
    """A search's identity keyed as its settings: one run's settings (``train.epochs``,
    ``method.lr``, ...), the ``seeds``, and ``search.*``; not one entry per seed."""
    runs = identity.get("runs")
    if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
        return identity
    first = {k: v for k, v in (runs[0] if runs else {}).items() if k != "seed"}
    return {**first, "seeds": [r.get("seed") for r in runs], "search": identity.get("search")}


def _check_rho(
    config: StudyConfig, problem: Problem, spec: TuneSpec, base: MethodSpec, rho: float | str
) -> None:
    import copy

    data = problem.load(config.seeds[0])
    model = problem.build_model(data)
    build_method(spec.method, copy.deepcopy(model), base.train_spec(), rho=rho)


def tune(
    model: Any = None,
    train: Any = None,
    val: Any = None,
    test: Any = None,
    *,
    method: str = "sam",
    trials: int | None = None,
    rho_range: tuple[float, float] | None = None,
    grid: list[float] | None = None,
    tune_lr: bool = False,
    sampler_seed: int = 0,
    base: str | None = None,
    auto: list[str] | None = None,
    data: Any = None,
    loss: Callable[..., Any] | None = None,
    metrics: dict[str, Callable[..., Any]] | None = None,
    task: str | None = None,
    seeds: int | list[int] | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    out: str | os.PathLike[str] | None = None,
    device: str | None = None,
    amp: str | None = None,
    num_workers: int | None = None,
    quiet: bool = False,
    **settings: Any,
) -> TuneResult:
    """Search rho (and with ``tune_lr`` the learning rate) of ``method`` on the validation split.

    Takes the model and data as :func:`samkit.compare` does. ``trials``
    (default 20), ``rho_range`` (log-uniform, default 0.005 to 1 times the
    method's rho scale) or ``grid`` (exactly these values), ``sampler_seed``;
    ``auto`` (e.g. ``["auto", "auto:loss_equated"]``): also train the method
    with these self-tuning radii on the same seeds, reported beside the search
    (``summary["auto"]``: validation score, each run's rho over training).
    Returns a :class:`TuneResult` (``best``, ``trials``, ``to_dict()``, paths).
    Interrupted, it resumes from the Optuna journal in ``out``.
    """
    from .api import _user_parts, check_flags

    check_flags(quiet=quiet)
    unknown = sorted((set(settings) - st.KEYS) | ({"optimizers", "methods", "rho"} & set(settings)))
    if unknown:  # (only those: a valid setting beside them is not named)
        raise ValueError(f"Invalid setting: {', '.join(unknown)}")
    spec = TuneSpec(
        method=method.lower() if isinstance(method, str) else method,
        trials=trials,
        rho_range=rho_range,
        grid=grid,
        tune_lr=tune_lr,
        sampler_seed=sampler_seed,
        base=base,
        auto=auto,
    )
    flat: dict[str, Any] = {**QUICK, "seeds": 3, "epochs": 30, **settings}
    flat.update(
        {
            k: v
            for k, v in dict(
                task=task,
                seeds=seeds,
                epochs=epochs,
                batch_size=batch_size,
                device=device,
                amp=amp,
                num_workers=num_workers,
                lr=lr,
                weight_decay=weight_decay,
            ).items()
            if v is not None
        }
    )
    flat["optimizers"] = [spec.method]
    user = _user_parts(model, data, train, val, test, flat)
    merged = st.merge(flat)
    config = st.build_study(merged, loss=loss, metrics=metrics, **user)
    log = None if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    how = st.execution(merged)
    with open_tune(config, spec, out, lr=merged["lr"], weight_decay=merged["weight_decay"]) as t:
        return t.run(log=log, **how)
