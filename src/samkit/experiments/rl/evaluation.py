"""Evaluating a ``samkit rl`` policy: deterministic episodes on the nominal environment
and on every point of its perturbation grid, with the same seeds for every method."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .envs import Axis, EnvSpec

__all__ = ["episode_seeds", "play", "sb3_policy", "evaluate"]


def episode_seeds(seed: int, episodes: int) -> list[int]:
    """The reset seeds of the evaluation episodes of run seed ``seed`` (every method, every grid point)."""
    state = np.random.SeedSequence([seed, 0x5A4D]).generate_state(episodes, dtype=np.uint32)
    return [int(s) for s in state]


def play(
    policy: Callable[[np.ndarray], np.ndarray],
    env_id: str,
    seeds: list[int],
    *,
    axis: Axis | None = None,
    level: float | None = None,
    action_seed: int = 0,
) -> list[float]:
    """Returns of ``len(seeds)`` episodes played side by side by a deterministic policy.

    ``policy(observations) -> actions`` is called on the observations of the
    episodes still running, stacked. ``axis``/``level``: the perturbation.
    With an action perturbation, each step draws one uniform number and one
    random action per episode (whether it is still running or not) from a
    generator seeded by ``action_seed``, so the same ``(action_seed, level)``
    gives every policy the same random actions at the same steps.
    """
    import gymnasium as gym

    n = len(seeds)
    envs = [gym.make(env_id) for _ in range(n)]
    try:
        if axis is not None and not axis.is_action:
            for env in envs:
                axis.apply(env, level)
        p = float(level) if axis is not None and axis.is_action else 0.0
        n_actions = int(envs[0].action_space.n)
        rng = np.random.default_rng(action_seed)
        obs = np.stack([env.reset(seed=s)[0] for env, s in zip(envs, seeds)])
        returns = np.zeros(n)
        alive = np.ones(n, dtype=bool)
        while alive.any():
            idx = np.flatnonzero(alive)
            actions = np.zeros(n, dtype=np.int64)
            actions[idx] = np.asarray(policy(obs[idx])).reshape(-1)
            if p > 0:
                swap = rng.random(n) < p
                random_actions = rng.integers(n_actions, size=n)
                actions = np.where(swap, random_actions, actions)
            for i in idx:
                o, r, terminated, truncated, _ = envs[i].step(int(actions[i]))
                returns[i] += r
                obs[i] = o
                if terminated or truncated:
                    alive[i] = False
        return [float(r) for r in returns]
    finally:
        for env in envs:
            env.close()


def sb3_policy(model: Any) -> Callable[[np.ndarray], np.ndarray]:
    """The deterministic (greedy) policy of an SB3 model, on a batch of observations."""

    def act(obs: np.ndarray) -> np.ndarray:
        actions, _ = model.predict(obs, deterministic=True)
        return actions

    return act


def evaluate(
    policy: Callable[[np.ndarray], np.ndarray],
    env_spec: EnvSpec,
    seed: int,
    episodes: int,
    grid_name: str = "full",
) -> dict[str, Any]:
    """The policy's returns on the nominal environment and on every point of the grid.

    Returns ``{"nominal": mean, "nominal_std": std over episodes, "axes": {name:
    {"levels": [...], "mean": [...], "std": [...]}}, "axis_means": {name: mean over
    the non-nominal levels}, "robust": mean of axis_means}``.
    """
    seeds = episode_seeds(seed, episodes)
    nominal = play(policy, env_spec.id, seeds)
    axes: dict[str, Any] = {}
    axis_means: dict[str, float] = {}
    for a_index, axis in enumerate(env_spec.axes):
        means, stds, levels = [], [], list(axis.grid_levels(grid_name))
        for level in levels:
            if level == axis.nominal:
                returns = nominal
            else:
                returns = play(
                    policy,
                    env_spec.id,
                    seeds,
                    axis=axis,
                    level=level,
                    action_seed=seed * 1000 + a_index,
                )
            means.append(float(np.mean(returns)))
            stds.append(float(np.std(returns)))
        axes[axis.name] = {"levels": levels, "mean": means, "std": stds}
        off = [m for lv, m in zip(levels, means) if lv != axis.nominal]
        axis_means[axis.name] = float(np.mean(off)) if off else float("nan")
    return {
        "nominal": float(np.mean(nominal)),
        "nominal_std": float(np.std(nominal)),
        "axes": axes,
        "axis_means": axis_means,
        "robust": float(np.mean(list(axis_means.values()))),
    }
