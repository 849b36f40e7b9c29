"""The defects new users hit in samkit 0.1's optimizer, checked against any samkit tree.

    python benchmarks/defects.py                              # this checkout
    git worktree add /tmp/old 994a22b                          # samkit 0.1 (before the redesign)
    PYTHONPATH=/tmp/old/src python benchmarks/defects.py       # the same checks on it

One line per defect: FIXED, or DEFECT (with the error it raised, if any). The
tests that pin each fix are in tests/test_sam.py, test_family.py and
test_compile.py.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

import samkit

warnings.simplefilter("ignore")  # deprecations of the old tree are not what is checked
X, Y = torch.randn(12, 4), torch.randn(12, 3)
RESULTS: dict[str, str] = {}


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def closure_for(
    net: nn.Module, x: torch.Tensor = X, y: torch.Tensor = Y
) -> Callable[[], torch.Tensor]:
    def closure() -> torch.Tensor:
        loss = nn.functional.mse_loss(net(x), y)
        loss.backward()
        return loss

    return closure


def case(name: str) -> Callable[[Callable[[], bool]], None]:
    def run(check: Callable[[], bool]) -> None:
        try:
            RESULTS[name] = "FIXED" if check() else "DEFECT"
        except Exception as exc:  # the defect may be a crash: report it
            RESULTS[name] = f"DEFECT ({type(exc).__name__}: {str(exc)[:70]})"

    return run


def sgd(net: nn.Module, **kw: float) -> samkit.SAM:
    return samkit.SAM(torch.optim.SGD(net.parameters(), lr=0.1), **kw)


@case("7a class form: Adam's eps reaches Adam")
def _() -> bool:
    opt = samkit.SAM(model().parameters(), torch.optim.Adam, rho=0.05, lr=1e-3, eps=1e-5)
    return opt.base_optimizer.defaults["eps"] == 1e-5


@case("7a class form: foreach reaches the base")
def _() -> bool:
    opt = samkit.SAM(model().parameters(), torch.optim.SGD, lr=0.1, foreach=False)
    return opt.base_optimizer.defaults["foreach"] is False


@case("7b a bad state dict leaves the optimizer as it was")
def _() -> bool:
    net = model()
    opt = sgd(net, rho=0.05)
    opt.step(closure_for(net))
    opt.zero_grad()
    sd = opt.state_dict()
    sd["param_groups"][0]["lr"] = 1e6
    sd["param_groups"][0]["rho"] = -1.0
    try:
        opt.load_state_dict(sd)
    except ValueError:
        pass
    return opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["rho"] == 0.05


@case("7b a plain torch state dict keeps a group's explicit rho=0")
def _() -> bool:
    params = list(model().parameters())
    groups = [{"params": params[:2]}, {"params": params[2:], "rho": 0.0}]
    opt = samkit.SAM(torch.optim.SGD(groups, lr=0.1), rho=0.05)
    plain = torch.optim.SGD([{"params": params[:2]}, {"params": params[2:]}], lr=0.1)
    opt.load_state_dict(plain.state_dict())
    return opt.param_groups[1]["rho"] == 0.0


@case("7c an infinite epsilon is refused")
def _() -> bool:
    new_name = hasattr(sgd(model()), "ascent_eps")
    try:
        sgd(model(), **({"ascent_eps": math.inf} if new_name else {"eps": math.inf}))
    except ValueError:
        return True
    return False


@case("7c rho=np.float32(0.05) is accepted")
def _() -> bool:
    sgd(model(), rho=np.float32(0.05))
    return True


@case("7d gradients accumulated before step(closure) are refused")
def _() -> bool:
    net = model()
    opt = sgd(net, rho=0.05)
    nn.functional.mse_loss(net(X[:6]), Y[:6]).backward()
    try:
        opt.step(closure_for(net, X[6:], Y[6:]))
    except RuntimeError as exc:
        return "accumulated" in str(exc)
    return False


@case("7e a second-order base optimizer is refused clearly")
def _() -> bool:
    class SecondOrder(torch.optim.SGD):
        is_second_order = True

    try:
        samkit.SAM(SecondOrder(model().parameters(), lr=0.1))
    except ValueError as exc:
        return "second-order" in str(exc)
    return False


@case("7f a compiled training step equals eager")
def _() -> bool:
    nets = [model(), model()]
    opts = [
        samkit.SAM(torch.optim.SGD(n.parameters(), lr=0.1, momentum=0.9), rho=0.05) for n in nets
    ]

    def train_step(net: nn.Module, opt: samkit.SAM) -> None:
        opt.step(closure_for(net))
        opt.zero_grad()

    compiled = torch.compile(train_step, backend="aot_eager")
    for _ in range(3):
        train_step(nets[0], opts[0])
        compiled(nets[1], opts[1])
    return all(torch.equal(a, b) for a, b in zip(nets[0].parameters(), nets[1].parameters()))


@case("found: Adadelta's own rho is not read as SAM's radius")
def _() -> bool:
    net = model()
    opt = samkit.SAM(torch.optim.Adadelta(net.parameters(), lr=1.0), rho=0.05)
    w0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    nn.functional.mse_loss(net(X), Y).backward()
    opt.first_step()
    moved = torch.cat([p.detach().reshape(-1) for p in net.parameters()]) - w0
    opt.second_step()
    return abs(float(moved.norm()) - 0.05) < 1e-5


if __name__ == "__main__":
    for name, outcome in RESULTS.items():
        print(f"{outcome:8s} {name}" if outcome in ("FIXED", "DEFECT") else f"{outcome}  <- {name}")
