"""``samkit rl``: PPO against PPO with SAM on classic-control tasks, and the robustness of the policies.

Trains every (environment x method x seed) run with Stable-Baselines3's PPO
(SAM through samkit's SAMPPO), records the return over training, then plays
the final deterministic policies on the nominal environment and on a grid of
perturbed ones (random actions, scaled masses, lengths, inertias, forces and
gravity), as Lee & Yoon (ICLR 2025) do. Prints a table and one paired
verdict per method, writes a run folder (results.json, report.html, the
trained agents). Rerunning the same command resumes: finished runs are not
run again.
"""

from __future__ import annotations

import argparse
from typing import Any

from .common import add_grid_arguments, print_methods, run_grid_study

EPILOG = """examples:
  samkit rl --quick                            # about 2 minutes: CartPole, PPO vs SAM, 2 seeds
  samkit rl                                    # CartPole and Acrobot, PPO / SAM / SAM every 4 steps, 5 seeds
  samkit rl --envs CartPole-v1 --methods ppo sam looksam --rho 0.02,0.1 --seeds 10
  samkit rl --methods ppo "sam_every_k:k=8,rho=0.05" --timesteps 50000 --grid coarse
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
    add_grid_arguments(
        p,
        conditions=("--envs", "ENV", "CartPole-v1, Acrobot-v1"),
        methods_help="ppo, sam, asam, sam_every_k, looksam, or 'name:key=value,...' (default "
        "ppo sam sam_every_k; everyk, sam_every_k's old name, still works)",
        rho_help="rho values: each SAM-type method once per value",
        baseline="ppo",
        out="samkit-runs/rl-...-<hash>",
        own=_own_arguments,
        list_help="list environments and methods, then exit",
    )
    p.set_defaults(func=run)


def _own_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--timesteps", type=int, help="training timesteps per run (default: per environment)"
    )
    p.add_argument(
        "--eval-episodes", type=int, help="episodes per point of the robustness grid (default 20)"
    )
    p.add_argument("--grid", choices=("full", "coarse"), help="robustness grid (default full)")


def _print_list() -> int:
    from ..experiments.rl import ENVS, RL_METHODS

    print("environments (perturbation axes: levels):")
    for name, spec in ENVS.items():
        print(f"  {name}  ({spec.timesteps} timesteps; {spec.source})")
        for axis in spec.axes:
            levels = ", ".join(f"{lv:g}" for lv in axis.levels)
            print(f"    {axis.name:<13} {axis.description}: {levels}")
    print_methods(RL_METHODS, 11)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.list:
        return _print_list()
    from ..experiments import rl

    own = {
        "envs": args.envs,
        "timesteps": args.timesteps,
        "eval_episodes": args.eval_episodes,
        "grid": args.grid,
    }
    return run_grid_study(
        args,
        "rl",
        rl,
        own,
        headline=lambda config: (
            f"{', '.join(config.envs)} x [{', '.join(config.labels)}] x {len(config.seeds)} seed(s)"
        ),
        tables=lambda result: [result.table, result.axis_tables],
    )
