"""Stable-Baselines3: SAMPPO / SAMA2C against SB3 itself and a plain-loop SAM.

* ``rho=0`` is SB3's PPO / A2C bit for bit (same seed, same weights and
  optimizer state after ``learn()``).
* With ``rho > 0``, every gradient step equals, bit for bit, a plain samkit
  loop: ``SAM(Adam).step(closure)`` on the very minibatches SB3 drew, where the
  closure computes the algorithm's loss as written here from SB3's
  documented formula and clips as SB3 does. The first pass is SB3's own, so
  this also checks that SB3's loss and this file's agree.
* save/load keeps samkit's state: a loaded model's next ``train()`` on the
  same rollout equals the never-stopped model's.
"""

from __future__ import annotations

import copy
import io
import zipfile

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import A2C, PPO
from torch.nn import functional as F

import samkit
from samkit.integrations.sb3 import SAMA2C, SAMPPO, PolicySAM

ENV = "CartPole-v1"
N_STEPS = 32
PPO_KW = dict(n_steps=N_STEPS, batch_size=16, n_epochs=2, seed=0, device="cpu")
A2C_KW = dict(n_steps=N_STEPS // 4, seed=0, device="cpu")


def weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.policy.parameters()]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y), (x - y).abs().max()


def record_minibatches(model) -> list:
    """Record every minibatch SB3's train() draws (the test's own hook on the buffer)."""
    seen = []
    buffer = model.rollout_buffer
    original = buffer.get

    def get(*args, **kwargs):
        for data in original(*args, **kwargs):
            seen.append(data)
            yield data

    buffer.get = get
    return seen


# ------------------------------------------------------------------ rho = 0
@pytest.mark.parametrize(
    "sam_cls, sb3_cls, kwargs",
    [(SAMPPO, PPO, PPO_KW), (SAMA2C, A2C, A2C_KW)],
    ids=["ppo", "a2c"],
)
def test_rho_zero_is_sb3_bit_for_bit(sam_cls, sb3_cls, kwargs):
    ours = sam_cls("MlpPolicy", ENV, rho=0.0, **kwargs).learn(3 * N_STEPS)
    theirs = sb3_cls("MlpPolicy", ENV, **kwargs).learn(3 * N_STEPS)
    assert_same(weights(ours), weights(theirs))
    ours_state = ours.policy.optimizer.state_dict()["state"]
    theirs_state = theirs.policy.optimizer.state_dict()["state"]
    for i, state in theirs_state.items():
        for key, value in state.items():
            assert torch.equal(ours_state[i][key], value), (i, key)
    assert ours.sam.steps > 0 and ours.sam.ascents == 0


# ------------------------------------------------- against a plain SAM loop
def ppo_loss(model, data, *, clip_range: float, clip_range_vf: float | None) -> torch.Tensor:
    """PPO's loss (Schulman et al. 2017) as SB3 documents it, written out here."""
    discrete = isinstance(model.action_space, gym.spaces.Discrete)
    actions = data.actions.long().flatten() if discrete else data.actions
    values, log_prob, entropy = model.policy.evaluate_actions(data.observations, actions)
    values = values.flatten()
    advantages = data.advantages
    advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    ratio = torch.exp(log_prob - data.old_log_prob)
    surrogate = -torch.min(
        advantages * ratio, advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    ).mean()
    if clip_range_vf is not None:
        values = data.old_values + torch.clamp(
            values - data.old_values, -clip_range_vf, clip_range_vf
        )
    value_loss = F.mse_loss(data.returns, values)
    entropy_loss = -torch.mean(entropy)
    return surrogate + model.ent_coef * entropy_loss + model.vf_coef * value_loss


def a2c_loss(model, data) -> torch.Tensor:
    values, log_prob, entropy = model.policy.evaluate_actions(
        data.observations, data.actions.long().flatten()
    )
    value_loss = F.mse_loss(data.returns, values.flatten())
    return (
        -(data.advantages * log_prob).mean()
        + model.ent_coef * -torch.mean(entropy)
        + model.vf_coef * value_loss
    )


SAM_SETTINGS = {
    "sam": (dict(rho=0.05), dict(rho=0.05)),
    "asam": (dict(rho=0.5, adaptive=True), dict(rho=0.5, adaptive=True)),
    "every_2nd": (
        dict(rho=0.1, sam_kwargs=dict(policy=samkit.EveryK(2))),
        dict(rho=0.1, policy=samkit.EveryK(2)),
    ),
}


@pytest.mark.parametrize(
    "setting, env",
    [(name, ENV) for name in sorted(SAM_SETTINGS)] + [("sam", "Pendulum-v1")],
)
def test_ppo_steps_equal_plain_loop_sam(setting, env):
    """Discrete (CartPole) and continuous (Pendulum: Gaussian policy, analytic entropy) actions."""
    ours_kw, loop_kw = SAM_SETTINGS[setting]
    ppo_kw = dict(PPO_KW, ent_coef=0.01, clip_range_vf=0.3, max_grad_norm=0.3)
    model = SAMPPO("MlpPolicy", env, **ours_kw, **ppo_kw)
    # the same initial weights, trained by hand: a plain PPO built with the same seed
    reference = PPO("MlpPolicy", env, **ppo_kw)
    assert_same(weights(model), weights(reference))
    minibatches = record_minibatches(model)
    model.learn(2 * N_STEPS)
    assert len(minibatches) == 2 * (N_STEPS // 16) * 2  # 2 rollouts x 2 epochs x 2 minibatches

    params = list(reference.policy.parameters())
    opt = samkit.SAM(torch.optim.Adam(params, lr=reference.learning_rate, eps=1e-5), **loop_kw)
    for data in minibatches:

        def closure(data=data):
            loss = ppo_loss(reference, data, clip_range=0.2, clip_range_vf=0.3)
            loss.backward()
            # SB3 clips every gradient it computes; so does this loop, in both passes
            torch.nn.utils.clip_grad_norm_(params, 0.3)
            return loss

        opt.zero_grad()
        opt.step(closure)
    assert_same(weights(model), weights(reference))
    assert (model.sam.steps, model.sam.ascents) == (opt.steps, opt.ascents)
    assert opt.ascents == (4 if setting == "every_2nd" else 8)


def test_a2c_steps_equal_plain_loop_sam():
    kw = dict(A2C_KW, ent_coef=0.01, max_grad_norm=0.2)
    model = SAMA2C("MlpPolicy", ENV, rho=0.05, **kw)
    reference = A2C("MlpPolicy", ENV, **kw)
    minibatches = record_minibatches(model)
    model.learn(3 * kw["n_steps"])
    assert len(minibatches) == 3
    base = reference.policy.optimizer  # A2C's RMSprop, as SB3 built it
    params = list(reference.policy.parameters())
    opt = samkit.SAM(base, rho=0.05)
    for data in minibatches:

        def closure(data=data):
            loss = a2c_loss(reference, data)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 0.2)
            return loss

        opt.zero_grad()
        opt.step(closure)
    assert_same(weights(model), weights(reference))


def test_sam_changes_the_update():
    """The comparison above is not vacuous: SAM's weights differ from PPO's."""
    ours = SAMPPO("MlpPolicy", ENV, rho=0.05, **PPO_KW).learn(N_STEPS)
    theirs = PPO("MlpPolicy", ENV, **PPO_KW).learn(N_STEPS)
    assert not all(torch.equal(a, b) for a, b in zip(weights(ours), weights(theirs)))
    assert ours.sam.ascents == ours.sam.steps == 4


# -------------------------------------------------------------- save / load
def test_save_load_continues_as_if_never_stopped(tmp_path):
    sam_kwargs = dict(policy=samkit.EveryK(3))
    model = SAMPPO(
        "MlpPolicy", ENV, rho=samkit.FollowLR(0.1), sam_kwargs=sam_kwargs, **PPO_KW
    ).learn(2 * N_STEPS)
    assert model.sam.steps == 8  # next ascent at step 9: a lost counter shows
    path = tmp_path / "model.zip"
    model.save(path)
    loaded = SAMPPO.load(path, env=gym.make(ENV), device="cpu")
    assert isinstance(loaded.policy.optimizer, PolicySAM)
    assert (loaded.sam.steps, loaded.sam.ascents) == (8, 3)
    assert isinstance(loaded.sam.rho_controller, samkit.FollowLR)
    assert isinstance(loaded.sam.policy, samkit.EveryK)

    # both train once more on the same rollout with the same minibatch order
    loaded.rollout_buffer = copy.deepcopy(model.rollout_buffer)
    stale = SAMPPO.load(path, env=gym.make(ENV), device="cpu")
    stale.rollout_buffer = copy.deepcopy(model.rollout_buffer)
    stale.sam.steps = 0  # what a resume that dropped samkit's state would do
    for m in (loaded, stale):
        m.set_logger(model.logger)  # learn() would set one up
    for m in (model, loaded, stale):
        np.random.seed(7)
        m.train()
    assert_same(weights(model), weights(loaded))
    assert (loaded.sam.steps, loaded.sam.ascents) == (model.sam.steps, model.sam.ascents)
    assert not all(torch.equal(a, b) for a, b in zip(weights(model), weights(stale)))


def test_saved_file_holds_samkit_state(tmp_path):
    model = SAMPPO("MlpPolicy", ENV, rho=0.05, **PPO_KW).learn(N_STEPS)
    model.save(tmp_path / "m.zip")
    with zipfile.ZipFile(tmp_path / "m.zip") as z:
        sd = torch.load(io.BytesIO(z.read("policy.optimizer.pth")), weights_only=True)
    assert sd["samkit"]["steps"] == 4 and sd["samkit"]["ascents"] == 4


def test_a_rho_given_at_load_is_the_radius_it_trains_with(tmp_path):
    """SB3 puts the saved optimizer state back after building the model: load(path,
    rho=0.2) reported model.rho 0.2 and trained with the saved 0.05."""
    model = SAMPPO("MlpPolicy", ENV, rho=0.05, **PPO_KW).learn(N_STEPS)
    model.save(tmp_path / "m.zip")
    loaded = SAMPPO.load(tmp_path / "m.zip", env=gym.make(ENV), device="cpu", rho=0.2)
    assert loaded.rho == 0.2 and loaded.sam.param_groups[0]["rho"] == 0.2
    loaded.learn(N_STEPS)
    assert loaded.sam.param_groups[0]["rho"] == 0.2
    kept = SAMPPO.load(tmp_path / "m.zip", env=gym.make(ENV), device="cpu")
    assert kept.sam.param_groups[0]["rho"] == 0.05
    follow = SAMPPO.load(tmp_path / "m.zip", env=gym.make(ENV), rho=samkit.FollowLR(0.1))
    follow.learn(N_STEPS)  # a controller given at load sets the radius (from the lr)
    assert follow.sam.param_groups[0]["rho"] == pytest.approx(0.1 * follow.lr_schedule(0.0) / 3e-4)


# ------------------------------------------------------------ bad settings
def test_sam_as_optimizer_class_is_refused_naming_sampo():
    with pytest.raises(ValueError, match="SAMPPO wraps the policy's optimizer in SAM itself"):
        SAMPPO("MlpPolicy", ENV, policy_kwargs=dict(optimizer_class=samkit.SAM), **PPO_KW)


def test_plain_ppo_with_sam_class_routes_eps_and_names_sampo():
    model = PPO(
        "MlpPolicy",
        ENV,
        policy_kwargs=dict(
            optimizer_class=samkit.SAM,
            optimizer_kwargs=dict(base_optimizer=torch.optim.Adam, eps=1e-5),
        ),
        **PPO_KW,
    )
    assert model.policy.optimizer.base_optimizer.defaults["eps"] == 1e-5  # Adam's, not SAM's
    assert model.policy.optimizer.ascent_eps == 1e-12
    with pytest.raises(RuntimeError, match="samkit.integrations.sb3.SAMPPO"):
        model.learn(N_STEPS)


def test_plain_ppo_with_sam_class_and_no_base_names_sampo():
    with pytest.raises(ValueError, match="use samkit.integrations.sb3.SAMPPO"):
        PPO("MlpPolicy", ENV, policy_kwargs=dict(optimizer_class=samkit.SAM), **PPO_KW)


def test_base_optimizer_settings_reach_the_base():
    model = SAMPPO(
        "MlpPolicy",
        ENV,
        policy_kwargs=dict(optimizer_class=torch.optim.AdamW, optimizer_kwargs=dict(eps=1e-3)),
        **PPO_KW,
    )
    base = model.sam.base_optimizer
    assert isinstance(base, torch.optim.AdamW) and base.defaults["eps"] == 1e-3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rho=-1.0), "Invalid rho value"),
        (dict(sam_kwargs=dict(rho=0.1)), "give rho= to SAMPPO itself"),
        (dict(sam_kwargs=dict(max_grad_norm=1.0)), "SB3's own max_grad_norm"),
        (dict(sam_kwargs=dict(model=torch.nn.Linear(1, 1))), "passes its policy"),
        (dict(sam_kwargs=dict(eta=-1.0)), "Invalid eta value"),
        (dict(sam_kwargs=dict(policy="every")), "Invalid policy value"),
        (dict(sam_kwargs=[1]), r"Invalid sam_kwargs value: \[1\]"),
        (
            dict(sam_kwargs=dict(perturbation=samkit.optim.perturbation.Masked([torch.zeros(1)]))),
            "selects parameters",
        ),
    ],
)
def test_bad_settings_fail_before_any_work(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SAMPPO("MlpPolicy", ENV, **kwargs, **PPO_KW)


def test_step_outside_train_is_refused():
    model = SAMPPO("MlpPolicy", ENV, **PPO_KW)
    with pytest.raises(RuntimeError, match="inside SAMPPO/SAMA2C's train"):
        model.sam.step()


def test_example_trains_both_and_reloads():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "sb3_ppo.py"
    spec = importlib.util.spec_from_file_location("samkit_example_sb3_ppo", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = example.main(["--timesteps", "128", "--n-steps", "64", "--episodes", "2"])
    assert out["sam_steps"] == out["loaded_steps"] == 2 * 10  # 2 rollouts x 10 epochs x 1 minibatch
    assert {"sam", "ppo"} <= out.keys() and out["sam"]["mean_return"] > 0
