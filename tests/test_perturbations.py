"""Fisher SAM, masked / SAM-ON and ESAM's random-subset perturbations.

Each perturbation's ascent vector is checked against the paper's formula
written out in float64, independently of samkit's kernels.
"""

from __future__ import annotations

import pytest
import torch
from optim_registry import all_equal, make_data, make_model, params_of
from torch import nn

import samkit
from samkit.optim.perturbation import L2, Adaptive, Fisher, Masked, NormOnly, RandomSubset


def _first_pass(model, x, y):
    model.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()


def _ascent(opt, model, x, y):
    """e = w(perturbed) - w, and the first-pass gradients (float64)."""
    _first_pass(model, x, y)
    w0 = [p.detach().double().clone() for p in model.parameters()]
    g = [p.grad.double().clone() for p in model.parameters()]
    assert opt.first_step(zero_grad=True)
    e = [p.detach().double() - w for p, w in zip(model.parameters(), w0)]
    model.zero_grad()
    _first_pass(model, x, y)
    opt.second_step(zero_grad=True)
    return e, g


def test_fisher_matches_the_paper_formula():
    model, (x, y) = make_model(1).double(), make_data(1)
    x, y = x.double(), y.double()
    rho, eta = 0.07, 3.0
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=rho, perturbation=Fisher(eta))
    e, g = _ascent(opt, model, x, y)
    f = [1 + eta * gi * gi for gi in g]
    denom = sum(((gi * gi) / fi).sum() for gi, fi in zip(g, f)).sqrt()
    for ei, gi, fi in zip(e, g, f):
        torch.testing.assert_close(ei, rho * (gi / fi) / denom, rtol=1e-10, atol=1e-12)


def test_fisher_with_tiny_eta_is_sam():
    ref, model = make_model(2).double(), make_model(2).double()
    x, y = (t.double() for t in make_data(2))
    e_ref, _ = _ascent(samkit.SAM(torch.optim.SGD(ref.parameters(), lr=0.1), rho=0.05), ref, x, y)
    e, _ = _ascent(
        samkit.SAM(
            torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05, perturbation=Fisher(1e-12)
        ),
        model,
        x,
        y,
    )
    for a, b in zip(e, e_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def _bn_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3), nn.LayerNorm(3)
    ).double()


def test_norm_only_perturbs_exactly_the_norm_parameters():
    model = _bn_model(0)
    x, y = (t.double() for t in make_data(3))
    rho = 0.5
    opt = samkit.SAM(
        torch.optim.SGD(model.parameters(), lr=0.1),
        rho=rho,
        perturbation=NormOnly(model),
        model=model,
    )
    e, g = _ascent(opt, model, x, y)
    norm_ids = {
        id(p)
        for m in model.modules()
        if isinstance(m, (nn.BatchNorm1d, nn.LayerNorm))
        for p in m.parameters()
    }
    is_norm = [id(p) in norm_ids for p in model.parameters()]
    assert sum(is_norm) == 4
    denom = sum((gi * gi).sum() for gi, n in zip(g, is_norm) if n).sqrt()
    for ei, gi, n in zip(e, g, is_norm):
        if n:
            torch.testing.assert_close(ei, rho * gi / denom, rtol=1e-10, atol=1e-12)
        else:
            assert torch.equal(ei, torch.zeros_like(ei))


def test_masked_with_adaptive_inner_is_asam_on_the_subset():
    model = make_model(4).double()
    x, y = (t.double() for t in make_data(4))
    sel = [model[0].weight, model[2].bias]
    opt = samkit.SAM(
        torch.optim.SGD(model.parameters(), lr=0.1), rho=0.5, perturbation=Masked(sel, Adaptive())
    )
    w = [p.detach().clone() for p in model.parameters()]
    e, g = _ascent(opt, model, x, y)
    on = [any(p is s for s in sel) for p in model.parameters()]
    t = [wi.abs() + 0.01 for wi in w]
    denom = sum(((ti * gi) ** 2).sum() for ti, gi, o in zip(t, g, on) if o).sqrt()
    for ei, gi, ti, o in zip(e, g, t, on):
        expect = 0.5 * ti * ti * gi / denom if o else torch.zeros_like(gi)
        torch.testing.assert_close(ei, expect, rtol=1e-10, atol=1e-12)


def test_masked_still_sees_a_nonfinite_gradient_outside_the_mask():
    model = make_model(5)
    x, y = make_data(5)
    opt = samkit.SAM(
        torch.optim.SGD(model.parameters(), lr=0.1),
        rho=0.05,
        perturbation=Masked([model[0].bias]),
        skip_nonfinite=True,
    )
    before = params_of(model)
    _first_pass(model, x, y)
    model[2].weight.grad[0, 0] = float("nan")  # not in the mask
    assert opt.first_step(zero_grad=True) is False
    opt.second_step()
    assert all_equal(params_of(model), before)


def test_random_subset_is_a_rescaled_bernoulli_mask_of_the_sam_ascent():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(20000, dtype=torch.float64))
    rho, beta = 0.05, 0.3
    opt = samkit.SAM(torch.optim.SGD([w], lr=0.1), rho=rho, perturbation=RandomSubset(beta, seed=1))
    w.grad = torch.randn_like(w)
    g = w.grad.clone()
    w0 = w.detach().clone()
    assert opt.first_step()
    e = w.detach() - w0
    sam_e = rho * g / g.norm()
    kept = e != 0
    torch.testing.assert_close(e[kept], sam_e[kept] / beta, rtol=1e-10, atol=0)
    frac = kept.double().mean().item()
    assert abs(frac - beta) < 0.02  # binomial sd ~ 0.003
    w.grad = torch.zeros_like(w)
    opt.second_step()


def test_random_subset_is_unbiased_on_average():
    w = nn.Parameter(torch.zeros(50, dtype=torch.float64))
    g = torch.linspace(-1, 1, 50, dtype=torch.float64)
    opt = samkit.SAM(torch.optim.SGD([w], lr=0.0), rho=1.0, perturbation=RandomSubset(0.5, seed=3))
    total = torch.zeros_like(w)
    n = 400
    for _ in range(n):
        w.grad = g.clone()
        opt.first_step()
        total += w.detach()
        w.grad = torch.zeros_like(w)
        opt.second_step()
    c = g / g.norm()
    sd = c.abs() * (1 / 0.5 - 1) ** 0.5 / n**0.5  # sd of the mean of c * m / beta
    assert bool(((total / n - c).abs() <= 4 * sd + 1e-12).all())


def test_random_subset_beta_one_is_sam_bit_for_bit():
    ref, model = make_model(6), make_model(6)
    x, y = make_data(6)
    e_ref, _ = _ascent(samkit.SAM(torch.optim.SGD(ref.parameters(), lr=0.1), rho=0.05), ref, x, y)
    e, _ = _ascent(
        samkit.SAM(
            torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05, perturbation=RandomSubset(1.0)
        ),
        model,
        x,
        y,
    )
    assert all_equal(e, e_ref)
    assert all_equal(params_of(model), params_of(ref))


PERTS = {
    "fisher": lambda m: Fisher(2.0),
    "masked": lambda m: Masked([m[0].weight, m[2].weight]),
    "random_subset": lambda m: RandomSubset(0.5, seed=11),
    "random_subset_adaptive": lambda m: RandomSubset(0.6, seed=2, inner=Adaptive()),
}


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Fisher(0.0), "Invalid eta value: 0.0"),
        (lambda: Fisher(-1), "Invalid eta value: -1"),
        (lambda: Masked([]), "Invalid params value"),
        (lambda: Masked(3), "Invalid params value: 3"),
        (lambda: Masked([torch.zeros(1)], inner="l2"), "Invalid inner value"),
        (lambda: NormOnly(nn.Linear(2, 2)), "Invalid model value: it has no normalisation layer"),
        (lambda: NormOnly("model"), "Invalid model value"),
        (lambda: RandomSubset(0.0), "Invalid beta value: 0.0"),
        (lambda: RandomSubset(1.5), "Invalid beta value: 1.5"),
        (lambda: RandomSubset(0.5, seed=1.5), "Invalid seed value: 1.5"),
    ],
)
def test_invalid_arguments_raise_value_error_naming_them(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_l2_repr_and_names():
    assert Fisher().name == "fisher" and "eta=1.0" in repr(Fisher())
    assert "beta=0.5" in repr(RandomSubset())
    assert isinstance(NormOnly(nn.BatchNorm1d(3)).inner, L2)
