"""The defects new users hit in samkit 0.1's optimizer, checked against any samkit tree.

    python benchmarks/defects.py                              # this checkout
    git worktree add /tmp/old 994a22b                          # samkit 0.1 (before the redesign)
    PYTHONPATH=/tmp/old/src python benchmarks/defects.py       # the same checks on it

One line per defect: FIXED, or DEFECT (with the error it raised). The tests
that pin each fix are in tests/test_sam.py, test_family.py and test_compile.py.
"""

import math
import warnings

import numpy as np
import torch
import torch.nn as nn

warnings.simplefilter("ignore")
import samkit


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


x, y = torch.randn(12, 4), torch.randn(12, 3)


def closure_for(m, xs=x, ys=y):
    def c():
        l = nn.functional.mse_loss(m(xs), ys)
        l.backward()
        return l

    return c


res = {}


def case(name):
    def deco(fn):
        try:
            res[name] = "FIXED" if fn() else "DEFECT"
        except Exception as e:
            res[name] = f"DEFECT ({type(e).__name__}: {str(e)[:70]})"
        return fn

    return deco


@case("7a class form: Adam's eps reaches Adam")
def _():
    o = samkit.SAM(model().parameters(), torch.optim.Adam, rho=0.05, lr=1e-3, eps=1e-5)
    return o.base_optimizer.defaults["eps"] == 1e-5


@case("7a class form: foreach reaches the base")
def _():
    o = samkit.SAM(model().parameters(), torch.optim.SGD, lr=0.1, foreach=False)
    return o.base_optimizer.defaults["foreach"] is False


@case("7b bad state dict leaves the optimizer as it was")
def _():
    m = model()
    o = samkit.SAM(torch.optim.SGD(m.parameters(), lr=0.1), rho=0.05)
    o.step(closure_for(m))
    o.zero_grad()
    sd = o.state_dict()
    sd["param_groups"][0]["lr"] = 1e6
    sd["param_groups"][0]["rho"] = -1.0
    try:
        o.load_state_dict(sd)
    except ValueError:
        pass
    return o.param_groups[0]["lr"] == 0.1 and o.param_groups[0]["rho"] == 0.05


@case("7b plain torch state dict keeps a group's explicit rho=0")
def _():
    m = model()
    ps = list(m.parameters())
    o = samkit.SAM(
        torch.optim.SGD([{"params": ps[:2]}, {"params": ps[2:], "rho": 0.0}], lr=0.1), rho=0.05
    )
    plain = torch.optim.SGD([{"params": ps[:2]}, {"params": ps[2:]}], lr=0.1)
    o.load_state_dict(plain.state_dict())
    return o.param_groups[1]["rho"] == 0.0


@case("7c eps=inf refused")
def _():
    kw = (
        {"ascent_eps": math.inf}
        if hasattr(samkit.SAM(torch.optim.SGD(model().parameters(), lr=0.1)), "ascent_eps")
        else {"eps": math.inf}
    )
    try:
        samkit.SAM(torch.optim.SGD(model().parameters(), lr=0.1), **kw)
    except ValueError:
        return True
    return False


@case("7c rho=np.float32(0.05) accepted")
def _():
    samkit.SAM(torch.optim.SGD(model().parameters(), lr=0.1), rho=np.float32(0.05))
    return True


@case("7d gradients accumulated before step(closure) refused")
def _():
    m = model()
    o = samkit.SAM(torch.optim.SGD(m.parameters(), lr=0.1), rho=0.05)
    nn.functional.mse_loss(m(x[:6]), y[:6]).backward()
    try:
        o.step(closure_for(m, x[6:], y[6:]))
    except RuntimeError as e:
        return "accumulated" in str(e)
    return False


@case("7e second-order base optimizer refused clearly")
def _():
    class SO(torch.optim.SGD):
        is_second_order = True

    try:
        samkit.SAM(SO(model().parameters(), lr=0.1))
    except ValueError as e:
        return "second-order" in str(e)
    return False


@case("7f compiled training step equals eager")
def _():
    m1, m2 = model(), model()
    o1 = samkit.SAM(torch.optim.SGD(m1.parameters(), lr=0.1, momentum=0.9), rho=0.05)
    o2 = samkit.SAM(torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9), rho=0.05)

    def ts(m, o):
        o.step(closure_for(m))
        o.zero_grad()

    c = torch.compile(ts, backend="aot_eager")
    for _ in range(3):
        ts(m1, o1)
        c(m2, o2)
    return all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


@case("found: Adadelta's own rho not read as SAM's radius")
def _():
    m = model()
    o = samkit.SAM(torch.optim.Adadelta(m.parameters(), lr=1.0), rho=0.05)
    w0 = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
    nn.functional.mse_loss(m(x), y).backward()
    o.first_step()
    d = torch.cat([p.detach().reshape(-1) for p in m.parameters()]) - w0
    o.second_step()
    return abs(float(d.norm()) - 0.05) < 1e-5


for k, v in res.items():
    print(f"{v:8s} {k}" if v in ("FIXED", "DEFECT") else f"{v}  <- {k}")
