"""One trial of ``samkit tune``, the same whether the engine trains it in this process
or sends it to a worker (:mod:`~samkit.experiments.tune_parallel`): the values it
suggests (:func:`suggest`) and its score (:func:`trial_value`)."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["STUDY_NAME", "suggest", "trial_value", "trial_text", "shown"]

#: the Optuna study's name in the run folder's journal
STUDY_NAME = "samkit-tune"


def suggest(trial: Any, search: Any) -> tuple[float, float]:
    """``(rho, lr)`` of ``trial``: rho from the search's grid or its log-uniform range;
    lr log-uniform within 10x of the base lr with ``tune_lr``, else the base lr."""
    spec, base = search.spec, search.base
    lo, hi = spec.range()
    rho = (
        trial.suggest_categorical("rho", spec.grid)
        if spec.grid
        else trial.suggest_float("rho", lo, hi, log=True)
    )
    lr = (
        trial.suggest_float("lr", base.lr / 10, base.lr * 10, log=True) if spec.tune_lr else base.lr
    )
    return rho, lr


def trial_value(search: Any, trial: Any, rho: float, lr: float) -> float | None:
    """Train every seed of ``search`` (an :class:`~samkit.experiments.tune_search.OpenTune`)
    with ``rho`` and ``lr``; the mean validation score, or None when a seed diverged.

    Each epoch's validation value is reported to ``trial`` (over the seeds, one after
    another); Optuna's pruner may stop the first seed: ``optuna.TrialPruned`` is raised.
    """
    import optuna

    metric, epochs = search.problem.primary, search.config.train.epochs
    scores = []
    for s_i, seed in enumerate(search.config.seeds):

        def report(rec: dict[str, Any], s_i: int = s_i) -> None:
            value = rec.get(f"val_{metric}")
            if value is None or not math.isfinite(value):  # an epoch without evaluation
                return
            trial.report(value, s_i * epochs + rec["epoch"])
            if s_i == 0 and trial.should_prune():
                raise optuna.TrialPruned()

        res = search._train_seed(seed, rho, lr, [report])
        value = res.final.get(f"val_{metric}")
        if res.diverged or value is None or not math.isfinite(value):
            return None
        scores.append(value)
    return sum(scores) / len(scores)


def shown(value: float, metric: str) -> str:
    """A validation score as the log shows it: ``"91.20 %"`` for accuracy, else 4 digits."""
    return f"{100 * value:.2f} %" if metric in ("acc", "accuracy") else f"{value:.4g}"


def trial_text(search: Any, rho: float, lr: float, value: float | None) -> str:
    """What a finished trial gave (``value`` None: it diverged, and was pruned)."""
    if value is None:
        return f"rho {rho:.4g} diverged (pruned)"
    metric = search.problem.primary
    lr_txt = f", lr {lr:.3g}" if search.spec.tune_lr else ""
    return f"rho {rho:.4g}{lr_txt} -> validation {metric} {shown(value, metric)}"
