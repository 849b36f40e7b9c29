"""``samkit rl``: PPO against PPO with SAM on classic-control tasks, and the robustness of the policies.

Trains every (environment x method x seed) run with Stable-Baselines3's PPO
(SAM through samkit's SAMPPO), records the return over training, then plays
the final deterministic policies on the nominal environment and on a grid of
perturbed ones (random actions, scaled masses, lengths, forces, gravity,
torque noise), as Lee & Yoon (ICLR 2025) do. Prints a table and one paired
verdict per method, writes a run folder (results.json, report.html, the
trained agents). Rerunning the same command resumes: finished runs are not
run again.
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
  samkit rl --quick                            # about 2 minutes: CartPole, PPO vs SAM, 2 seeds
  samkit rl                                    # CartPole and Acrobot, PPO / SAM / SAM every 4 steps, 5 seeds
  samkit rl --envs CartPole-v1 --methods ppo sam looksam --rho 0.02,0.1 --seeds 10
  samkit rl --methods ppo "everyk:k=8,rho=0.05" --timesteps 50000 --grid coarse
  samkit rl --config rl.toml --out runs/rl
  samkit rl --list                             # environments, perturbations and methods
"""


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "rl",
        help="PPO vs PPO with SAM (Stable-Baselines3): return and robustness to perturbed "
        "actions and dynamics",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE", help="TOML settings file (flags override it)")
    p.add_argument("--quick", action="store_true", help="a short run (about 2 minutes on a CPU)")
    p.add_argument("--envs", nargs="+", metavar="ENV", help="CartPole-v1, Acrobot-v1")
    p.add_argument(
        "--methods",
        nargs="+",
        metavar="SPEC",
        help="ppo, sam, asam, everyk, looksam, or 'name:key=value,...' (default ppo sam everyk)",
    )
    p.add_argument(
        "--rho", metavar="R[,R...]", help="rho values: each SAM-type method once per value"
    )
    p.add_argument(
        "--seeds", metavar="N|S,S,...", help="number of seeds, or a comma-separated list"
    )
    p.add_argument(
        "--timesteps", type=int, help="training timesteps per run (default: per environment)"
    )
    p.add_argument(
        "--eval-episodes", type=int, help="episodes per point of the robustness grid (default 20)"
    )
    p.add_argument("--grid", choices=("full", "coarse"), help="robustness grid (default full)")
    p.add_argument("--baseline", metavar="LABEL", help="the method verdicts compare against (ppo)")
    p.add_argument("--device", help="cpu (default), cuda, cuda:N, mps, auto")
    p.add_argument("--out", metavar="DIR", help="run folder (default: samkit-runs/rl-...-<hash>)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    add_execution_arguments(p)
    p.add_argument("--list", action="store_true", help="list environments and methods, then exit")
    p.set_defaults(func=run)


def _print_list() -> int:
    from ..experiments.rl import ENVS, RL_METHODS

    print("environments (perturbation axes: levels):")
    for name, spec in ENVS.items():
        print(f"  {name}  ({spec.timesteps} timesteps; {spec.source})")
        for axis in spec.axes:
            levels = ", ".join(f"{lv:g}" for lv in axis.levels)
            print(f"    {axis.name:<13} {axis.description}: {levels}")
    print("methods:")
    for name, info in RL_METHODS.items():
        opts = ", ".join(f"{k}={v}" for k, v in info.defaults.items())
        print(f"  {name:<8} {info.description}" + (f" [{opts}]" if opts else ""))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.list:
        return _print_list()
    from ..experiments import rl
    from ..experiments import settings as st

    try:
        toml = st.load_toml(args.config, keys=rl.KEYS) if args.config else {}
        flags = {
            "envs": args.envs,
            "methods": args.methods,
            "rho": _floats("rho", args.rho),
            "seeds": _seeds(args.seeds),
            "timesteps": args.timesteps,
            "eval_episodes": args.eval_episodes,
            "grid": args.grid,
            "baseline": args.baseline,
            "device": args.device,
            "out": args.out,
        }
        merged = st.merge(rl.QUICK if args.quick else None, toml, flags, defaults=rl.DEFAULTS)
        config = rl.build_config(merged)
        how = st.execution(execution_flags(args))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    out = Path(merged["out"]) if merged["out"] else rl.default_out(config)
    log = _log(args.quiet)
    with contextlib.ExitStack() as stack:
        try:  # the folder's lock and every check, before any training: one line, exit 2
            folder = stack.enter_context(rl.open_study(config, out))
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        warn_if_no_plots("rl")
        if log:
            log(
                f"samkit rl: {', '.join(config.envs)} x [{', '.join(config.labels)}] x "
                f"{len(config.seeds)} seed(s) -> {folder}"
            )
        result = rl.run_checked(
            config, folder, progress=None if not args.quiet else False, log=log, **how
        )
    print(result.table)
    print()
    print(result.axis_tables)
    if result.verdicts:
        print()
        for sentence in result.verdicts:
            print(sentence)
    print(f"results: {result.results_path}\nreport:  {result.report_path}")
    return 0
