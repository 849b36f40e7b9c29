"""mSAM: micro-batch ascents averaged, by hand; m=1 is SAM; BN; resume."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import samkit
from samkit.optim.msam import MicroBatchSAM
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
    opt = MicroBatchSAM(torch.optim.SGD([w], lr=lr), rho=rho, micro_batches=m)
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
    opt = MicroBatchSAM(torch.optim.SGD([w], lr=0.1, momentum=0.9), rho=0.05, micro_batches=1)
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


def test_unsupported_combinations_raise_clear_errors():
    w = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="Invalid policy value: mSAM ascends on every micro-batch"):
        MicroBatchSAM(torch.optim.SGD([w], lr=0.1), policy=EveryK(2))
    with pytest.raises(ValueError, match="Invalid micro_batches value: 0"):
        MicroBatchSAM(torch.optim.SGD([w], lr=0.1), micro_batches=0)
    opt = MicroBatchSAM(torch.optim.SGD([w], lr=0.1))
    with pytest.raises(
        ValueError, match="Invalid scaler value: mSAM does not support a GradScaler"
    ):
        opt.step(lambda j: w.sum(), scaler=torch.amp.GradScaler("cpu"))


def test_msam_is_a_deprecated_alias_of_micro_batch_sam():
    """``MSAM`` (samkit 0.2's name; Momentum-SAM's paper calls its method MSAM) still
    builds micro-batch SAM, with a DeprecationWarning; it is not in ``__all__``."""
    import samkit
    from samkit.optim.msam import MSAM

    assert samkit.MSAM is MSAM and "MSAM" not in samkit.__all__
    assert "MicroBatchSAM" in samkit.__all__ and samkit.MicroBatchSAM is MicroBatchSAM
    w = nn.Parameter(torch.ones(3))
    with pytest.warns(DeprecationWarning, match="MicroBatchSAM"):
        old = samkit.MSAM(torch.optim.SGD([w], lr=0.1), micro_batches=2)
    assert isinstance(old, MicroBatchSAM) and old.micro_batches == 2
    new = MicroBatchSAM(torch.optim.SGD([w], lr=0.1), micro_batches=2)
    assert old.method == new.method and new.method["class"] == "MicroBatchSAM"


def test_a_state_dict_written_by_msam_loads_into_micro_batch_sam():
    """A checkpoint of samkit 0.2's ``MSAM`` records class "MSAM": the same method."""
    w = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = MicroBatchSAM(torch.optim.SGD([w], lr=0.1, momentum=0.9), rho=0.05, micro_batches=2)
    xs = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def closure(j):
        loss = (xs[2 * j : 2 * j + 2] @ w).pow(2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    sd = opt.state_dict()
    sd["samkit"]["method"]["class"] = "MSAM"
    fresh = MicroBatchSAM(torch.optim.SGD([w], lr=0.1, momentum=0.9), rho=0.05, micro_batches=2)
    fresh.load_state_dict(sd)
    assert fresh.steps == opt.steps
    assert torch.equal(
        fresh.base_optimizer.state[w]["momentum_buffer"],
        opt.base_optimizer.state[w]["momentum_buffer"],
    )


def test_gradients_accumulated_before_the_step_are_refused_not_dropped():
    """Micro-batch 0 cleared .grad: a backward before step() was dropped without a word.
    What the last step left (no zero_grad between steps) is still cleared, as before."""
    x, y, w = _problem(2)
    opt = MicroBatchSAM(torch.optim.SGD([w], lr=0.1), rho=0.05, micro_batches=2)
    xs, ys = x.chunk(2), y.chunk(2)

    def closure(j):
        loss = ((xs[j] @ w - ys[j]) ** 2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    opt.step(closure)  # the gradients the first step left: cleared, as before
    ((x @ w - y) ** 2).mean().backward()  # accumulated outside the step
    before = w.detach().clone()
    with pytest.raises(RuntimeError, match="gradients were already accumulated before the step"):
        opt.step(closure)
    assert torch.equal(w.detach(), before) and opt.steps == 2
    opt.zero_grad(set_to_none=False)  # zeros in place: no accumulation
    opt.step(closure)
    assert opt.steps == 3
