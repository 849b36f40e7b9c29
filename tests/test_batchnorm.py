"""BatchNorm running statistics under SAM's two forward passes.

The running mean / variance and ``num_batches_tracked`` must describe the
model at w: after one SAM step they must equal what ONE forward pass at w
gives. Without ``model=`` or ``freeze_bn_stats`` the second pass (at w + e)
moves them a second time; the last test documents that.
"""

from __future__ import annotations

import copy

import pytest
import torch
from optim_registry import make_data, make_model
from torch import nn

import samkit
from samkit.optim.batchnorm import batchnorm_modules
from samkit.optim.policy import Policy


def _bn_state(model):
    return [
        t.clone()
        for m in batchnorm_modules(model)
        for t in (m.running_mean, m.running_var, m.num_batches_tracked)
    ]


def _one_pass_reference(model, x):
    ref = copy.deepcopy(model)
    ref.train()
    with torch.no_grad():
        ref(x)
    return _bn_state(ref)


def _setup(seed=0, rho=0.05, **kw):
    model = make_model(seed, bn=True)
    x, y = make_data(seed)
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=rho, **kw)
    return model, x, y, opt


def _loss(model, x, y):
    return nn.functional.mse_loss(model(x), y)


def _closure(model, x, y):
    def closure():
        loss = _loss(model, x, y)
        loss.backward()
        return loss

    return closure


def _equal(a, b):
    return len(a) == len(b) and all(torch.equal(s, t) for s, t in zip(a, b))


@pytest.mark.parametrize("form", ["closure", "explicit"])
@pytest.mark.parametrize("rho", [0.05, 0.0])
def test_model_argument_keeps_running_stats_to_the_first_pass(form, rho):
    model, x, y, opt = _setup(model=None, rho=rho)
    opt.model = model  # same as SAM(..., model=model)
    for _ in range(3):
        expected = _one_pass_reference(model, x)
        if form == "closure":
            opt.step(_closure(model, x, y))
            opt.zero_grad()
        else:
            _loss(model, x, y).backward()
            if opt.first_step(zero_grad=True):
                _loss(model, x, y).backward()
            opt.second_step(zero_grad=True)
        assert _equal(_bn_state(model), expected)
    assert int(batchnorm_modules(model)[0].num_batches_tracked) == 3
    assert all(m.track_running_stats for m in batchnorm_modules(model))


def test_model_passed_to_constructor():
    model = make_model(1, bn=True)
    x, y = make_data(1)
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05, model=model)
    expected = _one_pass_reference(model, x)
    opt.step(_closure(model, x, y))
    assert _equal(_bn_state(model), expected)


def test_freeze_bn_stats_around_the_second_pass_does_the_same():
    model, x, y, opt = _setup()
    expected = _one_pass_reference(model, x)
    _loss(model, x, y).backward()
    assert opt.first_step(zero_grad=True)
    with samkit.freeze_bn_stats(model):
        _loss(model, x, y).backward()
    opt.second_step(zero_grad=True)
    assert _equal(_bn_state(model), expected)


def test_without_either_the_second_pass_moves_the_stats_again():
    """Why the feature exists: a plain two-pass step counts the batch twice, once at w + e."""
    model, x, y, opt = _setup()
    expected = _one_pass_reference(model, x)
    opt.step(_closure(model, x, y))
    state = _bn_state(model)
    assert int(state[2]) == 2  # num_batches_tracked
    assert not torch.equal(state[0], expected[0])
    assert not torch.equal(state[1], expected[1])


def test_second_pass_still_normalises_with_batch_statistics():
    model = make_model(2, bn=True)
    x, _ = make_data(2)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        out_ref = ref(x)
        with samkit.freeze_bn_stats(model):
            out = model(x)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-6)
    assert int(batchnorm_modules(model)[0].num_batches_tracked) == 0


def test_eval_mode_batchnorm_is_unaffected():
    model, x, y, opt = _setup(model=None)
    with torch.no_grad():
        model(x)  # non-trivial running stats
    model.eval()
    twin = copy.deepcopy(model)
    twin_opt = samkit.SAM(torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9), rho=0.05)
    opt.model = model
    before = _bn_state(model)
    with torch.no_grad(), samkit.freeze_bn_stats(model):
        inside = model(x)
    assert torch.equal(inside, twin(x).detach())  # eval uses the running stats, frozen or not
    for _ in range(2):
        opt.step(_closure(model, x, y))
        opt.zero_grad()
        twin_opt.step(_closure(twin, x, y))
        twin_opt.zero_grad()
    assert _equal(_bn_state(model), before)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


def test_freeze_restores_flags_on_exception_and_nests():
    model = nn.Sequential(
        nn.BatchNorm1d(3), nn.BatchNorm1d(3, track_running_stats=False), nn.SyncBatchNorm(3)
    )
    mods = batchnorm_modules(model)
    assert mods == [model[0], model[2]]  # SyncBatchNorm counts, untracked BN does not
    with pytest.raises(KeyError):
        with samkit.freeze_bn_stats(model):
            with samkit.freeze_bn_stats(model):
                assert not model[0].track_running_stats
            assert not model[0].track_running_stats  # the outer context still holds
            raise KeyError
    assert model[0].track_running_stats and model[2].track_running_stats
    assert not model[1].track_running_stats


def test_exception_in_second_pass_releases_the_freeze():
    model, x, y, opt = _setup(model=None)
    opt.model = model
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return _closure(model, x, y)()

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(closure)
    assert all(m.track_running_stats for m in batchnorm_modules(model))
    expected = _one_pass_reference(model, x)
    opt.zero_grad()
    opt.step(_closure(model, x, y))
    assert _equal(_bn_state(model), expected)


def test_cumulative_average_batchnorm():
    """momentum=None (cumulative moving average) uses num_batches_tracked: it must count once."""
    model = nn.Sequential(
        nn.Linear(4, 5), nn.BatchNorm1d(5, momentum=None), nn.Tanh(), nn.Linear(5, 3)
    )
    x, y = make_data(3)
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05, model=model)
    for _ in range(3):
        expected = _one_pass_reference(model, x)
        opt.step(_closure(model, x, y))
        opt.zero_grad()
        assert _equal(_bn_state(model), expected)


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
