"""``samkit tune``: its trials through Optuna's ask/tell, on the study engine.

The search is a :class:`~samkit.experiments.engine.CellSource`
(:class:`TrialSource`): the engine's one run loop
(:func:`~samkit.experiments.engine.run_cells`) asks it for a trial each
time a slot is free, runs the trial, and tells it the outcome, which it
tells Optuna; retries, faults, the study line and Ctrl-C are the engine's,
as for every study. The journal in the run folder stays the one record.

With ``jobs=1`` (the default) the engine's in-process executor trains each
trial in this process on the trial Optuna asked (:class:`InlineTrial`): its
epochs are reported to it and its pruner asked there, and the next trial is
asked only once this one is told, so the search is Optuna's sequential one
(the same trials, in the same order, for a given seed). With ``jobs=N`` a
worker trains the trial (:class:`TuneTrial`) and reports each epoch's
validation value to the journal itself (Optuna's journal storage is safe
for several processes), so the median pruner sees the other trials as in a
sequential search.

What parallel sampling changes: a trial is proposed from the trials that
have *completed* when it is asked. With N at once, each proposal misses the
results of up to N-1 trials still training, and the order in which trials
complete depends on timing, so a TPE search with ``jobs > 1`` is not
reproducible run to run (a grid search is: it runs the same points).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .engine import Cell, CellSource, InProcess, Outcome, make_executor, run_cells
from .tune_search import OpenTune
from .tune_trial import STUDY_NAME, suggest, trial_text, trial_value

__all__ = ["InlineTrial", "TrialSource", "TuneTrial", "run_trials"]

#: a trial whose worker dies is trained again this many times, then failed (as a run)
RETRIES = 2


@dataclass
class TuneTrial:
    """One trial, trained in a worker: every seed, its epochs reported to the journal."""

    config: Any
    spec: Any
    base: Any
    journal: str
    trial_id: int
    rho: float
    lr: float
    warmup: int
    maximize: bool

    def __call__(self, folder: Path, ctx: Any) -> dict[str, Any]:
        import optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        key = "tune:" + self.journal
        problem = ctx.cache.get(key)
        if problem is None:
            problem = ctx.cache[key] = self.config.problem()
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        study = optuna.load_study(
            study_name=STUDY_NAME,
            storage=JournalStorage(JournalFileBackend(self.journal)),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=self.warmup),
        )
        trial = optuna.Trial(study, self.trial_id)
        search = OpenTune(self.config, self.spec, self.base, folder, problem, 0)
        return _score(search, trial, self.rho, self.lr)


@dataclass
class InlineTrial:
    """One trial trained in this process (``jobs=1``) on the trial Optuna asked: its
    epochs are reported to it, and its pruner asked, as in Optuna's own loop."""

    search: Any
    trial: Any
    rho: float
    lr: float

    @property
    def trial_id(self) -> int:
        return self.trial._trial_id

    def __call__(self, folder: Path, ctx: Any) -> dict[str, Any]:
        return _score(self.search, self.trial, self.rho, self.lr)


def _score(search: Any, trial: Any, rho: float, lr: float) -> dict[str, Any]:
    """Train ``trial`` (:func:`~samkit.experiments.tune_trial.trial_value`): its record."""
    import optuna

    values = {"rho": rho, "lr": lr}
    try:
        value = trial_value(search, trial, rho, lr)
    except optuna.TrialPruned:
        return {"state": "pruned", **values}
    if value is None:
        return {"state": "pruned", "diverged": True, **values}
    return {"state": "complete", "value": value, **values}


def _state() -> Any:
    """Optuna's trial states (imported when a search runs: Optuna is optional)."""
    from optuna.trial import TrialState

    return TrialState


def _tell(ostudy: Any, trial: Any, *args: Any, **kwargs: Any) -> bool:
    """``ostudy.tell``; True when a grid sampler wished to stop the search, every point
    being tried (it calls ``Study.stop``, which only ``optimize`` takes; the trial's
    state is stored before it)."""
    try:
        ostudy.tell(trial, *args, **kwargs)
    except RuntimeError as exc:
        if "Study.stop" not in str(exc):
            raise
        return True
    return False


class TrialSource(CellSource):
    """The remaining trials of ``ostudy`` as the engine's cells (``search``: an OpenTune).

    A trial is asked from Optuna only when a slot is free, so it is proposed
    from every result told so far; its outcome is told to Optuna as its cell
    is over; no trial is asked once a grid sampler has stopped the search (as
    Optuna's own loop). ``inline``: the trials train in this process
    (:class:`InlineTrial`), else in workers (:class:`TuneTrial`). A trial whose
    worker dies is failed in the journal (marked interrupted) and its values
    queued again as a new trial, which the engine runs in its place (up to its
    retries; the last one's failure is kept).
    """

    redo = "queued again"

    def __init__(self, search: Any, ostudy: Any, remaining: int, *, inline: bool = False) -> None:
        self.search, self.ostudy, self.total = search, ostudy, remaining
        self.inline = inline
        self.journal = str(search.out / "optuna-journal.log")
        self.asked = 0
        self.stopped = False  # the grid sampler stopped the search
        self.live: dict[int, Any] = {}  # trial id -> the trial, asked and not told yet

    def next_cell(self) -> Cell | None:
        if self.asked == self.total or self.stopped:
            return None
        self.asked += 1
        return self._ask()

    def _ask(self) -> Cell:
        search, cfg = self.search, self.search.config
        trial = self.ostudy.ask()
        rho, lr = suggest(trial, search)
        self.live[trial._trial_id] = trial
        task: InlineTrial | TuneTrial
        if self.inline:
            task = InlineTrial(search, trial, rho, lr)
        else:
            task = TuneTrial(
                cfg,
                search.spec,
                search.base,
                self.journal,
                trial._trial_id,
                rho,
                lr,
                cfg.train.epochs // 2,
                search.problem.maximize,
            )
        name = f"trial {trial.number}"
        return Cell(name, search.out, f"trial{trial.number}", {}, task, stored=False)

    def again(self, cell: Cell, why: str) -> Cell:
        trial = self.live.pop(cell.task.trial_id)
        trial.set_user_attr("interrupted", True)
        trial.set_user_attr("failure", why)
        _tell(self.ostudy, trial, state=_state().FAIL)
        self.ostudy.enqueue_trial(
            dict(trial.params), user_attrs={"redo_of": trial.number}, skip_if_exists=False
        )
        return self._ask()

    def done(self, outcome: Outcome) -> None:
        trial = self.live.pop(outcome.cell.task.trial_id)
        out = outcome.record
        if out is None:  # it raised, or its worker died on every try
            trial.set_user_attr("interrupted", False)
            trial.set_user_attr("failure", outcome.error)
            self.stopped |= _tell(self.ostudy, trial, state=_state().FAIL)
        elif out["state"] == "complete":
            self.stopped |= _tell(self.ostudy, trial, out["value"])
        else:
            if out.get("diverged"):
                trial.set_user_attr("diverged", True)
            self.stopped |= _tell(self.ostudy, trial, state=_state().PRUNED)

    def describe(self, out: dict[str, Any]) -> str:
        """A finished trial's log line (after its name)."""
        if out["state"] == "complete" or out.get("diverged"):
            return trial_text(self.search, out["rho"], out["lr"], out.get("value"))
        return f"rho {out['rho']:.4g} pruned"

    def interrupted(self, exc: BaseException) -> None:
        """The study stopped on ``exc`` (Ctrl-C, an error): the trials still running are
        failed, marked for the resumed search to do again; in this process (``inline``)
        the one running raised ``exc`` itself, and an error of its own is not redone (as
        in Optuna's loop)."""
        cut = not self.inline or not isinstance(exc, Exception)
        for trial in self.live.values():
            try:
                if cut:
                    trial.set_user_attr("interrupted", True)
                _tell(self.ostudy, trial, state=_state().FAIL)
            except Exception:  # noqa: BLE001, S110 - already told
                pass


def run_trials(search: Any, ostudy: Any, remaining: int, jobs: Any, threads: Any, log: Any) -> None:
    """Run ``remaining`` trials of ``ostudy``, ``jobs`` at once (``search``: an OpenTune);
    with one in this process, one after another as Optuna's own loop."""
    import optuna

    executor = make_executor(jobs, threads, loaders=search.config.num_workers)
    source = TrialSource(search, ostudy, remaining, inline=isinstance(executor, InProcess))
    try:
        run_cells(
            source,
            executor=executor,
            log=log,
            describe=source.describe,
            retries=RETRIES,
        )
    except BaseException as exc:
        source.interrupted(exc)
        raise
    finally:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
