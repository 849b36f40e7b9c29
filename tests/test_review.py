"""Regression tests from the review of SAM's core (sam.py, functional.py, schedule.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import samkit
from samkit.optim.policy import Policy


class _Boom(Policy):
    def should_ascend(self, sam):
        raise RuntimeError("boom")


def test_exception_inside_first_step_releases_bn_and_allows_a_new_step():
    # explicit two-step form: an error raised inside first_step (here by a
    # policy) must not leave BatchNorm frozen nor the step half-open
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    policy = _Boom()
    opt = samkit.SAM(
        torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05, model=model, policy=policy
    )
    x = torch.randn(8, 3)
    w0 = [p.detach().clone() for p in model.parameters()]
    model(x).square().mean().backward()
    with pytest.raises(RuntimeError, match="boom"):
        opt.first_step()
    assert model[1].track_running_stats is True
    assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))
    # the next step works and counts normally
    opt.policy = None
    opt.zero_grad()
    model(x).square().mean().backward()
    assert opt.first_step() is True
    model(x).square().mean().backward()
    opt.second_step()
    assert opt.steps == 1 and opt.ascents == 1


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("adaptive", [False, True])
def test_complex_params_equal_their_real_view(foreach, adaptive):
    # torch's optimizers train complex params as pairs of reals; SAM's L2
    # ascent must equal SAM on the (re, im) view: e = rho g / ||g||, with
    # ||g||^2 = sum |g_i|^2.  ASAM's T_w = |w| + eta uses the complex modulus.
    torch.manual_seed(1)
    z0 = torch.randn(5, dtype=torch.complex64)
    t = torch.randn(5, dtype=torch.complex64)
    zc = nn.Parameter(z0.clone())
    opt = samkit.SAM(torch.optim.SGD([zc], lr=0.1), rho=0.3, adaptive=adaptive, foreach=foreach)
    seen = []

    def closure():
        seen.append(zc.detach().clone())
        loss = (zc - t).abs().square().sum() + (zc.abs() ** 4).sum()
        loss.backward()
        return loss

    opt.step(closure)
    # hand-computed ascent from the first-pass gradient
    z = z0.clone().requires_grad_(True)
    ((z - t).abs().square().sum() + (z.abs() ** 4).sum()).backward()
    g = z.grad
    if adaptive:
        T = z0.abs() + 0.01
        e = 0.3 * T * T * g / torch.linalg.vector_norm(T * g)
    else:
        e = 0.3 * g / torch.linalg.vector_norm(g)
    torch.testing.assert_close(seen[1], z0 + e, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(torch.view_as_real(zc.detach())).all()


def test_complex_sq_norm_foreach_equals_reference():
    xs = [torch.randn(4, dtype=torch.complex64), torch.randn(3, 2, dtype=torch.complex128)]
    a = samkit.functional.sq_norm(xs, foreach=True)
    b = samkit.functional.sq_norm(xs, foreach=False)
    assert torch.equal(a, b)
    expected = sum(float(x.abs().square().sum()) for x in xs)
    assert float(a) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", ["rho", "eta", "ascent_weight_decay"])
def test_infinite_hyper_parameters_raise_value_error(name):
    p = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=name):
        samkit.SAM(torch.optim.SGD([p], lr=0.1), **{name: float("inf")})
    with pytest.raises(ValueError, match=name):
        samkit.SAM(torch.optim.SGD([{"params": [p], name: float("inf")}], lr=0.1))


def test_proportional_rho_applies_at_construction_like_an_lr_scheduler():
    # with a warm-up, the first steps run at a small lr: rho must be small too,
    # not rho_max until the first rho_sched.step()
    p = nn.Parameter(torch.zeros(2))
    opt = samkit.SAM(torch.optim.SGD([p], lr=0.2), rho=0.1)
    torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.25, total_iters=4)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    rho_sched = samkit.ProportionalRho(opt)
    assert opt.param_groups[0]["rho"] == pytest.approx(0.025)
    assert rho_sched.rho_max == [0.1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_params_on_cuda_and_cpu_in_one_optimizer():
    # the ascent scale lives on the first group's device; a CPU group must
    # still be perturbed (cuda 0-d tensors cannot scale CPU tensors)
    a = nn.Parameter(torch.randn(3, device="cuda"))
    b = nn.Parameter(torch.randn(3))
    opt = samkit.SAM(torch.optim.SGD([{"params": [a]}, {"params": [b]}], lr=0.1), rho=0.05)
    a.grad, b.grad = torch.randn(3, device="cuda"), torch.randn(3)
    ga, gb, b0 = a.grad.clone(), b.grad.clone(), b.detach().clone()
    norm = (ga.cpu().square().sum() + gb.square().sum()).sqrt()
    assert opt.first_step() is True
    torch.testing.assert_close(b.detach(), b0 + 0.05 * gb / norm)


def test_backup_follows_a_parameter_whose_dtype_changed():
    """model.double() after some steps: the backup is reallocated, restore stays exact."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.0), rho=0.1)
    x, y = torch.randn(8, 4), torch.randn(8, 3)

    def closure():
        loss = torch.nn.functional.mse_loss(
            model(x.to(model.weight.dtype)), y.to(model.weight.dtype)
        )
        loss.backward()
        return loss

    opt.step(closure)
    opt.zero_grad()
    model.double()
    with torch.no_grad():  # values float32 cannot hold: a float32 backup would round them
        for p in model.parameters():
            p.add_(1e-12)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(closure)
    opt.zero_grad()
    assert all(b.dtype is p.dtype for b, p in zip(opt._backups.values(), model.parameters()))
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # lr 0: exact restore


def test_abort_step_after_a_failed_second_pass_restores_and_reopens():
    """Two-step form: the user's second forward raises; abort_step() undoes first_step()."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.5, model=model)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    before = [p.detach().clone() for p in model.parameters()]
    torch.nn.functional.mse_loss(model(x), y).backward()
    assert opt.first_step(zero_grad=True)
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # perturbed
    opt.abort_step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert model[1].track_running_stats  # BN released
    opt.abort_step()  # no-op when nothing is open
    torch.nn.functional.mse_loss(model(x), y).backward()
    assert opt.first_step(zero_grad=True)  # a new step can begin
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.second_step(zero_grad=True)
    assert opt.steps == 1
