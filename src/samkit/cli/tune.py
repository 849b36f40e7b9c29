"""``samkit tune``: search SAM's rho (and optionally the learning rate) with Optuna.

Each trial trains the method on the training split and scores it by its
validation accuracy (mean over the seeds), never by the test set. The
search is Optuna's TPE sampler (seeded), or a grid with ``--grid``; the trials
are kept in a journal file in the run folder, so an interrupted search
resumes. Writes ``tune.json`` (every trial and the recommendation) and
``report.html`` (validation accuracy against rho).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from .compare import add_common_arguments, prepare_out_dir, settings_from_args
from .errors import UsageError

EPILOG = """examples:
  samkit tune --quick                          # a few trials of SAM on MNIST-1D
  samkit tune --method sam --trials 30 --tune-lr
  samkit tune --grid 0.01,0.02,0.05,0.1,0.2 --seeds 2
  samkit tune --method asam --rho-range 0.1,5 --noise 0.4
"""

QUICK = {"seeds": 1, "epochs": 15, "sharpness": False}


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "tune",
        help="search rho (and lr) for a SAM-type method with Optuna on the validation split",
        description=__doc__.replace("``", ""),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_arguments(p)
    p.add_argument(
        "--method", default="sam", help="the method to tune (default sam; any method with a rho)"
    )
    p.add_argument("--base", help="its base optimizer: sgd, adam or adamw (default: the method's)")
    p.add_argument("--trials", type=int, help="number of trials (default 20, 6 with --quick)")
    p.add_argument(
        "--rho-range",
        metavar="LO,HI",
        help="log-uniform search range (default 0.005,1 x the method's rho scale)",
    )
    p.add_argument(
        "--grid", metavar="R[,R...]", help="try exactly these rho values instead of sampling"
    )
    p.add_argument(
        "--tune-lr",
        action="store_true",
        help="also search the learning rate (log-uniform, 0.1x to 10x)",
    )
    p.add_argument(
        "--sampler-seed", type=int, default=0, help="seed of the Optuna sampler (default 0)"
    )
    p.set_defaults(func=run)


def _range(text: str | None, scale: float) -> tuple[float, float]:
    if text is None:
        return 0.005 * scale, 1.0 * scale
    try:
        lo, hi = (float(t) for t in text.split(","))
    except ValueError as exc:
        raise UsageError(f"invalid --rho-range value: {text!r} (expected LO,HI)") from exc
    if not 0 < lo < hi:
        raise UsageError(f"invalid --rho-range value: {text!r} (need 0 < LO < HI)")
    return lo, hi


def _grid(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        vals = [float(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise UsageError(f"invalid --grid value: {text!r} (numbers separated by commas)") from exc
    if not vals or any(not v >= 0 for v in vals):
        raise UsageError(f"invalid --grid value: {text!r} (rho must be >= 0)")
    return vals


def run(args: argparse.Namespace) -> int:
    try:
        import optuna
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise UsageError("samkit tune needs optuna (pip install 'samkit[tune]')") from exc
    from ..experiments import config as cfg
    from ..experiments.methods import method_info
    from ..experiments.study import MethodSpec, write_json_atomic

    try:
        info = method_info(args.method.lower())
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if not info.uses_rho:
        raise UsageError(f"invalid --method value: {args.method!r} has no rho to tune")
    if args.trials is not None and args.trials < 1:
        raise UsageError(f"invalid --trials value: {args.trials} (must be >= 1)")
    lo, hi = _range(args.rho_range, info.rho_scale)
    grid = _grid(args.grid)
    try:
        settings = settings_from_args(args, QUICK)
        settings["optimizers"] = [info.name]
        settings["sharpness"] = False
        study_cfg = cfg.build_study(settings)
        base_spec = MethodSpec(
            method=info.name,
            base=args.base or "",
            lr=settings["lr"],
            weight_decay=settings["weight_decay"],
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if study_cfg.val_fraction == 0:
        raise UsageError("invalid --val-fraction value: 0 (tuning needs a validation split)")
    n_trials = len(grid) if grid else (args.trials or (6 if args.quick else 20))
    out = prepare_out_dir(
        Path(settings["out"])
        if settings["out"]
        else cfg.default_out_dir(study_cfg, prefix=f"tune-{info.name}")
    )
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(out / "optuna-journal.log")))
    if grid:
        sampler: Any = optuna.samplers.GridSampler({"rho": grid}, seed=args.sampler_seed)
    else:
        sampler = optuna.samplers.TPESampler(
            seed=args.sampler_seed, n_startup_trials=min(5, n_trials)
        )
    ostudy = optuna.create_study(
        study_name="samkit-tune",
        storage=storage,
        sampler=sampler,
        direction="maximize",
        load_if_exists=True,
        pruner=optuna.pruners.MedianPruner(
            n_startup_trials=5, n_warmup_steps=study_cfg.train.epochs // 2
        ),
    )
    finished = [t for t in ostudy.trials if t.state.is_finished()]
    remaining = max(0, n_trials - len(finished))
    if log:
        log(
            f"samkit tune: {info.name} on {study_cfg.dataset} / {study_cfg.model}, {len(study_cfg.seeds)} seed(s), "
            f"{study_cfg.train.epochs} epochs, {n_trials} trials ({len(finished)} done before) -> {out}"
        )
    objective = _objective(study_cfg, base_spec, info, lo, hi, grid, args.tune_lr, log)
    if remaining:
        ostudy.optimize(objective, n_trials=remaining, catch=())
    summary = _summarize(ostudy, info.name, study_cfg, base_spec, args.tune_lr)
    write_json_atomic(out / "tune.json", summary)
    from ..experiments.report import write_report

    write_report(
        out / "report.html",
        title=f"samkit tune: {info.name} on {study_cfg.dataset} / {study_cfg.model}",
        rows=[],
        records=[],
        histories={},
        settings={k: v for k, v in study_cfg.to_dict().items() if k != "methods"}
        | {"method": base_spec.to_dict()},
        tune=summary,
        notes=[
            f"Recommended rho = {summary['best']['rho']:.4g} (validation accuracy "
            f"{100 * summary['best']['val_acc']:.2f} %)."
        ],
    )
    _print_trials(summary)
    best = summary["best"]
    lr_txt = f", lr = {best['lr']:.3g}" if "lr" in best else ""
    print(
        f"recommended: rho = {best['rho']:.4g}{lr_txt} (validation accuracy {100 * best['val_acc']:.2f} %)"
    )
    print(f"results: {out / 'tune.json'}\nreport:  {out / 'report.html'}")
    return 0


def _objective(study_cfg, base_spec, info, lo, hi, grid, tune_lr, log):
    import optuna

    from ..experiments.methods import build_method
    from ..experiments.models import build_model
    from ..experiments.trainer import seed_everything, train

    cache: dict[int, Any] = {}

    def objective(trial: optuna.Trial) -> float:
        rho = (
            trial.suggest_categorical("rho", grid)
            if grid
            else trial.suggest_float("rho", lo, hi, log=True)
        )
        lr = (
            trial.suggest_float("lr", base_spec.lr / 10, base_spec.lr * 10, log=True)
            if tune_lr
            else base_spec.lr
        )
        accs = []
        for s_i, seed in enumerate(study_cfg.seeds):
            if seed not in cache:
                cache[seed] = study_cfg.load(seed)
            data = cache[seed]
            seed_everything(seed)
            model = build_model(
                study_cfg.model,
                **{
                    "in_len": data.in_len,
                    "num_classes": data.num_classes,
                    **study_cfg.model_kwargs,
                },
            )
            n_steps = max(1, len(data.train) // study_cfg.train.batch_size)
            spec = base_spec.train_spec(
                total_steps=n_steps * study_cfg.train.epochs,
                steps_per_epoch=n_steps,
                epochs=study_cfg.train.epochs,
            ).replace(lr=lr)
            method = build_method(info.name, model, spec, rho=rho)

            def report(rec: dict[str, Any], s_i: int = s_i) -> None:
                if "val_acc" not in rec:  # an epoch without evaluation
                    return
                trial.report(rec["val_acc"], s_i * study_cfg.train.epochs + rec["epoch"])
                if s_i == 0 and trial.should_prune():
                    raise optuna.TrialPruned()

            res = train(
                model, method, data, study_cfg.train, seed=seed, callbacks=[report], progress=False
            )
            accs.append(res.final["val_acc"] if not res.diverged else 0.0)
        value = sum(accs) / len(accs)
        if log:
            lr_txt = f", lr {lr:.3g}" if tune_lr else ""
            log(
                f"  trial {trial.number}: rho {rho:.4g}{lr_txt} -> validation accuracy {100 * value:.2f} %"
            )
        return value

    return objective


def _summarize(ostudy, method, study_cfg, base_spec, tune_lr) -> dict[str, Any]:
    import optuna

    trials = [
        {"number": t.number, "params": dict(t.params), "value": t.value, "state": t.state.name}
        for t in ostudy.trials
    ]
    complete = [t for t in ostudy.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise UsageError("no trial completed; try more epochs or a wider --rho-range")
    # Recommend the best trial; among trials within 0.1 point of it, the smallest rho
    # (ties are common at this scale and a smaller rho is the safer default).
    top = max(t.value for t in complete)
    near = [t for t in complete if t.value >= top - 1e-3]
    best_t = min(near, key=lambda t: (t.params["rho"], -t.value))
    best = {"rho": best_t.params["rho"], "val_acc": best_t.value, "trial": best_t.number}
    if tune_lr:
        best["lr"] = best_t.params["lr"]
    return {
        "format": "samkit-tune",
        "version": 1,
        "method": method,
        "base": base_spec.base,
        "lr": base_spec.lr,
        "settings": study_cfg.to_dict(),
        "trials": trials,
        "best": best,
    }


def _print_trials(summary: dict[str, Any]) -> None:
    rows = sorted(
        (t for t in summary["trials"] if t["value"] is not None), key=lambda t: t["params"]["rho"]
    )
    has_lr = any("lr" in t["params"] for t in rows)
    print(
        f"{'rho':>10}  {'lr':>10}  {'val acc %':>9}" if has_lr else f"{'rho':>10}  {'val acc %':>9}"
    )
    for t in rows:
        acc = "pruned" if t["state"] == "PRUNED" else f"{100 * t['value']:.2f}"
        if has_lr:
            print(
                f"{t['params']['rho']:>10.4g}  {t['params'].get('lr', math.nan):>10.3g}  {acc:>9}"
            )
        else:
            print(f"{t['params']['rho']:>10.4g}  {acc:>9}")
