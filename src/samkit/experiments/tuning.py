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
import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import settings as st
from .folder import describe_differences, differences, run_folder, study_folder
from .problem import Problem
from .registry import MethodInfo, build_method, method_info
from .settings import MethodSpec, StudyConfig, check_float, check_int

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
        st.check_bool("tune_lr", self.tune_lr)
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


@dataclass
class TuneResult:
    """What :func:`tune` returns."""

    out: Path
    summary: dict[str, Any]

    @property
    def best(self) -> dict[str, Any]:
        return self.summary["best"]

    @property
    def trials(self) -> list[dict[str, Any]]:
        return self.summary["trials"]

    @property
    def results_path(self) -> Path:
        return self.out / "tune.json"

    @property
    def report_path(self) -> Path:
        return self.out / "report.html"

    def to_dict(self) -> dict[str, Any]:
        return self.summary


def _sampler_seed(seed: int, existing: int) -> int:
    if existing == 0:
        return seed
    return int(np.random.SeedSequence([seed, existing]).generate_state(1)[0])


class OpenTune:
    """A validated search holding its folder's lock."""

    def __init__(
        self,
        config: StudyConfig,
        spec: TuneSpec,
        base: MethodSpec,
        out: Path,
        problem: Problem,
        n_trials: int,
    ) -> None:
        self.config, self.spec, self.base, self.out = config, spec, base, out
        self.problem, self.n_trials = problem, n_trials

    def run(
        self,
        *,
        log: Callable[[str], None] | None = None,
        jobs: int | str = 1,
        threads: int | None = None,
        ray: str | None = None,
    ) -> TuneResult:
        """Run the remaining trials, ``jobs`` at once (:mod:`~samkit.experiments.tune_parallel`)."""
        import optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend
        from optuna.trial import TrialState

        from .report import write_report
        from .study import write_json_atomic

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = JournalStorage(JournalFileBackend(str(self.out / "optuna-journal.log")))
        direction = "maximize" if self.problem.maximize else "minimize"
        probe = optuna.create_study(
            study_name="samkit-tune", storage=storage, direction=direction, load_if_exists=True
        )
        existing = list(probe.trials)
        # trials a killed process left RUNNING: mark them failed, and queue their values
        # again; likewise the trials a Ctrl-C stopped (Optuna marked those failed itself).
        # The redo points back at its trial, so each is queued once.
        stuck = [t for t in existing if t.state == TrialState.RUNNING]
        redone = {t.user_attrs.get("redo_of") for t in existing}
        cut = [
            t
            for t in existing
            if t.state == TrialState.FAIL
            and t.user_attrs.get("interrupted")
            and t.number not in redone
        ]
        for t in stuck:
            probe.tell(t.number, state=TrialState.FAIL)
        for t in stuck + cut:
            if t.params:
                probe.enqueue_trial(
                    dict(t.params), user_attrs={"redo_of": t.number}, skip_if_exists=False
                )
        stuck += cut
        seed = _sampler_seed(self.spec.sampler_seed, len(existing))
        if self.spec.grid:
            # the grid's order (its shuffle) must stay that of the first run: its trials
            # are stored by their place in it, so a reseeded grid would map a finished
            # trial to another rho and run a value twice and another never
            sampler: Any = optuna.samplers.GridSampler(
                {"rho": self.spec.grid}, seed=self.spec.sampler_seed
            )
        else:
            sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(5, self.n_trials))
        ostudy = optuna.create_study(
            study_name="samkit-tune",
            storage=storage,
            sampler=sampler,
            direction=direction,
            load_if_exists=True,
            pruner=optuna.pruners.MedianPruner(
                n_startup_trials=5, n_warmup_steps=self.config.train.epochs // 2
            ),
        )
        done = [t for t in ostudy.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        remaining = max(0, self.n_trials - len(done))
        if log:
            c = self.config
            log(
                f"samkit tune: {self.spec.method} on {c.dataset} / {c.model}, {len(c.seeds)} "
                f"seed(s), {c.train.epochs} epochs, {self.n_trials} trials ({len(done)} done "
                f"before{', ' + str(len(stuck)) + ' interrupted, queued again' if stuck else ''}) "
                f"-> {self.out}"
            )
        if remaining:
            # a trial that raises is reported by samkit itself (a Ctrl-C as one line):
            # Optuna's own warning with the traceback would come first
            optuna.logging.set_verbosity(optuna.logging.ERROR)
            if ray is not None:
                raise ValueError(
                    f"Invalid ray value: {ray!r} (samkit tune runs its trials on this machine; "
                    "use --jobs)"
                )
            if jobs != 1 or threads is not None:
                from .tune_parallel import run_parallel

                run_parallel(self, ostudy, remaining, jobs, threads, log)
            else:
                try:
                    ostudy.optimize(self._objective(log), n_trials=remaining, catch=())
                finally:
                    optuna.logging.set_verbosity(optuna.logging.WARNING)
        summary = self._summarize(ostudy)
        if self.spec.auto:
            summary["auto"] = [self._run_auto(name, log) for name in self.spec.auto]
        write_json_atomic(self.out / "tune.json", summary)
        metric = self.problem.primary
        pct = metric in ("acc", "accuracy")
        best = summary["best"]
        shown = f"{100 * best['value']:.2f} %" if pct else f"{best['value']:.4g}"
        write_report(
            self.out / "report.html",
            title=f"samkit tune: {self.spec.method} on {self.config.dataset} / {self.config.model}",
            rows=[],
            records=[],
            histories={},
            settings={k: v for k, v in self.config.to_dict().items() if k != "methods"}
            | {"method": self.base.to_dict()},
            tune=summary,
            notes=[f"Recommended rho = {best['rho']:.4g} (validation {metric} {shown})."]
            + [auto_note(a, best, pct) for a in summary.get("auto", [])],
        )
        return TuneResult(self.out, summary)

    def _train_seed(
        self,
        seed: int,
        rho: float | str,
        lr: float,
        callbacks: list[Callable[[dict[str, Any]], None]],
        state_path: Path | None = None,
    ) -> Any:
        """Train the method once on ``seed`` (the same data, model and schedule for every rho)."""
        from .trainer import resolve_device, seed_everything, steps_per_epoch, train

        cfg, problem = self.config, self.problem
        data = problem.load(seed)
        seed_everything(seed)
        model = problem.build_model(data)
        n_steps = steps_per_epoch(data.train, cfg.train.batch_size, seed)
        tspec = self.base.train_spec(
            total_steps=n_steps * cfg.train.epochs,
            steps_per_epoch=n_steps,
            epochs=cfg.train.epochs,
        ).replace(lr=lr)
        method = build_method(self.spec.method, model, tspec, rho=rho)
        return train(
            model,
            method,
            data,
            cfg.train,
            seed=seed,
            loss_fn=problem.loss_fn,
            metrics=problem.metrics,
            maximize=problem.maximize,
            device=resolve_device(cfg.device),
            num_workers=cfg.num_workers,
            callbacks=callbacks,
            progress=False,
            epoch_steps=n_steps,
            state_path=state_path,
        )

    def _run_auto(self, name: str, log: Callable[[str], None] | None) -> dict[str, Any]:
        """Train the method with ``rho=name`` on every seed, beside the search.

        Each seed's result is kept in ``auto/`` (reused when the settings are
        unchanged; an interrupted run resumes from its training state).
        """
        import json

        from .trainer import finite

        metric = self.problem.primary
        folder = self.out / "auto"
        folder.mkdir(exist_ok=True)
        # what the stored runs were trained with, as it reads back from JSON
        key = json.loads(
            json.dumps(
                finite(
                    {"rho": name, "method": self.base.to_dict(), "settings": self.config.to_dict()}
                )
            )
        )
        from .engine import Cell, InProcess, run_cells

        def describe(rec: dict[str, Any]) -> str:
            shown = "diverged" if rec["value"] is None else _shown(rec["value"], metric)
            rhos = [v for v in rec["rho_history"] if v is not None]
            return f"validation {metric} {shown}, final rho {rhos[-1] if rhos else math.nan:.3g}"

        cells = []
        for seed in self.config.seeds:
            stem = f"{name.replace(':', '-')}-seed{seed}"
            task = AutoRun(self, name, seed, key)
            cells.append(
                Cell(f"rho={name} seed {seed}", folder, stem, key, task, (f"{stem}.state.pt",))
            )
            cells[-1].identity_field = "key"
        executor = InProcess()
        outcomes = run_cells(cells, executor=executor, log=log, describe=describe)
        values, histories, diverged = [], [], False
        for o in outcomes:
            rec = o.record
            assert rec is not None
            if rec["value"] is None:
                diverged = True
            else:
                values.append(rec["value"])
            histories.append([v for v in rec["rho_history"] if v is not None])
        finals = [h[-1] for h in histories if h]
        return {
            "rho": name,
            "value": None if diverged else sum(values) / len(values),
            "per_seed": values,
            "final_rho": float(np.median(finals)) if finals else None,
            "rho_history": histories,
            **({"diverged": True} if diverged else {}),
        }

    def _objective(self, log: Callable[[str], None] | None) -> Callable[[Any], float]:
        import optuna

        cfg, spec, problem = self.config, self.spec, self.problem
        lo, hi = spec.range()
        metric = problem.primary

        def objective(trial: optuna.Trial) -> float:
            rho = (
                trial.suggest_categorical("rho", spec.grid)
                if spec.grid
                else trial.suggest_float("rho", lo, hi, log=True)
            )
            lr = (
                trial.suggest_float("lr", self.base.lr / 10, self.base.lr * 10, log=True)
                if spec.tune_lr
                else self.base.lr
            )
            try:
                return trial_value(trial, rho, lr)
            except KeyboardInterrupt:
                # Optuna marks the trial failed; this tells the resumed search to redo it
                trial.set_user_attr("interrupted", True)
                raise

        def trial_value(trial: optuna.Trial, rho: float, lr: float) -> float:
            scores = []
            for s_i, seed in enumerate(cfg.seeds):

                def report(rec: dict[str, Any], s_i: int = s_i) -> None:
                    value = rec.get(f"val_{metric}")
                    if value is None or not math.isfinite(value):  # an epoch without evaluation
                        return
                    trial.report(value, s_i * cfg.train.epochs + rec["epoch"])
                    if s_i == 0 and trial.should_prune():
                        raise optuna.TrialPruned()

                res = self._train_seed(seed, rho, lr, [report])
                value = res.final.get(f"val_{metric}")
                if res.diverged or value is None or not math.isfinite(value):
                    trial.set_user_attr("diverged", True)
                    if log:
                        log(f"  trial {trial.number}: rho {rho:.4g} diverged (pruned)")
                    raise optuna.TrialPruned()
                scores.append(value)
            value = sum(scores) / len(scores)
            if log:
                lr_txt = f", lr {lr:.3g}" if spec.tune_lr else ""
                shown = f"{100 * value:.2f} %" if metric in ("acc", "accuracy") else f"{value:.4g}"
                log(f"  trial {trial.number}: rho {rho:.4g}{lr_txt} -> validation {metric} {shown}")
            return value

        return objective

    def _summarize(self, ostudy: Any) -> dict[str, Any]:
        from optuna.trial import TrialState

        redone = {t.user_attrs.get("redo_of") for t in ostudy.trials}
        trials = [
            {
                "number": t.number,
                "params": dict(t.params),
                "value": t.value,
                "state": t.state.name,
                **({"diverged": True} if t.user_attrs.get("diverged") else {}),
                # interrupted (Ctrl-C or killed), and tried again as a later trial
                **({"redone": True} if t.number in redone else {}),
            }
            for t in ostudy.trials
        ]
        complete = [t for t in ostudy.trials if t.state == TrialState.COMPLETE]
        if not complete:
            raise ValueError(
                "Invalid trials value: no trial completed (all pruned, diverged or failed); "
                "try more epochs, a smaller lr or another --rho-range"
            )
        sign = 1.0 if self.problem.maximize else -1.0
        top = max(sign * t.value for t in complete)
        pct = self.problem.primary in ("acc", "accuracy")
        tol = 1e-3 if pct else 1e-3 * max(1.0, abs(top))
        near = [t for t in complete if sign * t.value >= top - tol]
        best_t = min(near, key=lambda t: (t.params["rho"], -sign * t.value))
        best = {
            "rho": best_t.params["rho"],
            "value": best_t.value,
            "trial": best_t.number,
        }
        if pct:
            best["val_acc"] = best_t.value
        if self.spec.tune_lr:
            best["lr"] = best_t.params["lr"]
        return {
            "format": "samkit-tune",
            "version": 2,
            "method": self.spec.method,
            "metric": self.problem.primary,
            "maximize": self.problem.maximize,
            "base": self.base.base,
            "lr": self.base.lr,
            "settings": self.config.to_dict(),
            "trials": trials,
            "best": best,
        }


@dataclass
class AutoRun:
    """One seed of a self-tuning radius trained beside the search (an engine task)."""

    search: OpenTune
    name: str
    seed: int
    key: Any

    def __call__(self, folder: Path, ctx: Any) -> dict[str, Any]:
        metric = self.search.problem.primary
        stem = f"{self.name.replace(':', '-')}-seed{self.seed}"
        res = self.search._train_seed(
            self.seed, self.name, self.search.base.lr, [], state_path=folder / f"{stem}.state.pt"
        )
        value = res.final.get(f"val_{metric}")
        ok = not res.diverged and value is not None and math.isfinite(value)
        return {
            "key": self.key,
            "value": value if ok else None,
            "test": res.final.get(f"test_{metric}"),
            "rho_history": [h.get("rho") for h in res.history],
        }


def _shown(value: float, metric: str) -> str:
    return f"{100 * value:.2f} %" if metric in ("acc", "accuracy") else f"{value:.4g}"


def auto_note(auto: dict[str, Any], best: dict[str, Any], pct: bool) -> str:
    """One sentence: a self-tuning rho against the search's recommendation, on validation."""
    if auto.get("value") is None:
        return f"rho = {auto['rho']}: diverged on at least one seed."
    scale, unit = (100.0, " points") if pct else (1.0, "")
    diff = scale * (auto["value"] - best["value"])
    return (
        f"rho = {auto['rho']}: validation {scale * auto['value']:.4g} "
        f"({diff:+.2f}{unit} against the recommended rho {best['rho']:.4g}), "
        f"final rho {auto['final_rho']:.3g} (median over seeds), in one training per seed."
    )


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
    from .study import check_study

    base = MethodSpec(method=spec.method, base=spec.base or "", lr=lr, weight_decay=weight_decay)
    config.methods = [base]
    config.sharpness = False
    if config.val_fraction == 0 and not (
        config.user_data is not None and config.user_data.val is not None
    ):
        raise ValueError("Invalid val_fraction value: 0 (tuning needs a validation split)")
    folder = run_folder(out, lambda: st.default_out_dir(config, prefix=f"tune-{spec.method}"))
    with study_folder(folder) as path:
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
    from .study import _normalise, _run_config, write_json_atomic

    identity = _normalise(
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
    record = path / "tune-settings.json"
    if record.exists():
        try:
            saved = json.loads(record.read_text())
        except (OSError, ValueError):
            saved = None
        if saved != identity:
            what = (
                describe_differences(differences(_readable(saved), _readable(identity)))
                if isinstance(saved, dict)
                else "its tune-settings.json cannot be read"
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
    unknown = sorted(set(settings) - st.KEYS)
    if unknown or {"optimizers", "methods", "rho"} & set(settings):
        raise ValueError(f"Invalid setting: {', '.join(unknown or sorted(settings))}")
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
