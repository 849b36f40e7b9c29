"""ESAM: the selected fraction and the update by hand, SWP inside ESAM, AMP, resume."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import samkit
from samkit.optim.esam import ESAM


def _problem(seed: int, n: int = 10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    w = nn.Parameter(torch.randn(3, generator=g, dtype=torch.float64))
    return x, y, w


def _per_sample(w, x, y):
    return (x @ w - y) ** 2


@given(seed=st.integers(0, 200), gamma=st.sampled_from([0.1, 0.3, 0.5, 0.75, 1.0]))
def test_selection_and_update_match_hand_computation(seed, gamma):
    x, y, w = _problem(seed)
    rho, lr = 0.3, 0.1
    opt = ESAM(torch.optim.SGD([w], lr=lr), rho=rho, beta=1.0, gamma=gamma)
    w0 = w.detach().clone()
    calls = []

    def closure(index=None):
        calls.append((index is None, torch.is_grad_enabled()))
        xb, yb = (x, y) if index is None else (x[index], y[index])
        return _per_sample(w, xb, yb)

    loss = opt.step(closure)
    # by hand
    before = _per_sample(w0, x, y)
    g = (2 * (x @ w0 - y)[:, None] * x).mean(0)
    e = rho * g / g.norm()
    after = _per_sample(w0 + e, x, y)
    m = max(1, math.ceil(gamma * len(y)))
    chosen = torch.argsort(after - before, descending=True)[:m]
    gsel = (2 * (x[chosen] @ (w0 + e) - y[chosen])[:, None] * x[chosen]).mean(0)
    torch.testing.assert_close(w.detach(), w0 - lr * gsel, rtol=1e-6, atol=1e-9)
    assert loss == pytest.approx(float(before.mean()), rel=1e-12)
    if gamma < 1.0:
        assert sorted(opt.last_selected.tolist()) == sorted(chosen.tolist())
        # a first pass with gradients, the selection pass without, the second pass on the subset
        assert calls == [(True, True), (True, False), (False, True)]
    else:
        assert opt.last_selected is None and calls == [
            (True, True),
            (True, True),
        ]  # SAM: no selection


def test_gamma_and_beta_one_is_sam_bit_for_bit():
    x, y, w = _problem(1)
    w2 = nn.Parameter(w.detach().clone())
    opt = ESAM(torch.optim.SGD([w], lr=0.1, momentum=0.9), rho=0.05, beta=1.0, gamma=1.0)
    sam = samkit.SAM(torch.optim.SGD([w2], lr=0.1, momentum=0.9), rho=0.05)
    for _ in range(4):
        opt.step(lambda index=None: _per_sample(w, x, y))
        opt.zero_grad()

        def closure():
            loss = _per_sample(w2, x, y).mean()
            loss.backward()
            return loss

        sam.step(closure)
        sam.zero_grad()
    assert torch.equal(w.detach(), w2.detach())


def _mlp_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 5, generator=g), torch.randint(0, 3, (32,), generator=g)
    return model, x, y


def _closure(model, x, y):
    def closure(index=None):
        xb, yb = (x, y) if index is None else (x[index], y[index])
        return torch.nn.functional.cross_entropy(model(xb), yb, reduction="none")

    return closure


def test_closure_must_return_per_sample_losses():
    x, y, w = _problem(2)
    opt = ESAM(torch.optim.SGD([w], lr=0.1), gamma=0.5)
    with pytest.raises(ValueError, match=r"per-sample losses of shape \[n\].*got shape \(\)"):
        opt.step(lambda index=None: _per_sample(w, x, y).mean())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"gamma": 0.0}, "Invalid gamma value: 0.0"),
        ({"gamma": 1.2}, "Invalid gamma value: 1.2"),
        ({"beta": 0.0}, "Invalid beta value: 0.0"),
        ({"seed": "x"}, "Invalid seed value: 'x'"),
        ({"adaptive": True}, "Invalid adaptive value"),
    ],
)
def test_invalid_arguments_raise_value_error_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ESAM(torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1), **{"gamma": 0.5, **kwargs})
