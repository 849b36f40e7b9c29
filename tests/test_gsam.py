"""GSAM: the orthogonal-component update by hand, rho following the lr, resume."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from optim_registry import all_equal, make_data, make_model, params_of
from torch import nn

import samkit
from samkit.optim.gsam import GSAM

A = torch.tensor([[3.0, 0.5, 0.0], [0.5, 1.0, -0.3], [0.0, -0.3, 2.0]], dtype=torch.float64)
B = torch.tensor([0.4, -1.0, 0.7], dtype=torch.float64)


def loss_of(w):
    return 0.5 * w @ A @ w + B @ w + 0.25 * (w**4).sum()


def grad_of(w):
    return A @ w + B + w**3


def closure_for(w):
    def closure():
        loss = loss_of(w)
        loss.backward()
        return loss

    return closure


@given(
    w0=st.lists(st.floats(-2, 2), min_size=3, max_size=3),
    rho=st.floats(0.01, 0.5),
    alpha=st.floats(0.0, 1.0),
)
def test_update_matches_hand_computation(w0, rho, alpha):
    w = nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    lr = 0.05
    opt = GSAM(torch.optim.SGD([w], lr=lr), rho=rho, alpha=alpha, follow_lr=False)
    start = w.detach().clone()
    opt.step(closure_for(w))
    g = grad_of(start)
    e = rho * g / (g.norm() + 1e-12)
    gp = grad_of(start + e)
    g_par = (g @ gp) / (gp @ gp + 1e-12) * gp
    g_perp = g - g_par
    assert abs(float(g_perp @ gp)) < 1e-9 * (
        1 + float(g.norm() * gp.norm())
    )  # orthogonal by construction
    expect = start - lr * (gp - alpha * g_perp)
    # samkit's norms and dot products accumulate in float32 (SAM's convention)
    torch.testing.assert_close(w.detach(), expect, rtol=1e-6, atol=1e-8)


def test_alpha_zero_without_schedule_is_sam_bit_for_bit():
    x, y = make_data(0)
    m1, m2 = make_model(0), make_model(0)
    o1 = GSAM(
        torch.optim.SGD(m1.parameters(), lr=0.1, momentum=0.9), rho=0.05, alpha=0.0, follow_lr=False
    )
    o2 = samkit.SAM(torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9), rho=0.05)
    for _ in range(4):
        for m, o in ((m1, o1), (m2, o2)):

            def closure(m=m):
                loss = torch.nn.functional.mse_loss(m(x), y)
                loss.backward()
                return loss

            o.step(closure)
            o.zero_grad()
    assert all_equal(params_of(m1), params_of(m2))


def test_rho_follows_the_learning_rate_schedule():
    w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    opt = GSAM(torch.optim.SGD([w], lr=0.2), rho=0.1, alpha=0.0, rho_min=0.02)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: [1.0, 0.5, 0.0][min(t, 2)])
    seen = []
    for _ in range(3):
        start = w.detach().clone()
        w.grad = None
        loss_of(w).backward()
        assert opt.first_step()
        seen.append(float((w.detach() - start).norm()))
        w.grad = None
        loss_of(w).backward()
        opt.second_step(zero_grad=True)
        sched.step()
    # rho = rho_min + (rho_max - rho_min) * lr / lr_max
    assert seen == pytest.approx([0.1, 0.02 + 0.08 * 0.5, 0.02], rel=1e-9)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"alpha": -0.1}, "Invalid alpha value: -0.1"),
        ({"alpha": "big"}, "Invalid alpha value"),
        ({"rho": -1.0}, "Invalid rho value: -1.0"),
        ({"rho_min": 1.0, "rho": 0.1}, "Invalid rho_min value"),
        ({"rho": 1e308}, r"Invalid rho value: 1e\+308"),
        ({"follow_lr": "no"}, "Invalid follow_lr value: 'no'"),  # was truthy: rho followed lr
    ],
)
def test_invalid_arguments_raise_value_error_naming_them(kwargs, match):
    w = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match=match):
        GSAM(torch.optim.SGD([w], lr=0.1), **kwargs)


def test_scaler_step_after_a_plain_first_step_restores_and_refuses():
    w = nn.Parameter(torch.tensor([1.0, 2.0, -1.0]))
    opt = GSAM(torch.optim.SGD([w], lr=0.1), rho=0.05, follow_lr=False)
    scaler = torch.amp.GradScaler("cpu")
    loss_of(w.double()).backward()
    assert opt.first_step()
    w.grad = None
    scaler.scale(loss_of(w.double()).float()).backward()
    with pytest.raises(
        ValueError, match="Invalid scaler value: scaler.step.opt. after first_step.. without"
    ):
        scaler.step(opt)
    assert torch.equal(w.detach(), torch.tensor([1.0, 2.0, -1.0]))
    assert not opt.perturbed


def test_gsam_rho_follows_lr_in_groups_added_later_and_resumes():
    """A group added with add_param_group follows its lr like the first ones, and the
    checkpoint loads into the same setup (it was refused: a state for 1 group, not 2)."""

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))
        opt = samkit.GSAM(torch.optim.SGD(model[0].parameters(), lr=0.1), rho=0.05)
        opt.add_param_group({"params": model[2].parameters(), "lr": 0.2})
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5**t)
        return model, opt, sched

    x, y = torch.randn(8, 3), torch.randn(8, 1)

    def train(model, opt, sched, steps):
        for _ in range(steps):

            def closure():
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                return loss

            opt.zero_grad()
            opt.step(closure)
            sched.step()

    model, opt, sched = build()
    train(model, opt, sched, 2)
    # rho of each group = 0.05 * lr / its peak lr, set as a step begins: 0.5x at the second
    assert [g["rho"] for g in opt.param_groups] == pytest.approx([0.025, 0.025])
    ckpt = copy.deepcopy({"m": model.state_dict(), "o": opt.state_dict(), "s": sched.state_dict()})
    train(model, opt, sched, 2)
    model2, opt2, sched2 = build()
    model2.load_state_dict(ckpt["m"])
    opt2.load_state_dict(ckpt["o"])
    sched2.load_state_dict(ckpt["s"])
    train(model2, opt2, sched2, 2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


@pytest.mark.parametrize("make", ["gsam", "looksam"])
def test_stored_first_pass_gradients_follow_a_dtype_change(make):
    """model.double() between steps: the mixes' stored gradients become float64 too
    (a float32 copy would round g); the step matches a run that was float64 from the start."""
    torch.manual_seed(0)
    template = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    x, y = torch.randn(8, 3), torch.randn(8, 1)

    def build(model):
        base = torch.optim.SGD(model.parameters(), lr=0.1)
        if make == "gsam":
            return samkit.GSAM(base, rho=0.05, alpha=0.3)
        return samkit.LookSAM(base, rho=0.05, k=2, alpha=0.7)

    def step(model, opt):
        def closure():
            loss = nn.functional.mse_loss(
                model(x.to(model[0].weight.dtype)), y.to(model[0].weight.dtype)
            )
            loss.backward()
            return loss

        opt.zero_grad()
        opt.step(closure)

    a = copy.deepcopy(template)
    opt_a = build(a)
    step(a, opt_a)  # one float32 step: buffers are allocated in float32
    b = copy.deepcopy(a).double()
    a.double()
    opt_b = build(b)
    opt_b.load_state_dict(opt_a.state_dict())
    for _ in range(3):
        step(a, opt_a)
        step(b, opt_b)
    mix = opt_a.mix
    stored = list(mix.first.buffers.values()) + list(getattr(mix, "orthogonal", {}).values())
    assert stored and all(t.dtype is torch.float64 for t in stored)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_the_follow_lr_hint_is_given_for_an_lr_range_error_only():
    """An lr not above lr_min gets the follow_lr=False hint (FollowLR has no range to
    follow); another error that merely names lr_max does not (it was decided by
    matching "lr_max" in the message)."""
    w = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match=r"Invalid lr_max value: 0\.1 .*follow_lr=False"):
        samkit.GSAM(torch.optim.SGD([w], lr=0.1), lr_min=0.1)
    with pytest.raises(ValueError, match=r"Invalid lr_max value: 0\.0 .*follow_lr=False"):
        samkit.GSAM(torch.optim.SGD([w], lr=0.0))
    assert samkit.GSAM(torch.optim.SGD([w], lr=0.0), follow_lr=False).param_groups[0]["rho"] == 0.05
    with pytest.raises(ValueError, match=r"Invalid lr_max value: -0\.5") as got:
        samkit.GSAM(torch.optim.SGD([w], lr=0.1), lr_max=-0.5)
    assert "follow_lr" not in str(got.value)
    with pytest.raises(ValueError, match=r"Invalid lr_max value: 0\.05 .*follow_lr=False"):
        samkit.GSAM(torch.optim.SGD([w], lr=0.1), lr_min=0.1, lr_max=0.05)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"rho": "auto", "rho_min": 0.01}, r"Invalid rho_min value: 0\.01 .*rho='auto' turns off"),
        ({"rho": "auto", "lr_min": 0.001}, r"Invalid lr_min value: 0\.001"),
        ({"rho": 0.05, "follow_lr": False, "rho_min": 0.01}, "follow_lr=False turns off"),
        ({"rho": "auto", "rho_min": float("nan")}, "Invalid rho_min value: nan"),
        ({"rho": "auto", "lr_min": "x"}, "Invalid lr_min value: 'x'"),
        ({"rho": 0.05, "follow_lr": False, "rho_min": float("nan")}, "Invalid rho_min value"),
    ],
)
def test_the_schedules_arguments_are_checked_and_refused_where_they_would_be_ignored(kw, match):
    w = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=match):
        samkit.GSAM(torch.optim.SGD([w], lr=0.1), **kw)


def test_gsam_takes_a_controller_instance_as_it_takes_auto():
    w = torch.nn.Parameter(torch.zeros(3))
    opt = samkit.GSAM(torch.optim.SGD([w], lr=0.1), rho=samkit.ValidationPlateau(0.1))
    assert isinstance(opt.rho_controller, samkit.ValidationPlateau)
    assert opt.param_groups[0]["rho"] == 0.1
