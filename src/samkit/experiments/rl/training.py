"""Training one ``samkit rl`` run: Stable-Baselines3's PPO, or samkit's SAMPPO with
the method's SAM settings, and the learning curve of its training episodes."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from ..grid import Variant
from .envs import EnvSpec

__all__ = ["learning_curve", "train_run"]


def _sam_arguments(variant: Variant) -> dict[str, Any]:
    """SAMPPO's keyword arguments for a SAM-type variant."""
    import samkit

    o = variant.options
    if variant.method == "sam":
        return {"rho": o["rho"]}
    if variant.method == "asam":
        return {"rho": o["rho"], "adaptive": True}
    if variant.method == "sam_every_k":
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


def _make_model(env_spec: EnvSpec, variant: Variant, seed: int, device: str) -> Any:
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    from ...integrations.sb3 import SAMPPO

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
    from ...integrations.sb3 import SAMPPO

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
