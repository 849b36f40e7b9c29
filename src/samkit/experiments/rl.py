r"""``samkit rl``: PPO against PPO with SAM, return over training and robustness of the final policies.

The question (Lee & Yoon, ICLR 2025, "Flat reward in policy parameter space
implies robust reinforcement learning", openreview 4OaO3GjP7k): does a policy
trained with sharpness-aware updates keep its return better when the actions
or the dynamics it meets differ from those it was trained on? Their argument:
a reward that is flat around the policy's parameters :math:`\theta`,

.. math:: \max_{\lVert \epsilon \rVert \le \rho} \big(J(\theta) - J(\theta + \epsilon)\big) \ \text{small},

bounds the loss of return under perturbed actions, and through them under
perturbed transitions and rewards. PPO with SAM (Foret et al., arXiv
2010.01412) seeks such parameters: every PPO gradient step is a SAM step on
PPO's loss (:class:`samkit.integrations.sb3.SAMPPO`, Stable-Baselines3's PPO
with samkit's optimizer; nothing here re-implements PPO).

Protocol (one study = environments x methods x seeds):

* **training**: Stable-Baselines3 PPO with the RL Baselines3 Zoo's tuned
  hyper-parameters for each environment; every method of a seed starts from the
  same initial weights and the same environment seeds (SB3's ``seed``), so the
  differences are paired. The return of each training episode (stochastic
  policy) is binned over the timesteps: the learning curve.
* **evaluation** (as Lee & Yoon: the deterministic policy, the mean over many
  episodes, a grid of perturbation strengths): the final policy plays
  ``eval_episodes`` episodes on the nominal environment and on each point of
  a grid of perturbed ones -- random actions taken with probability ``p``
  (action perturbation) and scaled physical parameters (pole length and mass,
  cart mass, force, gravity; link masses and inertia, torque noise). Every
  method and grid point uses the same episode seeds (and the same random
  actions for the same ``p``), so the evaluation is paired too.
* **summary**: per method, the nominal return, the *robust return* (for each
  perturbation axis the mean return over its non-nominal levels, then the mean
  over axes) and the per-axis means; paired verdicts against PPO.

The run folder::

    config.json                        the study's settings
    runs/<env>/<label>-seed<k>.zip     the trained agent (SB3 zip: PPO.load / SAMPPO.load)
    runs/<env>/<label>-seed<k>.train.json  its training record (learning curve, time)
    runs/<env>/<label>-seed<k>.json    the run's result (training + robustness), atomically
    results.json, report.html          the summary and the report

Resume: a run whose result file holds the same settings is not run again; a
run whose training finished (its ``.train.json`` and ``.zip`` with the same
training settings) is only evaluated. A run interrupted while training starts
that training again from the beginning (SB3 cannot resume its environments
mid-episode), so keep runs short enough to lose.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._atomic import atomic_write_via
from .._checks import is_number
from . import grid
from . import settings as st
from .folder import run_folder, study_folder
from .grid import MethodDef, Variant
from .study import run_key, write_json_atomic

__all__ = [
    "RL_METHODS",
    "ENVS",
    "DEFAULTS",
    "QUICK",
    "KEYS",
    "Axis",
    "EnvSpec",
    "RLConfig",
    "RLResult",
    "build_config",
    "check",
    "run",
    "open_study",
    "run_checked",
    "rl_study",
    "evaluate",
    "train_run",
]

PROTOCOL = 1  # bump when a change alters what a finished run would measure

# ------------------------------------------------------------------- methods
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
    "everyk": MethodDef(
        "PPO with SAM on one gradient step in k, rho scaled by k (Composer's SAM every k steps)",
        {"rho": 0.05, "k": 4},
    ),
    "looksam": MethodDef(
        "PPO with LookSAM (arXiv 2203.02714): SAM every k steps, the ascent direction reused between",
        {"rho": 0.05, "k": 4, "alpha": 0.2},
    ),
}


def _sam_arguments(variant: Variant) -> dict[str, Any]:
    """SAMPPO's keyword arguments for a SAM-type variant."""
    import samkit

    o = variant.options
    if variant.method == "sam":
        return {"rho": o["rho"]}
    if variant.method == "asam":
        return {"rho": o["rho"], "adaptive": True}
    if variant.method == "everyk":
        policy = samkit.EveryK(int(o["k"]), scale_rho=True)  # Composer's recipe, as documented
        return {"rho": o["rho"], "sam_kwargs": {"policy": policy}}
    if variant.method == "looksam":
        return {
            "rho": o["rho"],
            "sam_kwargs": {
                "policy": samkit.EveryK(int(o["k"]), scale_rho=False),
                "mix": samkit.ReuseOrthogonal(o["alpha"]),
            },
        }
    raise ValueError(f"Invalid method value: {variant.method!r}")  # pragma: no cover


def _check_variant(variant: Variant) -> None:
    o = variant.options
    if "k" in o:
        st.check_int("k", o["k"], 1, 10_000)
    if "alpha" in o:
        st.check_float("alpha", o["alpha"], 0.0, 1.0)


# -------------------------------------------------------------- environments
@dataclass(frozen=True)
class Axis:
    """One perturbation of the evaluation grid.

    ``levels`` include the nominal one (no perturbation); ``coarse`` is the
    subset used by ``grid="coarse"``. ``attributes``: the unwrapped
    environment's attributes multiplied by the level (a scale factor);
    ``absolute``: the attribute set to the level itself; neither: the level is
    the probability of replacing the policy's action by a uniformly random one.
    """

    name: str
    description: str
    levels: tuple[float, ...]
    coarse: tuple[float, ...]
    nominal: float
    attributes: tuple[str, ...] = ()
    absolute: str | None = None

    def grid_levels(self, grid_name: str) -> tuple[float, ...]:
        return self.coarse if grid_name == "coarse" else self.levels

    def apply(self, env: Any, level: float) -> None:
        """Perturb a freshly made environment (before its first reset)."""
        unwrapped = env.unwrapped
        for attribute in self.attributes:
            setattr(unwrapped, attribute, getattr(unwrapped, attribute) * level)
        if self.absolute is not None:
            setattr(unwrapped, self.absolute, level)
        if hasattr(unwrapped, "polemass_length"):  # CartPole keeps two derived constants
            unwrapped.total_mass = unwrapped.masspole + unwrapped.masscart
            unwrapped.polemass_length = unwrapped.masspole * unwrapped.length

    @property
    def is_action(self) -> bool:
        return not self.attributes and self.absolute is None

    @property
    def label(self) -> str:
        """A short axis label for the plots."""
        return "P(random action)" if self.is_action else self.description


def _action_axis(levels: tuple[float, ...], coarse: tuple[float, ...]) -> Axis:
    return Axis(
        "action_noise",
        "probability that the action is replaced by a uniformly random one",
        levels,
        coarse,
        0.0,
    )


@dataclass(frozen=True)
class EnvSpec:
    """An environment of the study: SB3 PPO's hyper-parameters and the robustness grid."""

    id: str
    timesteps: int
    hyper: dict[str, Any]
    axes: tuple[Axis, ...]
    source: str

    def ppo_kwargs(self) -> dict[str, Any]:
        """The SB3 PPO keyword arguments (the learning rate and clip range may be linear schedules)."""
        from stable_baselines3.common.utils import LinearSchedule

        h = dict(self.hyper)
        h.pop("n_envs")
        for key in ("learning_rate", "clip_range"):
            value = h.pop(key)
            h[key] = LinearSchedule(value, 0.0, 1.0) if h.pop(f"{key}_linear") else value
        return h

    @property
    def rollout(self) -> int:
        return int(self.hyper["n_envs"]) * int(self.hyper["n_steps"])


ENVS: dict[str, EnvSpec] = {
    "CartPole-v1": EnvSpec(
        "CartPole-v1",
        50_000,
        {
            "n_envs": 8,
            "n_steps": 32,
            "batch_size": 256,
            "n_epochs": 20,
            "gamma": 0.98,
            "gae_lambda": 0.8,
            "ent_coef": 0.0,
            "learning_rate": 1e-3,
            "learning_rate_linear": True,
            "clip_range": 0.2,
            "clip_range_linear": True,
        },
        (
            _action_axis((0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6), (0.0, 0.3, 0.5)),
            Axis(
                "pole_length",
                "pole length x factor",
                (0.1, 0.25, 0.5, 1.0, 1.25, 1.5, 2.0),
                (0.25, 1.0, 1.5),
                1.0,
                ("length",),
            ),
            Axis(
                "pole_mass",
                "pole mass x factor",
                (1.0, 10.0, 50.0, 100.0, 200.0, 400.0),
                (1.0, 100.0, 400.0),
                1.0,
                ("masspole",),
            ),
            Axis(
                "cart_mass",
                "cart mass x factor",
                (0.25, 1.0, 4.0, 8.0, 16.0, 32.0),
                (1.0, 8.0, 32.0),
                1.0,
                ("masscart",),
            ),
            Axis(
                "force",
                "push force x factor",
                (0.05, 0.1, 0.2, 0.5, 1.0, 4.0),
                (0.1, 0.5, 1.0),
                1.0,
                ("force_mag",),
            ),
            Axis(
                "gravity",
                "gravity x factor",
                (0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0),
                (1.0, 3.0, 5.0),
                1.0,
                ("gravity",),
            ),
        ),
        "rl-baselines3-zoo hyperparams/ppo.yml (CartPole-v1), 5e4 steps instead of 1e5",
    ),
    "Acrobot-v1": EnvSpec(
        "Acrobot-v1",
        80_000,
        {
            "n_envs": 8,
            "n_steps": 256,
            "batch_size": 64,
            "n_epochs": 4,
            "gamma": 0.99,
            "gae_lambda": 0.94,
            "ent_coef": 0.0,
            "learning_rate": 3e-4,
            "learning_rate_linear": False,
            "clip_range": 0.2,
            "clip_range_linear": False,
        },
        (
            _action_axis((0.0, 0.2, 0.4, 0.6, 0.8), (0.0, 0.4, 0.8)),
            Axis(
                "link_mass",
                "link masses x factor",
                (0.5, 1.0, 1.5, 2.0, 3.0, 4.0),
                (1.0, 2.0, 4.0),
                1.0,
                ("LINK_MASS_1", "LINK_MASS_2"),
            ),
            Axis(
                "link_inertia",
                "link inertias x factor",
                (0.5, 1.0, 2.0, 4.0, 8.0),
                (1.0, 4.0, 8.0),
                1.0,
                ("LINK_MOI",),
            ),
            Axis(
                "link_length",
                "first link length x factor",
                (0.75, 1.0, 1.5, 2.0, 2.5),
                (1.0, 2.0, 2.5),
                1.0,
                ("LINK_LENGTH_1",),
            ),
        ),
        "rl-baselines3-zoo hyperparams/ppo.yml (Acrobot-v1) with 8 environments instead of 16, "
        "without observation normalisation, 8e4 steps instead of 1e6",
    ),
}

# ------------------------------------------------------------------ settings
DEFAULTS: dict[str, Any] = {
    "envs": ["CartPole-v1", "Acrobot-v1"],
    "methods": ["ppo", "sam", "everyk"],
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
        if n < ENVS[e].rollout:
            raise ValueError(
                f"Invalid timesteps value: {n} for {e} (at least one rollout: "
                f"{ENVS[e].rollout} steps)"
            )
    st.check_int("eval_episodes", s["eval_episodes"], 1, 10_000)
    st.check_choice("grid", s["grid"], GRIDS)
    st.check_int("curve_points", s["curve_points"], 1, 10_000)
    labels = [v.label for v in variants]
    baseline = s["baseline"]
    if baseline is None:
        baseline = "ppo" if "ppo" in labels else labels[0]
    elif baseline not in labels:
        raise ValueError(
            f"Invalid baseline value: {baseline!r} (one of the labels: {', '.join(labels)})"
        )
    device = st.check_device(s["device"])
    if s.get("out") is not None and (not isinstance(s["out"], str) or not s["out"].strip()):
        raise ValueError(f"Invalid out value: {s['out']!r} (a folder path)")
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


# ------------------------------------------------------------------- training
def _make_model(env_spec: EnvSpec, variant: Variant, seed: int, device: str) -> Any:
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    from ..integrations.sb3 import SAMPPO

    env = make_vec_env(env_spec.id, n_envs=env_spec.hyper["n_envs"], seed=seed)
    from stable_baselines3.common.logger import Logger

    kwargs = dict(env_spec.ppo_kwargs(), seed=seed, device=device, verbose=0)
    if variant.method == "ppo":
        model = PPO("MlpPolicy", env, **kwargs)
    else:
        model = SAMPPO("MlpPolicy", env, **_sam_arguments(variant), **kwargs)
    # SB3's default logger makes an empty temporary folder per learn(); the study
    # records what it needs itself
    model.set_logger(Logger(folder=None, output_formats=[]))
    return model


def _model_class(variant: Variant) -> Any:
    if variant.method == "ppo":
        from stable_baselines3 import PPO

        return PPO
    from ..integrations.sb3 import SAMPPO

    return SAMPPO


def _recorder(total: int, bar: Any) -> Any:
    from stable_baselines3.common.callbacks import BaseCallback

    class Recorder(BaseCallback):
        """Collects (timestep, return) of every finished training episode; moves the bar."""

        def __init__(self) -> None:
            super().__init__()
            self.episodes: list[tuple[int, float]] = []
            self._shown = 0

        def _on_step(self) -> bool:
            for info in self.locals.get("infos", ()):
                episode = info.get("episode")
                if episode is not None:
                    self.episodes.append((int(self.num_timesteps), float(episode["r"])))
            if bar is not None:
                bar.update(min(self.num_timesteps, total) - self._shown)
                self._shown = min(self.num_timesteps, total)
            return True

    return Recorder()


def learning_curve(
    episodes: list[tuple[int, float]], total: int, points: int
) -> tuple[list[int], list[float | None]]:
    """Mean return of the episodes that ended in each of ``points`` equal bins of
    ``[0, total]`` timesteps (bin ``i`` covers ``(i * total / points, (i+1) * total / points]``;
    None where no episode ended)."""
    edges = [round(total * (i + 1) / points) for i in range(points)]
    sums = [0.0] * points
    counts = [0] * points
    for t, r in episodes:
        i = min(points - 1, max(0, math.ceil(t * points / total) - 1))
        sums[i] += r
        counts[i] += 1
    return edges, [sums[i] / counts[i] if counts[i] else None for i in range(points)]


def train_run(
    env_spec: EnvSpec,
    variant: Variant,
    seed: int,
    timesteps: int,
    *,
    device: str = "cpu",
    curve_points: int = 40,
    progress: bool = False,
    desc: str = "",
) -> tuple[Any, dict[str, Any]]:
    """Train one (environment, method, seed) run; returns the SB3 model and its training record.

    A run that fails numerically (NaN in the policy: SB3's distributions raise)
    is returned as ``(None, record)`` with ``diverged=True`` and the error.
    """
    import torch

    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=timesteps, desc=desc, unit="step", leave=False, mininterval=0.5)
        except ImportError:  # pragma: no cover
            bar = None
    model = _make_model(env_spec, variant, seed, device)
    recorder = _recorder(timesteps, bar)
    t0 = time.perf_counter()
    error = None
    try:
        model.learn(timesteps, callback=recorder)
    except (ValueError, RuntimeError) as exc:  # NaN logits / weights
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    finally:
        if bar is not None:
            bar.close()
    train_time = time.perf_counter() - t0
    finite = error is None and all(bool(torch.isfinite(p).all()) for p in model.policy.parameters())
    xs, ys = learning_curve(recorder.episodes, timesteps, curve_points)
    returns = [r for _, r in recorder.episodes]
    sam = getattr(model, "sam", None)
    if sam is not None:
        steps, ascents = sam.steps, sam.ascents
    else:  # plain PPO: Adam's own step count
        state = next(iter(model.policy.optimizer.state.values()), {})
        steps, ascents = int(state.get("step", 0)), 0
    record = {
        "curve_timesteps": xs,
        "curve_return": ys,
        "train_episodes": len(returns),
        "train_return_mean": float(np.mean(returns)) if returns else None,
        "train_return_last": float(np.mean(returns[-20:])) if returns else None,
        "train_time": train_time,
        "gradient_steps": int(steps),
        "ascents": int(ascents),
        # forward/backward passes per gradient step: 1 for PPO, 2 for SAM
        "passes_per_step": 1.0 + ascents / max(1, steps),
        "diverged": not finite,
        "error": error if error is not None else (None if finite else "non-finite weights"),
    }
    return (model if finite else None), record


# ----------------------------------------------------------------- evaluation
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


# ---------------------------------------------------------------------- study
def _train_identity(config: RLConfig, env: str, variant: Variant, seed: int) -> dict[str, Any]:
    spec = ENVS[env]
    return {
        "env": env,
        "method": variant.to_dict(),
        "seed": seed,
        "timesteps": config.timesteps[env],
        "hyper": spec.hyper,
        "curve_points": config.curve_points,
        "protocol": PROTOCOL,
    }


def _run_identity(config: RLConfig, env: str, variant: Variant, seed: int) -> dict[str, Any]:
    return {
        **_train_identity(config, env, variant, seed),
        "eval_episodes": config.eval_episodes,
        "grid": {a.name: list(a.grid_levels(config.grid)) for a in ENVS[env].axes},
    }


def check(config: RLConfig, out: Path | None = None) -> None:
    """Everything that can fail before any training: the packages, each method on
    each environment (built, not trained), the output folder."""
    try:
        import gymnasium  # noqa: F401
        import stable_baselines3  # noqa: F401
    except ImportError as exc:
        raise ValueError(
            "Invalid envs value: samkit rl needs stable-baselines3 and gymnasium "
            "(pip install -c constraints.txt 'samkit[rl]')"
        ) from exc
    from .trainer import resolve_device

    try:
        resolve_device(config.device)
    except (ValueError, RuntimeError) as exc:
        raise ValueError(f"Invalid device value: {config.device!r} ({exc})") from exc
    for env in config.envs:
        for variant in config.variants:
            try:
                model = _make_model(ENVS[env], variant, config.seeds[0], config.device)
            except ValueError as exc:
                raise ValueError(f"Invalid settings for method {variant.label!r}: {exc}") from exc
            model.env.close()
    if out is not None:
        from .folder import check_writable

        check_writable(out)


@dataclass
class RLResult(grid.StudyResult):
    """What :func:`run` returns: the summary (``results.json``) and where the files are."""

    executed: int = 0

    @property
    def table(self) -> str:
        return format_table(self.rows)

    @property
    def axis_tables(self) -> str:
        return format_axis_tables(self.rows)

    def __str__(self) -> str:
        return "\n".join([self.table, "", self.axis_tables, "", *self.verdicts])


def _execute(
    config: RLConfig,
    env: str,
    variant: Variant,
    seed: int,
    folder: Path,
    progress: bool,
    log: Callable[[str], None] | None,
    identity: dict[str, Any] | None = None,
) -> dict[str, Any]:
    spec = ENVS[env]
    key = run_key(variant.label, seed)
    train_path, zip_path = folder / f"{key}.train.json", folder / f"{key}.zip"
    train_id = grid.normalise(_train_identity(config, env, variant, seed))
    trained = grid.finished(train_path, train_id)
    model = None
    if trained is not None and (trained["diverged"] or zip_path.is_file()):
        if not trained["diverged"]:
            model = _model_class(variant).load(zip_path, device=config.device)
        if log:
            log(f"  {env} {variant.label} seed {seed}: trained before, evaluating")
    else:
        model, training = train_run(
            spec,
            variant,
            seed,
            config.timesteps[env],
            device=config.device,
            curve_points=config.curve_points,
            progress=progress,
            desc=f"{env} {variant.label} s{seed}",
        )
        if model is not None:
            atomic_write_via(zip_path, lambda tmp: model.save(tmp), suffix=".zip")
        trained = {"config": train_id, **training}
        write_json_atomic(train_path, trained)
    record = dict(trained)
    record.update(key=key, env=env, label=variant.label, method=variant.method, seed=seed)
    if model is not None:
        t0 = time.perf_counter()
        record["robustness"] = evaluate(
            sb3_policy(model), spec, seed, config.eval_episodes, config.grid
        )
        record["eval_time"] = time.perf_counter() - t0
        record["checkpoint"] = zip_path.name
    record["config"] = grid.normalise(identity or _run_identity(config, env, variant, seed))
    return record


@contextlib.contextmanager
def open_study(config: RLConfig, out: str | os.PathLike[str] | None = None) -> Iterator[Path]:
    """Lock the run folder and check the study (ValueError before any training), then yield the folder."""
    folder_path = run_folder(out, lambda: default_out(config))
    with grid.open_study(folder_path, lambda folder: check(config, folder)) as folder:
        yield folder


def run(
    config: RLConfig,
    out: str | os.PathLike[str] | None = None,
    *,
    progress: bool | None = None,
    log: Callable[[str], None] | None = print,
    jobs: int | str = 1,
    threads: int | None = None,
    ray: str | None = None,
) -> RLResult:
    """Check, then run (or resume) every (environment, method, seed) run; write
    ``results.json`` and ``report.html``. Holds the folder's lock throughout.
    ``jobs``/``threads``/``ray``: the executor (:func:`~samkit.experiments.engine.make_executor`)."""
    with open_study(config, out) as folder:
        return run_checked(
            config, folder, progress=progress, log=log, jobs=jobs, threads=threads, ray=ray
        )


@dataclass
class RLRun:
    """One (environment, method, seed) run: the task the study engine executes."""

    config: RLConfig
    env: str
    variant: Variant
    seed: int
    identity: dict[str, Any]

    def __call__(self, folder: Path, ctx: Any) -> dict[str, Any]:
        return _execute(
            self.config,
            self.env,
            self.variant,
            self.seed,
            folder,
            ctx.progress,
            ctx.log,
            self.identity,
        )


def run_checked(
    config: RLConfig,
    folder: Path,
    *,
    progress: bool | None = None,
    log: Callable[[str], None] | None = print,
    jobs: int | str = 1,
    threads: int | None = None,
    ray: str | None = None,
) -> RLResult:
    """:func:`run` inside :func:`open_study`."""
    from .engine import make_executor

    show = sys.stderr.isatty() if progress is None else progress
    executor = make_executor(jobs, threads, ray=ray, progress=show, log=log)
    with study_folder(folder):
        records, executed = grid.run_cells(
            folder,
            config.to_dict(),
            [(e, v, s) for e in config.envs for s in config.seeds for v in config.variants],
            identity=lambda env, variant, seed: _run_identity(config, env, variant, seed),
            task=lambda env, variant, seed, key, identity: RLRun(
                config, env, variant, seed, identity
            ),
            describe=_describe,
            log=log,
            executor=executor,
        )
        summary = summarize(config, records)
        write_json_atomic(folder / "results.json", summary)
        write_report(folder / "report.html", config, summary)
    return RLResult(folder, grid.normalise(summary), executed)


def _describe(record: dict[str, Any]) -> str:
    if record.get("diverged"):
        return f"DIVERGED ({record.get('error')}), left out of the summary"
    rob = record["robustness"]
    return (
        f"return {rob['nominal']:.1f}, robust return {rob['robust']:.1f}, "
        f"{record['train_time']:.0f} s training"
    )


# -------------------------------------------------------------------- summary
def summarize(config: RLConfig, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per environment and method: means over seeds; paired verdicts against the baseline."""
    rows: list[dict[str, Any]] = []
    verdicts: list[dict[str, Any]] = []
    for env in config.envs:
        mine = [r for r in records if r["env"] == env]
        ok = [r for r in mine if not r.get("diverged")]
        base_time = grid.stats([r["train_time"] for r in mine if r["label"] == config.baseline])[0]
        for label in config.labels:
            runs = [r for r in ok if r["label"] == label]
            every = [r for r in mine if r["label"] == label]
            if not every:
                continue
            nominal = grid.stats([r["robustness"]["nominal"] for r in runs])
            robust = grid.stats([r["robustness"]["robust"] for r in runs])
            time_mean = grid.stats([r["train_time"] for r in every])[0]
            row = {
                "env": env,
                "label": label,
                "method": every[0]["method"],
                "runs": len(every),
                "n": len(runs),
                "diverged": len(every) - len(runs),
                "nominal_mean": nominal[0],
                "nominal_std": nominal[1],
                "robust_mean": robust[0],
                "robust_std": robust[1],
                "train_return_mean": grid.stats([r["train_return_mean"] for r in runs])[0],
                "train_time": time_mean,
                "cost_time": time_mean / base_time if base_time and base_time > 0 else math.nan,
                "passes_per_step": grid.stats([r["passes_per_step"] for r in every])[0],
                "axes": {
                    a.name: grid.stats([r["robustness"]["axis_means"][a.name] for r in runs])[0]
                    for a in ENVS[env].axes
                },
            }
            rows.append(row)
        _add_axis_differences(config, env, mine, [r for r in rows if r["env"] == env])
        for metric, unit in (("nominal", "return"), ("robust", "robust return")):
            values = {
                label: {
                    r["seed"]: (None if r.get("diverged") else r["robustness"][metric])
                    for r in mine
                    if r["label"] == label
                }
                for label in config.labels
            }
            for v in grid.verdicts(values, config.baseline, metric=metric, unit=unit):
                v["env"] = env
                v["sentence"] = f"{env}: {v['sentence']}"
                verdicts.append(v)
    return {
        "format": "samkit-rl",
        "version": 1,
        "settings": config.to_dict(),
        "envs": {e: {"source": ENVS[e].source, "hyper": ENVS[e].hyper} for e in config.envs},
        "summary": rows,
        "verdicts": verdicts,
        "runs": records,
    }


def _add_axis_differences(
    config: RLConfig, env: str, records: list[dict[str, Any]], rows: list[dict[str, Any]]
) -> None:
    """Each method's per-axis robustness minus the baseline's, paired by seed
    (``row["axes_vs_baseline"][axis] = {"mean", "se", "n"}``; none for the baseline)."""
    for axis in ENVS[env].axes:
        values = {
            label: {
                r["seed"]: (None if r.get("diverged") else r["robustness"]["axis_means"][axis.name])
                for r in records
                if r["label"] == label
            }
            for label in config.labels
        }
        for v in grid.verdicts(values, config.baseline, metric=axis.name, unit="return"):
            for row in rows:
                if row["label"] == v["label"]:
                    row.setdefault("axes_vs_baseline", {})[axis.name] = {
                        "mean": v["mean"],
                        "se": v["se"],
                        "n": v["n"],
                    }


def _fmt(v: Any, spec: str = ".1f") -> str:
    return format(v, spec) if isinstance(v, (int, float)) and math.isfinite(v) else "-"


def table_rows(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The summary table: headers and text cells."""
    headers = [
        "env",
        "method",
        "seeds",
        "return (mean +- std)",
        "robust return (mean +- std)",
        "train return",
        "train s",
        "cost (time)",
        "passes/step",
    ]
    cells = []
    for r in rows:
        div = f" ({r['diverged']} diverged)" if r["diverged"] else ""
        cells.append(
            [
                r["env"],
                r["label"],
                str(r["runs"]),
                f"{_fmt(r['nominal_mean'])} +- {_fmt(r['nominal_std'])}{div}",
                f"{_fmt(r['robust_mean'])} +- {_fmt(r['robust_std'])}",
                _fmt(r["train_return_mean"]),
                _fmt(r["train_time"], ".0f"),
                _fmt(r["cost_time"], ".2f") + "x",
                _fmt(r["passes_per_step"], ".2f"),
            ]
        )
    return headers, cells


def axis_table(rows: list[dict[str, Any]], env: str) -> tuple[list[str], list[list[str]]]:
    """Per-axis robustness of one environment: the mean return over the axis' non-nominal
    levels (mean over seeds), then the difference from the baseline paired by seed +- s.e."""
    mine = [r for r in rows if r["env"] == env]
    names = [a.name for a in ENVS[env].axes]

    def cell(row: dict[str, Any], name: str) -> str:
        text = _fmt(row["axes"].get(name))
        diff = row.get("axes_vs_baseline", {}).get(name)
        if diff is not None and diff["mean"] is not None:
            text += f" ({diff['mean']:+.1f} +- {_fmt(diff['se'])})"
        return text

    return ["method", *names], [[r["label"], *(cell(r, n) for n in names)] for r in mine]


def format_axis_tables(rows: list[dict[str, Any]]) -> str:
    """:func:`axis_table` of every environment, as text."""
    parts = []
    for env in dict.fromkeys(r["env"] for r in rows):
        headers, cells = axis_table(rows, env)
        parts.append(f"{env}: robustness per axis (paired difference from the baseline +- s.e.)")
        parts.append(_align(headers, cells))
    return "\n".join(parts)


def _align(headers: list[str], cells: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def format_table(rows: list[dict[str, Any]]) -> str:
    return _align(*table_rows(rows))


# --------------------------------------------------------------------- report
def _figures(config: RLConfig, summary: dict[str, Any], env: str) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from .report import png_base64

    runs = [r for r in summary["runs"] if r["env"] == env and not r.get("diverged")]
    figures = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for label in config.labels:
        curves = [r for r in runs if r["label"] == label]
        if not curves:
            continue
        xs = curves[0]["curve_timesteps"]
        ys = np.array(
            [[np.nan if y is None else y for y in r["curve_return"]] for r in curves], dtype=float
        )
        with np.errstate(all="ignore"), _quiet_nan_warnings():
            mean = np.nanmean(ys, axis=0)
            se = np.nanstd(ys, axis=0) / np.sqrt(np.maximum(1, np.sum(np.isfinite(ys), axis=0)))
        (line,) = ax.plot(xs, mean, label=label.replace("$", r"\$"))
        ax.fill_between(xs, mean - se, mean + se, color=line.get_color(), alpha=0.2)
    ax.set(
        xlabel="timesteps", ylabel="training episode return", title=f"{env}: return over training"
    )
    if ax.lines:
        ax.legend(fontsize=8)
    figures.append(
        (
            f"{env}: return of the training episodes (mean over seeds, band: standard error)",
            png_base64(fig),
        )
    )

    axes = ENVS[env].axes
    fig, panels = plt.subplots(1, len(axes), figsize=(3.3 * len(axes), 3.4), sharey=True)
    for panel, axis in zip(np.atleast_1d(panels), axes):
        for label in config.labels:
            mine = [r for r in runs if r["label"] == label]
            if not mine:
                continue
            levels = mine[0]["robustness"]["axes"][axis.name]["levels"]
            values = np.array([r["robustness"]["axes"][axis.name]["mean"] for r in mine])
            se = values.std(axis=0, ddof=1) / np.sqrt(len(mine)) if len(mine) > 1 else None
            panel.errorbar(
                range(len(levels)),
                values.mean(axis=0),
                yerr=se,
                marker="o",
                ms=3,
                capsize=2,
                label=label.replace("$", r"\$"),
            )
            panel.set_xticks(range(len(levels)), [f"{lv:g}" for lv in levels])
        panel.set(
            title=axis.name, xlabel=axis.description if len(axis.description) < 30 else "level"
        )
        panel.axvline(
            list(axis.grid_levels(config.grid)).index(axis.nominal), color="0.7", lw=0.8, ls="--"
        )
    np.atleast_1d(panels)[0].set_ylabel("evaluation return")
    np.atleast_1d(panels)[0].legend(fontsize=7)
    fig.tight_layout()
    figures.append(
        (
            f"{env}: return of the final policies under perturbations (deterministic policy, "
            f"{config.eval_episodes} episodes per point; mean over seeds, error bar: standard error; "
            "dashed: nominal)",
            png_base64(fig),
        )
    )
    return figures


@contextlib.contextmanager
def _quiet_nan_warnings() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def write_report(path: Path, config: RLConfig, summary: dict[str, Any]) -> None:
    """``report.html``: the table, the paired verdicts, the per-axis table and the figures per environment."""
    import html

    from .report import NO_PLOTS, html_figure, html_list, html_table, plots_available, write_page

    rows = summary["summary"]
    headers, cells = table_rows(rows)
    sections = [html_table(headers, cells)]
    sections.append(html_list("Paired verdicts", [v["sentence"] for v in summary["verdicts"]]))
    sections.append(
        "<p>"
        + html.escape(
            "Return: the deterministic final policy on the nominal environment, mean over "
            f"{config.eval_episodes} episodes, then mean +- sample standard deviation over seeds "
            "(diverged runs left out). Robust return: for each perturbation axis the mean return "
            "over its non-nominal levels, then the mean over axes. Train return: mean return of "
            "all training episodes (the area under the learning curve). Cost: training time "
            f"relative to {config.baseline}; passes/step: forward-backward passes per PPO "
            "gradient step."
        )
        + "</p>"
    )
    plots = plots_available()
    if not plots:
        sections.append(f"<p><b>{html.escape(NO_PLOTS)}.</b></p>")
    for env in config.envs:
        sections.append(f"<h2>{html.escape(env)}</h2>")
        sections.append(f"<p>Hyper-parameters: {html.escape(ENVS[env].source)}.</p>")
        h, c = axis_table(rows, env)
        sections.append(html_table(h, c))
        if plots and any(r["env"] == env and not r.get("diverged") for r in summary["runs"]):
            for caption, b64 in _figures(config, summary, env):
                sections.append(html_figure(caption, b64))
    write_page(
        path,
        title="samkit rl: PPO and PPO with SAM, return and robustness",
        sections=sections,
        settings={k: v for k, v in summary["settings"].items()},
    )


# ------------------------------------------------------------------------ API
def rl_study(
    *,
    envs: Any = None,
    methods: Any = None,
    rho: Any = None,
    seeds: Any = None,
    timesteps: Any = None,
    eval_episodes: int | None = None,
    grid: str | None = None,
    out: str | os.PathLike[str] | None = None,
    quick: bool = False,
    progress: bool | None = None,
    quiet: bool = False,
    jobs: int | str | None = None,
    threads: int | None = None,
    ray: str | None = None,
    **settings: Any,
) -> RLResult:
    """PPO against PPO with SAM (and variants) on classic-control tasks, paired over seeds.

    Args:
        envs: environment ids (default ``["CartPole-v1", "Acrobot-v1"]``; see :data:`ENVS`).
        methods: names or ``"name:key=value,..."`` specs from :data:`RL_METHODS`
            (default ``ppo``, ``sam``, ``everyk``).
        rho: a value or list on SAM's scale: each SAM-type method once per value.
        seeds: a count or a list. ``timesteps``: training length (an int, or a
            dict env -> int; default: each environment's own).
        eval_episodes: episodes per point of the robustness grid (default 20).
        grid: ``"full"`` or ``"coarse"`` (three levels per perturbation).
        out: the run folder (default ``samkit-runs/rl-<envs>-<hash>``); rerunning resumes it.
        quick: start from the ``--quick`` preset (CartPole, PPO and SAM, two seeds).
        progress: a progress bar per run (default: on a terminal); ``quiet``: no log lines.
        jobs, threads, ray: runs at once, torch threads per run, a Ray cluster's
            address (as in :func:`samkit.compare`).
        **settings: ``baseline``, ``curve_points``, ``device``.

    Returns:
        an :class:`RLResult` (``rows``, ``verdicts``, ``table``, ``summary``,
        ``results_path``, ``report_path``).

    Raises:
        ValueError: any bad setting, found before anything is trained.
    """
    given = dict(
        settings,
        envs=envs,
        methods=methods,
        rho=[rho] if is_number(rho) else rho,
        seeds=seeds,
        timesteps=timesteps,
        eval_episodes=eval_episodes,
        grid=grid,
    )
    from .api import check_flags

    check_flags(quick=quick, progress=progress, quiet=quiet)
    unknown = sorted(set(given) - KEYS)
    if unknown or "out" in settings:
        raise ValueError(f"Invalid setting: {', '.join(unknown or ['out'])}")
    merged = st.merge(QUICK if quick else None, given, defaults=DEFAULTS)
    config = build_config(merged)
    log = None if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    how = st.execution({"jobs": jobs, "threads": threads, "ray": ray})
    return run(config, out, progress=progress, log=log, **how)
