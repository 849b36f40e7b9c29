"""Momentum-SAM against the paper's algorithm written out by hand (arXiv 2401.12033).

The family's laws (resume, foreach, restore, AMP, BatchNorm, DDP replicas,
bad arguments) run over MomentumSAM in tests/test_family.py; here is what is
particular to it: the update of Algorithm 1 (SGD) and of its Adam rule, the
step before any momentum exists, the loss it returns, the two-step form,
and the base optimizers and combinations it refuses.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import samkit


def _problem(seed: int):
    """Least squares in float64 with two parameters in two groups."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 3, generator=g, dtype=torch.float64)
    y = torch.randn(16, generator=g, dtype=torch.float64)
    w = nn.Parameter(torch.randn(3, generator=g, dtype=torch.float64))
    b = nn.Parameter(torch.randn(1, generator=g, dtype=torch.float64))
    return x, y, w, b


def _loss(x, y, w, b):
    return ((x @ w + b - y) ** 2).mean()


def _grads(x, y, w, b):
    """The gradient of the mean squared error, by hand."""
    r = x @ w + b - y
    return 2 * (r[:, None] * x).mean(0), 2 * r.mean().reshape(1)


def _closure(x, y, w, b, seen=None):
    def closure():
        if seen is not None:
            seen.append((w.detach().clone(), b.detach().clone()))
        loss = _loss(x, y, w, b)
        loss.backward()
        return loss

    return closure


@given(seed=st.integers(0, 100), rho=st.sampled_from([0.1, 0.5, 3.0]))
def test_sgd_update_is_the_papers_algorithm_1(seed, rho):
    """v <- mu v + g(w - rho_i v / ||v||); w <- w - lr v, with ||v|| over both groups."""
    x, y, w, b = _problem(seed)
    lr, mu, rho_b = 0.05, 0.9, rho / 2
    base = torch.optim.SGD([{"params": [w]}, {"params": [b], "rho": rho_b}], lr=lr, momentum=mu)
    opt = samkit.MomentumSAM(base, rho=rho)
    hw, hb = w.detach().clone(), b.detach().clone()
    vw = vb = None
    for _ in range(4):
        loss = opt.step(_closure(x, y, w, b))
        opt.zero_grad()
        if vw is None:  # step 0: no momentum yet, a plain step at w
            pw, pb = hw, hb
            gw, gb = _grads(x, y, hw, hb)
            vw, vb = gw, gb
        else:
            norm = torch.cat([vw, vb]).norm()
            pw, pb = hw - rho * vw / norm, hb - rho_b * vb / norm
            gw, gb = _grads(x, y, pw, pb)
            vw, vb = mu * vw + gw, mu * vb + gb
        hw, hb = hw - lr * vw, hb - lr * vb
        torch.testing.assert_close(w.detach(), hw, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(b.detach(), hb, rtol=1e-10, atol=1e-12)
        # the loss returned is the loss of the only pass: at w + e (at w on step 0)
        assert float(loss.detach()) == pytest.approx(float(_loss(x, y, pw, pb)), rel=1e-9)
    assert (opt.steps, opt.ascents) == (4, 3)


def test_adam_perturbs_along_the_first_moment():
    """Adam's rule: e = -rho m / ||m|| with m Adam's (uncorrected) first moment."""
    x, y, w, b = _problem(3)
    lr, (beta1, beta2), eps, rho = 0.01, (0.9, 0.999), 1e-8, 0.4
    opt = samkit.MomentumSAM(
        torch.optim.Adam([w, b], lr=lr, betas=(beta1, beta2), eps=eps), rho=rho
    )
    assert opt.buffer == "exp_avg"
    p = torch.cat([w.detach(), b.detach()])
    m = torch.zeros_like(p)
    s = torch.zeros_like(p)
    for t in range(1, 5):
        opt.step(_closure(x, y, w, b))
        opt.zero_grad()
        at = p if t == 1 else p - rho * m / m.norm()
        g = torch.cat(_grads(x, y, at[:3], at[3:]))
        m = beta1 * m + (1 - beta1) * g
        s = beta2 * s + (1 - beta2) * g * g
        step = lr / (1 - beta1**t)
        p = p - step * m / ((s / (1 - beta2**t)).sqrt() + eps)
        torch.testing.assert_close(torch.cat([w.detach(), b.detach()]), p, rtol=1e-10, atol=1e-12)


def test_step_zero_is_the_base_optimizers_step_bit_for_bit():
    """Before the base optimizer's first step there is no momentum: no ascent, one pass at w."""
    x, y, w, b = _problem(5)
    w2, b2 = nn.Parameter(w.detach().clone()), nn.Parameter(b.detach().clone())
    opt = samkit.MomentumSAM(torch.optim.SGD([w, b], lr=0.1, momentum=0.9, nesterov=True), rho=3.0)
    ref = torch.optim.SGD([w2, b2], lr=0.1, momentum=0.9, nesterov=True)
    w0 = w.detach().clone()
    seen = []
    loss = opt.step(_closure(x, y, w, b, seen))
    ref_loss = _closure(x, y, w2, b2)()
    ref.step()
    assert torch.equal(w, w2) and torch.equal(b, b2)
    assert torch.equal(loss, ref_loss)
    assert (opt.steps, opt.ascents, len(seen)) == (1, 0, 1)
    assert torch.equal(seen[0][0], w0)  # the pass ran at w
    # a zero momentum (zero gradient) is no perturbation either
    opt.zero_grad()
    for p in (w, b):
        opt.state[p]["momentum_buffer"].zero_()
    before = (w.detach().clone(), b.detach().clone())
    seen.clear()
    opt.step(_closure(x, y, w, b, seen))
    assert torch.equal(seen[0][0], before[0]) and torch.equal(seen[0][1], before[1])


def test_one_pass_per_step_and_the_two_step_form_gives_the_same_bits():
    x, y, w, b = _problem(7)
    twin = [nn.Parameter(t.detach().clone()) for t in (w, b)]
    opt = samkit.MomentumSAM(torch.optim.SGD([w, b], lr=0.05, momentum=0.9), rho=1.0)
    opt2 = samkit.MomentumSAM(torch.optim.SGD(twin, lr=0.05, momentum=0.9), rho=1.0)
    calls = []
    for _ in range(4):
        opt.step(_closure(x, y, w, b, calls))
        opt.zero_grad()
        ascended = opt2.first_step()  # before the forward: w + e from the momentum
        assert opt2.perturbed == ascended
        _loss(x, y, *twin).backward()
        opt2.second_step(zero_grad=True)
    assert len(calls) == 4  # one closure call per step
    assert torch.equal(w, twin[0]) and torch.equal(b, twin[1])
    assert opt2.ascents == opt.ascents == 3


def test_first_step_clears_gradients_left_over_before_the_only_pass():
    x, y, w, b = _problem(8)
    twin = [nn.Parameter(t.detach().clone()) for t in (w, b)]
    opt = samkit.MomentumSAM(torch.optim.SGD([w, b], lr=0.05, momentum=0.9), rho=1.0)
    ref = samkit.MomentumSAM(torch.optim.SGD(twin, lr=0.05, momentum=0.9), rho=1.0)
    for _ in range(3):
        _loss(x, y, w, b).backward()  # the usual SAM habit: a pass at w first
        opt.first_step(zero_grad=True)
        _loss(x, y, w, b).backward()
        opt.second_step(zero_grad=True)
        ref.step(_closure(x, y, *twin))
        ref.zero_grad()
    assert torch.equal(w, twin[0]) and torch.equal(b, twin[1])


def test_policies_on_the_step_count_combine():
    """Late(2) and EveryK(2): the steps they decline are plain base steps, at w."""
    for policy, expected in ((samkit.Late(2), [False, False, True, True]),
                             (samkit.EveryK(2, scale_rho=False), [False, False, True, False])):  # fmt: skip
        x, y, w, b = _problem(9)
        opt = samkit.MomentumSAM(
            torch.optim.SGD([w, b], lr=0.05, momentum=0.9), rho=3.0, policy=policy
        )
        ascended = []
        for _ in range(4):
            before = opt.ascents
            opt.step(_closure(x, y, w, b))
            opt.zero_grad()
            ascended.append(opt.ascents > before)
        assert ascended == expected, policy  # EveryK's step 0 has no momentum yet


def test_base_optimizers_without_a_momentum_are_refused():
    w = nn.Parameter(torch.zeros(3))
    with pytest.raises(
        ValueError, match=r"Invalid base_optimizer value: SGD param group 0 has momentum=0"
    ):
        samkit.MomentumSAM(torch.optim.SGD([w], lr=0.1), rho=3.0)
    with pytest.raises(
        ValueError, match="Invalid base_optimizer value: .*not of Adagrad; pass buffer="
    ):
        samkit.MomentumSAM(torch.optim.Adagrad([w], lr=0.1), rho=3.0)
    # a group with rho 0 is not perturbed and needs no momentum
    v = nn.Parameter(torch.zeros(2))
    opt = samkit.MomentumSAM(
        torch.optim.SGD([{"params": [w], "momentum": 0.9}, {"params": [v], "rho": 0.0}], lr=0.1),
        rho=3.0,
    )
    assert opt.buffer == "momentum_buffer"
    # any state entry, named explicitly
    opt = samkit.MomentumSAM(torch.optim.Adagrad([w], lr=0.1), rho=3.0, buffer="sum")
    assert repr(opt.perturbation) == "Momentum(buffer='sum')"


def test_combinations_without_a_first_pass_are_refused():
    w = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="Invalid mix value"):
        samkit.SAM(torch.optim.SGD([w], lr=0.1, momentum=0.9), perturbation=samkit.Momentum(),
                   mix=samkit.SurrogateGap(0.1))  # fmt: skip
    with pytest.raises(ValueError, match="Invalid policy value: .* decides from the first-pass"):
        samkit.MomentumSAM(torch.optim.SGD([w], lr=0.1, momentum=0.9), rho=3.0,
                           policy=samkit.GradNormTrigger(10))  # fmt: skip
    with pytest.raises(ValueError, match="Invalid perturbation value"):
        samkit.MomentumSAM(
            torch.optim.SGD([w], lr=0.1, momentum=0.9), rho=3.0, perturbation=samkit.L2()
        )


@given(seed=st.integers(0, 1000), rho=st.floats(0.01, 5.0))
def test_the_perturbation_has_norm_rho_against_the_momentum(seed, rho):
    """Law: after first_step, w + e - w = -rho v / ||v|| exactly in direction, rho in norm."""
    x, y, w, b = _problem(seed)
    opt = samkit.MomentumSAM(torch.optim.SGD([w, b], lr=0.05, momentum=0.9), rho=rho)
    opt.step(_closure(x, y, w, b))
    opt.zero_grad()
    before = torch.cat([w.detach(), b.detach()])
    v = torch.cat([opt.state[w]["momentum_buffer"], opt.state[b]["momentum_buffer"]])
    assert opt.first_step()
    e = torch.cat([w.detach(), b.detach()]) - before
    opt.abort_step()
    assert torch.equal(torch.cat([w.detach(), b.detach()]), before)
    assert float(e.norm()) == pytest.approx(rho, rel=1e-9)
    torch.testing.assert_close(e, -rho * v / v.norm(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    ("base", "buffer"),
    [
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), "nope"),
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), "exp_avg"),
        (lambda ps: torch.optim.Adam(ps, lr=0.1), "momentum_buffer"),
        (lambda ps: torch.optim.Adam(ps, lr=0.1), "exp_avg_sq"),
    ],
)
def test_a_buffer_the_base_optimizer_does_not_keep_is_refused(base, buffer):
    """buffer="nope" was accepted and never perturbed: bit for bit SGD."""
    w = nn.Parameter(torch.ones(3))
    with pytest.raises(
        ValueError, match=rf"Invalid buffer value: '{buffer}' \(\w+ keeps its momentum"
    ):
        samkit.MomentumSAM(base([w]), rho=0.5, buffer=buffer)
    assert samkit.MomentumSAM(torch.optim.Adam([w]), rho=0.5, buffer="exp_avg").buffer == "exp_avg"


def test_a_buffer_missing_from_another_optimizers_state_is_refused_once_it_has_stepped():
    """For an optimizer samkit does not know, the key is checked against its state."""
    x, y, w, b = _problem(0)

    def closure():
        loss = _loss(x, y, w, b)
        loss.backward()
        return loss

    opt = samkit.MomentumSAM(torch.optim.Adagrad([w, b], lr=0.1), rho=0.5, buffer="nope")
    opt.step(closure)  # step 0: no state yet, a plain step
    opt.zero_grad()
    before = (w.detach().clone(), b.detach().clone())
    with pytest.raises(ValueError, match=r"Invalid buffer value: 'nope' is not in .*'sum'"):
        opt.step(closure)
    assert torch.equal(w, before[0]) and torch.equal(b, before[1]) and opt.steps == 1
    opt = samkit.MomentumSAM(torch.optim.Adagrad([w, b], lr=0.1), rho=0.5, buffer="sum")
    for _ in range(2):  # a key it keeps: followed
        opt.zero_grad()
        opt.step(closure)
    assert opt.ascents == 2  # (Adagrad keeps a zero "sum" from the start: e = 0 at step 0)


def test_sam_refuses_a_momentum_sams_state_dict_that_would_set_its_radius():
    """SAM(rho=0.05) became rho=3.0 after loading a MomentumSAM's state dict."""
    x, y, w, b = _problem(1)

    def closure():
        loss = _loss(x, y, w, b)
        loss.backward()
        return loss

    msam = samkit.MomentumSAM(torch.optim.SGD([w, b], lr=0.01, momentum=0.9), rho=3.0)
    msam.step(closure)
    sam = samkit.SAM(torch.optim.SGD([w, b], lr=0.01, momentum=0.9), rho=0.05)
    with pytest.raises(ValueError, match=r"written by MomentumSAM \(perturbation=Momentum\)"):
        sam.load_state_dict(msam.state_dict())
    assert sam.param_groups[0]["rho"] == 0.05 and sam.state == {}
    sam.load_state_dict(msam.state_dict(), base_only=True)
    assert sam.param_groups[0]["rho"] == 0.05
    assert torch.equal(sam.state[w]["momentum_buffer"], msam.state[w]["momentum_buffer"])


def test_rho_is_required_and_the_error_says_how_to_pick_it():
    """The paper's rho = 3.0 was the default and put small models at chance (issue 20)."""
    w = nn.Parameter(torch.zeros(3))
    with pytest.raises(
        ValueError, match=r"Invalid rho value: None; Momentum-SAM needs its radius"
    ) as err:
        samkit.MomentumSAM(torch.optim.SGD([w], lr=0.1, momentum=0.9))
    msg = str(err.value)
    for data_point in ("rho=3.0 for ResNet-50", "0.25-0.5", "samkit tune"):
        assert data_point in msg
    # the davda54 form too
    with pytest.raises(ValueError, match="Invalid rho value: None"):
        samkit.MomentumSAM([w], torch.optim.SGD, lr=0.1, momentum=0.9)
    assert samkit.MomentumSAM(torch.optim.SGD([w], lr=0.1, momentum=0.9), rho=0.5).rho_key == "rho"


def test_the_momentum_perturbation_with_sgds_key_on_adam_is_refused_naming_adams_key():
    """SAM(adam, perturbation=Momentum()) looked for "momentum_buffer" and never perturbed."""
    x, y, w, b = _problem(2)

    def closure():
        loss = _loss(x, y, w, b)
        loss.backward()
        return loss

    opt = samkit.SAM(torch.optim.Adam([w, b], lr=0.01), rho=0.1, perturbation=samkit.Momentum())
    opt.step(closure)  # step 0: no state yet, a plain step
    opt.zero_grad()
    with pytest.raises(ValueError, match=r"Momentum\('exp_avg'\) for the Adam family"):
        opt.step(closure)
    opt = samkit.SAM(
        torch.optim.Adam([w, b], lr=0.01), rho=0.1, perturbation=samkit.Momentum("exp_avg")
    )
    for _ in range(2):
        opt.step(closure)
        opt.zero_grad()
    assert opt.ascents == 1
