"""``samkit compare``: SGD vs Adam vs SAM and its variants, on built-in or your own problem.

Trains every (optimizer x seed) run, prints a table and one paired verdict per
method, and writes a run folder (``results.json``, per-run metrics and
checkpoints, ``report.html``). Rerunning the same command resumes: finished
runs are not trained again. Your own model and data: ``--model
module:function`` and ``--data module:function`` or ``--data file.npz``.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any

from .common import (
    add_execution_arguments,
    execution_flags,
    floats,
    print_outcome,
    refusals_before_training,
    seeds,
    stderr_log,
)
from .errors import UsageError, warn_if_no_plots

EPILOG = """examples:
  samkit compare --quick                       # about 2 minutes: SGD, Adam, SAM, ASAM, 2 seeds
  samkit compare                               # the full study (about 10 minutes)
  samkit compare --optimizers sgd sam --rho 0.02,0.05,0.1 --seeds 5
  samkit compare --optimizers sgd,sam,sam:rho=auto --rho 0.02,0.05,0.1   # rho="auto" beside the grid
  samkit compare --noise 0.4 --model gru --epochs 100
  samkit compare --optimizers sgd "sam:base=adam,lr=0.01,label=sam-adam" adam
  samkit compare --config examples/compare.toml
  samkit compare --model mymodels:make_model --data mydata:load --task regression
  samkit compare --model mlp --data arrays.npz --device cuda --amp bf16
  samkit compare --list                        # datasets, models and optimizers
"""


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "compare",
        help="compare SGD, Adam, SAM and its variants on a real dataset (table + HTML report)",
        description=__doc__.replace("``", ""),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_arguments(p)
    p.add_argument(
        "--optimizers",
        nargs="+",
        metavar="SPEC",
        help="methods to compare: names (comma or space separated) or 'name:key=value,...' "
        "(default: sgd adam sam asam and every registered variant but the slowest, msam and mesa; "
        "'all' for every one)",
    )
    p.add_argument(
        "--rho",
        metavar="R[,R...]",
        help="rho values on SAM's scale; each SAM-type method runs once per value",
    )
    p.add_argument(
        "--no-sharpness",
        dest="sharpness",
        action="store_false",
        default=None,
        help="skip the sharpness measures (Hessian top eigenvalue, trace, worst-case sharpness)",
    )
    p.add_argument(
        "--list", action="store_true", help="list datasets, models and optimizers, then exit"
    )
    p.set_defaults(func=run)


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by ``compare`` and ``tune``."""
    add_execution_arguments(p)
    p.add_argument("--config", metavar="FILE", help="TOML settings file (flags override it)")
    p.add_argument(
        "--quick", action="store_true", help="a short run (about 2 minutes on a laptop CPU)"
    )
    p.add_argument("--dataset", help="mnist1d (default), digits or synthetic")
    p.add_argument(
        "--data",
        metavar="MODULE:FUNCTION|FILE.npz",
        help="your own data: a function returning (train, test), (train, val, test) or a dict "
        "of torch Datasets / (x, y) arrays, or an .npz with x_train, y_train, x_test, y_test "
        "(optional x_val, y_val)",
    )
    p.add_argument(
        "--model",
        metavar="NAME|MODULE:FUNCTION",
        help="cnn (default), gru, mlp, resnet, or your own: a function returning a fresh nn.Module "
        "(imported from the current folder or an installed package)",
    )
    p.add_argument(
        "--task",
        choices=("classification", "regression"),
        help="default: classification for integer targets, regression for float targets",
    )
    p.add_argument(
        "--device", help="auto (default: CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps"
    )
    p.add_argument("--num-workers", type=int, help="DataLoader worker processes (default 0)")
    p.add_argument("--amp", choices=("bf16", "fp16"), help="mixed precision (default: float32)")
    p.add_argument(
        "--noise",
        type=float,
        help="fraction of training labels replaced by a wrong class (default 0)",
    )
    p.add_argument(
        "--seeds", metavar="N|S,S,...", help="number of seeds, or a comma-separated list"
    )
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument(
        "--lr", type=float, help="learning rate for every method (default: per base optimizer)"
    )
    p.add_argument("--weight-decay", type=float)
    p.add_argument(
        "--val-fraction", type=float, help="validation split of the training set (default 0.1)"
    )
    p.add_argument("--train-size", type=int, help="use only this many training samples")
    p.add_argument(
        "--early-stopping",
        type=int,
        metavar="PATIENCE",
        help="stop after PATIENCE epochs without a better validation value of the primary "
        "metric (accuracy by default; keeps the best weights; 0: no early stopping)",
    )
    p.add_argument(
        "--baseline",
        metavar="LABEL",
        help="the method the paired verdicts compare against (default sgd, else the first)",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="run folder (default: samkit-runs/<command>-<dataset>-<model>-<hash>)",
    )
    p.add_argument(
        "--quiet", "-q", action="store_true", help="no progress output, only the final table"
    )


def settings_from_args(args: argparse.Namespace, quick_preset: dict[str, Any]) -> dict[str, Any]:
    """Merge defaults / quick preset / TOML / flags into one settings dict."""
    from ..experiments import settings as st

    toml = st.load_toml(args.config) if args.config else {}
    flags = {
        "dataset": args.dataset,
        "data": args.data,
        "model": args.model,
        "task": args.task,
        "noise": args.noise,
        "seeds": seeds(args.seeds),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "val_fraction": args.val_fraction,
        "train_size": args.train_size,
        "early_stopping": args.early_stopping,
        "device": args.device,
        "num_workers": args.num_workers,
        "amp": args.amp,
        "baseline": args.baseline,
        "out": args.out,
        **execution_flags(args),
    }
    if getattr(args, "optimizers", None) is not None:
        flags["optimizers"] = args.optimizers
    if getattr(args, "rho", None) is not None:
        flags["rho"] = floats("rho", args.rho)
    if getattr(args, "sharpness", None) is not None:
        flags["sharpness"] = args.sharpness
    st.check_one_data_source(toml, flags)
    return st.merge(quick_preset if args.quick else None, toml, flags)


def _print_list() -> int:
    from ..experiments.datasets import list_datasets
    from ..experiments.methods import list_methods
    from ..experiments.models import list_models

    for title, items in (
        ("datasets", list_datasets()),
        ("models", list_models()),
        ("optimizers", list_methods()),
    ):
        print(f"{title}:")
        for k, v in items.items():
            print(f"  {k:<12} {v}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.list:
        return _print_list()
    from ..experiments import api
    from ..experiments import settings as st
    from ..experiments.report import print_table
    from ..experiments.study import sharpness_available

    try:
        settings = settings_from_args(args, st.QUICK)
        config = api.study_from_settings(settings)
        how = st.execution(settings)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    out = Path(settings["out"]) if settings["out"] else st.default_out_dir(config)
    default_methods = settings["optimizers"] in (None, ["all"], "all") and not settings["methods"]
    log = stderr_log(args.quiet)
    with contextlib.ExitStack() as stack:
        try:
            study = stack.enter_context(api.open_study(config, out, drop_unfit=default_methods))
        except ValueError as exc:  # validation before any training: one line, exit 2
            raise UsageError(str(exc)) from exc
        warn_if_no_plots("compare")
        if log:
            log(api.headline(study))
            if config.sharpness and not sharpness_available():
                log("samkit compare: samkit.sharpness is not available; sharpness columns skipped")
        with refusals_before_training():
            result = study.run(progress=None if not args.quiet else False, log=log, **how)
    title = f"{config.dataset} / {config.model}" + (
        f", {config.noise:.0%} label noise" if config.noise else ""
    )
    print_table(result.rows, title=title)
    return print_outcome(result)
