"""A base optimizer with ``maximize=True``: SAM climbs the objective as it descends its negation.

torch's ``maximize=True`` steps up the gradient of the objective the closure returns; SAM's
worst case in the ball is then down that gradient. Maximising ``f`` must be minimising ``-f``,
step for step, in every variant: the weights agree exactly (every difference is a sign flip).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import samkit

Factory = Callable[[torch.optim.Optimizer], torch.optim.Optimizer]

VARIANTS: dict[str, Factory] = {
    "sam": lambda base: samkit.SAM(base, rho=0.1),
    "asam": lambda base: samkit.SAM(base, rho=0.5, adaptive=True),
    "fisher": lambda base: samkit.SAM(base, rho=0.1, perturbation=samkit.Fisher()),
    "gsam": lambda base: samkit.GSAM(base, rho=0.1, alpha=0.3),
    "looksam": lambda base: samkit.LookSAM(base, rho=0.1, k=2),
    "momentum_sam": lambda base: samkit.MomentumSAM(base, rho=0.1),
    "every_k": lambda base: samkit.SAM(base, rho=0.1, policy=samkit.EveryK(2)),
    # the decay joins the loss minimised (-f + wd/2 |w|^2), not the objective climbed
    "ascent_weight_decay": lambda base: samkit.SAM(base, rho=0.1, ascent_weight_decay=0.5),
    "auto": lambda base: samkit.SAM(base, rho=samkit.GradientAgreement(warmup=1, rate=0.5)),
}

BASES = {
    "sgd": lambda params, maximize: torch.optim.SGD(
        params, lr=0.05, momentum=0.9, weight_decay=1e-3, maximize=maximize
    ),
    "adam": lambda params, maximize: torch.optim.Adam(
        params, lr=0.01, weight_decay=1e-3, maximize=maximize
    ),
}


def _problem() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x, y = torch.randn(16, 5), torch.randn(16, 1)
    return model, x, y


def _train(variant: str, base: str, maximize: bool, steps: int = 5) -> list[torch.Tensor]:
    model, x, y = _problem()
    opt = VARIANTS[variant](BASES[base](model.parameters(), maximize))
    sign = 1.0 if maximize else -1.0  # maximise f, or minimise -f

    for _ in range(steps):
        opt.zero_grad()
        if variant == "momentum_sam":  # one pass, at w + e (from the optimizer's momentum)
            opt.first_step()
            (sign * -((model(x) - y) ** 2).mean()).backward()
            opt.second_step(zero_grad=True)
            continue

        def closure() -> torch.Tensor:
            f = -((model(x) - y) ** 2).mean()
            (sign * f).backward()
            return f

        opt.step(closure)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_maximising_is_minimising_the_negation(variant: str, base: str) -> None:
    up = _train(variant, base, maximize=True)
    down = _train(variant, base, maximize=False)
    start = [p.detach() for p in _problem()[0].parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(up, start))  # it trained
    for a, b in zip(up, down):
        assert torch.equal(a, b)


def test_the_ascent_goes_down_the_objective() -> None:
    """The point SAM takes the gradient at lowers the objective climbed (0.3 went up it)."""
    model, x, y = _problem()
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1, maximize=True), rho=0.1)
    objective = lambda: -((model(x) - y) ** 2).mean()  # noqa: E731
    with opt.first_pass():
        at_w = objective()
        at_w.backward()
    assert opt.first_step(zero_grad=True)
    with torch.no_grad():
        at_w_plus_e = objective()
    objective().backward()
    opt.second_step(zero_grad=True)
    assert at_w_plus_e < at_w.detach()


def _per_sample(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, sign: float):
    def closure(index: torch.Tensor | None) -> torch.Tensor:
        xs, ys = (x, y) if index is None else (x[index], y[index])
        # per sample: the objective f (maximised), or -f (minimised)
        return sign * -((model(xs) - ys) ** 2).reshape(-1)

    return closure


@pytest.mark.parametrize(
    "make",
    [
        lambda base: samkit.ESAM(base, rho=0.1, gamma=0.5, beta=1.0),
        lambda base: samkit.KSAM(base, rho=0.1, fraction=0.5),
    ],
    ids=["esam", "ksam"],
)
def test_sample_selection_picks_the_worst_for_the_objective(make: Factory) -> None:
    """ESAM and K-SAM select by the closure's per-sample values: under maximize=True the worst
    samples are those with the lowest value (ESAM: whose value falls most at w + e)."""
    runs = []
    for maximize in (True, False):
        model, x, y = _problem()
        x, y = torch.cat([x, x]), torch.cat([y, y])  # 32 samples, select 16
        opt = make(torch.optim.SGD(model.parameters(), lr=0.05, maximize=maximize))
        selected = []
        for _ in range(4):
            opt.zero_grad()
            # the maximised objective's per-sample values, or minus them as losses
            opt.step(_per_sample(model, x, y, 1.0 if maximize else -1.0))
            selected.append(sorted(opt.last_selected.tolist()))
        runs.append(([p.detach().clone() for p in model.parameters()], selected))
    (up, picked_up), (down, picked_down) = runs
    assert picked_up == picked_down
    for a, b in zip(up, down):
        assert torch.equal(a, b)


def test_mixed_directions_refused_where_samples_are_selected() -> None:
    model, x, y = _problem()
    first, last = list(model.parameters())[:2], list(model.parameters())[2:]
    base = torch.optim.SGD([{"params": first}, {"params": last, "maximize": True}], lr=0.1)
    opt = samkit.KSAM(base, rho=0.1, fraction=0.5)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="maximize"):
        opt.step(_per_sample(model, x, y, 1.0))
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
