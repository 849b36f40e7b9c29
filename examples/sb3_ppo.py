"""SAM for Stable-Baselines3's PPO: one class instead of PPO, nothing else changes.

    pip install -c constraints.txt 'samkit[sb3]'
    python examples/sb3_ppo.py --timesteps 50000

    from samkit.integrations.sb3 import SAMPPO
    model = SAMPPO("MlpPolicy", "CartPole-v1", rho=0.05, seed=0)   # was PPO(...)
    model.learn(50_000)

Every PPO gradient step (each minibatch of each epoch) becomes a SAM step on
PPO's full loss on that minibatch; SB3's own ``train()`` loop, logging, LR and
clip-range schedules, ``target_kl`` and ``max_grad_norm`` are untouched.
``rho=0`` is PPO bit for bit. ASAM is ``adaptive=True`` (with rho about 10x);
any other SAM option goes in ``sam_kwargs`` (e.g. ``policy=samkit.EveryK(5)``
to pay for the ascent on one update in five). ``SAMA2C`` does the same for A2C.

The script trains SAMPPO and PPO with the same seed, reports each one's mean
return over evaluation episodes, and saves and reloads the SAM model
(samkit's counters travel with SB3's zip file).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import gymnasium as gym
from stable_baselines3 import PPO
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.monitor import Monitor

from samkit.integrations.sb3 import SAMPPO


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env", default="CartPole-v1")
    ap.add_argument("--timesteps", type=int, default=50_000)
    ap.add_argument("--rho", type=float, default=0.05)
    ap.add_argument("--adaptive", action="store_true", help="ASAM (use rho about 0.5)")
    ap.add_argument("--n-steps", type=int, default=512)
    ap.add_argument("--episodes", type=int, default=10, help="evaluation episodes")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    common = dict(n_steps=args.n_steps, batch_size=64, seed=args.seed, device="cpu")
    results = {}
    for name, build in (
        (
            "sam",
            lambda: SAMPPO("MlpPolicy", args.env, rho=args.rho, adaptive=args.adaptive, **common),
        ),
        ("ppo", lambda: PPO("MlpPolicy", args.env, **common)),
    ):
        model = build().learn(args.timesteps)
        mean, std = evaluate_policy(
            model, Monitor(gym.make(args.env)), n_eval_episodes=args.episodes
        )
        results[name] = {"mean_return": float(mean), "std_return": float(std)}
        print(f"{name}: mean return {mean:.1f} +- {std:.1f} over {args.episodes} episodes")
        if name == "sam":
            sam_model = model

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sam_ppo.zip"
        sam_model.save(path)
        loaded = SAMPPO.load(path, env=gym.make(args.env), device="cpu")
    results["sam_steps"] = sam_model.sam.steps
    results["loaded_steps"] = loaded.sam.steps
    print(
        f"SAM steps {sam_model.sam.steps} (ascents {sam_model.sam.ascents}); after load {loaded.sam.steps}"
    )
    return results


if __name__ == "__main__":
    main()
