"""``samkit tune``: search SAM's rho (and optionally the learning rate) with Optuna.

Each trial trains the method on the training split and scores it by its
validation accuracy (mean over the seeds), never by the test set. The
search is Optuna's TPE sampler (seeded), or a grid with ``--grid``; the trials
are kept in a journal file in the run folder, so an interrupted search
resumes. With ``--auto``, the method is also trained with a self-tuning
rho (``rho="auto"``) on the same seeds and shown beside the search. Writes
``tune.json`` (every trial, the recommendation, the automatic runs) and
``report.html`` (validation accuracy against rho; each automatic run's rho
over training).
"""

from __future__ import annotations

import argparse
import contextlib
import math
from pathlib import Path
from typing import Any

from .common import stderr_log
from .compare import add_common_arguments, settings_from_args
from .errors import UsageError, warn_if_no_plots

EPILOG = """examples:
  samkit tune --quick                          # a few trials of SAM on MNIST-1D
  samkit tune --method sam --trials 30 --tune-lr
  samkit tune --grid 0.01,0.02,0.05,0.1,0.2 --seeds 2
  samkit tune --grid 0.02,0.05,0.1,0.2,0.5 --auto     # rho='auto' beside the grid
  samkit tune --method asam --rho-range 0.1,5 --noise 0.4
  samkit tune --model mymodels:make_model --data mydata:load --trials 10
"""


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "tune",
        help="search rho (and lr) for a SAM-type method with Optuna on the validation split",
        description=__doc__.replace("``", ""),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_arguments(p)
    for action in p._actions:  # tune trains its trials here (--ray is refused): not listed
        if action.dest == "ray":
            action.help = argparse.SUPPRESS
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
    p.add_argument(
        "--auto",
        nargs="?",
        const="auto",
        metavar="RHO[,RHO...]",
        help="also train the method with a self-tuning rho on the same seeds and show it "
        "beside the search: 'auto' (the default when the flag has no value), "
        "'auto:loss_equated', ... (comma separated; 'sam:rho=auto' is read as 'auto')",
    )
    p.set_defaults(func=run)


def _numbers(flag: str, text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise UsageError(f"invalid --{flag} value: {text!r} (numbers separated by commas)") from exc


def _auto(text: str | None, method: str) -> list[str] | None:
    """``--auto`` -> the self-tuning radii: ``auto,auto:loss_equated`` or ``sam:rho=auto``."""
    if text is None:
        return None
    out = []
    for token in (t.strip() for t in text.split(",")):
        if not token:
            continue
        name, sep, rest = token.partition(":rho=")
        if sep:
            if name.lower() != method:
                raise UsageError(
                    f"invalid --auto value: {token!r} (tuning {method!r}; give {method}:rho=...)"
                )
            token = rest
        out.append(token)
    if not out:
        raise UsageError(f"invalid --auto value: {text!r} (auto, auto:<name>, ...)")
    return out


def run(args: argparse.Namespace) -> int:
    from ..experiments import api, tuning
    from ..experiments import settings as st

    try:
        if args.baseline is not None:  # (shared with compare) one method: nothing to compare
            raise ValueError(
                f"Invalid baseline value: {args.baseline!r} (samkit tune searches one method's "
                "rho and gives no verdicts; --baseline is samkit compare's)"
            )
        rho_range = _numbers("rho-range", args.rho_range)
        spec = tuning.TuneSpec(
            method=args.method.lower(),
            trials=args.trials,
            rho_range=tuple(rho_range) if rho_range is not None else None,
            grid=_numbers("grid", args.grid),
            tune_lr=args.tune_lr,
            sampler_seed=args.sampler_seed,
            base=args.base,
            auto=_auto(args.auto, args.method.lower()),
        )
        settings = settings_from_args(args, tuning.QUICK)
        settings["optimizers"] = [spec.method]
        settings["sharpness"] = False
        config = api.study_from_settings(settings)
        how = st.execution(settings)
        if how["ray"] is not None:
            raise ValueError(
                f"Invalid ray value: {how['ray']!r} (samkit tune runs its trials on this "
                "machine; use --jobs)"
            )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    out = (
        Path(settings["out"])
        if settings["out"]
        else st.default_out_dir(config, prefix=f"tune-{spec.method}")
    )
    with contextlib.ExitStack() as stack:
        try:
            search = stack.enter_context(
                tuning.open_tune(
                    config,
                    spec,
                    out,
                    quick=args.quick,
                    lr=settings["lr"],
                    weight_decay=settings["weight_decay"],
                )
            )
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        warn_if_no_plots("tune")
        try:
            result = search.run(log=stderr_log(args.quiet), **how)
        except ValueError as exc:  # no trial completed
            raise UsageError(str(exc)) from exc
    summary = result.summary
    _print_trials(summary)
    best = summary["best"]
    lr_txt = f", lr = {best['lr']:.3g}" if "lr" in best else ""
    metric = summary["metric"]
    shown = (
        f"{100 * best['value']:.2f} %" if metric in ("acc", "accuracy") else f"{best['value']:.4g}"
    )
    print(f"recommended: rho = {best['rho']:.4g}{lr_txt} (validation {metric} {shown})")
    for auto in summary.get("auto", []):
        print(tuning.auto_note(auto, best, metric in ("acc", "accuracy")))
    print(f"results: {result.results_path}\nreport:  {result.report_path}")
    return 0


def _print_trials(summary: dict[str, Any]) -> None:
    pct = summary.get("metric", "acc") in ("acc", "accuracy")
    head = "val acc %" if pct else f"val {summary.get('metric')}"
    rows = sorted(  # an interrupted trial that was tried again shows once, as the redo
        (
            t
            for t in summary["trials"]
            if t["params"].get("rho") is not None and not t.get("redone")
        ),
        key=lambda t: t["params"]["rho"],
    )
    has_lr = any("lr" in t["params"] for t in rows)
    print(f"{'rho':>10}  {'lr':>10}  {head:>9}" if has_lr else f"{'rho':>10}  {head:>9}")
    for t in rows:
        if t.get("diverged"):
            acc = "diverged"
        elif t["state"] == "PRUNED":
            acc = "pruned"
        elif t["state"] != "COMPLETE" or t["value"] is None:
            acc = t["state"].lower()
        else:
            acc = f"{100 * t['value']:.2f}" if pct else f"{t['value']:.4g}"
        if has_lr:
            print(
                f"{t['params']['rho']:>10.4g}  {t['params'].get('lr', math.nan):>10.3g}  {acc:>9}"
            )
        else:
            print(f"{t['params']['rho']:>10.4g}  {acc:>9}")
    for a in summary.get("auto", []):
        if a.get("value") is None:
            acc = "diverged"
        else:
            acc = f"{100 * a['value']:.2f}" if pct else f"{a['value']:.4g}"
        print(f"{a['rho']:>10}  {'':>10}  {acc:>9}" if has_lr else f"{a['rho']:>10}  {acc:>9}")
