"""The environments of ``samkit rl``: SB3 PPO's tuned hyper-parameters and the
perturbation grid each final policy is evaluated on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Axis", "EnvSpec", "ENVS"]


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
