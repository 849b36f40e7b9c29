"""vSAM against its algorithm written out by hand (arXiv 2403.08821; the authors' script).

The family's laws run over VSAM in tests/test_family.py; here: the reuse of
``psf = g_s - g`` with weights beta^j (ReusePSF), the sampling schedule's
warm-up, quota and rescaling rule (PSFVariation), and their assembly.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import samkit
from samkit.optim.view import StepView
from samkit.optim.vsam import _mean_relative_change


def _problem(seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 3, generator=g, dtype=torch.float64)
    y = torch.randn(12, generator=g, dtype=torch.float64)
    w = nn.Parameter(torch.randn(3, generator=g, dtype=torch.float64))
    return x, y, w


def _grad(w, x, y):
    return (2 * (x @ w - y)[:, None] * x).mean(0)


def _closure(w, x, y):
    def closure():
        loss = ((x @ w - y) ** 2).mean()
        loss.backward()
        return loss

    return closure


def test_reuse_adds_beta_to_the_j_times_the_last_psf_then_stops():
    """SAM every 4th step (EveryK), ReusePSF(beta=0.5, max_reuse=2): by hand."""
    x, y, w = _problem(0)
    lr, rho, beta = 0.1, 0.2, 0.5
    mix = samkit.ReusePSF(beta=beta, max_reuse=2)
    seen = []
    mix.observer = lambda psf_norm, grad_norm: seen.append((psf_norm, grad_norm))
    opt = samkit.SAM(
        torch.optim.SGD([w], lr=lr), rho=rho, policy=samkit.EveryK(4, scale_rho=False), mix=mix
    )
    h = w.detach().clone()
    psf = None
    for t in range(8):
        opt.step(_closure(w, x, y))
        opt.zero_grad()
        g = _grad(h, x, y)
        if t % 4 == 0:
            g_s = _grad(h + rho * g / (g.norm() + 1e-12), x, y)  # SAM's ascent_eps
            psf, j = g_s - g, 0
            update = g_s
            assert seen[-1] == pytest.approx((float(psf.norm()), float(g.norm())), rel=1e-12)
        else:
            j += 1
            update = g + beta**j * psf if j <= 2 else g
        h = h - lr * update
        torch.testing.assert_close(w.detach(), h, rtol=1e-12, atol=1e-12)
    assert (mix.reused, len(seen)) == (4, 2)


def _view(steps: int) -> StepView:
    return StepView(steps=steps, ascents=0, gradients=[], state={}, foreach=True, eps=1e-12,
                    local=False, process_group=None)  # fmt: skip


def test_schedule_warms_up_then_takes_its_quota_in_every_window():
    policy = samkit.PSFVariation(5, window=10, blocks=2, alpha=(0.0, 0.0), seed=3)
    decisions = [policy.should_ascend(_view(t)) for t in range(45)]
    assert decisions[:5] == [True] * 5
    for start in range(5, 45, 10):  # n stays 1 with alpha = 0: one SAM step per window
        assert sum(decisions[start : start + 10]) == 1


def test_schedule_rescales_the_quota_by_the_relative_changes():
    """n <- clip(n (1 + a1 mean rel. change of ||psf||/||g|| + a2 that of s), 1, p_max K)."""
    policy = samkit.PSFVariation(0, window=4, blocks=2, alpha=(0.5, 0.25), max_fraction=1.0)
    norms, grads = [1.0, 2.0, 2.0, 4.0], [1.0, 1.0, 2.0, 2.0]
    for t in range(4):  # the first window: quota 1, and what the mix reports
        policy.should_ascend(_view(t))
        policy.observe(norms[t], grads[t])
    ratios = [1.0, 2.0, 1.0, 2.0]  # ||psf|| / ||g||
    dr = ((2 - 1) / 1 + (1 - 2) / 2 + (2 - 1) / 1) / 3
    # s after each observation: mean variance within 2 blocks of the sorted norms so far
    spreads = [0.0, 0.0, 0.0, (torch.tensor([1.0, 2.0]).var() + torch.tensor([2.0, 4.0]).var()) / 2]
    assert policy.spreads == pytest.approx([float(s) for s in spreads])
    ds = 0.0  # only zeros before the last value: no defined relative change
    policy.should_ascend(_view(4))  # a new window
    assert policy.ratios == ratios
    assert policy.sam_per_window == pytest.approx(
        min(4.0, max(1.0, 1 * (1 + 0.5 * dr + 0.25 * ds)))
    )
    assert _mean_relative_change([1.0, 3.0]) == 1.0  # +200 %, clipped
    assert _mean_relative_change([4.0, 1.0, 0.5]) == pytest.approx(-0.625)


def test_vsam_assembles_the_schedule_and_the_reuse():
    x, y, w = _problem(2)
    opt = samkit.VSAM(
        torch.optim.SGD([w], lr=0.05, momentum=0.9), warmup_steps=3, window=5, blocks=1
    )
    for _ in range(23):
        opt.step(_closure(w, x, y))
        opt.zero_grad()
    # 3 warm-up steps, then int(n) >= 1 per window of 5: 4 windows
    assert opt.ascents >= 3 + 4 and opt.reused > 0
    assert opt.ascents + opt.reused <= 23
    assert len(opt.policy.norms) == min(5, opt.ascents)
    with pytest.raises(ValueError, match="Invalid mix value: vSAM chooses its own"):
        samkit.VSAM(torch.optim.SGD([w], lr=0.1), warmup_steps=1, mix=samkit.ReusePSF())
    with pytest.raises(ValueError, match=r"Invalid blocks value: 6 \(must be <= window = 5\)"):
        samkit.PSFVariation(0, window=5, blocks=6)


def test_stored_psf_follows_a_dtype_change():
    """model.double() between steps: the kept psf is re-made in float64 (it was kept in
    float32, rounding g_s - g); the run matches one that was float64 from the start."""
    import copy

    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    x, y = torch.randn(8, 3), torch.randn(8, 1)

    def build(model):
        base = torch.optim.SGD(model.parameters(), lr=0.1)
        return samkit.VSAM(base, warmup_steps=2, window=2, blocks=1, rho=0.05)

    def step(model, opt):
        dtype = model[0].weight.dtype

        def closure():
            loss = nn.functional.mse_loss(model(x.to(dtype)), y.to(dtype))
            loss.backward()
            return loss

        opt.zero_grad()
        opt.step(closure)

    opt_a = build(a)
    step(a, opt_a)  # a float32 SAM step: psf is allocated in float32
    b = copy.deepcopy(a).double()
    a.double()
    opt_b = build(b)
    opt_b.load_state_dict(opt_a.state_dict())
    ascents, reused = opt_a.ascents, opt_a.reused
    for _ in range(8):
        step(a, opt_a)
        step(b, opt_b)
    assert opt_a.ascents > ascents and opt_a.reused > reused  # both kinds of step ran
    psf = list(opt_a.mix.psf.values())
    assert psf and all(t.dtype is torch.float64 for t in psf)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
