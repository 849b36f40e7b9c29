"""``samkit tune --jobs N``: N Optuna trials at once through ask/tell, on the study engine's workers.

The driver asks Optuna for a trial, sends its values to a free worker
(:class:`~samkit.experiments.engine.LocalPool`) and tells Optuna the result;
the journal in the run folder stays the one record. A worker reports each
epoch's validation value to the journal itself (Optuna's journal storage is
safe for several processes), so the median pruner sees the other trials as
in a sequential search.

What parallel sampling changes: a trial is proposed from the trials that
have *completed* when it is asked. With N at once, each proposal misses the
results of up to N-1 trials still training, and the order in which trials
complete depends on timing, so a TPE search with ``jobs > 1`` is not
reproducible run to run (a grid search is: it runs the same points). With
``jobs = 1`` the search is exactly the sequential one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .engine import Cell, make_executor
from .tune_search import OpenTune
from .tune_trial import STUDY_NAME, suggest, trial_line, trial_value

__all__ = ["TuneTrial", "run_parallel"]

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
        try:
            value = trial_value(search, trial, self.rho, self.lr)
        except optuna.TrialPruned:
            return {"state": "pruned"}
        if value is None:
            return {"state": "pruned", "diverged": True}
        return {"state": "complete", "value": value}


def _tell(ostudy: Any, trial: Any, *args: Any, **kwargs: Any) -> None:
    """``ostudy.tell``: a grid sampler's wish to stop the loop once every point is
    asked (it calls ``Study.stop``, which only ``optimize`` takes) is this loop's own
    count; the trial's state is stored before it."""
    try:
        ostudy.tell(trial, *args, **kwargs)
    except RuntimeError as exc:
        if "Study.stop" not in str(exc):
            raise


def run_parallel(
    search: Any, ostudy: Any, remaining: int, jobs: Any, threads: Any, log: Any
) -> None:
    """Run ``remaining`` trials of ``ostudy``, ``jobs`` at once (``search``: an OpenTune)."""
    import optuna
    from optuna.trial import TrialState

    executor = make_executor(jobs, threads)
    spec, cfg = search.spec, search.config
    journal = str(search.out / "optuna-journal.log")
    trials: dict[int, Any] = {}
    asked = 0
    executor.start()
    try:
        while asked < remaining or executor.running():
            while asked < remaining and executor.free():
                trial = ostudy.ask()
                rho, lr = suggest(trial, search)
                task = TuneTrial(
                    cfg,
                    spec,
                    search.base,
                    journal,
                    trial._trial_id,
                    rho,
                    lr,
                    cfg.train.epochs // 2,
                    search.problem.maximize,
                )
                cell = Cell(f"trial {trial.number}", search.out, f"trial{trial.number}", {}, task)
                if asked == 0:
                    executor.check(cell)
                trials[trial.number] = (trial, rho, lr)
                executor.submit(trial.number, cell)
                asked += 1
            for ev in executor.wait():
                trial, rho, lr = trials.pop(ev.index)
                if ev.kind == "error":
                    _tell(ostudy, trial, state=TrialState.FAIL)
                    assert ev.error is not None
                    raise ev.error
                if ev.kind == "died":  # its worker was killed: the trial is done again,
                    # up to RETRIES times (as a study's run), then failed with the reason
                    tries = int(trial.user_attrs.get("tries", 1))
                    trial.set_user_attr("interrupted", tries <= RETRIES)
                    trial.set_user_attr("failure", f"{ev.reason} ({tries} tries)")
                    _tell(ostudy, trial, state=TrialState.FAIL)
                    if tries > RETRIES:
                        if log:
                            log(f"  trial {trial.number}: FAILED: {ev.reason} ({tries} tries)")
                        continue
                    ostudy.enqueue_trial(
                        dict(trial.params),
                        user_attrs={"redo_of": trial.number, "tries": tries + 1},
                        skip_if_exists=False,
                    )
                    asked -= 1
                    if log:
                        log(
                            f"  trial {trial.number}: {ev.reason}; queued again "
                            f"(try {tries + 1} of {RETRIES + 1})"
                        )
                    continue
                out = ev.record or {}
                if out["state"] == "complete":
                    _tell(ostudy, trial, out["value"])
                    if log:
                        log(trial_line(search, trial.number, rho, lr, out["value"]))
                else:
                    if out.get("diverged"):
                        trial.set_user_attr("diverged", True)
                        if log:
                            log(trial_line(search, trial.number, rho, lr, None))
                    _tell(ostudy, trial, state=TrialState.PRUNED)
    except BaseException:
        executor.stop()
        for trial, _, _ in trials.values():  # the resumed search does them again
            try:
                trial.set_user_attr("interrupted", True)
                _tell(ostudy, trial, state=TrialState.FAIL)
            except Exception:  # noqa: BLE001, S110 - already told
                pass
        raise
    finally:
        executor.close()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
