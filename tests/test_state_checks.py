"""A state dict a user hands in is checked, not trusted (an audit's findings, each once
accepted): stored vectors of the wrong shape broadcast into later gradients, a state of
another base optimizer failed mid-step, malformed samkit entries raised raw errors; and
ESAM / K-SAM took gradients left in ``.grad`` into their first pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import samkit


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def _batch(step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)


def _closure(model, step=0):
    x, y = _batch(step)

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def _trained(make, steps: int = 3):
    model = _model()
    opt = make(model)
    for t in range(steps):
        opt.step(_closure(model, t))
        opt.zero_grad()
    return model, opt


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


MIXES = {
    "looksam": (lambda m: samkit.LookSAM(_sgd(m), k=3, alpha=0.5), "gv"),
    "vsam": (lambda m: samkit.VSAM(_sgd(m), warmup_steps=1), "psf"),
}


@pytest.mark.parametrize("name", list(MIXES))
@pytest.mark.parametrize(
    "bad",
    [torch.ones(1), torch.full((8, 5), float("nan")), "x"],
    ids=["shape", "nan", "type"],
)
def test_a_stored_vector_of_another_shape_is_refused_and_changes_nothing(name, bad):
    make, key = MIXES[name]
    model, opt = _trained(make)
    sd = opt.state_dict()
    if not sd["samkit"]["mix"][key]:
        pytest.skip("no stored vector at this step")
    good = opt.state_dict()
    first = next(iter(sd["samkit"]["mix"][key]))
    sd["samkit"]["mix"][key][first] = bad
    with pytest.raises(ValueError, match=rf"Invalid state value: .*{key} entry {first} is"):
        opt.load_state_dict(sd)
    after = opt.state_dict()["samkit"]["mix"][key]
    assert all(torch.equal(after[i], v) for i, v in good["samkit"]["mix"][key].items())


@pytest.mark.parametrize(
    ("name", "corrupt", "match"),
    [
        ("vsam", {"age": -5}, "vSAM's age"),  # a reuse weight beta**(age + 1) above 1
        ("vsam", {"age": 99}, "vSAM's age"),
        ("vsam", {"reused": "x"}, "vSAM's reused"),
        ("looksam", {"gv": {99: torch.zeros(3)}}, "gv entry 99 names no parameter"),
        ("looksam", {"gv": None}, "gv is missing"),
        ("looksam", {"gv_norm": 3.0}, "gv_norm"),  # an AttributeError before
    ],
)
def test_malformed_mix_entries_are_value_errors(name, corrupt, match):
    model, opt = _trained(MIXES[name][0])
    sd = opt.state_dict()
    sd["samkit"]["mix"].update(corrupt)
    with pytest.raises(ValueError, match=f"Invalid state value: .*{match}"):
        opt.load_state_dict(sd)


def test_a_malformed_policy_state_is_a_value_error_and_changes_nothing():
    model, opt = _trained(lambda m: samkit.SAM(_sgd(m), policy=samkit.RandomPolicy()))
    good = opt.state_dict()
    sd = opt.state_dict()
    sd["samkit"]["policy"] = {"generator": "garbage"}
    with pytest.raises(ValueError, match="Invalid state_dict value: its samkit state cannot"):
        opt.load_state_dict(sd)
    assert opt.state_dict()["samkit"]["steps"] == good["samkit"]["steps"]


def test_a_state_of_another_base_optimizer_is_refused_at_loading_not_mid_step():
    """Adam's state into SAM over SGD loaded, then failed inside SGD after both passes."""
    _, adam = _trained(lambda m: samkit.SAM(torch.optim.Adam(m.parameters(), lr=0.01)))
    model, opt = _trained(lambda m: samkit.SAM(_sgd(m)))
    before = opt.state_dict()
    with pytest.raises(ValueError, match=r"has no \[.*'momentum'.*\].*another base optimizer"):
        opt.load_state_dict(adam.state_dict())
    assert opt.state_dict()["param_groups"] == before["param_groups"]
    opt.step(_closure(model, 9))  # and it still steps


def test_a_buffer_of_another_shape_is_refused():
    model, opt = _trained(lambda m: samkit.SAM(_sgd(m)))
    sd = opt.state_dict()
    sd["state"][0]["momentum_buffer"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"momentum_buffer of a parameter .* has shape \(1,\)"):
        opt.load_state_dict(sd)


def _per_sample_closure(model, step=0):
    x, y = _batch(step)

    def closure(index=None):
        xs, ys = (x, y) if index is None else (x[index], y[index])
        return F.cross_entropy(model(xs), ys, reduction="none")

    return closure


@pytest.mark.parametrize(
    "make",
    [
        lambda m: samkit.ESAM(_sgd(m), gamma=1.0, beta=1.0),
        lambda m: samkit.KSAM(_sgd(m), fraction=1.0),
    ],
    ids=["esam", "ksam"],
)
def test_esam_and_ksam_refuse_gradients_left_in_grad_as_sam_does(make):
    model = _model()
    opt = make(model)
    x, y = _batch(5)
    F.cross_entropy(model(x), y).backward()  # a forgotten zero_grad
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="gradients were already accumulated"):
        opt.step(_per_sample_closure(model))
    assert all(torch.equal(a, p) for a, p in zip(weights, model.parameters()))


def test_ksam_with_the_whole_batch_is_sam_bit_for_bit():
    """A top-k permutation of the whole batch summed its mean in another order (4.5e-8
    apart after 12 steps); the whole batch is now taken in its order."""
    models = [_model(), _model()]
    ksam = samkit.KSAM(_sgd(models[0]), fraction=1.0)
    sam = samkit.SAM(_sgd(models[1]))
    for t in range(12):
        ksam.step(_per_sample_closure(models[0], t))
        ksam.zero_grad()
        sam.step(_closure(models[1], t))
        sam.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters()))
