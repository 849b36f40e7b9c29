"""Parameters of ``model=`` that SAM does not hold (warned), and one listed twice (refused).

SAM runs the closure twice a step; a parameter outside its groups (a head given to another
optimizer) keeps the first pass's gradient and adds the second's, so its own optimizer takes
about twice its step, silently. With ``model=`` SAM can see it, and says so once.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import samkit


def _model() -> tuple[torch.nn.Module, torch.nn.Linear, torch.nn.Linear]:
    torch.manual_seed(0)
    body, head = torch.nn.Linear(5, 8), torch.nn.Linear(8, 1)
    return torch.nn.Sequential(body, torch.nn.Tanh(), head), body, head


def test_the_doubling_is_real_and_warned() -> None:
    model, body, head = _model()
    x, y = torch.randn(16, 5), torch.randn(16, 1)
    with pytest.warns(RuntimeWarning, match=r"2 trainable parameter\(s\) of model= .*2\.weight"):
        opt = samkit.SAM(torch.optim.SGD(body.parameters(), lr=0.1), rho=0.05, model=model)

    def closure() -> torch.Tensor:
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    at_w = torch.autograd.grad(torch.nn.functional.mse_loss(model(x), y), head.weight)[0]
    opt.step(closure)
    # what the warning is about: the head's gradient holds both passes' (about twice g(w))
    ratio = (head.weight.grad.norm() / at_w.norm()).item()
    assert 1.9 < ratio < 2.1


@pytest.mark.parametrize(
    "make",
    [
        lambda m, body, head: samkit.SAM(torch.optim.SGD(m.parameters(), lr=0.1), model=m),
        # the head in a group with rho=0: held, so stepped by SAM's base step
        lambda m, body, head: samkit.SAM(
            torch.optim.SGD(
                [{"params": body.parameters()}, {"params": head.parameters(), "rho": 0.0}], lr=0.1
            ),
            model=m,
        ),
        # Momentum-SAM has one pass: nothing is summed
        lambda m, body, head: samkit.MomentumSAM(
            torch.optim.SGD(body.parameters(), lr=0.1, momentum=0.9), rho=0.1, model=m
        ),
        # no model=: nothing to compare with
        lambda m, body, head: samkit.SAM(torch.optim.SGD(body.parameters(), lr=0.1)),
    ],
    ids=["all", "rho0_group", "momentum_sam", "no_model"],
)
def test_no_warning_where_nothing_is_summed(make) -> None:
    model, body, head = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make(model, body, head)


def test_frozen_parameters_are_not_counted() -> None:
    model, body, head = _model()
    head.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        samkit.SAM(torch.optim.SGD(body.parameters(), lr=0.1), model=model)


def test_a_parameter_listed_twice_is_refused() -> None:
    """torch only warns; SAM's ascent would add e twice (a radius sqrt(2) too large)."""
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own warning about the duplicate
        with pytest.raises(ValueError, match="param group 0 lists a parameter more than once"):
            samkit.SAM(torch.optim.SGD([w, w], lr=0.1), rho=1.0)
        opt = samkit.SAM(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1), rho=1.0)
        with pytest.raises(ValueError, match="param group 1 lists a parameter more than once"):
            opt.add_param_group({"params": [w, w]})
    assert len(opt.param_groups) == 1  # the refused group is not kept
