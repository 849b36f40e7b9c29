"""Worst-case and average-case sharpness: closed forms on quadratics,
SAM's one-step lower bound, and the scale invariance of the adaptive ball."""

import math

import pytest
import torch
import torch.nn.functional as F
from test_hessian import quad_problem
from torch import nn

from samkit.sharpness import average_case_sharpness, worst_case_sharpness


def test_quadratic_minimum_closed_form():
    # at the minimum the worst case in the ball is rho^2 lambda_max / 2
    model, loss_fn, batches, a = quad_problem([6.0, 2.0, 1.0, 0.5, -0.3], seed=2)
    with torch.no_grad():
        model.w.copy_(loss_fn.center)  # zero gradient: the first step is a random direction
    res = worst_case_sharpness(model, loss_fn, batches, rho=0.1, steps=60, seed=1)
    assert res.sharpness == pytest.approx(0.5 * 0.1**2 * 6.0, rel=1e-6)
    assert float(res.delta.norm()) == pytest.approx(0.1, rel=1e-9)
    assert res.loss == pytest.approx(0.0, abs=1e-15)


def test_quadratic_off_minimum_matches_brute_force():
    model, loss_fn, batches, a = quad_problem([3.0, 0.5], seed=5)
    rho = 0.3
    res = worst_case_sharpness(model, loss_fn, batches, rho=rho, steps=50)
    w = model.w.detach()
    angles = torch.linspace(0, 2 * math.pi, 20001, dtype=torch.float64)
    ring = (
        torch.stack([angles.cos(), angles.sin()], 1) * rho
    )  # a convex function peaks on the boundary
    d = w + ring - loss_fn.center
    brute = float((0.5 * ((d @ a) * d).sum(1)).max()) - float(loss_fn(w, None))
    assert res.sharpness == pytest.approx(brute, rel=1e-6)


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 16, bias=False), nn.ReLU(), nn.Linear(16, 3, bias=False)
    ).double()


def _data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(64, 6, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (64,), generator=g
    )


def test_never_below_sam_one_step_and_monotone_history():
    model = _net()
    x, y = _data()
    rho = 0.2
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    gnorm = torch.sqrt(sum((g**2).sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads):
            p.add_(g * rho / gnorm)
        sam = float(F.cross_entropy(model(x), y)) - float(loss)
        for p, g in zip(model.parameters(), grads):
            p.sub_(g * rho / gnorm)
    res = worst_case_sharpness(model, F.cross_entropy, [(x, y)], rho=rho, steps=1)
    assert res.sharpness == pytest.approx(sam, rel=1e-9)  # steps=1 is SAM's ascent
    multi = worst_case_sharpness(model, F.cross_entropy, [(x, y)], rho=rho, steps=15)
    assert multi.sharpness >= sam
    assert multi.sharpness > sam * 1.01


def test_adaptive_is_scale_invariant_l2_is_not():
    # w1 -> a w1, w2 -> w2 / a leaves a bias-free ReLU net's function unchanged
    x, y = _data()
    m1, m2 = _net(), _net()
    with torch.no_grad():
        m2[0].weight.mul_(4.0)
        m2[2].weight.div_(4.0)
    torch.testing.assert_close(m1(x), m2(x))
    kw = dict(rho=0.5, adaptive=True, steps=5)
    a1 = worst_case_sharpness(m1, F.cross_entropy, [(x, y)], **kw)
    a2 = worst_case_sharpness(m2, F.cross_entropy, [(x, y)], **kw)
    assert a1.sharpness == pytest.approx(a2.sharpness, rel=1e-9)
    l1 = worst_case_sharpness(m1, F.cross_entropy, [(x, y)], rho=0.5, steps=5)
    l2 = worst_case_sharpness(m2, F.cross_entropy, [(x, y)], rho=0.5, steps=5)
    assert abs(l1.sharpness - l2.sharpness) > 0.05 * l1.sharpness
    g1 = average_case_sharpness(
        m1, F.cross_entropy, [(x, y)], rho=0.5, adaptive=True, n_samples=4, seed=3
    )
    g2 = average_case_sharpness(
        m2, F.cross_entropy, [(x, y)], rho=0.5, adaptive=True, n_samples=4, seed=3
    )
    assert g1.samples == pytest.approx(g2.samples, rel=1e-9)


def test_average_case_on_quadratic():
    # E[0.5 z^T A z] = 0.5 sigma^2 tr A at the minimum
    eigs = [4.0, 2.0, 1.0, 1.0, 0.5, 0.2]
    model, loss_fn, batches, a = quad_problem(eigs, seed=3)
    with torch.no_grad():
        model.w.copy_(loss_fn.center)
    res = average_case_sharpness(model, loss_fn, batches, rho=0.3, n_samples=400, seed=0)
    assert res.sigma == pytest.approx(0.3 / math.sqrt(6))
    expect = 0.5 * res.sigma**2 * sum(eigs)
    assert abs(res.sharpness - expect) < 4 * res.stderr
    assert res.stderr < 0.1 * expect


def test_model_untouched_and_errors():
    model = _net()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _data()
    worst_case_sharpness(model, F.cross_entropy, [(x, y)], rho=0.1, steps=3)
    average_case_sharpness(model, F.cross_entropy, [(x, y)], n_samples=2)
    assert model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="Invalid rho value: -1"):
        worst_case_sharpness(model, F.cross_entropy, [(x, y)], rho=-1)
    with pytest.raises(ValueError, match="steps"):
        worst_case_sharpness(model, F.cross_entropy, [(x, y)], steps=0)
    with pytest.raises(ValueError, match="n_samples"):
        average_case_sharpness(model, F.cross_entropy, [(x, y)], n_samples=0)


def test_a_ball_whose_norm_overflows_float32_is_refused_not_zero():
    """At rho = 1e30 the ascent's norm overflowed float32 to inf, the step was scaled to
    nothing and the worst case read 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    batches = [(torch.randn(20, 4), torch.randint(0, 3, (20,)))]
    with pytest.raises(ValueError, match="Invalid rho value: 1e"):
        worst_case_sharpness(model, F.cross_entropy, batches, rho=1e30)
    with pytest.raises(ValueError, match="Invalid rho value: 1e"):
        average_case_sharpness(model, F.cross_entropy, batches, rho=1e30)
