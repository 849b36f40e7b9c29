"""Policies: every k steps, random (RST), adaptive (AE-SAM), late; and the
variant methods registered for ``samkit compare``."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from optim_registry import all_equal, make_data, make_model, params_of, roundtrip
from torch import nn

import samkit
from samkit.optim.policy import EveryK, GradNormTrigger, Late, RandomPolicy


def _counting_closure(model, x, y, counter):
    def closure():
        counter[0] += 1
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    return closure


def _run(opt, model, x, y, n, counter=None):
    counter = counter if counter is not None else [0]
    for _ in range(n):
        opt.step(_counting_closure(model, x, y, counter))
        opt.zero_grad()
    return counter[0]


@given(k=st.integers(1, 6), steps=st.integers(1, 20))
def test_every_k_ascends_on_multiples_of_k_and_counts_passes(k, steps):
    model = make_model(0)
    x, y = make_data(0)
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.01), rho=0.05, policy=EveryK(k))
    calls = _run(opt, model, x, y, steps)
    assert opt.ascents == math.ceil(steps / k)
    assert calls == steps + math.ceil(steps / k)


@pytest.mark.parametrize("scale", [True, False])
def test_every_k_scales_rho_by_k(scale):
    w = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    opt = samkit.SAM(torch.optim.SGD([w], lr=0.1), rho=0.05, policy=EveryK(4, scale_rho=scale))
    w.grad = torch.tensor([0.6, 0.8], dtype=torch.float64)
    assert opt.first_step()
    e = w.detach() - torch.tensor([3.0, 4.0], dtype=torch.float64)
    g = torch.tensor([0.6, 0.8], dtype=torch.float64)
    # SAM's ascent_eps (1e-12) in the denominator is a relative 1e-12 here (||g|| = 1),
    # as large as the tolerance: the expectation includes it
    expect = (0.2 if scale else 0.05) * g / (torch.linalg.vector_norm(g) + 1e-12)
    torch.testing.assert_close(e, expect, rtol=1e-12, atol=0)
    w.grad = torch.zeros_like(w)
    opt.second_step()


def test_every_k_equals_sam_on_its_steps_and_sgd_in_between():
    x, y = make_data(1)
    model, ref = make_model(1), make_model(1)
    opt = samkit.SAM(
        torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05, policy=EveryK(3, scale_rho=False)
    )
    sam = samkit.SAM(torch.optim.SGD(ref.parameters(), lr=0.1), rho=0.05)
    for t in range(7):
        _run(opt, model, x, y, 1)
        if t % 3 == 0:
            _run(sam, ref, x, y, 1)
        else:
            ref.zero_grad()
            torch.nn.functional.mse_loss(ref(x), y).backward()
            sam.base_optimizer.step()
            sam.steps += 1
            ref.zero_grad()
        assert all_equal(params_of(model), params_of(ref))


def test_random_policy_frequency_schedule_and_seed():
    sam = SimpleNamespace(steps=0)
    pol = RandomPolicy(0.3, seed=5)
    draws = [pol.should_ascend(sam) for _ in range(4000)]
    assert abs(sum(draws) / 4000 - 0.3) < 0.03  # sd 0.007
    again = RandomPolicy(0.3, seed=5)
    assert [again.should_ascend(sam) for _ in range(4000)] == draws
    other = RandomPolicy(0.3, seed=6)
    assert [other.should_ascend(sam) for _ in range(4000)] != draws
    lin = RandomPolicy(0.0, p_end=1.0, total_steps=100)
    assert [lin.probability(t) for t in (0, 25, 100, 200)] == [0.0, 0.25, 1.0, 1.0]
    assert not any(RandomPolicy(0.0).should_ascend(sam) for _ in range(100))
    assert all(RandomPolicy(1.0).should_ascend(sam) for _ in range(100))


def test_adaptive_policy_matches_hand_computed_statistics():
    w = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    pol = GradNormTrigger(total_steps=4, c_start=-1.0, c_end=1.0, decay=0.5)
    sam = samkit.SAM(torch.optim.SGD([w], lr=0.0), rho=0.05, policy=pol)
    norms = [2.0, 1.0, 3.0, 0.5, 3.0]
    mean, var, decisions = None, 0.0, []
    for t, n in enumerate(norms):
        x = n * n
        if mean is None:
            mean = x
        else:
            mean = 0.5 * mean + 0.5 * x
            var = 0.5 * var + 0.5 * (x - mean) ** 2
        c = -1.0 + 2.0 * min(t / 4, 1.0)
        decisions.append(x >= mean + c * math.sqrt(var))
    got = []
    for n in norms:
        w.grad = torch.tensor([n, 0.0, 0.0], dtype=torch.float64)
        got.append(sam.first_step())
        w.grad = torch.zeros_like(w)
        sam.second_step()
        assert pol.last_sq_norm == pytest.approx(n * n, rel=1e-6)
    assert got == decisions
    assert pol.mean == pytest.approx(mean, rel=1e-6) and pol.var == pytest.approx(var, rel=1e-6)
    assert True in got and False in got  # the example exercises both branches


def test_late_policy():
    sam = SimpleNamespace(steps=0)
    pol = Late(total_steps=100, fraction=0.2)
    assert pol.start_step == 80
    decisions = []
    for t in range(100):
        sam.steps = t
        decisions.append(pol.should_ascend(sam))
    assert decisions == [t >= 80 for t in range(100)]
    assert Late(0).should_ascend(sam)


POLICIES = {
    "every_k": lambda: EveryK(3),
    "random": lambda: RandomPolicy(0.5, p_end=0.2, total_steps=8, seed=3),
    "adaptive": lambda: GradNormTrigger(8, decay=0.7),
    "late": lambda: Late(2),
}


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: EveryK(0), "Invalid k value: 0"),
        (lambda: EveryK(2.5), "Invalid k value: 2.5"),
        (lambda: RandomPolicy(1.5), "Invalid p value: 1.5"),
        (lambda: RandomPolicy(0.5, p_end=0.1), "Invalid total_steps value: None"),
        (lambda: RandomPolicy(0.5, p_end=-0.1, total_steps=3), "Invalid p_end value: -0.1"),
        (lambda: GradNormTrigger(0), "Invalid total_steps value: 0"),
        (lambda: GradNormTrigger(5, decay=1.0), "Invalid decay value: 1.0"),
        (lambda: GradNormTrigger(5, c_start=float("nan")), "Invalid c_start value: nan"),
        (lambda: Late(), "Invalid start_step value: None"),
        (lambda: Late(-1), "Invalid start_step value: -1"),
        (lambda: Late(3, total_steps=10, fraction=0.1), "Invalid start_step value"),
        (lambda: Late(total_steps=10, fraction=2.0), "Invalid fraction value: 2.0"),
    ],
)
def test_invalid_arguments_raise_value_error_naming_them(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ------------------------------------------------- samkit compare registry
VARIANTS = [
    "fisher_sam", "swp", "sam_every_k", "rst", "ae_sam", "late_sam",
    "gsam", "looksam", "esam", "msam", "saf", "mesa",
]  # fmt: skip
EXPECTED_PASSES = {  # per step over 6 steps, k = 5 / fraction 0.2 etc. (defaults)
    "fisher_sam": 2.0, "swp": 2.0, "sam_every_k": 1 + 2 / 6, "late_sam": 1 + 1 / 6, "gsam": 2.0,
    "looksam": 1 + 2 / 6, "esam": 1 + 1 / 3 + 0.5, "msam": 2.0, "saf": 1.0,
}  # fmt: skip


@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_is_registered_builds_and_counts_its_passes(name):
    from samkit.experiments.methods import TrainSpec, build_method, list_methods

    assert name in list_methods()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    spec = TrainSpec(total_steps=6, steps_per_epoch=3, epochs=2)
    method = build_method(name, model, spec)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 8, generator=g), torch.randint(0, 4, (24,), generator=g)

    def loss_fn(out, t):
        return torch.nn.functional.cross_entropy(out, t, reduction="none")

    losses = []
    for step in range(6):
        idx = torch.arange(8) + 8 * (step % 3)
        losses.append(method.step(model, x[idx], y[idx], idx, loss_fn))
        if step % 3 == 2:
            method.on_epoch_end(step // 3, model)
    assert all(torch.isfinite(torch.stack(losses)))
    assert all(p.grad is None for p in model.parameters())  # zeroed for the trainer
    if name in EXPECTED_PASSES:
        assert method.passes / 6 == pytest.approx(EXPECTED_PASSES[name])
    # state_dict goes through torch.save (the trainer's checkpoint)
    roundtrip(method.state_dict())


def test_unknown_option_and_sam_on_without_norm_layers_raise():
    from samkit.experiments.methods import TrainSpec, build_method

    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="Invalid option for method 'looksam': beta"):
        build_method("looksam", model, TrainSpec(), beta=0.5)
    with pytest.raises(ValueError, match="method 'sam_on'.*no normalisation layer"):
        build_method("sam_on", model, TrainSpec())
