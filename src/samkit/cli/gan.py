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
from typing import Any

from .common import add_grid_arguments, print_methods, run_grid_study

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
    add_grid_arguments(
        p,
        conditions=("--datasets", "NAME", "ring8, grid25 (default both)"),
        methods_help="adam, sam_g, sam_d, sam_both, or 'name:rho=...' (default all four)",
        rho_help="rho values: each SAM method once per value",
        baseline="adam",
        out="samkit-runs/gan-...-<hash>",
        own=_own_arguments,
        list_help="list data sets and methods, then exit",
    )
    p.set_defaults(func=run)


def _own_arguments(p: argparse.ArgumentParser) -> None:
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


def _print_list() -> int:
    from ..experiments.gan import GAN_METHODS, MIXTURES

    print("data sets:")
    for name, m in MIXTURES.items():
        iterations, batch, hidden = m.sizes
        print(
            f"  {name:<8} {len(m.centers)} modes, standard deviation {m.std:g} ({m.source}); "
            f"{iterations} iterations, batch {batch}, width {hidden}"
        )
    print_methods(GAN_METHODS, 9)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.list:
        return _print_list()
    from ..experiments import gan

    own = {
        "datasets": args.datasets,
        "iterations": args.iterations,
        "batch_size": args.batch_size,
        "hidden": args.hidden,
        "lr": args.lr,
        "eval_every": args.eval_every,
    }

    def headline(config: Any) -> str:
        sizes = ", ".join(f"{d} {config.resolved(d).iterations}" for d in config.datasets)
        return (
            f"{', '.join(config.datasets)} x [{', '.join(config.labels)}] x "
            f"{len(config.seeds)} seed(s), iterations {sizes}"
        )

    return run_grid_study(
        args, "gan", gan, own, headline=headline, tables=lambda result: [result.table]
    )
