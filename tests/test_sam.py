"""The SAM optimizer battery: laws that every (base optimizer x method) declaring what they need obeys.

The registry (tests/optim_registry.py) lists the base optimizers and the methods.
The update and rho=0 laws here run over every base with every method declaring a
closed-form ascent (plain SAM and ASAM, with ascent weight decay, gradient
clipping or per-group radii: ``methods("closed_form_ascent")``), whose ``e`` the
registry computes from the papers' formulas; the closure and gradient laws over
every method declaring what they need (tests/test_family.py has the rest).
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from optim_registry import (
    BASE_BY_NAME,
    BASES,
    METHOD_BY_NAME,
    all_equal,
    closure_for,
    loss_fn,
    make_data,
    make_model,
    methods,
    params_of,
    roundtrip,
    state_equal,
)
from torch import nn

import samkit
from samkit import functional

MODES = methods("closed_form_ascent")


def _combos(infos):
    return [
        pytest.param(b, m, id=f"{b.name}-{m.name}") for b in BASES for m in infos if m.supports(b)
    ]


COMBOS = _combos(MODES)
# The battery multiplies hypothesis examples by 30 combinations: each combination
# gets a fifth of the profile's budget (the profile's scaling is kept).
FEW = settings(max_examples=max(3, settings.default.max_examples // 5))

shapes = st.tuples(st.integers(1, 5), st.integers(1, 6), st.integers(1, 3))  # d_in, hidden, d_out


def _explicit_step(opt, model, x, y):
    """The documented two-step form; returns what first_step returned."""
    loss_fn(model, x, y).backward()
    ascended = opt.first_step(zero_grad=True)
    if ascended:
        loss_fn(model, x, y).backward()
    opt.second_step(zero_grad=True)
    return ascended


def _run(opt, model, x, y, steps, form):
    for _ in range(steps):
        if form == "closure":
            opt.step(closure_for(opt, model, x, y))
            opt.zero_grad()
        else:
            _explicit_step(opt, model, x, y)


def _base_run(base, mode, model, x, y, steps):
    """The base optimizer alone (with the mode's gradient clipping, which is not part of SAM's ascent)."""
    clip = mode.kwargs.get("max_grad_norm")
    for _ in range(steps):
        base.zero_grad()
        loss_fn(model, x, y).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(list(model.parameters()), clip, foreach=True)
        base.step()


# ------------------------------------------------------------------ rho = 0


@pytest.mark.parametrize(("base", "mode"), COMBOS)
@FEW
@given(seed=st.integers(0, 2**16), lr_frac=st.floats(0.0, 1.0), shape=shapes)
def test_rho_zero_is_exactly_the_base_optimizer(base, mode, seed, lr_frac, shape):
    d_in, hidden, d_out = shape
    lo, hi = base.lr_range
    lr = lo + (hi - lo) * lr_frac
    x, y = make_data(seed, 8, d_in, d_out)

    ref_model = make_model(seed, d_in, hidden, d_out)
    ref = base.make(mode.groups(ref_model, 0.0), lr=lr)
    _base_run(ref, mode, ref_model, x, y, steps=3)

    for form in ("closure", "explicit"):
        model = make_model(seed, d_in, hidden, d_out)
        opt = mode.make(base, model, rho=0.0, base_kw={"lr": lr})
        _run(opt, model, x, y, 3, form)
        assert all_equal(params_of(model), params_of(ref_model)), form
        assert state_equal(opt.base_optimizer.state_dict()["state"], ref.state_dict()["state"]), (
            form
        )
        assert (opt.steps, opt.ascents) == (3, 0)


# ------------------------------------------------------------- exact restore


# -------------------------------------------------------- the paper's update


def _grads_at(model, weights, x, y):
    """Gradient of the loss at ``weights`` (float32, autograd on a copy)."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p, w in zip(twin.parameters(), weights):
            p.copy_(w)
    twin.zero_grad()
    loss_fn(twin, x, y).backward()
    return [p.grad.clone() for p in twin.parameters()]


@pytest.mark.parametrize(("base", "mode"), COMBOS)
@pytest.mark.parametrize("seed", [0, 1])
def test_update_matches_the_paper(base, mode, seed):
    model = make_model(seed)
    x, y = make_data(seed)
    twin = copy.deepcopy(model)
    opt = mode.make(base, model)
    ref_base = base.make(mode.groups(twin))
    for _ in range(2):
        w = params_of(model)
        loss_fn(model, x, y).backward()
        e = [t for group in mode.reference_e(opt.param_groups) for t in group]
        assert opt.first_step(zero_grad=True)
        w_adv = [wi + ei.float() for wi, ei in zip(w, e)]
        torch.testing.assert_close(params_of(model), w_adv, rtol=1e-5, atol=1e-7)
        loss_fn(model, x, y).backward()
        opt.second_step(zero_grad=True)

        # Reference: the base optimizer fed the gradient at w + e (clipped if asked).
        g2 = _grads_at(twin, w_adv, x, y)
        clip = mode.kwargs.get("max_grad_norm")
        if clip is not None:
            n = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in g2]))
            g2 = [g * min(1.0, clip / (float(n) + 1e-6)) for g in g2]
        for p, g in zip(twin.parameters(), g2):
            p.grad = g
        ref_base.step()
        torch.testing.assert_close(params_of(model), params_of(twin), rtol=1e-5, atol=1e-6)


def test_rho_zero_group_is_neither_perturbed_nor_counted():
    mode = METHOD_BY_NAME["per_group_rho"]
    model = make_model(0)
    x, y = make_data(0)
    opt = mode.make(BASE_BY_NAME["sgd"], model)
    w = {p: p.detach().clone() for p in model.parameters()}
    loss_fn(model, x, y).backward()
    g = {p: p.grad.clone() for p in model.parameters()}
    opt.first_step(zero_grad=True)
    frozen_group = opt.param_groups[2]
    assert frozen_group["rho"] == 0.0
    assert all(torch.equal(p, w[p]) for p in frozen_group["params"])
    # The norm is over groups 0 and 1 only: e in group 0 is rho_0 g / ||g_{0,1}||.
    norm = torch.sqrt(
        sum((g[p].double() ** 2).sum() for grp in opt.param_groups[:2] for p in grp["params"])
    )
    p0 = opt.param_groups[0]["params"][0]
    torch.testing.assert_close(
        (p0 - w[p0]).double(), 0.1 * g[p0].double() / norm, rtol=1e-5, atol=1e-7
    )


def test_hand_computed_sam_and_asam_on_two_scalars():
    """e = rho g/||g|| and ASAM's rho T^2 g / ||T g|| worked out by hand."""
    # loss = 3a + 4b: g = (3, 4), ||g|| = 5.
    for adaptive, expected in [(False, (0.03, 0.04)), (True, None)]:
        a = torch.nn.Parameter(torch.tensor(2.0))
        b = torch.nn.Parameter(torch.tensor(-1.0))
        opt = samkit.SAM(torch.optim.SGD([a, b], lr=0.5), rho=0.05, adaptive=adaptive, eta=0.0)
        (3 * a + 4 * b).backward()
        opt.first_step()
        if expected is None:  # T = (2, 1): T g = (6, 4), ||T g|| = sqrt(52), T^2 g = (12, 4)
            s = 0.05 / 52**0.5
            expected = (12 * s, 4 * s)
        torch.testing.assert_close(torch.stack([a - 2.0, b + 1.0]).detach(), torch.tensor(expected))
        (3 * a + 4 * b).backward()
        opt.second_step()
        # linear loss: the gradient at w + e is still (3, 4), SGD moves by -lr g exactly
        torch.testing.assert_close(
            torch.stack([a, b]).detach(), torch.tensor([2.0 - 1.5, -1.0 - 2.0])
        )


# -------------------------------------------------------- foreach reference


# --------------------------------------------------------------------- resume


def _train_loop(opt, sched, rho_sched, model, x, y, steps):
    for _ in range(steps):
        opt.step(closure_for(opt, model, x, y))
        opt.zero_grad()
        sched.step()
        rho_sched.step()


def _sched(kind, opt, total):
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    if kind == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    cycle_momentum = (
        "momentum" in opt.defaults and opt.defaults["momentum"] > 0 or "betas" in opt.defaults
    )
    return torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=[g["lr"] for g in opt.param_groups],
        total_steps=total,
        cycle_momentum=cycle_momentum,
    )


@pytest.mark.parametrize("base", BASES, ids=lambda b: b.name)
def test_plain_torch_optimizer_loads_sam_state_dict(base):
    model = make_model(1)
    x, y = make_data(1)
    opt = METHOD_BY_NAME["sam"].make(base, model)
    _run(opt, model, x, y, 2, "closure")
    sd = roundtrip(opt.state_dict())
    assert sd["samkit"]["steps"] == 2 and sd["samkit"]["ascents"] == 2
    plain = base.make(METHOD_BY_NAME["sam"].groups(make_model(1)))
    plain.load_state_dict(sd)
    assert state_equal(plain.state_dict()["state"], opt.base_optimizer.state_dict()["state"])
    assert [g["lr"] for g in plain.param_groups] == [g["lr"] for g in opt.param_groups]


# --------------------------------------------------- zero and missing grads


@pytest.mark.parametrize(("base", "mode"), _combos(methods(closure_kind="standard")))
def test_params_without_grad_and_frozen_params_are_untouched(base, mode):
    model = mode.model(4)
    x, y = make_data(4)
    ref = mode.model(4)
    unused = torch.nn.Parameter(torch.randn(3, 2))  # in the optimizer, never in the graph
    frozen = torch.nn.Parameter(torch.randn(4), requires_grad=False)
    model.get_submodule("0").weight.requires_grad_(False)  # a frozen layer weight
    ref.get_submodule("0").weight.requires_grad_(False)
    opt = mode.make(base, model)
    opt.add_param_group({"params": [unused, frozen], "rho": 0.2})
    ref_opt = mode.make(base, ref)
    before = [t.detach().clone() for t in (unused, frozen, model.get_submodule("0").weight)]
    _run(opt, model, x, y, 3, "closure")
    _run(ref_opt, ref, x, y, 3, "closure")
    after = [t.detach() for t in (unused, frozen, model.get_submodule("0").weight)]
    assert all_equal(after, before)
    assert unused not in opt.state and frozen not in opt.state
    # The extra params did not enter the ascent's norm: training is as if they were absent.
    assert all_equal(params_of(model), params_of(ref))


# -------------------------------------------------------- argument checking


def _params():
    return [torch.nn.Parameter(torch.zeros(2))]


def _sgd():
    return torch.optim.SGD(_params(), lr=0.1)


BAD_ARGS = [
    (lambda: samkit.SAM(_sgd(), rho=-0.1), r"rho.*-0\.1"),
    (lambda: samkit.SAM(_sgd(), rho=float("nan")), r"rho.*nan"),
    (lambda: samkit.SAM(_sgd(), rho="0.05"), r"rho"),
    (lambda: samkit.SAM(_sgd(), eta=-1.0), r"eta.*-1\.0"),
    (lambda: samkit.SAM(_sgd(), ascent_weight_decay=-0.5), r"ascent_weight_decay.*-0\.5"),
    (lambda: samkit.SAM(_sgd(), ascent_eps=0.0), r"ascent_eps.*0\.0"),
    (lambda: samkit.SAM(_sgd(), ascent_eps=-1e-12), r"ascent_eps"),
    (lambda: samkit.SAM(_sgd(), ascent_eps=float("inf")), r"ascent_eps.*inf"),
    (lambda: samkit.SAM(_sgd(), eps=1e-8), r"eps.*ascent_eps"),
    (lambda: samkit.SAM(_sgd(), max_grad_norm=0.0), r"max_grad_norm.*0\.0"),
    (lambda: samkit.SAM(_sgd(), max_grad_norm=-1), r"max_grad_norm.*-1"),
    (lambda: samkit.SAM(_sgd(), ddp_ascent="both"), r"ddp_ascent.*both"),
    (lambda: samkit.SAM(_params(), "sgd", lr=0.1), r"base_optimizer.*sgd"),
    (lambda: samkit.SAM(_params(), None), r"base_optimizer"),
    (lambda: samkit.SAM(_params(), torch.nn.Linear), r"base_optimizer"),
    (lambda: samkit.SAM(_sgd(), torch.optim.SGD), r"base_optimizer"),
    (lambda: samkit.SAM(_sgd(), lr=0.1), r"Invalid lr value: 0\.1 \(lr= is not a keyword of SAM"),
    (lambda: samkit.SAM(_sgd(), adaptve=True), r"adaptve= .*did you mean 'adaptive'\?"),
    (
        lambda: samkit.SAM(_params(), torch.optim.SGD, lr=0.1, momentm=0.9),
        r"SAM or SGD; did you mean 'momentum'",
    ),
    (lambda: samkit.SAM(samkit.SAM(_sgd())), r"SAM in a SAM"),
    (lambda: samkit.SAM(_sgd(), adaptive=True, perturbation=samkit.L2()), r"adaptive"),
    (lambda: samkit.SAM(_sgd(), perturbation="l2"), r"perturbation.*l2"),
    (lambda: samkit.SAM(_sgd(), policy="always"), r"policy.*always"),
    (lambda: samkit.SAM(_sgd(), model="net"), r"model"),
    (
        lambda: samkit.SAM(torch.optim.SGD([{"params": _params(), "rho": -1.0}], lr=0.1)),
        r"rho.*group 0.*-1\.0",
    ),
    (
        lambda: samkit.SAM(_sgd()).add_param_group({"params": _params(), "rho": -2.0}),
        r"rho.*group 1.*-2\.0",
    ),
    (
        lambda: samkit.SAM(_sgd()).add_param_group({"params": _params(), "eta": -3.0}),
        r"eta.*group 1.*-3\.0",
    ),
]


@pytest.mark.parametrize(("make", "match"), BAD_ARGS, ids=[m for _, m in BAD_ARGS])
def test_invalid_arguments_raise_value_error_naming_them(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_rejected_add_param_group_leaves_the_optimizer_unchanged():
    opt = samkit.SAM(_sgd())
    with pytest.raises(ValueError):
        opt.add_param_group({"params": _params(), "rho": -2.0})
    assert len(opt.param_groups) == 1 and len(opt.base_optimizer.param_groups) == 1


# ------------------------------------------------------------- davda54 form


@pytest.mark.parametrize("base", BASES, ids=lambda b: b.name)
@pytest.mark.parametrize("adaptive", [False, True])
def test_params_and_class_form_equals_instance_form(base, adaptive):
    x, y = make_data(5)
    rho = 0.5 if adaptive else 0.05
    m1, m2 = make_model(5), make_model(5)
    o1 = samkit.SAM(m1.parameters(), base.cls, rho=rho, adaptive=adaptive, **base.kwargs)
    o2 = samkit.SAM(base.cls(m2.parameters(), **base.kwargs), rho=rho, adaptive=adaptive)
    assert isinstance(o1.base_optimizer, base.cls)
    _run(o1, m1, x, y, 3, "closure")
    _run(o2, m2, x, y, 3, "closure")
    assert all_equal(params_of(m1), params_of(m2))
    assert state_equal(o1.state_dict(), o2.state_dict())


# -------------------------------------------------------------- schedulers


@pytest.mark.parametrize("kind", ["step", "onecycle", "cosine"])
@pytest.mark.parametrize("form", ["closure", "explicit"])
def test_lr_schedulers_drive_the_base_lr_without_warnings(kind, form):
    x, y = make_data(6)
    model, ref_model = make_model(6), make_model(6)
    base = BASE_BY_NAME["sgd_nesterov"]
    opt = METHOD_BY_NAME["sam"].make(base, model)
    ref = base.make([ref_model.parameters()])
    sched, ref_sched = _sched(kind, opt, 6), _sched(kind, ref, 6)
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for _ in range(5):
            _run(opt, model, x, y, 1, form)
            sched.step()
            ref.step()
            ref_sched.step()
            lrs.append(opt.base_optimizer.param_groups[0]["lr"])
            assert opt.base_optimizer.param_groups[0]["lr"] == ref.param_groups[0]["lr"]
            assert opt.base_optimizer.param_groups[0].get("momentum") == ref.param_groups[0].get(
                "momentum"
            )
    assert len(set(lrs)) > 1  # the lr did change


def test_add_param_group_gets_sam_defaults_and_is_stepped():
    model = make_model(8)
    x, y = make_data(8)
    extra = torch.nn.Linear(3, 3)
    opt = samkit.SAM(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        rho=0.07,
        eta=0.2,
        ascent_weight_decay=0.01,
    )
    opt.add_param_group({"params": extra.parameters(), "lr": 0.5})
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "rho": 0.0})
    g1, g2 = opt.param_groups[1], opt.param_groups[2]
    assert (g1["rho"], g1["eta"], g1["ascent_weight_decay"], g1["lr"], g1["momentum"]) == (
        0.07,
        0.2,
        0.01,
        0.5,
        0.9,
    )
    assert g2["rho"] == 0.0
    assert opt.param_groups is opt.base_optimizer.param_groups
    w = [p.detach().clone() for p in extra.parameters()]

    def closure():
        loss = loss_fn(model, x, y) + extra(y).square().mean()
        loss.backward()
        return loss

    opt.step(closure)
    assert all(not torch.equal(p, wi) for p, wi in zip(extra.parameters(), w))
    assert all("momentum_buffer" in opt.state[p] for p in extra.parameters())


# ---------------------------------------------------- closure conventions


# (the loss it returns is at w; no BatchNorm, whose statistics depend on the batch)
@pytest.mark.parametrize(
    "mode",
    methods(closure_kind="standard", needs_gradient=True, needs_norm_layer=False),
    ids=lambda m: m.name,
)
def test_gradient_accumulation_in_the_closure_equals_the_full_batch(mode):
    x, y = make_data(9, n=12)
    base = mode.base("adam")
    m_full, m_acc = mode.model(9), mode.model(9)
    o_full, o_acc = mode.make(base, m_full), mode.make(base, m_acc)
    for _ in range(3):
        with torch.no_grad():
            expected_loss = loss_fn(m_acc, x, y)
        full_loss = o_full.step(closure_for(o_full, m_full, x, y))
        o_full.zero_grad()

        def closure(n=3):
            total = torch.zeros(())
            for xb, yb in zip(x.chunk(n), y.chunk(n)):
                loss = loss_fn(m_acc, xb, yb) / n
                loss.backward()
                total += loss.detach()
            return total

        acc_loss = o_acc.step(closure)
        o_acc.zero_grad()
        torch.testing.assert_close(acc_loss, expected_loss)  # the first-pass loss, at w
        torch.testing.assert_close(full_loss.detach(), expected_loss)
    torch.testing.assert_close(params_of(m_acc), params_of(m_full), rtol=1e-5, atol=1e-6)


class _RecordingSGD(torch.optim.SGD):
    """SGD that records the global norm of the gradients it is given."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.norms: list[float] = []

    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.norms.append(
            float(
                torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            )
        )
        return super().step(closure)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("max_norm", [1e-3, 0.05, 1e3])
def test_max_grad_norm_bounds_the_gradient_given_to_the_base_step(foreach, max_norm):
    model = make_model(10)
    x, y = make_data(10)
    rec = _RecordingSGD(model.parameters(), lr=0.1)
    opt = samkit.SAM(rec, rho=0.05, max_grad_norm=max_norm, foreach=foreach)
    # what the base would get without clipping
    free_model = make_model(10)
    free = _RecordingSGD(free_model.parameters(), lr=0.1)
    _run(samkit.SAM(free, rho=0.05), free_model, x, y, 1, "closure")
    _run(opt, model, x, y, 1, "closure")
    assert rec.norms[0] <= max_norm * (1 + 1e-5)
    assert rec.norms[0] == pytest.approx(min(max_norm, free.norms[0]), rel=1e-5)


# ------------------------------------------------------------ protocol


def _pending_opt():
    model = make_model(11)
    x, y = make_data(11)
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    return opt, model, x, y


def test_protocol_misuse_raises():
    opt, model, x, y = _pending_opt()
    with pytest.raises(RuntimeError, match="second_step"):
        opt.second_step()
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    loss_fn(model, x, y).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="first_step"):
        opt.state_dict()
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step()
    loss_fn(model, x, y).backward()
    opt.step()  # completes the pending step (what GradScaler.step calls)
    assert opt.steps == 1 and not opt.perturbed
    opt.state_dict()


class _Boom(Exception):
    pass


def test_step_returns_the_first_pass_loss_and_counts():
    opt, model, x, y = _pending_opt()
    with torch.no_grad():
        expected = loss_fn(model, x, y)
    loss = opt.step(closure_for(opt, model, x, y))
    assert torch.equal(loss.detach(), expected)
    assert (opt.steps, opt.ascents) == (1, 1)


def test_skip_nonfinite_without_scaler_leaves_weights_and_state_untouched():
    model = make_model(13)
    x, y = make_data(13)
    opt = samkit.SAM(torch.optim.Adam(model.parameters(), lr=1e-2), rho=0.05, skip_nonfinite=True)
    _run(opt, model, x, y, 1, "closure")
    w, sd = params_of(model), roundtrip(opt.base_optimizer.state_dict())
    for which in (1, 2):  # NaN in the first pass, then in the second pass
        calls = []

        def closure(calls=calls, which=which):
            calls.append(1)
            loss = loss_fn(model, x, y)
            (loss * (float("nan") if len(calls) == which else 1.0)).backward()
            return loss

        opt.step(closure)
        opt.zero_grad()
        assert all_equal(params_of(model), w), which
        assert state_equal(opt.base_optimizer.state_dict(), sd), which
    _run(opt, model, x, y, 1, "closure")
    assert not all_equal(params_of(model), w)


# --------------------------------------------------------------- host sync


def test_tensor_scale_path_makes_no_host_read(monkeypatch):
    """The accelerator path of the ascent never reads a value back to the host.

    On CPU, ``functional.scale_for`` deliberately returns a Python float (a
    CPU 0-d tensor read is a memory load, not a device sync, and lets the add
    fuse the scale). Elsewhere it returns a tensor; here the tensor path is
    forced on CPU, and every way of reading a tensor to the host raises.
    """
    model = make_model(14)
    x, y = make_data(14)
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05, adaptive=True)
    ref_model = make_model(14)
    ref = samkit.SAM(torch.optim.SGD(ref_model.parameters(), lr=0.1), rho=0.05, adaptive=True)
    _run(ref, ref_model, x, y, 2, "explicit")

    def tensor_scale(rho, norm, eps):
        return rho / (norm + eps)

    def no_host_read(*a, **k):
        raise AssertionError("host read on the hot path")

    monkeypatch.setattr(functional, "scale_for", tensor_scale)
    for _ in range(2):
        loss_fn(model, x, y).backward()
        with monkeypatch.context() as m:
            for name in ("item", "__bool__", "__float__", "__int__", "__index__", "tolist"):
                m.setattr(torch.Tensor, name, no_host_read)
            assert opt.first_step(zero_grad=True)
        loss_fn(model, x, y).backward()
        with monkeypatch.context() as m:
            m.setattr(opt.base_optimizer, "step", lambda closure=None: None)
            for name in ("item", "__bool__", "__float__", "__int__", "__index__", "tolist"):
                m.setattr(torch.Tensor, name, no_host_read)
            opt.second_step()
        opt.base_optimizer.step()
        opt.zero_grad()
    # the tensor-scale path computes the same step (to rounding: it scales, then adds)
    torch.testing.assert_close(params_of(model), params_of(ref_model))


def test_repr_and_forwarding():
    opt, model, _, _ = _pending_opt()
    assert opt.state is opt.base_optimizer.state
    assert opt.defaults is opt.base_optimizer.defaults
    assert opt.defaults["rho"] == 0.05
    assert re.search(r"SAM\(rho=0\.05", repr(opt))


# ------------------------------------------------------------------ dtypes


@pytest.mark.parametrize("foreach", [True, False])
def test_float64_and_mixed_dtype_params(foreach):
    """One global norm across dtypes (grouped per dtype for the kernels); float64 is not narrowed."""
    g = torch.Generator().manual_seed(0)
    ps = [
        torch.nn.Parameter(torch.randn(3, generator=g, dtype=torch.float64)),
        torch.nn.Parameter(torch.randn(4, generator=g)),
        torch.nn.Parameter(torch.randn(2, generator=g).to(torch.bfloat16)),
        torch.nn.Parameter(torch.randn(2, generator=g, dtype=torch.float64)),
    ]
    targets = [torch.randn(p.shape, generator=g).to(p.dtype) for p in ps]
    opt = samkit.SAM(torch.optim.SGD(ps, lr=0.1), rho=0.05, foreach=foreach)

    def loss():
        return sum(((p - t).double() ** 2).sum() for p, t in zip(ps, targets))

    w = [p.detach().clone() for p in ps]
    loss().backward()
    grads = [p.grad.double() for p in ps]
    norm = torch.sqrt(sum((gr**2).sum() for gr in grads))
    assert opt.first_step(zero_grad=True)
    for p, wi, gr in zip(ps, w, grads):
        assert p.dtype == wi.dtype
        expected = (wi.double() + 0.05 * gr / norm).to(p.dtype)
        torch.testing.assert_close(
            p.detach(), expected, rtol=1e-6 if p.dtype == torch.float64 else 1e-2, atol=1e-6
        )
    loss().backward()
    opt.second_step()
    assert all(torch.isfinite(p).all() for p in ps)
    if foreach:
        twin = [torch.nn.Parameter(wi.clone()) for wi in w]
        ps2 = twin
        opt2 = samkit.SAM(torch.optim.SGD(ps2, lr=0.1), rho=0.05, foreach=False)
        closure_loss = lambda: sum(((p - t).double() ** 2).sum() for p, t in zip(ps2, targets))  # noqa: E731
        closure_loss().backward()
        opt2.first_step()
        closure_loss().backward()
        opt2.second_step()
        assert all_equal([p.detach() for p in ps2], [p.detach() for p in ps])


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_and_pickle_keep_the_base_optimizer(how):
    import pickle

    model = make_model(15)
    x, y = make_data(15)
    opt = METHOD_BY_NAME["asam"].make(BASE_BY_NAME["adam"], model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # installs a step wrapper
    _run(opt, model, x, y, 2, "closure")
    sched.step()
    bundle = {"model": model, "opt": opt}
    twin = copy.deepcopy(bundle) if how == "deepcopy" else pickle.loads(pickle.dumps(bundle))
    m2, o2 = twin["model"], twin["opt"]
    assert isinstance(o2.base_optimizer, torch.optim.Adam) and (o2.steps, o2.ascents) == (2, 2)
    assert o2.param_groups[0]["params"][0] is next(m2.parameters())
    _run(opt, model, x, y, 2, "closure")
    _run(o2, m2, x, y, 2, "closure")
    assert all_equal(params_of(model), params_of(m2))
    assert state_equal(opt.state_dict(), o2.state_dict())


@pytest.mark.parametrize(
    "mode", methods("supports_two_step", "needs_gradient"), ids=lambda m: m.name
)
def test_first_step_without_zero_grad_keeps_the_gradients(mode):
    x, y = make_data(16)
    m1, m2 = mode.model(16), mode.model(16)
    o1, o2 = mode.make(mode.base("sgd"), m1), mode.make(mode.base("sgd"), m2)
    for m in (m1, m2):
        loss_fn(m, x, y).backward()
    g = [p.grad.clone() for p in m2.parameters()]
    assert o1.first_step(zero_grad=True) == o2.first_step(zero_grad=False) == mode.ascends(0)
    if mode.ascends(0):  # (a step that does not ascend keeps the gradient for the base step)
        assert all(p.grad is None for p in m1.parameters())
    assert all_equal(
        [p.grad for p in m2.parameters()], g
    )  # untouched, though ASAM / wd work in place
    assert all_equal(params_of(m1), params_of(m2))  # the same ascent


def test_sparse_gradients_are_refused():
    emb = torch.nn.Embedding(5, 2, sparse=True)
    opt = samkit.SAM(torch.optim.SGD(emb.parameters(), lr=0.1), rho=0.05)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.first_step()


def test_sam_loads_a_plain_optimizer_state_dict():
    x, y = make_data(17)
    m_plain, m_sam = make_model(17), make_model(17)
    plain = torch.optim.Adam(m_plain.parameters(), lr=1e-2)
    for _ in range(2):
        plain.zero_grad()
        loss_fn(m_plain, x, y).backward()
        plain.step()
    m_sam.load_state_dict(m_plain.state_dict())
    opt = samkit.SAM(torch.optim.Adam(m_sam.parameters(), lr=1e-2), rho=0.03)
    opt.load_state_dict(roundtrip(plain.state_dict()))
    assert (
        opt.param_groups[0]["rho"] == 0.03 and opt.param_groups[0]["eta"] == 0.01
    )  # SAM keys restored
    assert opt.steps == 0
    assert state_equal(opt.base_optimizer.state_dict()["state"], plain.state_dict()["state"])
    _run(opt, m_sam, x, y, 1, "closure")


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


@pytest.mark.parametrize("name", ["rho", "eta", "ascent_weight_decay"])
def test_infinite_hyper_parameters_raise_value_error(name):
    p = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=name):
        samkit.SAM(torch.optim.SGD([p], lr=0.1), **{name: float("inf")})
    with pytest.raises(ValueError, match=name):
        samkit.SAM(torch.optim.SGD([{"params": [p], name: float("inf")}], lr=0.1))


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


# ----------------------------------------- defects found by new users (0.1)


TORCH_OPTIMIZERS_WITH_EPS = [
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adagrad,
    torch.optim.Adadelta,
    torch.optim.RMSprop,
]


@pytest.mark.parametrize("cls", TORCH_OPTIMIZERS_WITH_EPS, ids=lambda c: c.__name__)
def test_class_form_passes_eps_to_the_base_optimizer(cls):
    """SAM(params, Adam, eps=1e-5) used to take eps for itself (Adam kept 1e-8)."""
    opt = samkit.SAM(make_model(0).parameters(), cls, lr=0.01, eps=1e-5)
    assert opt.base_optimizer.defaults["eps"] == 1e-5
    assert opt.param_groups[0]["eps"] == 1e-5
    assert opt.ascent_eps == 1e-12


@pytest.mark.parametrize(
    "cls", [torch.optim.SGD, torch.optim.Adam, torch.optim.RMSprop], ids=lambda c: c.__name__
)
@pytest.mark.parametrize("foreach", [True, False])
def test_class_form_passes_foreach_to_the_base_optimizer_and_sam(cls, foreach):
    opt = samkit.SAM(make_model(0).parameters(), cls, lr=0.01, foreach=foreach)
    assert opt.base_optimizer.defaults["foreach"] is foreach
    assert opt.foreach is foreach


def test_class_form_with_a_name_both_take_is_refused():
    """Adadelta has its own rho: in the class form rho= would be ambiguous."""
    with pytest.raises(ValueError, match=r"Invalid rho value: both SAM and Adadelta take rho="):
        samkit.SAM(make_model(0).parameters(), torch.optim.Adadelta, rho=0.05)
    opt = samkit.SAM(
        make_model(0).parameters(), torch.optim.Adadelta, lr=1.0
    )  # not given: no ambiguity
    assert (opt.base_optimizer.defaults["rho"], opt.param_groups[0]["sam_rho"]) == (0.9, 0.05)


def test_a_base_optimizer_using_rho_itself_keeps_its_own_and_sam_uses_sam_rho():
    """Adadelta's group key "rho" is its decay: SAM used to read it (0.9) as the ascent radius."""
    model = make_model(1)
    x, y = make_data(1)
    base = torch.optim.Adadelta(model.parameters(), lr=1.0, rho=0.8)
    opt = samkit.SAM(base, rho=0.1)
    assert opt.rho_key == "sam_rho"
    assert [(g["rho"], g["sam_rho"]) for g in opt.param_groups] == [(0.8, 0.1)]
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    loss_fn(model, x, y).backward()
    assert opt.first_step()
    moved = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - w0
    assert float(moved.norm()) == pytest.approx(0.1, rel=1e-5)  # the radius is SAM's
    loss_fn(model, x, y).backward()
    opt.second_step()
    assert base.param_groups[0]["rho"] == 0.8  # Adadelta's decay untouched
    rho = samkit.ProportionalRho(opt, rho_max=0.2)  # schedules write SAM's key
    rho.step()
    assert (opt.param_groups[0]["rho"], opt.param_groups[0]["sam_rho"]) == (0.8, 0.2)


@pytest.mark.parametrize(
    "cls", [torch.optim.SGD, torch.optim.Adam, torch.optim.Adagrad], ids=lambda c: c.__name__
)
def test_class_form_passes_every_keyword_the_base_accepts(cls):
    import inspect

    values = {"lr": 0.0123, "weight_decay": 0.0456, "maximize": True, "differentiable": False}
    accepted = inspect.signature(cls.__init__).parameters
    given = {k: v for k, v in values.items() if k in accepted}
    opt = samkit.SAM(make_model(0).parameters(), cls, **given)
    for key, value in given.items():
        assert opt.base_optimizer.defaults[key] == value, key


def test_eps_on_the_instance_form_names_ascent_eps():
    with pytest.raises(ValueError, match="Invalid eps value: .*ascent_eps"):
        samkit.SAM(torch.optim.SGD(make_model(0).parameters(), lr=0.1), eps=1e-3)


def test_numpy_scalars_are_accepted_as_hyper_parameters():
    np = pytest.importorskip("numpy")
    x, y = make_data(2)
    runs = []
    for rho, k in ((np.float32(0.05), np.int64(2)), (float(np.float32(0.05)), 2)):
        model = make_model(2)
        opt = samkit.SAM(
            torch.optim.SGD(model.parameters(), lr=0.1), rho=rho, policy=samkit.EveryK(k)
        )
        _run(opt, model, x, y, 3, "closure")
        runs.append(params_of(model))
    assert all_equal(*runs)


def test_infinite_ascent_eps_is_refused():
    """eps=inf used to be accepted and silently turned the ascent off."""
    with pytest.raises(ValueError, match="Invalid ascent_eps value: inf"):
        samkit.SAM(torch.optim.SGD(make_model(0).parameters(), lr=0.1), ascent_eps=float("inf"))


def test_gradients_accumulated_before_step_closure_are_refused():
    """Micro-batches backpropagated outside the closure cannot be recomputed at w + e."""
    model = make_model(3)
    x, y = make_data(3)
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    w0 = params_of(model)
    loss_fn(model, x[:6], y[:6]).backward()  # micro-batch 1, outside the closure
    with pytest.raises(
        RuntimeError, match="accumulated before the step.*Accumulate inside the closure"
    ):
        opt.step(closure_for(opt, model, x[6:], y[6:]))
    assert all_equal(params_of(model), w0) and opt.steps == 0
    # zeros left by zero_grad(set_to_none=False) are no accumulation
    opt.zero_grad(set_to_none=False)
    opt.step(closure_for(opt, model, x, y))
    assert opt.steps == 1


def test_existing_grads_keep_adds_them_to_both_passes():
    """existing_grads="keep": a fixed gradient term c in both passes, by hand."""
    w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    c = torch.tensor([0.3, 0.1, -0.2], dtype=torch.float64)
    opt = samkit.SAM(torch.optim.SGD([w], lr=0.1), rho=0.2)

    def grad(v):  # of the closure's loss sum(v^4) / 4
        return v**3

    w0 = w.detach().clone()
    w.grad = c.clone()

    def closure():
        loss = (w**4).sum() / 4
        loss.backward()
        return loss

    opt.step(closure, existing_grads="keep")
    g1 = grad(w0) + c
    e = 0.2 * g1 / (g1.norm() + 1e-12)
    expected = w0 - 0.1 * (grad(w0 + e) + c)
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="Invalid existing_grads value"):
        opt.step(closure, existing_grads="ignore")


class _SecondOrderSGD(torch.optim.SGD):
    is_second_order = True


def test_second_order_base_optimizers_are_refused_clearly():
    with pytest.raises(
        ValueError, match="Invalid base_optimizer value: _SecondOrderSGD is second-order"
    ):
        samkit.SAM(_SecondOrderSGD(make_model(0).parameters(), lr=0.1))
    model = make_model(4)
    x, y = make_data(4)
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    w0 = params_of(model)

    def closure():
        loss = loss_fn(model, x, y)
        loss.backward(create_graph=True)
        return loss

    with pytest.raises(ValueError, match=r"backward\(create_graph=True\)"):
        opt.step(closure)
    assert all_equal(params_of(model), w0) and not opt.perturbed


def test_load_state_dict_mid_step_is_refused():
    model = make_model(5)
    x, y = make_data(5)
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    sd = opt.state_dict()
    loss_fn(model, x, y).backward()
    assert opt.first_step()
    with pytest.raises(RuntimeError, match="load_state_dict.. between first_step"):
        opt.load_state_dict(sd)
    opt.abort_step()


def test_perturbed_tells_the_closure_which_pass_it_is_in():
    model = make_model(6)
    x, y = make_data(6)
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    seen = []

    def closure():
        seen.append(opt.perturbed)
        return closure_for(opt, model, x, y)()

    opt.step(closure)
    assert seen == [False, True] and not opt.perturbed


# ------------------------------------------ torch's optimizer hooks, loading


def test_torch_optimizer_hooks_register_and_run_on_sam():
    """register_step_*/state_dict_*/load_state_dict_* hooks work as on a torch optimizer."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    calls = []
    handles = [
        opt.register_step_pre_hook(lambda o, a, k: calls.append("step_pre")),
        opt.register_step_post_hook(lambda o, a, k: calls.append("step_post")),
        opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre")),
        opt.register_state_dict_post_hook(lambda o, sd: {**sd, "tag": 1}),
        opt.register_load_state_dict_pre_hook(
            lambda o, sd: calls.append("load_pre") or {k: v for k, v in sd.items() if k != "tag"}
        ),
        opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post")),
    ]
    x, y = torch.randn(4, 3), torch.randn(4, 2)

    def closure():
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    sd = opt.state_dict()
    assert sd["tag"] == 1
    opt.load_state_dict(sd)
    assert calls == ["step_pre", "step_post", "sd_pre", "load_pre", "load_post"]
    for h in handles:
        h.remove()
    opt.zero_grad()
    opt.step(closure)
    assert "tag" not in opt.state_dict() and len(calls) == 5


def test_a_state_dict_of_sam_over_another_base_is_refused_clearly():
    """Adadelta keeps SAM's radius under "sam_rho" (its own "rho" is a decay): loading such
    a state dict into SAM over SGD must not read Adadelta's 0.9 as the radius."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randn(4, 2)

    def closure():
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    ada = samkit.SAM(torch.optim.Adadelta(model.parameters()), rho=0.05)
    ada.step(closure)
    sgd = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    with pytest.raises(ValueError, match="'sam_rho'.*another base optimizer"):
        sgd.load_state_dict(ada.state_dict())
    assert sgd.param_groups[0]["rho"] == 0.05
    with pytest.raises(ValueError, match="'rho'.*another base optimizer"):
        ada.load_state_dict(sgd.state_dict())
    assert ada.param_groups[0]["rho"] == 0.9 and ada.param_groups[0]["sam_rho"] == 0.05
    # SGD's state into Adam: torch's KeyError becomes a ValueError, nothing changes
    sgd_m = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.05)
    sgd_m.zero_grad()
    sgd_m.step(closure)
    adam = samkit.SAM(torch.optim.Adam(model.parameters(), lr=0.1), rho=0.05)
    adam.zero_grad()
    adam.step(closure)
    before = copy.deepcopy(adam.state_dict())
    with pytest.raises(ValueError, match="Adam cannot load it"):
        adam.load_state_dict(sgd_m.state_dict())
    after = adam.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert all(
        torch.equal(after["state"][i][k], v)
        for i, s in before["state"].items()
        for k, v in s.items()
    )


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda m: samkit.SAM(torch.optim.SGD, rho=0.05), "the class SGD, not an optimizer"),
        (lambda m: samkit.SAM(m, torch.optim.SGD, lr=0.1), r"pass model.parameters\(\)"),
        (
            lambda m: samkit.SAM(torch.optim.SGD(m.parameters(), lr=0.1), adaptive="yes"),
            "Invalid adaptive value: 'yes'",
        ),
    ],
)
def test_common_construction_mistakes_name_the_fix(make, match):
    with pytest.raises(ValueError, match=match):
        make(nn.Linear(2, 2))


def test_a_refused_construction_leaves_the_base_optimizer_as_it_was():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    base = torch.optim.SGD(
        [{"params": model[0].parameters()}, {"params": model[1].parameters(), "rho": -1.0}], lr=0.1
    )
    groups_before = [set(g) for g in base.param_groups]
    defaults_before = dict(base.defaults)
    with pytest.raises(ValueError, match=r"rho \(param group 1\)"):
        samkit.SAM(base, rho=0.05)
    assert [set(g) for g in base.param_groups] == groups_before
    assert base.defaults == defaults_before


@pytest.mark.parametrize("bad", [float("nan"), -0.05, float("inf"), 1e308])
def test_a_radius_set_to_nonsense_after_construction_is_refused_at_the_step(bad):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    opt.param_groups[0]["rho"] = bad
    w0 = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(4, 3), torch.randn(4, 2)

    def closure():
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(ValueError, match="Invalid rho value"):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters())) and not opt.perturbed


@pytest.mark.parametrize("base_name", ["sgd", "adam"])
def test_a_parameter_the_second_pass_does_not_reach_keeps_a_zero_gradient(base_name):
    """zero_grad(set_to_none=False) and a head unused after the first step: plain torch
    keeps stepping it with a zero gradient (momentum, weight decay, Adam's count); SAM
    must too, not drop it from the base step."""

    def make(model):
        if base_name == "sgd":
            return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
        return torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=0.01)

    torch.manual_seed(0)
    template = nn.ModuleDict({"body": nn.Linear(3, 3), "head": nn.Linear(3, 1)})
    x = torch.randn(8, 3)
    for rho in (0.0, 0.05):
        model = copy.deepcopy(template)
        opt = samkit.SAM(make(model), rho=rho)
        ref = copy.deepcopy(template)  # plain torch, rho = 0's exact counterpart
        base = make(ref)
        after_first = None
        for step in range(4):
            for o, m in ((opt, model), (base, ref)):
                o.zero_grad(set_to_none=False)

                def closure(m=m, step=step):
                    out = m["body"](x)
                    if step == 0:
                        out = m["head"](out)
                    loss = out.square().mean()
                    loss.backward()
                    return loss

                if o is opt:
                    opt.step(closure)
                else:
                    closure()
                    base.step()
            if step == 0:
                after_first = model["head"].weight.detach().clone()
        head = model["head"]
        assert head.weight.grad is not None and not head.weight.grad.any()  # a zero gradient
        assert not torch.equal(head.weight, after_first), "the head was dropped from the base step"
        if rho == 0.0:
            assert torch.equal(head.weight, ref["head"].weight)


# ------------------------------------------------------- silent wrong answers


def _linear_closure(model, x, y):
    def closure():
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    return closure


def test_a_radius_beyond_float32_is_refused_wherever_it_comes_in():
    """rho=1e308 gave NaN weights after one step: refused in the constructor, a new
    param group and a state dict, and the largest float32 itself is still a radius."""
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"Invalid rho value: 1e\+308 .*largest float32"):
        samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=1e308)
    with pytest.raises(ValueError, match=r"Invalid rho value: 1e\+39"):
        samkit.SAM(model.parameters(), torch.optim.SGD, lr=0.1, rho=1e39)
    samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=torch.finfo(torch.float32).max)
    opt = samkit.SAM(torch.optim.SGD([model.weight], lr=0.1), rho=0.05)
    with pytest.raises(ValueError, match=r"rho \(param group 1\) value: 1e\+308"):
        opt.add_param_group({"params": [model.bias], "rho": 1e308})
    sd = opt.state_dict()
    sd["param_groups"][0]["rho"] = 1e308
    with pytest.raises(ValueError, match=r"rho \(param group 0 of the state dict\) value: 1e\+308"):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["rho"] == 0.05
    with pytest.raises(ValueError, match=r"Invalid rho_max value: 1e\+308"):
        samkit.ProportionalRho(opt, rho_max=1e308)


def test_an_overflowing_radius_skips_the_step_with_a_warning_and_training_goes_on():
    """rho=1e30 is a float32, but the pass at w + e overflows: the step is skipped like
    one with a non-finite gradient (weights, state, scheduler untouched), with a warning."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.05)
    closure = _linear_closure(model, x, y)
    opt.step(closure)  # a momentum buffer for the skipped step to leave alone
    opt.param_groups[0]["rho"] = 1e30
    w, state = params_of(model), roundtrip(opt.base_optimizer.state_dict())
    with pytest.warns(RuntimeWarning, match=r"rho = 1e\+30 the gradient at w \+ e overflows"):
        opt.zero_grad()
        opt.step(closure)
    assert all_equal(params_of(model), w)
    assert state_equal(opt.base_optimizer.state_dict(), state)
    assert opt.steps == 2 and opt.ascents == 2
    # a disabled GradScaler checks nothing itself: the radius still asks for the check
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    with pytest.warns(RuntimeWarning, match="overflows"):
        opt.zero_grad()
        opt.step(closure, scaler=disabled)
    assert all_equal(params_of(model), w) and opt.steps == 3
    opt.param_groups[0]["rho"] = 0.05  # a sane radius trains on
    opt.zero_grad()
    opt.step(closure)
    assert not all_equal(params_of(model), w)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # skip_nonfinite=False opts out of every check: the overflow reaches the weights
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=1e30, skip_nonfinite=False)
    opt.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(closure)
    assert not all(torch.isfinite(p).all() for p in model.parameters())


def test_radii_up_to_checked_rho_make_no_host_read_for_the_guard(monkeypatch):
    """Only a radius above CHECKED_RHO pays for reading the pass at w + e."""
    from samkit.optim import sam as sam_module

    reads = []
    original = sam_module.SAM._nonfinite_grads
    monkeypatch.setattr(
        sam_module.SAM, "_nonfinite_grads", lambda self, g: reads.append(1) or original(self, g)
    )
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    closure = _linear_closure(model, torch.randn(4, 3), torch.randn(4, 2))
    for rho, expected in ((sam_module.CHECKED_RHO, 0), (2 * sam_module.CHECKED_RHO, 1)):
        reads.clear()
        opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=1e-9), rho=rho)
        opt.step(closure)
        opt.zero_grad()
        assert len(reads) == expected, rho


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"foreach": "x"}, r"Invalid foreach value: 'x' \(must be True, False or None\)"),
        ({"foreach": 1}, "Invalid foreach value: 1"),
        ({"skip_nonfinite": "yes"}, "Invalid skip_nonfinite value: 'yes'"),
    ],
)
def test_flags_are_booleans_not_truthy_values(kwargs, match):
    """foreach="x" was accepted (and repr showed foreach: None)."""
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=match):
        samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)
    with pytest.raises(ValueError, match=match):
        samkit.SAM(model.parameters(), torch.optim.SGD, lr=0.1, **kwargs)
    with pytest.raises(ValueError, match=r"Invalid scale_rho value: 'no'"):
        samkit.EveryK(2, scale_rho="no")
    with pytest.raises(ValueError, match=r"Invalid base_only value: 'yes'"):
        samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1)).load_state_dict({}, base_only="yes")
    samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), foreach=False, skip_nonfinite=True)


class _NeedsClosure(torch.optim.Optimizer):
    """An optimizer whose step evaluates the loss itself, like L-BFGS."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.1})

    def step(self, closure):
        return closure()


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda m: samkit.SAM(torch.optim.LBFGS(m.parameters()), rho=0.05), "LBFGS"),
        (lambda m: samkit.SAM(m.parameters(), torch.optim.LBFGS, lr=1.0), "LBFGS"),
        (lambda m: samkit.GSAM(torch.optim.LBFGS(m.parameters()), follow_lr=False), "LBFGS"),
        (lambda m: samkit.SAM(_NeedsClosure(m.parameters())), "_NeedsClosure"),
    ],
)
def test_a_base_optimizer_that_evaluates_the_loss_itself_is_refused(make, name):
    """SAM(LBFGS(...)) was accepted and failed at the first step with LBFGS's TypeError."""
    with pytest.raises(
        ValueError, match=rf"Invalid base_optimizer value: {name}: its step\(closure\)"
    ):
        make(nn.Linear(2, 2))


def test_a_closure_without_backward_is_refused_but_a_partly_unused_model_is_not():
    torch.manual_seed(0)
    model = nn.ModuleDict({"body": nn.Linear(3, 3), "head": nn.Linear(3, 1)})
    x = torch.randn(8, 3)
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    w = params_of(model)
    with pytest.raises(
        ValueError, match=r"Invalid closure value.*closure must call loss\.backward"
    ):
        opt.step(lambda: model["body"](x).square().mean())
    assert all_equal(params_of(model), w) and opt.steps == 0
    with pytest.raises(RuntimeError, match=r"first_step\(\): no parameter has a gradient"):
        opt.first_step()
    assert all_equal(params_of(model), w) and not opt.perturbed and opt.steps == 0

    def body_only():  # the head gets no gradient: a partly unused model is fine
        loss = model["body"](x).square().mean()
        loss.backward()
        return loss

    opt.step(body_only)
    assert opt.steps == 1 and model["head"].weight.grad is None
    assert not torch.equal(model["body"].weight, w[0]) and torch.equal(model["head"].weight, w[2])


def _momentum_state(opt):
    return [s["momentum_buffer"].clone() for s in opt.base_optimizer.state.values()]


def _linear_after_one_step():
    """A Linear model, its data and SAM over SGD (momentum, weight decay), one step taken."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    opt = samkit.SAM(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1), rho=0.05
    )
    opt.step(_linear_closure(model, x, y))
    return model, x, y, opt


@pytest.mark.parametrize("form", ["closure", "two_steps", "kept"])
def test_no_backward_at_w_plus_e_is_refused_with_the_weights_at_w(form):
    """A closure that skipped backward on its second call (`if not opt.perturbed:
    loss.backward()`) took a silent step of zero gradients: momentum and weight decay
    moved the weights, no error. Refused now, weights at w, no base step."""
    model, x, y, opt = _linear_after_one_step()
    opt.zero_grad()
    w, momentum = params_of(model), _momentum_state(opt)

    def at_w_only():
        loss = nn.functional.mse_loss(model(x), y)
        if not opt.perturbed:
            loss.backward()
        return loss

    with pytest.raises(ValueError, match=r"Invalid closure value: no gradient reached any"):
        if form == "closure":
            opt.step(at_w_only)
        elif form == "kept":  # gradients kept from before: the closure must still add to them
            nn.functional.mse_loss(model(x), y).backward()
            opt.step(at_w_only, existing_grads="keep")
        else:
            at_w_only()
            opt.first_step()
            nn.functional.mse_loss(model(x), y)  # forward at w + e, no backward
            opt.second_step()
    assert all_equal(params_of(model), w) and opt.steps == 1 and not opt.perturbed
    assert all(torch.equal(a, b) for a, b in zip(_momentum_state(opt), momentum))
    opt.zero_grad()
    opt.step(_linear_closure(model, x, y))  # and the optimizer goes on
    assert opt.steps == 2


def test_a_closure_without_backward_is_refused_after_zero_grad_keeping_zeros():
    """zero_grad(set_to_none=False) leaves zero gradients: a closure that never called
    backward passed the check (it looked only for None) and the weights moved."""
    model, x, y, opt = _linear_after_one_step()
    opt.zero_grad(set_to_none=False)
    w = params_of(model)
    with pytest.raises(ValueError, match=r"closure must call loss\.backward"):
        opt.step(lambda: nn.functional.mse_loss(model(x), y))
    assert all_equal(params_of(model), w) and opt.steps == 1
    opt.step(_linear_closure(model, x, y))  # zeros left in place, then a backward: fine
    assert opt.steps == 2 and not all_equal(params_of(model), w)


def test_sparse_gradients_left_as_zeros_are_refused_as_sparse():
    """A sparse gradient left by zero_grad(set_to_none=False) failed in count_nonzero with
    torch's NotImplementedError for SparseCPU instead of SAM's own refusal."""
    emb = nn.Embedding(10, 3, sparse=True)
    opt = samkit.SAM(torch.optim.SGD(emb.parameters(), lr=0.1), rho=0.05)

    def closure():
        loss = emb(torch.tensor([1, 2])).sum()
        loss.backward()
        return loss

    closure()
    opt.zero_grad(set_to_none=False)
    with pytest.raises(RuntimeError, match="SAM does not support sparse gradients"):
        opt.step(closure)


def test_a_state_dict_of_another_method_is_refused_and_its_base_part_loads_on_request():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    closure = _linear_closure(model, x, y)
    asam = samkit.SAM(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=2.0, adaptive=True
    )
    asam.step(closure)
    sd = roundtrip(asam.state_dict())
    assert sd["samkit"]["method"] == {
        "class": "SAM",
        "perturbation": "Adaptive",
        "policy": None,
        "mix": None,
        "rho": None,
    }
    sam = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.05)
    with pytest.raises(
        ValueError, match=r"written by SAM \(perturbation=Adaptive\), and this optimizer is SAM:"
    ):
        sam.load_state_dict(sd)
    assert sam.param_groups[0]["rho"] == 0.05 and sam.state == {}
    sam.load_state_dict(sd, base_only=True)
    assert sam.param_groups[0]["rho"] == 0.05 and sam.steps == 0
    assert state_equal(sam.base_optimizer.state_dict()["state"], sd["state"])
    # rho="auto"'s radius would become the fixed one; the other way round the
    # controller starts afresh (tests/test_autorho.py) and sets the radius itself
    auto = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho="auto")
    auto.load_state_dict(sam.state_dict())
    with pytest.raises(
        ValueError, match=r"written by SAM \(rho=\w+\), and this optimizer is SAM \(rho=LossEq"
    ):
        samkit.SAM(
            torch.optim.SGD(model.parameters(), lr=0.1), rho="auto:loss_equated"
        ).load_state_dict(auto.state_dict())
    with pytest.raises(ValueError, match=r"written by SAM \(rho=\w+\), and this optimizer is SAM:"):
        sam.load_state_dict(auto.state_dict())


def test_a_samkit_0_2_state_dict_without_its_method_loads_as_before():
    """State dicts written before the method was recorded: unknown writer, accepted."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    closure = _linear_closure(model, torch.randn(4, 3), torch.randn(4, 2))
    gsam = samkit.GSAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.1)
    gsam.step(closure)
    sd = roundtrip(gsam.state_dict())
    del sd["samkit"]["method"]
    twin = samkit.GSAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.1)
    twin.load_state_dict(sd)
    assert state_equal(twin.state_dict(), gsam.state_dict())
    sam = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.05)
    sam.load_state_dict(sd)  # as in 0.2: the groups (GSAM's radius) come with it
    assert sam.steps == 1 and sam.param_groups[0]["rho"] == gsam.param_groups[0]["rho"]
    sd["samkit"]["method"] = "GSAM"
    with pytest.raises(ValueError, match="samkit method entry 'GSAM' is not a dict"):
        sam.load_state_dict(sd)
