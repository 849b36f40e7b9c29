"""SAF and MESA: the trajectory loss by hand, the delayed memory, the EMA
teacher, and resuming their compare methods."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from optim_registry import all_equal, params_of, roundtrip, state_equal
from torch import nn

from samkit.losses import MESA, SAF, trajectory_kl


@given(seed=st.integers(0, 100), tau=st.floats(0.5, 10.0))
# float32 rounding of 1.1e-7 here: over the old abs=1e-7 (AVX2 and scalar kernels alike)
@example(seed=23, tau=7.857142857142857)
def test_trajectory_kl_matches_hand_computation(seed, tau):
    g = torch.Generator().manual_seed(seed)
    z, t = (
        torch.randn(6, 4, generator=g, dtype=torch.float64),
        torch.randn(6, 4, generator=g, dtype=torch.float64),
    )
    q = torch.softmax(t / tau, -1)
    p = torch.softmax(z / tau, -1)
    expect = (q * (q.log() - p.log())).sum(-1).mean()
    # trajectory_kl works in float32: each log-softmax entry (|log q| ~ 1.4 here)
    # carries ~1e-7 of rounding, which depends on the CPU's exp/log kernels (the
    # example above reached 1.1e-7). abs=1e-5 is 100x that scale and under 0.4% of
    # the smallest KL on this domain (2.7e-3): KL(p||q) for KL(q||p) still fails on 97%
    # of the examples, a sum for the mean on all.
    tol = {"rel": 1e-5, "abs": 1e-5}
    assert float(trajectory_kl(z, t, tau)) == pytest.approx(float(expect), **tol)
    mask = torch.tensor([True, False, True, False, False, True])
    expect_masked = ((q * (q.log() - p.log())).sum(-1) * mask).sum() / 6
    assert float(trajectory_kl(z, t, tau, mask)) == pytest.approx(float(expect_masked), **tol)
    assert float(trajectory_kl(z, z, tau)) == pytest.approx(0.0, abs=1e-6)


def test_saf_targets_are_the_logits_from_delay_epochs_ago():
    saf = SAF(num_samples=6, num_classes=3, lam=0.5, tau=2.0, delay=2)
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(6, 3, generator=g) for _ in range(4)]
    first, second = torch.arange(0, 3), torch.arange(3, 6)
    out = []
    for epoch in range(4):
        parts = []
        for idx in (first, second):
            parts.append(saf(logits[epoch][idx], idx, epoch))
        out.append(parts)
    for epoch in (0, 1):  # nothing that old yet
        assert all(float(v) == 0.0 for v in out[epoch])
    for epoch in (2, 3):
        for idx, v in zip((first, second), out[epoch]):
            expect = 0.5 * trajectory_kl(logits[epoch][idx], logits[epoch - 2][idx], 2.0)
            assert float(v) == pytest.approx(float(expect), rel=1e-6)
            assert float(v) > 0


def test_saf_gradient_flows_to_the_current_logits_only():
    saf = SAF(4, 3, delay=1)
    idx = torch.arange(4)
    saf(torch.randn(4, 3), idx, 0)
    z = torch.randn(4, 3, requires_grad=True)
    saf(z, idx, 1).backward()
    assert z.grad is not None and float(z.grad.abs().sum()) > 0


def test_saf_state_dict_round_trip_reproduces_the_loss():
    saf = SAF(5, 2, delay=1)
    idx = torch.arange(5)
    saf(torch.randn(5, 2), idx, 0)
    other = SAF(5, 2, delay=1)
    other.load_state_dict(roundtrip(saf.state_dict()))
    z = torch.randn(5, 2)
    assert torch.equal(saf(z, idx, 1), other(z, idx, 1))
    with pytest.raises(ValueError, match="Invalid state value: memory shape"):
        SAF(4, 2, delay=1).load_state_dict(saf.state_dict())


def test_mesa_teacher_is_an_exponential_moving_average():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    mesa = MESA(model, decay=0.75, start_step=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.randn(8, 3)
    assert float(mesa(model(x), x).detach()) == 0.0  # before start_step
    ema = None
    for _ in range(3):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        mesa.update()
        cur = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if ema is None:  # step 0 < start_step: the teacher copies the model
            ema = cur
        else:
            ema = {
                k: (0.75 * ema[k] + 0.25 * cur[k]) if cur[k].is_floating_point() else cur[k]
                for k in cur
            }
        for k, v in mesa.teacher.state_dict().items():
            torch.testing.assert_close(v, ema[k], rtol=1e-6, atol=1e-7)
    out = model(x)
    mesa.teacher.eval()
    expect = 0.8 * trajectory_kl(out, mesa.teacher(x), 5.0)
    assert float(mesa(out, x).detach()) == pytest.approx(float(expect.detach()), rel=1e-6)
    assert not any(p.requires_grad for p in mesa.teacher.parameters())


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: SAF(0, 3), "Invalid num_samples value: 0"),
        (lambda: SAF(3, 3, tau=0.0), "Invalid tau value: 0.0"),
        (lambda: SAF(3, 3, lam=-1.0), "Invalid lam value: -1.0"),
        (lambda: SAF(3, 3, delay=0), "Invalid delay value: 0"),
        (lambda: MESA("net"), "Invalid model value"),
        (lambda: MESA(nn.Linear(2, 2), decay=1.0), "Invalid decay value: 1.0"),
        (lambda: MESA(nn.Linear(2, 2), start_step=-1), "Invalid start_step value: -1"),
    ],
)
def test_invalid_arguments_raise_value_error_naming_them(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_saf_checks_its_inputs():
    saf = SAF(4, 3)
    with pytest.raises(ValueError, match=r"Invalid logits value: expected shape \[n, 3\]"):
        saf(torch.randn(4, 2), torch.arange(4), 0)
    with pytest.raises(ValueError, match="Invalid epoch value: -1"):
        saf(torch.randn(4, 3), torch.arange(4), -1)


# ---------------------------------------------------- the compare methods
@pytest.mark.parametrize("name", ["saf", "mesa"])
def test_method_resume_continues_bit_for_bit(name):
    """Stop after epoch 2 of 4 (SAF with delay 1 uses its memory from epoch 1 on)."""
    from samkit.experiments.methods import TrainSpec, build_method

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 6, generator=g), torch.randint(0, 3, (24,), generator=g)
    spec = TrainSpec(total_steps=12, steps_per_epoch=3, epochs=4)
    opts = {"saf": {"delay": 1}, "mesa": {"start_epoch": 1.0}}[name]

    def loss_fn(out, t):
        return torch.nn.functional.cross_entropy(out, t, reduction="none")

    def model_():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))

    def run(method, model, epochs):
        for epoch in epochs:
            for b in range(3):
                idx = torch.arange(8) + 8 * ((b + epoch) % 3)
                method.step(model, x[idx], y[idx], idx, loss_fn)
            method.on_epoch_end(epoch, model)

    ref = model_()
    ref_m = build_method(name, ref, spec, **opts)
    run(ref_m, ref, range(4))
    model = model_()
    m = build_method(name, model, spec, **opts)
    run(m, model, range(2))
    ckpt = roundtrip({"model": model.state_dict(), "method": m.state_dict()})
    model2 = model_()
    with torch.no_grad():
        for p in model2.parameters():
            p.add_(1.0)
    model2.load_state_dict(ckpt["model"])
    m2 = build_method(name, model2, spec, **opts)
    m2.load_state_dict(ckpt["method"])
    run(m2, model2, range(2, 4))
    assert all_equal(params_of(model2), params_of(ref))
    assert state_equal(m2.state_dict(), ref_m.state_dict())
    assert m2.passes == ref_m.passes
