"""``samkit gan``: a GAN on 2-D Gaussian mixtures (Ring-8, Grid-25), Adam against SAM on each player.

Trains every (data set x method x seed) run: Adam on both players, SAM on the
generator, on the discriminator, and on both. Measures the modes covered, the
share of high-quality samples (within 3 standard deviations of a mode), the
MMD to the true distribution and the KL divergence of the mode shares, over
training and at the end. Prints a table and one paired verdict per method and
metric, writes a run folder (results.json, report.html with scatter plots of
the samples over training). Rerunning the same command resumes, an
interrupted run from its last saved iteration.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any

from .common import add_execution_arguments, execution_flags
from .compare import _floats, _log, _seeds
from .errors import UsageError, warn_if_no_plots

EPILOG = """examples:
  samkit gan --quick                           # about 2 minutes: Ring-8, 4 methods, 2 seeds
  samkit gan                                   # the full study: 5 seeds, Ring-8 and Grid-25
  samkit gan --datasets grid25 --rho 0.01,0.05,0.2 --seeds 10
  samkit gan --methods adam "sam_g:rho=0.1" --iterations 20000
  samkit gan --list                            # data sets and methods
"""


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "gan",
        help="GAN on 2-D Gaussian mixtures: Adam vs SAM on the generator, the discriminator, both",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE", help="TOML settings file (flags override it)")
    p.add_argument("--quick", action="store_true", help="a short run (about 2 minutes on a CPU)")
    p.add_argument("--datasets", nargs="+", metavar="NAME", help="ring8, grid25 (default both)")
    p.add_argument(
        "--methods",
        nargs="+",
        metavar="SPEC",
        help="adam, sam_g, sam_d, sam_both, or 'name:rho=...' (default all four)",
    )
    p.add_argument("--rho", metavar="R[,R...]", help="rho values: each SAM method once per value")
    p.add_argument(
        "--seeds", metavar="N|S,S,...", help="number of seeds, or a comma-separated list"
    )
    p.add_argument(
        "--iterations", type=int, help="training iterations (default: Ring-8 5000, Grid-25 8000)"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        help="real and generated points per step (Ring-8 128, Grid-25 256)",
    )
    p.add_argument("--hidden", type=int, help="width of both networks (Ring-8 64, Grid-25 128)")
    p.add_argument("--lr", type=float, help="Adam's learning rate for both players (1e-3)")
    p.add_argument("--eval-every", type=int, help="iterations between evaluations (500)")
    p.add_argument("--baseline", metavar="LABEL", help="the method verdicts compare against (adam)")
    p.add_argument("--device", help="cpu (default), cuda, cuda:N, mps, auto")
    p.add_argument("--out", metavar="DIR", help="run folder (default: samkit-runs/gan-...-<hash>)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    add_execution_arguments(p)
    p.add_argument("--list", action="store_true", help="list data sets and methods, then exit")
    p.set_defaults(func=run)


def _print_list() -> int:
    from ..experiments.gan import GAN_METHODS, MIXTURES

    print("data sets:")
    for name, m in MIXTURES.items():
        iterations, batch, hidden = m.sizes
        print(
            f"  {name:<8} {len(m.centers)} modes, standard deviation {m.std:g} ({m.source}); "
            f"{iterations} iterations, batch {batch}, width {hidden}"
        )
    print("methods:")
    for name, info in GAN_METHODS.items():
        opts = ", ".join(f"{k}={v}" for k, v in info.defaults.items())
        print(f"  {name:<9} {info.description}" + (f" [{opts}]" if opts else ""))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.list:
        return _print_list()
    from ..experiments import gan
    from ..experiments import settings as st

    try:
        toml = st.load_toml(args.config, keys=gan.KEYS) if args.config else {}
        flags = {
            "datasets": args.datasets,
            "methods": args.methods,
            "rho": _floats("rho", args.rho),
            "seeds": _seeds(args.seeds),
            "iterations": args.iterations,
            "batch_size": args.batch_size,
            "hidden": args.hidden,
            "lr": args.lr,
            "eval_every": args.eval_every,
            "baseline": args.baseline,
            "device": args.device,
            "out": args.out,
        }
        merged = st.merge(gan.QUICK if args.quick else None, toml, flags, defaults=gan.DEFAULTS)
        config = gan.build_config(merged)
        how = st.execution(execution_flags(args))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    out = Path(merged["out"]) if merged["out"] else gan.default_out(config)
    log = _log(args.quiet)
    with contextlib.ExitStack() as stack:
        try:  # the folder's lock and every check, before any training: one line, exit 2
            folder = stack.enter_context(gan.open_study(config, out))
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        warn_if_no_plots("gan")
        if log:
            sizes = ", ".join(f"{d} {config.resolved(d).iterations}" for d in config.datasets)
            log(
                f"samkit gan: {', '.join(config.datasets)} x [{', '.join(config.labels)}] x "
                f"{len(config.seeds)} seed(s), iterations {sizes} -> {folder}"
            )
        result = gan.run_checked(
            config, folder, progress=None if not args.quiet else False, log=log, **how
        )
    print(result.table)
    if result.verdicts:
        print()
        for sentence in result.verdicts:
            print(sentence)
    print(f"results: {result.results_path}\nreport:  {result.report_path}")
    return 0
