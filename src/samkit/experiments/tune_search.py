"""A validated ``samkit tune`` search holding its folder's lock (:class:`OpenTune`):
its trials through Optuna (resumed from the journal in the run folder), the
self-tuning radii trained beside it, and ``tune.json`` and ``report.html``.

Opened by :func:`~samkit.experiments.tuning.open_tune`; one trial is
:mod:`~samkit.experiments.tune_trial`, the trials run on the study engine by
:mod:`~samkit.experiments.tune_parallel` (one at a time in this process, or N at once).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._atomic import finite
from .batches import schedule
from .configs import MethodSpec, StudyConfig
from .engine import Cell, InProcess, run_cells
from .problem import Problem
from .registry import build_method
from .runfiles import write_json_atomic
from .tune_trial import STUDY_NAME, shown

if TYPE_CHECKING:
    from .tuning import TuneSpec

__all__ = ["OpenTune", "TuneResult", "AutoRun", "auto_note"]


def _drop_partial_record(journal: Path) -> None:
    """A process killed while appending to the journal leaves a last line without its
    newline; the next record appended would fuse with it into a line no one can read
    (the search then failed at its first result). Cut it off: that trial is the one the
    resumed search redoes."""
    from .._atomic import atomic_open

    if not journal.is_file():
        return
    data = journal.read_bytes()
    if data and not data.endswith(b"\n"):
        with atomic_open(journal, "wb") as fh:
            fh.write(data[: data.rfind(b"\n") + 1])


def _check_journal_holds_the_summary(journal: Path, summary: Path, trials: list[Any]) -> None:
    """A journal cut short (not just its last line) lost trials that ``tune.json`` still
    lists: the search would start over and write over that summary. Refused, naming both."""
    import json

    try:
        listed = json.loads(summary.read_text(encoding="utf-8")).get("trials")
        recorded = {t["number"] for t in listed if t.get("state") == "COMPLETE"}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return  # (no summary yet, or not one to compare with: the journal stands alone)
    missing = recorded - {t.number for t in trials}
    if missing:
        raise ValueError(
            f"Invalid out value: the search's journal {str(journal)!r} lacks {len(missing)} "
            f"finished trial(s) that {summary.name} lists (it was cut or replaced); restore "
            f"it, or delete it and {summary.name} to start the search afresh"
        )


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
        """Run the remaining trials on the study engine, ``jobs`` at once
        (:mod:`~samkit.experiments.tune_parallel`; one: in this process)."""
        import optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend
        from optuna.trial import TrialState

        from .report import write_report

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        journal = self.out / "optuna-journal.log"
        _drop_partial_record(journal)
        if not journal.is_file() or journal.stat().st_size == 0:
            # (before Optuna writes a new one there: the message says to restore the old)
            _check_journal_holds_the_summary(journal, self.out / "tune.json", [])
        direction = "maximize" if self.problem.maximize else "minimize"
        try:
            storage = JournalStorage(JournalFileBackend(str(journal)))
            probe = optuna.create_study(
                study_name=STUDY_NAME, storage=storage, direction=direction, load_if_exists=True
            )
            existing = list(probe.trials)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:  # a damaged file
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise ValueError(
                f"Invalid out value: the search's journal {str(journal)!r} cannot be read "
                f"({reason}); delete it (and tune.json) to start the search afresh"
            ) from exc
        _check_journal_holds_the_summary(journal, self.out / "tune.json", existing)
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
        lost = [t for t in stuck if "rho" not in t.params]
        if self.spec.grid and lost:
            # a trial cut between its creation and its rho took its grid point with it
            # (Optuna counts a failed trial's point as visited): queue every grid value
            # that no finished, queued or requeued trial holds, so each runs once
            held = [
                t.params.get("rho")
                for t in existing
                if t.state in (TrialState.COMPLETE, TrialState.PRUNED) or t in stuck
            ]
            held += [
                t.system_attrs.get("fixed_params", {}).get("rho")
                for t in existing
                if t.state == TrialState.WAITING
            ]
            missing = [rho for rho in self.spec.grid if rho not in held]
            for k, rho in enumerate(missing):
                probe.enqueue_trial(
                    {"rho": rho},
                    user_attrs={"redo_of": lost[min(k, len(lost) - 1)].number},
                    skip_if_exists=False,
                )
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
            study_name=STUDY_NAME,
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
            from .tune_parallel import run_trials

            run_trials(self, ostudy, remaining, jobs, threads, log)
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
        state_tag: Any = None,
    ) -> Any:
        """Train the method once on ``seed`` (the same data, model and schedule for every rho)."""
        from .trainer import resolve_device, seed_everything, train  # train: looked up now

        cfg, problem = self.config, self.problem
        data = problem.load(seed)
        seed_everything(seed)
        model = problem.build_model(data)
        length = schedule(data.train, cfg.train.batch_size, cfg.train.epochs, seed)
        tspec = self.base.train_spec(**length).replace(lr=lr)
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
            epoch_steps=length["steps_per_epoch"],
            state_path=state_path,
            state_tag=state_tag,
        )

    def _run_auto(self, name: str, log: Callable[[str], None] | None) -> dict[str, Any]:
        """Train the method with ``rho=name`` on every seed, beside the search.

        Each seed's result is kept in ``auto/`` (reused when the settings are
        unchanged; an interrupted run resumes from its training state).
        """
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

        def describe(rec: dict[str, Any]) -> str:
            text = "diverged" if rec["value"] is None else shown(rec["value"], metric)
            rhos = [v for v in rec["rho_history"] if v is not None]
            return f"validation {metric} {text}, final rho {rhos[-1] if rhos else math.nan:.3g}"

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
                # its worker died on every try (--jobs N): why
                **(
                    {"failure": t.user_attrs["failure"]}
                    if "failure" in t.user_attrs and t.number not in redone
                    else {}
                ),
            }
            for t in ostudy.trials
        ]
        complete = [  # (a journal is a file: a value that is not a finite number is not one)
            t
            for t in ostudy.trials
            if t.state == TrialState.COMPLETE
            and isinstance(t.value, (int, float))
            and math.isfinite(t.value)
        ]
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
            self.seed,
            self.name,
            self.search.base.lr,
            [],
            state_path=folder / f"{stem}.state.pt",
            state_tag=json.loads(json.dumps(finite(self.key))),  # this run, as plain data
        )
        value = res.final.get(f"val_{metric}")
        ok = not res.diverged and value is not None and math.isfinite(value)
        return {
            "key": self.key,
            "value": value if ok else None,
            "test": res.final.get(f"test_{metric}"),
            "rho_history": [h.get("rho") for h in res.history],
        }


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
