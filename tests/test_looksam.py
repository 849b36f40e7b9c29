"""LookSAM: the reused orthogonal component by hand, with momentum SGD and
Adam; one pass on the steps in between; resume between full steps."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from optim_registry import all_equal, make_data, make_model, params_of
from torch import nn

from samkit.optim.looksam import LookSAM
from samkit.optim.mix import SurrogateGap
from samkit.optim.policy import EveryK

A = torch.tensor([[2.0, 0.3, 0.0], [0.3, 1.0, 0.4], [0.0, 0.4, 3.0]], dtype=torch.float64)
B = torch.tensor([1.0, -0.5, 0.2], dtype=torch.float64)


def loss_of(w):
    return 0.5 * w @ A @ w + B @ w + 0.1 * (w**4).sum()


def grad_of(w):
    return A @ w + B + 0.4 * w**3


BASES = {
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.05),
}


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("k", [1, 3])
def test_update_matches_hand_computation(base, k):
    rho, alpha, steps = 0.1, 0.7, 8
    w = nn.Parameter(torch.tensor([1.0, -1.5, 0.8], dtype=torch.float64))
    opt = LookSAM(BASES[base]([w]), rho=rho, k=k, alpha=alpha)
    # reference: the same base optimizer fed the paper's gradients
    w_ref = nn.Parameter(w.detach().clone())
    ref = BASES[base]([w_ref])
    gv = None
    calls = [0]

    def closure():
        calls[0] += 1
        loss = loss_of(w)
        loss.backward()
        return loss

    for t in range(steps):
        wr = w_ref.detach().clone()
        g = grad_of(wr)
        if t % k == 0:
            gs = grad_of(wr + rho * g / g.norm())
            gv = gs - (gs @ g) / (g @ g) * g
            assert abs(float(gv @ g)) < 1e-9  # orthogonal to g
            update = gs
        else:
            update = g + alpha * g.norm() / gv.norm() * gv
        w_ref.grad = update
        ref.step()
        opt.step(closure)
        opt.zero_grad()
        torch.testing.assert_close(w.detach(), w_ref.detach(), rtol=1e-6, atol=1e-8)
    full = math.ceil(steps / k)
    assert calls[0] == steps + full
    assert opt.reused == steps - full


@given(
    w0=st.lists(st.floats(-1.5, 1.5), min_size=3, max_size=3),
    rho=st.sampled_from([0.05, 0.2, 0.5]),
    alpha=st.sampled_from([0.2, 0.7, 1.5]),
)
def test_in_between_gradient_is_g_plus_alpha_norm_g_along_global_gv(w0, rho, alpha):
    """Algorithm 1's in-between step, read off a plain SGD step (lr 1, no
    momentum): the base optimizer receives g + alpha ||g|| g_v / ||g_v||, with
    g_v and both norms taken over *all* parameters (here two tensors, so a
    per-tensor scaling would fail), g computed at w in one pass."""
    w = torch.tensor(w0, dtype=torch.float64)
    g0 = grad_of(w)
    assume(float(g0.norm()) > 1e-3)
    a, b = nn.Parameter(w[:2].clone()), nn.Parameter(w[2:].clone())
    opt = LookSAM(torch.optim.SGD([a, b], lr=1.0), rho=rho, k=2, alpha=alpha)
    calls = [0]

    def closure():
        calls[0] += 1
        loss = loss_of(torch.cat([a, b]))
        loss.backward()
        return loss

    opt.step(closure)  # step 0: full SAM step, stores g_v
    opt.zero_grad()
    gs = grad_of(w + rho * g0 / g0.norm())
    gv = gs - (gs @ g0) / (g0 @ g0) * g0
    assume(float(gv.norm()) > 1e-6 * float(gs.norm()))
    w1 = w - gs
    torch.testing.assert_close(torch.cat([a, b]).detach(), w1)
    opt.step(closure)  # step 1: one pass at w1, reuses g_v
    fed = w1 - torch.cat([a, b]).detach()
    g1 = grad_of(w1)
    torch.testing.assert_close(fed, g1 + alpha * g1.norm() / gv.norm() * gv, rtol=1e-7, atol=1e-9)
    extra = fed - g1
    torch.testing.assert_close(
        extra.norm(), alpha * g1.norm(), rtol=1e-7, atol=1e-9
    )  # size set by alpha, not by SAM
    assert (
        abs(float(extra @ g0)) <= 1e-7 * float(extra.norm() * g0.norm()) + 1e-9
    )  # orthogonal to step 0's g
    assert calls[0] == 3 and (opt.ascents, opt.reused) == (1, 1)


def test_closure_runs_once_on_the_steps_in_between():
    """k=5, 10 steps: 10 first passes + 2 second passes (the peer runs 20)."""
    model = make_model(0)
    x, y = make_data(0)
    opt = LookSAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.05, k=5)
    calls = [0]

    def closure():
        calls[0] += 1
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(10):
        opt.step(closure)
        opt.zero_grad()
    assert calls[0] == 12
    assert (opt.steps, opt.ascents, opt.reused) == (10, 2, 8)


def test_alpha_zero_is_sam_every_k_without_rho_scaling():
    import samkit

    x, y = make_data(1)
    m1, m2 = make_model(1), make_model(1)
    o1 = LookSAM(torch.optim.Adam(m1.parameters(), lr=1e-2), rho=0.05, k=3, alpha=0.0)
    o2 = samkit.SAM(
        torch.optim.Adam(m2.parameters(), lr=1e-2), rho=0.05, policy=EveryK(3, scale_rho=False)
    )
    for _ in range(7):
        for m, o in ((m1, o1), (m2, o2)):

            def closure(m=m):
                loss = torch.nn.functional.mse_loss(m(x), y)
                loss.backward()
                return loss

            o.step(closure)
            o.zero_grad()
    assert all_equal(params_of(m1), params_of(m2))


def test_unsupported_combinations_raise_clear_errors():
    w = nn.Parameter(torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="Invalid policy value: LookSAM chooses its own steps"):
        LookSAM(torch.optim.SGD([w], lr=0.1), policy=EveryK(2))
    with pytest.raises(ValueError, match="Invalid mix value: LookSAM chooses its own steps"):
        LookSAM(torch.optim.SGD([w], lr=0.1), mix=SurrogateGap(0.1))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"k": 0}, "Invalid k value: 0"),
        ({"k": 2.0}, "Invalid k value: 2.0"),
        ({"alpha": -1}, "Invalid alpha value: -1"),
        ({"foreach": "x"}, "Invalid foreach value: 'x'"),
    ],
)
def test_invalid_arguments_raise_value_error_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LookSAM(torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1), **kwargs)


# ------------------------------------------------------------------- DDP


def test_a_skipped_full_step_does_not_poison_the_steps_that_reuse_its_direction():
    """With skip_nonfinite, a full step whose second pass is not finite is skipped; its
    g_v must not be stored, or every step in between (which adds g_v) is NaN or skipped."""
    model = make_model(3)
    x, y = make_data(3)
    opt = LookSAM(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), k=2, alpha=0.5,
                  skip_nonfinite=True)  # fmt: skip
    calls = []

    def closure(poison_second=False):
        calls.append(1)
        loss = torch.nn.functional.mse_loss(model(x), y)
        (loss * float("inf") if poison_second and len(calls) % 2 == 0 else loss).backward()
        return loss

    for _ in range(2):  # a full step (g_v stored) and one in between
        opt.step(closure)
        opt.zero_grad()
    gv = {p: v.clone() for p, v in opt.mix.orthogonal.items()}
    calls.clear()
    w = params_of(model)
    opt.step(lambda: closure(poison_second=True))  # a full step, skipped
    opt.zero_grad()
    assert all_equal(params_of(model), w)
    assert all(torch.equal(opt.mix.orthogonal[p], v) for p, v in gv.items())
    opt.step(closure)  # in between: reuses the g_v of the last good full step
    assert opt.reused == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not all_equal(params_of(model), w), "the step in between was skipped"
