"""mSAM: micro-batch ascents averaged, by hand; m=1 is SAM; BN; resume."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from optim_registry import all_equal, params_of, roundtrip, state_equal
from torch import nn

import samkit
from samkit.optim.msam import MSAM
from samkit.optim.policy import EveryK


def _problem(seed: int, n: int = 12):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    w = nn.Parameter(torch.randn(3, generator=g, dtype=torch.float64))
    return x, y, w


def _grad(w, x, y):
    return (2 * (x @ w - y)[:, None] * x).mean(0)


@given(seed=st.integers(0, 100), m=st.sampled_from([1, 2, 3, 4]), rho=st.floats(0.01, 1.0))
def test_update_matches_hand_computation(seed, m, rho):
    x, y, w = _problem(seed)
    lr = 0.1
    opt = MSAM(torch.optim.SGD([w], lr=lr), rho=rho, micro_batches=m)
    xs, ys = x.chunk(m), y.chunk(m)
    w0 = w.detach().clone()

    def closure(j):
        loss = ((xs[j] @ w - ys[j]) ** 2).mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    total = torch.zeros(3, dtype=torch.float64)
    for xj, yj in zip(xs, ys):
        gj = _grad(w0, xj, yj)
        total += _grad(w0 + rho * gj / gj.norm(), xj, yj)
    torch.testing.assert_close(w.detach(), w0 - lr * total / m, rtol=1e-6, atol=1e-9)
    expect_loss = torch.stack([((xj @ w0 - yj) ** 2).mean() for xj, yj in zip(xs, ys)]).mean()
    assert float(loss) == pytest.approx(float(expect_loss), rel=1e-12)
    assert (opt.steps, opt.ascents) == (1, m)


def test_one_micro_batch_is_sam_bit_for_bit():
    x, y, w = _problem(1)
    w2 = nn.Parameter(w.detach().clone())
    opt = MSAM(torch.optim.SGD([w], lr=0.1, momentum=0.9), rho=0.05, micro_batches=1)
    sam = samkit.SAM(torch.optim.SGD([w2], lr=0.1, momentum=0.9), rho=0.05)
    for _ in range(3):

        def c1(j):
            loss = ((x @ w - y) ** 2).mean()
            loss.backward()
            return loss

        def c2():
            loss = ((x @ w2 - y) ** 2).mean()
            loss.backward()
            return loss

        opt.step(c1)
        sam.step(c2)
        sam.zero_grad()
    assert torch.equal(w.detach(), w2.detach())


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))


def _data():
    g = torch.Generator().manual_seed(3)
    return torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)


def _closure(model, x, y, m):
    xs, ys = x.chunk(m), y.chunk(m)

    def closure(j):
        loss = torch.nn.functional.cross_entropy(model(xs[j]), ys[j])
        loss.backward()
        return loss

    return closure


def test_batchnorm_statistics_come_from_the_unperturbed_passes():
    model = _mlp()
    x, y = _data()
    opt = MSAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05, micro_batches=4, model=model)
    for _ in range(2):
        opt.step(_closure(model, x, y, 4))
    assert int(model[1].num_batches_tracked) == 2 * 4  # one update per micro-batch first pass


def test_resume_from_state_dict_continues_bit_for_bit():
    total, k = 5, 2
    x, y = _data()

    def build(model):
        return MSAM(
            torch.optim.Adam(model.parameters(), lr=1e-2), rho=0.1, micro_batches=2, model=model
        )

    def run(opt, model, n):
        for _ in range(n):
            opt.step(_closure(model, x, y, 2))
        opt.zero_grad()

    ref = _mlp()
    ref_opt = build(ref)
    run(ref_opt, ref, total)
    model = _mlp()
    opt = build(model)
    run(opt, model, k)
    ckpt = roundtrip({"m": model.state_dict(), "o": opt.state_dict()})
    model2 = _mlp(9)
    model2.load_state_dict(ckpt["m"])
    opt2 = build(model2)
    opt2.load_state_dict(ckpt["o"])
    run(opt2, model2, total - k)
    assert all_equal(params_of(model2), params_of(ref))
    assert state_equal(opt2.state_dict(), ref_opt.state_dict())


def test_exception_in_a_micro_batch_restores_the_weights():
    model = _mlp()
    x, y = _data()
    opt = MSAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.5, micro_batches=2, model=model)
    before = params_of(model)
    inner = _closure(model, x, y, 2)
    calls = [0]

    def closure(j):
        calls[0] += 1
        if calls[0] == 4:  # the second micro-batch's perturbed pass
            raise RuntimeError("boom")
        return inner(j)

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(closure)
    assert all_equal(params_of(model), before)
    opt.zero_grad()
    opt.step(inner)  # usable afterwards


def test_unsupported_combinations_raise_clear_errors():
    w = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="Invalid policy value: mSAM ascends on every micro-batch"):
        MSAM(torch.optim.SGD([w], lr=0.1), policy=EveryK(2))
    with pytest.raises(ValueError, match="Invalid micro_batches value: 0"):
        MSAM(torch.optim.SGD([w], lr=0.1), micro_batches=0)
    opt = MSAM(torch.optim.SGD([w], lr=0.1))
    with pytest.raises(
        ValueError, match="Invalid scaler value: mSAM does not support a GradScaler"
    ):
        opt.step(lambda j: w.sum(), scaler=torch.amp.GradScaler("cpu"))
