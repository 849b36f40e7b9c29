"""The settings of ``samkit rl``: its methods, defaults, the ``--quick`` preset, and
:func:`build_config`, which checks them all before anything is trained."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import grid
from .. import settings as st
from ..grid import MethodDef, Variant
from .envs import ENVS

__all__ = ["PROTOCOL", "RL_METHODS", "DEFAULTS", "QUICK", "KEYS", "RLConfig", "build_config"]

PROTOCOL = 1  # bump when a change alters what a finished run would measure

RL_METHODS: dict[str, MethodDef] = {
    "ppo": MethodDef("PPO (Schulman et al., arXiv 1707.06347): Stable-Baselines3's own"),
    "sam": MethodDef(
        "PPO with SAM on every gradient step (SAMPPO; Lee & Yoon, ICLR 2025)", {"rho": 0.05}
    ),
    "asam": MethodDef(
        "PPO with adaptive SAM (ASAM, arXiv 2102.11600) on every gradient step",
        {"rho": 0.5},
        rho_scale=10.0,
    ),
    "sam_every_k": MethodDef(
        "PPO with SAM on one gradient step in k, rho scaled by k (Composer's SAM every k steps; "
        "formerly everyk)",
        {"rho": 0.05, "k": 4},
    ),
    "looksam": MethodDef(
        "PPO with LookSAM (arXiv 2203.02714): SAM every k steps, the ascent direction reused between",
        {"rho": 0.05, "k": 4, "alpha": 0.2},
    ),
}


def _check_variant(variant: Variant) -> None:
    o = variant.options
    if "k" in o:
        st.check_int("k", o["k"], 1, 10_000)
    if "alpha" in o:
        st.check_float("alpha", o["alpha"], 0.0, 1.0)


DEFAULTS: dict[str, Any] = {
    "envs": ["CartPole-v1", "Acrobot-v1"],
    "methods": ["ppo", "sam", "sam_every_k"],
    "rho": None,  # a list: each SAM-type method once per value (SAM's scale)
    "seeds": 5,
    "timesteps": None,  # an int for every environment, or a table env -> int; None: each env's own
    "eval_episodes": 20,  # episodes per point of the robustness grid
    "grid": "full",  # or "coarse" (three levels per axis)
    "curve_points": 40,  # bins of the learning curve
    "baseline": None,  # the label the verdicts compare against (default: ppo, else the first)
    "device": "cpu",
    "out": None,
}

#: ``--quick``: CartPole only, PPO and SAM, two seeds, short training, the coarse grid.
QUICK: dict[str, Any] = {
    "envs": ["CartPole-v1"],
    "methods": ["ppo", "sam"],
    "seeds": 2,
    "timesteps": 16_384,
    "eval_episodes": 5,
    "grid": "coarse",
    "curve_points": 16,
}

KEYS = frozenset(DEFAULTS)
GRIDS = ("full", "coarse")


@dataclass
class RLConfig:
    """A validated RL study (see :func:`build_config`)."""

    envs: list[str]
    variants: list[Variant]
    seeds: list[int]
    timesteps: dict[str, int]
    eval_episodes: int
    grid: str
    curve_points: int
    baseline: str
    device: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "envs": list(self.envs),
            "methods": [v.to_dict() for v in self.variants],
            "seeds": list(self.seeds),
            "timesteps": dict(self.timesteps),
            "eval_episodes": self.eval_episodes,
            "grid": self.grid,
            "curve_points": self.curve_points,
            "baseline": self.baseline,
            "device": self.device,
            "protocol": PROTOCOL,
        }

    @property
    def labels(self) -> list[str]:
        return [v.label for v in self.variants]


def build_config(s: dict[str, Any]) -> RLConfig:
    """An :class:`RLConfig` from merged settings; ValueError naming the bad setting."""
    unknown = sorted(set(s) - KEYS)
    if unknown:
        raise ValueError(f"Invalid setting: {', '.join(unknown)}")
    s = st.plain({**DEFAULTS, **s})  # NumPy scalars are numbers too
    envs = grid.check_names("envs", s["envs"], ENVS)
    variants = grid.variants(s["methods"], s["rho"], RL_METHODS)
    for v in variants:
        _check_variant(v)
    seeds = grid.seed_list(s["seeds"])
    steps = s["timesteps"]
    if steps is None:
        timesteps = {e: ENVS[e].timesteps for e in envs}
    elif isinstance(steps, dict):
        extra = sorted(set(steps) - set(envs))
        if extra:
            raise ValueError(
                f"Invalid timesteps value: {', '.join(extra)} is not among the study's envs"
            )
        timesteps = {e: steps.get(e, ENVS[e].timesteps) for e in envs}
    else:
        timesteps = {e: steps for e in envs}
    for e, n in timesteps.items():
        st.check_int("timesteps", n, 1, 10**9)
        # where the learning rate decays linearly to 0 over training, the update after the
        # last rollout is at lr 0: one rollout would train nothing (PPO = SAM, seen)
        rollouts = 2 if ENVS[e].hyper.get("learning_rate_linear") else 1
        if n < rollouts * ENVS[e].rollout:
            why = (
                "at least two rollouts: its learning rate decays linearly to 0, so the "
                "update after a single rollout would be at lr 0"
                if rollouts == 2
                else "at least one rollout"
            )
            raise ValueError(
                f"Invalid timesteps value: {n} for {e} ({why}: {rollouts * ENVS[e].rollout} steps)"
            )
    st.check_int("eval_episodes", s["eval_episodes"], 1, 10_000)
    st.check_choice("grid", s["grid"], GRIDS)
    st.check_int("curve_points", s["curve_points"], 1, 10_000)
    baseline, device = grid.baseline_and_device(s, [v.label for v in variants], "ppo")
    return RLConfig(
        envs,
        variants,
        seeds,
        timesteps,
        s["eval_episodes"],
        s["grid"],
        s["curve_points"],
        baseline,
        device,
    )


def default_out(config: RLConfig) -> Path:
    return grid.default_out("rl", config.to_dict(), "-".join(e.split("-")[0] for e in config.envs))
