"""K-SAM against its algorithm written out by hand (arXiv 2210.12864).

The family's laws run over KSAM in tests/test_family.py (per-sample closure,
as ESAM's); here: the selection, both gradients on the top k, the closure's
call pattern, rho = 0, fraction = 1 and a malformed closure.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import samkit


def _problem(seed: int, n: int = 10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    w = nn.Parameter(torch.randn(3, generator=g, dtype=torch.float64))
    return x, y, w


def _per_sample(w, x, y):
    return (x @ w - y) ** 2


def _grad(w, x, y):
    return (2 * (x @ w - y)[:, None] * x).mean(0)


@given(seed=st.integers(0, 200), fraction=st.sampled_from([0.1, 1 / 3, 0.5, 0.9]))
def test_both_gradients_on_the_top_k_match_hand_computation(seed, fraction):
    x, y, w = _problem(seed)
    rho, lr = 0.3, 0.1
    opt = samkit.KSAM(torch.optim.SGD([w], lr=lr), rho=rho, fraction=fraction)
    w0 = w.detach().clone()
    calls = []

    def closure(index=None):
        calls.append((index is None, torch.is_grad_enabled()))
        xb, yb = (x, y) if index is None else (x[index], y[index])
        return _per_sample(w, xb, yb)

    loss = opt.step(closure)
    # by hand
    before = _per_sample(w0, x, y)
    k = max(1, math.ceil(fraction * len(y)))
    top = torch.argsort(before, descending=True)[:k]
    g = _grad(w0, x[top], y[top])
    e = rho * g / g.norm()
    torch.testing.assert_close(
        w.detach(), w0 - lr * _grad(w0 + e, x[top], y[top]), rtol=1e-10, atol=1e-12
    )
    assert sorted(opt.last_selected.tolist()) == sorted(top.tolist())
    assert float(loss) == pytest.approx(float(before.mean()), rel=1e-12)
    # the selection without gradients, then the top k at w and at w + e
    assert calls == [(True, False), (False, True), (False, True)]


def test_rho_zero_is_the_base_step_on_the_top_k_bit_for_bit():
    x, y, w = _problem(4)
    w2 = nn.Parameter(w.detach().clone())
    opt = samkit.KSAM(torch.optim.SGD([w], lr=0.1, momentum=0.9), rho=0.0, fraction=0.4)
    ref = torch.optim.SGD([w2], lr=0.1, momentum=0.9)
    for _ in range(3):
        opt.step(lambda index=None: _per_sample(w, x if index is None else x[index],
                                                y if index is None else y[index]))  # fmt: skip
        opt.zero_grad()
        top = opt.last_selected
        _per_sample(w2, x[top], y[top]).mean().backward()
        ref.step()
        ref.zero_grad()
    assert torch.equal(w, w2)
    assert (opt.steps, opt.ascents) == (3, 0)


def test_fraction_one_is_sam_on_the_whole_batch():
    x, y, w = _problem(5)
    w2 = nn.Parameter(w.detach().clone())
    opt = samkit.KSAM(torch.optim.SGD([w], lr=0.1, momentum=0.9), rho=0.2, fraction=1.0)
    sam = samkit.SAM(torch.optim.SGD([w2], lr=0.1, momentum=0.9), rho=0.2)

    def closure():
        loss = _per_sample(w2, x, y).mean()
        loss.backward()
        return loss

    for _ in range(4):
        opt.step(lambda index=None: _per_sample(w, x if index is None else x[index],
                                                y if index is None else y[index]))  # fmt: skip
        opt.zero_grad()
        sam.step(closure)
        sam.zero_grad()
    # the top-n is a permutation of the batch: the same mean up to rounding
    torch.testing.assert_close(w.detach(), w2.detach(), rtol=1e-12, atol=1e-12)


def test_a_closure_that_returns_a_mean_is_refused_before_any_change():
    x, y, w = _problem(6)
    opt = samkit.KSAM(torch.optim.SGD([w], lr=0.1), fraction=1 / 3)
    w0 = w.detach().clone()
    with pytest.raises(
        ValueError, match=r"Invalid closure value: K-SAM's closure must return per-sample"
    ):
        opt.step(lambda index=None: _per_sample(w, x, y).mean())
    assert torch.equal(w.detach(), w0) and opt.steps == 0 and not opt.perturbed
