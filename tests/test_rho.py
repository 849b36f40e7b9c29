"""rho schedules: ProportionalRho (GSAM, arXiv 2203.08065) and LambdaRho."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import samkit


def _sam(rhos=(0.1,), lr=0.2):
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "rho": r} for r in rhos]
    return samkit.SAM(torch.optim.SGD(groups, lr=lr, momentum=0.9), rho=0.05)


@given(st.floats(0.0, 1.0), st.floats(0.0, 0.05), st.floats(0.06, 1.0))
def test_proportional_rho_is_linear_in_lr_and_clamped(frac, rho_min, rho_max):
    opt = _sam()
    sched = samkit.ProportionalRho(opt, rho_max=rho_max, rho_min=rho_min, lr_max=0.2, lr_min=0.02)
    lr = 0.02 + (0.2 - 0.02) * frac
    opt.param_groups[0]["lr"] = lr
    sched.step()
    expected = rho_min + (rho_max - rho_min) * (lr - 0.02) / (0.2 - 0.02)
    assert opt.param_groups[0]["rho"] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # outside [lr_min, lr_max] rho is clamped to [rho_min, rho_max]
    opt.param_groups[0]["lr"] = 0.0
    sched.step()
    assert opt.param_groups[0]["rho"] == rho_min
    opt.param_groups[0]["lr"] = 5.0
    sched.step()
    assert opt.param_groups[0]["rho"] == rho_max


def test_proportional_rho_follows_a_cosine_schedule_per_group():
    opt = _sam(rhos=(0.1, 0.02), lr=0.4)
    lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    rho_sched = samkit.ProportionalRho(opt)  # defaults: each group's rho and initial lr
    assert rho_sched.rho_max == [0.1, 0.02] and rho_sched.lr_max == [0.4, 0.4]
    params = [p for g in opt.param_groups for p in g["params"]]

    def closure():
        loss = sum(p.square().sum() for p in params) + 1.0
        loss.backward()
        return loss

    for _ in range(10):
        opt.step(closure)
        opt.zero_grad()
        lr_sched.step()
        rho_sched.step()
        lr = opt.param_groups[0]["lr"]
        assert opt.param_groups[0]["rho"] == pytest.approx(0.1 * lr / 0.4)
        assert opt.param_groups[1]["rho"] == pytest.approx(0.02 * lr / 0.4)
    assert opt.param_groups[0]["rho"] == pytest.approx(0.0, abs=1e-12)  # lr reached 0


def test_proportional_rho_state_dict_roundtrip():
    opt = _sam()
    a = samkit.ProportionalRho(opt, rho_min=0.01, lr_min=0.01)
    opt2 = _sam()
    b = samkit.ProportionalRho(opt2, rho_max=0.5)
    b.load_state_dict(a.state_dict())
    assert "optimizer" not in a.state_dict()
    assert (b.rho_max, b.rho_min, b.lr_max, b.lr_min) == (a.rho_max, a.rho_min, a.lr_max, a.lr_min)
    assert b.optimizer is opt2
    opt.param_groups[0]["lr"] = opt2.param_groups[0]["lr"] = 0.07
    a.step()
    b.step()
    assert opt.param_groups[0]["rho"] == opt2.param_groups[0]["rho"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rho_max": -0.1}, r"rho_max.*-0\.1"),
        ({"rho_min": -0.1}, r"rho_min.*-0\.1"),
        ({"rho_min": 0.5}, r"rho_min.*0\.5"),
        ({"lr_max": 0.1, "lr_min": 0.1}, r"lr_max.*0\.1"),
        ({"lr_max": float("nan")}, r"lr_max.*nan"),
        ({"lr_max": float("inf")}, r"lr_max.*inf"),
        ({"lr_min": float("-inf")}, r"lr_min.*-inf"),
        ({"lr_min": float("nan")}, r"Invalid lr_min value: nan"),
        ({"lr_min": "0.1"}, r"lr_min.*'0\.1'"),
        ({"lr_max": True}, r"lr_max.*True"),
        ({"rho_min": float("nan")}, r"Invalid rho_min value: nan"),
    ],
)
def test_proportional_rho_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        samkit.ProportionalRho(_sam(), **kwargs)


def test_schedules_need_a_sam_optimizer():
    plain = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="optimizer.*rho"):
        samkit.ProportionalRho(plain)
    with pytest.raises(ValueError, match="optimizer.*rho"):
        samkit.LambdaRho(plain, lambda t: 1.0)
    with pytest.raises(ValueError, match="optimizer.*list"):
        samkit.ProportionalRho([1, 2])


@pytest.mark.parametrize("rho", ["auto", "auto:validation_plateau", "controller"])
def test_schedules_refuse_a_radius_a_controller_sets(rho):
    """A schedule on a SAM whose rho controller writes the radius before every ascent was
    overwritten in silence (the groups showed the schedule's value, the step used the
    controller's): refused, naming the optimizer."""
    w = torch.nn.Parameter(torch.zeros(2))
    if rho == "controller":
        rho = samkit.GradientAgreement(0.1)
    opt = samkit.SAM(torch.optim.SGD([w], lr=0.1), rho=rho)
    with pytest.raises(ValueError, match="Invalid optimizer value: .*rho controller"):
        samkit.ProportionalRho(opt)
    with pytest.raises(ValueError, match="Invalid optimizer value: .*rho controller"):
        samkit.LambdaRho(opt, lambda t: 2.0)
    samkit.ProportionalRho(samkit.SAM(torch.optim.SGD([w], lr=0.1), rho=0.1))  # a fixed rho


@given(st.integers(0, 20), st.floats(0.0, 3.0))
def test_lambda_rho_multiplies_initial_rho(steps, slope):
    opt = _sam(rhos=(0.1, 0.0, 0.3))
    sched = samkit.LambdaRho(opt, lambda t: 1.0 + slope * t)
    for _ in range(steps):
        sched.step()
    f = 1.0 + slope * steps
    assert [g["rho"] for g in opt.param_groups] == [0.1 * f, 0.0, 0.3 * f]


def test_lambda_rho_state_dict_and_errors():
    opt = _sam(rhos=(0.1,))
    sched = samkit.LambdaRho(opt, lambda t: 0.5**t)
    assert opt.param_groups[0]["rho"] == 0.1  # fn(0) applied at construction
    sched.step()
    sched.step()
    sd = sched.state_dict()
    opt2 = _sam(rhos=(0.7,))
    sched2 = samkit.LambdaRho(opt2, lambda t: 0.5**t)
    sched2.load_state_dict(sd)
    assert opt2.param_groups[0]["rho"] == pytest.approx(0.025) == opt.param_groups[0]["rho"]
    with pytest.raises(ValueError, match="fn"):
        samkit.LambdaRho(opt, "not callable")
    with pytest.raises(ValueError, match=r"fn.*-1"):
        samkit.LambdaRho(opt, lambda t: -1.0)
    bad = samkit.LambdaRho(_sam(), lambda t: 1.0 - t)
    bad.step()  # fn(1) = 0 is allowed
    with pytest.raises(ValueError, match=r"fn\(2\)"):
        bad.step()


def test_rho_schedule_is_used_by_the_next_sam_step():
    w = torch.nn.Parameter(torch.tensor([1.0, 0.0]))
    opt = samkit.SAM(torch.optim.SGD([w], lr=0.0), rho=0.1)
    sched = samkit.LambdaRho(opt, lambda t: 0.0 if t == 1 else 1.0)
    moved = []
    for _ in range(2):
        (w[0] * 3.0).backward()
        moved.append(opt.first_step())
        if moved[-1]:
            (w[0] * 3.0).backward()
        opt.second_step(zero_grad=True)
        sched.step()
    assert moved == [True, False]  # rho 0 on the second step: no ascent at all
    assert opt.ascents == 1 and opt.steps == 2


def test_proportional_rho_applies_at_construction_like_an_lr_scheduler():
    # with a warm-up, the first steps run at a small lr: rho must be small too,
    # not rho_max until the first rho_sched.step()
    p = nn.Parameter(torch.zeros(2))
    opt = samkit.SAM(torch.optim.SGD([p], lr=0.2), rho=0.1)
    torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.25, total_iters=4)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    rho_sched = samkit.ProportionalRho(opt)
    assert opt.param_groups[0]["rho"] == pytest.approx(0.025)
    assert rho_sched.rho_max == [0.1]


@pytest.mark.parametrize("order", ["schedule_first", "optimizer_first"])
def test_proportional_rho_resumes_bit_for_bit_in_either_load_order(order):
    """Built after the optimizer's state was loaded, the constructor reads the scaled rho
    as rho_max; loading the schedule's own state must put the right rho back."""
    x, y = torch.randn(16, 3), torch.randn(16, 1)

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
        opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
        return model, opt

    def train(model, opt, sched, rho, steps):
        for _ in range(steps):

            def closure():
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                return loss

            opt.zero_grad()
            opt.step(closure)
            sched.step()
            rho.step()

    model, opt = build()
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    rho = samkit.ProportionalRho(opt)
    train(model, opt, sched, rho, 3)
    ckpt = copy.deepcopy(
        {
            "m": model.state_dict(),
            "o": opt.state_dict(),
            "s": sched.state_dict(),
            "r": rho.state_dict(),
        }
    )
    train(model, opt, sched, rho, 3)

    model2, opt2 = build()
    model2.load_state_dict(ckpt["m"])
    if order == "optimizer_first":
        opt2.load_state_dict(ckpt["o"])
        sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=10)
        sched2.load_state_dict(ckpt["s"])
        rho2 = samkit.ProportionalRho(opt2)
        rho2.load_state_dict(ckpt["r"])
    else:
        sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=10)
        rho2 = samkit.ProportionalRho(opt2)
        opt2.load_state_dict(ckpt["o"])
        sched2.load_state_dict(ckpt["s"])
        rho2.load_state_dict(ckpt["r"])
    train(model2, opt2, sched2, rho2, 3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


@pytest.mark.parametrize("value", [float("inf"), float("nan"), "2", True, None])
def test_lambda_rho_refuses_an_fn_value_that_is_not_a_finite_number(value):
    with pytest.raises(ValueError, match=r"Invalid fn value: fn\(0\)"):
        samkit.LambdaRho(_sam(), lambda t: value)


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        ({"base_rhos": [float("nan")]}, "base_rhos"),
        ({"base_rhos": []}, "base_rhos"),
        ({"base_rhos": [-0.1]}, "base_rhos"),
        ({"last_step": -1}, "last_step"),
        ({"last_step": 1.5}, "last_step"),
        ({"last_step": None}, "last_step"),
    ],
)
def test_lambda_rho_refuses_a_malformed_state_and_changes_nothing(corrupt, match):
    opt = _sam(rhos=(0.1,))
    sched = samkit.LambdaRho(opt, lambda t: 0.5**t)
    sched.step()
    sd = {**sched.state_dict(), **corrupt}
    with pytest.raises(ValueError, match=f"Invalid state value: .*{match}"):
        sched.load_state_dict(sd)
    assert sched.state_dict() == {"base_rhos": [0.1], "last_step": 1}
    assert opt.param_groups[0]["rho"] == 0.05
    with pytest.raises(ValueError, match=r"has no \['last_step'\]"):
        sched.load_state_dict({"base_rhos": [0.1]})


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        ({"lr_max": [0.0]}, r"lr_max = 0\.0"),
        ({"rho_max": [float("nan")]}, "rho_max = nan"),
        ({"rho_max": [0.1, 0.1]}, "one number for each of the 1"),
        ({"lr_min": float("inf")}, "lr_min = inf"),
        ({"rho_min": -1.0}, "rho_min = -1.0"),
        ({"lr_max": "x"}, "lr_max = 'x'"),
    ],
)
def test_proportional_rho_refuses_a_malformed_state_and_changes_nothing(corrupt, match):
    opt = _sam(rhos=(0.1,))
    sched = samkit.ProportionalRho(opt)
    good = sched.state_dict()
    with pytest.raises(ValueError, match=f"Invalid state value: .*{match}"):
        sched.load_state_dict({**good, **corrupt})
    assert sched.state_dict() == good


def test_lambda_rho_takes_a_one_element_tensor_as_a_number():
    opt = _sam(rhos=(0.1,))
    samkit.LambdaRho(opt, lambda t: torch.tensor(0.5))
    assert opt.param_groups[0]["rho"] == pytest.approx(0.05)


def _cl(w):
    def closure():
        loss = (w**2).sum() + w.sum()
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("who", ["proportional", "gsam"])
def test_rho_follows_one_cycle_up_to_its_max_lr(who):
    """OneCycleLR's initial_lr is the bottom of its warm-up (max_lr / 25): taken as the
    peak, rho sat at its largest on every step but the last (GSAM's default included)."""
    w = nn.Parameter(torch.zeros(2))
    if who == "gsam":
        opt = samkit.GSAM(torch.optim.SGD([w], lr=1e-3), rho=0.05)  # the scheduler comes after
    else:
        opt = samkit.SAM(torch.optim.SGD([w], lr=0.1), rho=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=10)
    schedule = samkit.ProportionalRho(opt) if who == "proportional" else None
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for _ in range(9):
            if schedule is None:
                opt.step(_cl(w))  # GSAM writes rho for the lr of this step
            g = opt.param_groups[0]
            assert g["rho"] == pytest.approx(0.05 * g["lr"] / 0.2, rel=1e-9)
            if schedule is not None:
                opt.step(_cl(w))
            opt.zero_grad()
            sched.step()
            if schedule is not None:
                schedule.step()


def test_a_learning_rate_above_the_peak_warns_once_and_lr_max_mends_it():
    """CyclicLR records no peak in the groups: rho is held at its largest, with a warning
    naming lr_max; given, rho follows the cycle."""
    w = nn.Parameter(torch.zeros(2))
    opt = samkit.GSAM(torch.optim.SGD([w], lr=1e-3, momentum=0.9), rho=0.05)
    sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.01, max_lr=0.1, step_size_up=3)
    with pytest.warns(RuntimeWarning, match=r"pass lr_max= the peak") as got:
        for _ in range(6):
            opt.step(_cl(w))
            opt.zero_grad()
            sched.step()
    assert len([w for w in got if "lr_max" in str(w.message)]) == 1
    opt = samkit.GSAM(torch.optim.SGD([w], lr=1e-3, momentum=0.9), rho=0.05, lr_max=0.1)
    sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.01, max_lr=0.1, step_size_up=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for _ in range(6):
            opt.step(_cl(w))
            g = opt.param_groups[0]
            assert g["rho"] == pytest.approx(0.05 * g["lr"] / 0.1, rel=1e-9)
            opt.zero_grad()
            sched.step()
    with pytest.raises(ValueError, match=r"Invalid lr_max value: 0\.1 shapes GSAM's"):
        samkit.GSAM(torch.optim.SGD([w], lr=0.1), rho="auto", lr_max=0.1)
    with pytest.raises(ValueError, match="lr_max"):
        samkit.GSAM(torch.optim.SGD([w], lr=0.1), rho=0.05, lr_max=-1.0)


def test_a_tensor_learning_rates_peak_is_read_too():
    """A tensor lr's initial_lr was skipped as no number: the warmed-down lr was taken for
    the peak, rho sat at its largest through the warm-up, and a warning fired."""
    w = nn.Parameter(torch.zeros(2))
    opt = samkit.SAM(torch.optim.SGD([w], lr=torch.tensor(0.1)), rho=0.05)
    torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        schedule = samkit.ProportionalRho(opt)
        assert schedule.lr_max == [pytest.approx(0.1)]
        assert opt.param_groups[0]["rho"] == pytest.approx(0.005)
