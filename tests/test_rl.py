"""``samkit rl``: the evaluation against plain gymnasium loops, the learning curve by hand,
rho=0 against SB3's PPO bit for bit, resume against the study that never stopped, bad inputs."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
import torch

from samkit.cli.main import main
from samkit.experiments import rl

CARTPOLE = rl.ENVS["CartPole-v1"]
ROLLOUT = CARTPOLE.rollout  # 256 steps: the smallest run


# -------------------------------------------------------------- evaluation
def pole_policy(obs: np.ndarray) -> np.ndarray:
    """A hand-written CartPole controller: push towards the side the pole falls to."""
    return (obs[:, 2] + 0.5 * obs[:, 3] > 0).astype(np.int64)


def plain_returns(env_id, seeds, choose, setup=None):
    """The same episodes, one at a time, with gymnasium alone."""
    out = []
    for s in seeds:
        env = gym.make(env_id)
        if setup is not None:
            setup(env.unwrapped)
        obs, _ = env.reset(seed=s)
        total, done = 0.0, False
        while not done:
            obs, r, terminated, truncated, _ = env.step(int(choose(obs)))
            total += r
            done = terminated or truncated
        out.append(total)
    return out


def test_play_equals_a_plain_gymnasium_loop():
    seeds = [3, 14, 15]
    mine = rl.play(pole_policy, "CartPole-v1", seeds)
    assert mine == plain_returns("CartPole-v1", seeds, lambda o: pole_policy(o[None])[0])
    assert max(mine) > 100  # the controller balances: the episodes are long, not trivial


def test_a_scaled_pole_is_a_longer_pole_for_the_physics():
    axis = next(a for a in CARTPOLE.axes if a.name == "pole_length")
    env = gym.make("CartPole-v1")
    axis.apply(env, 2.0)
    u = env.unwrapped
    assert (u.length, u.polemass_length, u.total_mass) == pytest.approx((1.0, 0.1, 1.1))
    mass = next(a for a in CARTPOLE.axes if a.name == "pole_mass")
    env = gym.make("CartPole-v1")
    mass.apply(env, 10.0)
    assert (env.unwrapped.total_mass, env.unwrapped.polemass_length) == pytest.approx((2.0, 0.5))

    def setup(u):
        u.length = 1.0
        u.polemass_length = u.masspole * u.length

    seeds = [1, 2]
    mine = rl.play(pole_policy, "CartPole-v1", seeds, axis=axis, level=2.0)
    assert mine == plain_returns("CartPole-v1", seeds, lambda o: pole_policy(o[None])[0], setup)


def test_action_noise_replaces_actions_with_the_documented_draws():
    """With p = 0.3 each step draws one uniform number and one random action per
    episode (running or not) from a generator seeded with action_seed."""
    axis = next(a for a in CARTPOLE.axes if a.is_action)
    seeds, p = [5, 6], 0.3
    mine = rl.play(pole_policy, "CartPole-v1", seeds, axis=axis, level=p, action_seed=9)
    rng = np.random.default_rng(9)
    envs = [gym.make("CartPole-v1") for _ in seeds]
    obs = [env.reset(seed=s)[0] for env, s in zip(envs, seeds)]
    totals, alive = [0.0, 0.0], [True, True]
    while any(alive):
        swap, random_actions = rng.random(2) < p, rng.integers(2, size=2)
        for i, env in enumerate(envs):
            if not alive[i]:
                continue
            action = random_actions[i] if swap[i] else pole_policy(obs[i][None])[0]
            obs[i], r, terminated, truncated, _ = env.step(int(action))
            totals[i] += r
            alive[i] = not (terminated or truncated)
    assert mine == totals
    assert mine != rl.play(pole_policy, "CartPole-v1", seeds)  # the noise did something


def test_evaluate_summarises_the_grid_as_documented():
    result = rl.evaluate(pole_policy, CARTPOLE, seed=0, episodes=2, grid_name="coarse")
    seeds = rl.episode_seeds(0, 2)
    assert result["nominal"] == np.mean(rl.play(pole_policy, "CartPole-v1", seeds))
    for axis in CARTPOLE.axes:
        levels = list(axis.coarse)
        entry = result["axes"][axis.name]
        assert entry["levels"] == levels
        # the nominal level is the nominal evaluation itself
        assert entry["mean"][levels.index(axis.nominal)] == result["nominal"]
        off = [m for lv, m in zip(levels, entry["mean"]) if lv != axis.nominal]
        assert result["axis_means"][axis.name] == pytest.approx(np.mean(off))
    assert result["robust"] == pytest.approx(np.mean(list(result["axis_means"].values())))


def test_learning_curve_by_hand():
    episodes = [(10, 1.0), (20, 3.0), (25, 4.0), (90, 5.0)]
    xs, ys = rl.learning_curve(episodes, 100, 4)
    assert xs == [25, 50, 75, 100]
    assert ys == [pytest.approx(8 / 3), None, None, 5.0]


# ------------------------------------------------------------------- study
SMALL = [
    "--envs",
    "CartPole-v1",
    "--seeds",
    "1",
    "--timesteps",
    str(2 * ROLLOUT),
    "--eval-episodes",
    "2",
    "--grid",
    "coarse",
    "-q",
]


def _run(capsys, *argv):
    rc = main(["rl", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_rho_zero_is_ppo_bit_for_bit_through_the_study(tmp_path, capsys):
    out = tmp_path / "run"
    rc, text, err = _run(
        capsys, *SMALL, "--methods", "ppo", "sam:rho=0,label=sam0", "--out", str(out)
    )
    assert rc == 0, err
    res = json.loads((out / "results.json").read_text())
    ppo, sam0 = res["runs"]
    assert (ppo["label"], sam0["label"]) == ("ppo", "sam0")
    assert ppo["robustness"] == sam0["robustness"]
    assert ppo["curve_return"] == sam0["curve_return"]
    assert sam0["ascents"] == 0 and sam0["gradient_steps"] == ppo["gradient_steps"] == 2 * 20
    from stable_baselines3 import PPO

    from samkit.integrations.sb3 import SAMPPO

    a = PPO.load(out / "runs" / "CartPole-v1" / "ppo-seed0.zip", device="cpu")
    b = SAMPPO.load(out / "runs" / "CartPole-v1" / "sam0-seed0.zip", device="cpu")
    for p, q in zip(a.policy.parameters(), b.policy.parameters()):
        assert torch.equal(p, q)
    assert "sam0: +0 return against ppo on one seed" in text


def test_interrupted_study_resumes_to_the_uninterrupted_numbers(tmp_path, capsys, monkeypatch):
    methods = ["--methods", "ppo", "everyk:k=2,rho=0.1"]
    rc, text, err = _run(capsys, *SMALL, *methods, "--out", str(tmp_path / "whole"))
    assert rc == 0, err
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert "everyk" in text and "robust return" in text

    real_evaluate = rl.evaluate
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # everyk's training is done, its evaluation is cut off
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(rl, "evaluate", interrupted)
    rc, _, err = _run(capsys, *SMALL, *methods, "--out", str(tmp_path / "cut"))
    assert rc == 130 and "interrupted" in err
    runs = tmp_path / "cut" / "runs" / "CartPole-v1"
    assert (runs / "everyk-seed0.train.json").is_file() and (runs / "everyk-seed0.zip").is_file()
    assert not (runs / "everyk-seed0.json").exists()
    monkeypatch.setattr(rl, "evaluate", real_evaluate)

    trained = []
    real_train = rl.train_run
    monkeypatch.setattr(rl, "train_run", lambda *a, **k: trained.append(1) or real_train(*a, **k))
    rc, _, err = _run(capsys, *SMALL[:-1], *methods, "--out", str(tmp_path / "cut"))
    assert rc == 0
    assert trained == []  # nothing trained again: the finished run is skipped, the other evaluated
    assert "ppo seed 0: done before, skipped" in err and "trained before, evaluating" in err
    cut = json.loads((tmp_path / "cut" / "results.json").read_text())
    drop = ("train_time", "eval_time")
    for a, b in zip(whole["runs"], cut["runs"]):
        assert {k: v for k, v in a.items() if k not in drop} == {
            k: v for k, v in b.items() if k not in drop
        }
    html = (tmp_path / "cut" / "report.html").read_text()
    assert html.count("<img") == 2 and "Paired verdicts" in html
    # a damaged saved agent (its evaluation still to do) is trained again, with a line:
    # it failed every rerun with zipfile's traceback
    (runs / "everyk-seed0.json").unlink()
    agent = runs / "everyk-seed0.zip"
    agent.write_bytes(agent.read_bytes()[:5000])
    rc, _, err = _run(capsys, *SMALL[:-1], *methods, "--out", str(tmp_path / "cut"))
    assert rc == 0, err
    assert "its saved agent everyk-seed0.zip cannot be read (" in err and trained == [1]
    again = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert again["runs"][1]["robustness"] == whole["runs"][1]["robustness"]  # (deterministic)


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(envs=["MountainCar-v0"]), "Invalid envs value"),
        (dict(envs=[]), "Invalid envs value"),
        (dict(methods=["ppo", "dqn"]), "Invalid method value: 'dqn'"),
        (dict(methods=["sam:k=3"]), "Invalid option for method 'sam': k"),
        (dict(methods=["everyk:k=0"]), "Invalid k value"),
        (dict(methods=["looksam:alpha=2"]), "Invalid alpha value"),
        (dict(methods=["sam:rho=-0.1"]), "Invalid rho value"),
        (dict(rho=[0.1, float("inf")]), "Invalid rho value"),
        (dict(methods=["ppo"], rho=[0.1]), r"Invalid rho value: 0\.1 \(no method here takes it"),
        (dict(seeds=0), "Invalid seeds value"),
        (dict(timesteps=100), "at least two rollouts"),
        (dict(timesteps=256), r"at least two rollouts: its learning rate decays linearly to 0"),
        (dict(timesteps={"Acrobot-v1": 5000}), "not among the study's envs"),
        (dict(eval_episodes=0), "Invalid eval_episodes value"),
        (dict(grid="fine"), "Invalid grid value"),
        (dict(baseline="a2c"), "Invalid baseline value"),
        (dict(device="tpu"), "Invalid device value"),
        (dict(learning_rate=1e-3), "Invalid setting: learning_rate"),
    ],
)
def test_bad_settings_are_refused(changes, match):
    with pytest.raises(ValueError, match=match):
        rl.build_config({**rl.DEFAULTS, "envs": ["CartPole-v1"], **changes})


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--timesteps", "10"], "invalid timesteps value"),
        (["--envs", "Pong-v5"], "invalid envs value"),
        (["--methods", "sam:rho=abc"], "invalid rho value"),
        (["--eval-episodes", "-1"], "invalid eval_episodes value"),
        (["--seeds", "1,x"], "invalid --seeds value"),
    ],
)
def test_cli_bad_input_one_line_exit_2_nothing_run(tmp_path, capsys, argv, match):
    out = tmp_path / "run"
    rc, _, err = _run(capsys, "--out", str(out), "-q", *argv)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("samkit rl: error:") and match in err.lower()
    assert not (out / "runs").exists()


def test_list_names_the_perturbations(capsys):
    rc, out, _ = _run(capsys, "--list")
    assert rc == 0
    for name in ("CartPole-v1", "Acrobot-v1", "pole_length", "link_mass", "everyk", "looksam"):
        assert name in out


def test_axis_differences_are_paired_by_seed_by_hand():
    """The per-axis table's differences: each method's axis mean minus the baseline's on the
    same seed, averaged, with the standard error of those differences (a diverged run is
    left out of its pair)."""
    config = rl.build_config(
        {"envs": ["CartPole-v1"], "methods": ["ppo", "sam"], "seeds": [0, 1, 2]}
    )
    axes = [a.name for a in CARTPOLE.axes]

    def record(label, seed, value, diverged=False):
        means = {name: value + i for i, name in enumerate(axes)}
        return {
            "env": "CartPole-v1",
            "label": label,
            "method": label,
            "seed": seed,
            "diverged": diverged,
            "train_time": 1.0,
            "train_return_mean": 0.0,
            "passes_per_step": 1.0,
            "robustness": {"nominal": value, "robust": value, "axis_means": means},
        }

    ppo = [record("ppo", s, v) for s, v in enumerate([100.0, 200.0, 300.0])]
    sam = [record("sam", 0, 130.0), record("sam", 1, 190.0), record("sam", 2, 0.0, diverged=True)]
    summary = rl.summarize(config, ppo + sam)
    row = next(r for r in summary["summary"] if r["label"] == "sam")
    diffs = [30.0, -10.0]  # seed 2 diverged: out of the pair
    mean = sum(diffs) / 2
    se = (sum((d - mean) ** 2 for d in diffs) / 1) ** 0.5 / 2**0.5
    for name in axes:
        got = row["axes_vs_baseline"][name]
        assert got["n"] == 2
        assert got["mean"] == pytest.approx(mean) and got["se"] == pytest.approx(se)
    assert "axes_vs_baseline" not in next(r for r in summary["summary"] if r["label"] == "ppo")
    text = rl.format_axis_tables(summary["summary"])
    assert f"(+{mean:.1f} +- {se:.1f})" in text


def test_everyk_keeps_composers_rho_scaling():
    """EveryK's default no longer scales rho (issue 20); the RL study's `everyk` still does."""
    from samkit.experiments.grid import Variant

    kwargs = rl._sam_arguments(Variant("everyk", "everyk", {"rho": 0.05, "k": 4}))
    policy = kwargs["sam_kwargs"]["policy"]
    assert (policy.k, policy.scale_rho) == (4, True)
