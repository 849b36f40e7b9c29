"""Mixed precision on CPU: bf16 autocast, and the fp16 GradScaler protocol.

torch 2.13 runs both ``torch.autocast("cpu", dtype=torch.float16)`` and
``torch.amp.GradScaler("cpu")``. The scaler tests use fp32 models without
autocast where they compare against an unscaled fp32 run: what is tested is the
scaling logic (unscale before the ascent's norm, unscale the second-pass
gradients, skip on overflow), and with a power-of-two scale the comparison is
exact up to the base optimizer's arithmetic.
"""

from __future__ import annotations

import pytest
import torch
from optim_registry import (
    BASE_BY_NAME,
    all_equal,
    loss_fn,
    make_data,
    make_model,
    params_of,
    roundtrip,
    state_equal,
)

import samkit

BASES = ["sgd_nesterov", "adam"]


def _sam(base_name, model, **kw):
    base = BASE_BY_NAME[base_name]
    return samkit.SAM(base.make([model.parameters()]), rho=kw.pop("rho", 0.05), **kw)


def _closure(model, x, y, scaler=None, poison=None):
    """Forward + backward; ``poison`` (a set of call numbers) multiplies those losses by inf."""
    calls = []

    def closure():
        calls.append(1)
        loss = loss_fn(model, x, y)
        out = loss * float("inf") if poison and len(calls) in poison else loss
        (scaler.scale(out) if scaler is not None else out).backward()
        return loss

    return closure


def _scaler(init=2.0**10):
    return torch.amp.GradScaler("cpu", init_scale=init, growth_interval=1000)


# ------------------------------------------------------------------- bf16


def test_bf16_autocast_trains():
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = torch.sin(x @ torch.tensor([[1.0], [-2.0], [0.5], [1.5]]))
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = samkit.SAM(torch.optim.Adam(model.parameters(), lr=3e-2), rho=0.05)

    def closure():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            assert out.dtype == torch.bfloat16
        loss = torch.nn.functional.mse_loss(out.float(), y)
        loss.backward()
        return loss

    losses = []
    for _ in range(40):
        losses.append(float(opt.step(closure).detach()))
        opt.zero_grad()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < 0.5 * losses[0], losses


def test_fp16_autocast_with_scaler_trains():
    torch.manual_seed(1)
    x = torch.randn(64, 4)
    y = torch.sin(x @ torch.tensor([[1.0], [-2.0], [0.5], [1.5]]))
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = samkit.SAM(torch.optim.Adam(model.parameters(), lr=3e-2), rho=0.05)
    scaler = torch.amp.GradScaler("cpu")

    def closure():
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(x)
            assert out.dtype == torch.float16
        loss = torch.nn.functional.mse_loss(out.float(), y)
        scaler.scale(loss).backward()
        return loss

    losses = []
    for _ in range(40):
        losses.append(float(opt.step(closure, scaler=scaler).detach()))
        scaler.update()
        opt.zero_grad()
    assert losses[-1] < 0.5 * losses[0], losses
    assert opt.ascents > 30  # most steps did the ascent (a few may overflow at scale 2**16)


# ------------------------------------------------------------ GradScaler


def _fp32_run(base_name, steps, **kw):
    model = make_model(0)
    x, y = make_data(0)
    opt = _sam(base_name, model, **kw)
    for _ in range(steps):
        opt.step(_closure(model, x, y))
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("form", ["closure", "explicit", "explicit_unscale"])
@pytest.mark.parametrize(
    "kw",
    [{}, {"max_grad_norm": 0.05}, {"rho": 0.0}, {"adaptive": True, "rho": 0.5}],
    ids=["l2", "clip", "rho0", "asam"],
)
def test_scaled_step_equals_unscaled_fp32(base, form, kw):
    ref_model, ref_opt = _fp32_run(base, 3, **dict(kw))
    model = make_model(0)
    x, y = make_data(0)
    opt = _sam(base, model, **dict(kw))
    scaler = _scaler()
    for _ in range(3):
        if form == "closure":
            opt.step(_closure(model, x, y, scaler), scaler=scaler)
        else:
            scaler.scale(loss_fn(model, x, y)).backward()
            if opt.first_step(zero_grad=True, scaler=scaler):
                scaler.scale(loss_fn(model, x, y)).backward()
                if form == "explicit_unscale":
                    scaler.unscale_(opt)  # where a user would clip themselves
            elif form == "explicit_unscale":
                # already unscaled by first_step, and the scaler knows it
                with pytest.raises(RuntimeError, match="unscale_"):
                    scaler.unscale_(opt)
            scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert scaler.get_scale() == 2.0**10
    torch.testing.assert_close(params_of(model), params_of(ref_model), rtol=1e-6, atol=1e-7)
    assert (opt.steps, opt.ascents) == (ref_opt.steps, ref_opt.ascents)


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("form", ["closure", "explicit"])
@pytest.mark.parametrize("bad_pass", [1, 2])
@pytest.mark.parametrize("skip_nonfinite", [None, False])
def test_overflow_skips_the_step_and_backs_off_the_scale(base, form, bad_pass, skip_nonfinite):
    """skip_nonfinite=False: SAM does not look, the ascent goes to NaN, the restore is still exact
    and the scaler (which sees the second pass) skips the base step."""
    model = make_model(0)
    x, y = make_data(0)
    opt = _sam(base, model, skip_nonfinite=skip_nonfinite)
    scaler = _scaler()
    opt.step(_closure(model, x, y, scaler), scaler=scaler)  # one good step: non-trivial state
    scaler.update()
    opt.zero_grad()
    w, state = params_of(model), roundtrip(opt.base_optimizer.state_dict())
    scale = scaler.get_scale()

    closure = _closure(model, x, y, scaler, poison={bad_pass})
    if form == "closure":
        opt.step(closure, scaler=scaler)
    else:
        closure()
        if opt.first_step(zero_grad=True, scaler=scaler):
            closure()
        else:
            assert bad_pass == 1 and skip_nonfinite is None
        scaler.step(opt)
    assert all_equal(params_of(model), w)
    assert state_equal(opt.base_optimizer.state_dict(), state)
    scaler.update()
    assert scaler.get_scale() == scale / 2
    assert opt.steps == 2 and not opt._pending
    opt.zero_grad()

    # and training goes on
    opt.step(_closure(model, x, y, scaler), scaler=scaler)
    scaler.update()
    assert not all_equal(params_of(model), w)
    assert scaler.get_scale() == scale / 2


def test_disabled_scaler_is_a_plain_step():
    ref_model, _ = _fp32_run("adam", 2)
    model = make_model(0)
    x, y = make_data(0)
    opt = _sam("adam", model)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for _ in range(2):
        opt.step(_closure(model, x, y, scaler), scaler=scaler)
        scaler.update()
        opt.zero_grad()
    assert all_equal(params_of(model), params_of(ref_model))


@pytest.mark.parametrize("bad_pass", [1, 2])
def test_skip_nonfinite_without_scaler(bad_pass):
    model = make_model(0)
    x, y = make_data(0)
    opt = _sam("adam", model, skip_nonfinite=True)
    opt.step(_closure(model, x, y))
    opt.zero_grad()
    w, state = params_of(model), roundtrip(opt.base_optimizer.state_dict())
    loss = opt.step(_closure(model, x, y, poison={bad_pass}))
    assert torch.isfinite(loss)  # the returned loss is the un-poisoned one
    assert all_equal(params_of(model), w)
    assert state_equal(opt.base_optimizer.state_dict(), state)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_lr_scheduler_with_scaler_has_no_order_warning():
    import warnings

    model = make_model(0)
    x, y = make_data(0)
    opt = _sam("sgd_nesterov", model)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    scaler = _scaler()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            opt.step(_closure(model, x, y, scaler), scaler=scaler)
            scaler.update()
            opt.zero_grad()
            sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] < BASE_BY_NAME["sgd_nesterov"].lr


# ------------------------------------------- GradScaler internals, pinned


class _Recording(torch.optim.SGD):
    """An optimizer declaring _step_supports_amp_scaling, recording what GradScaler sets."""

    _step_supports_amp_scaling = True

    def step(self, closure=None):
        self.seen = (getattr(self, "grad_scale", None), getattr(self, "found_inf", None))


def test_grad_scaler_internals_samkit_relies_on():
    """samkit/optim/_amp.py is the only file touching GradScaler internals; this
    pins what it relies on in the installed torch, so an upgrade that changes
    them fails here, loudly, instead of making SAM's fp16 steps silently wrong."""
    from samkit.optim import _amp

    where = f"torch {torch.__version__} changed GradScaler; review samkit/optim/_amp.py"
    grad_scaler = torch.amp.grad_scaler
    assert {s.name for s in grad_scaler.OptState} >= {"READY", "UNSCALED", "STEPPED"}, where
    w = torch.nn.Parameter(torch.ones(3))
    opt = _Recording([w], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(torch.ones(()))  # the scale tensor is created lazily, as in training
    # 1. step() of an optimizer with _step_supports_amp_scaling gets grad_scale and
    #    found_inf as attributes (not a grad_scaler kwarg), removed afterwards
    w.grad = torch.full((3,), 4.0)
    scaler.step(opt)
    grad_scale, found_inf = opt.seen
    assert isinstance(grad_scale, torch.Tensor) and float(grad_scale) == 4.0, where
    assert isinstance(found_inf, torch.Tensor) and float(found_inf) == 0.0, where
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf"), where
    scaler.update()
    scaler.scale(torch.ones(()))
    # 2. the per-optimizer state is a dict with "stage" and "found_inf_per_device";
    #    marking it UNSCALED makes unscale_ refuse and step use the recorded flags
    w.grad = torch.full((3,), 4.0)
    found, per_device = _amp.unscale_([w.grad], scaler)
    assert torch.equal(w.grad, torch.ones(3)) and float(found) == 0.0
    _amp.mark_unscaled(scaler, opt, per_device, force_overflow=True)
    state = scaler._per_optimizer_states[id(opt)]
    assert state["stage"] is grad_scaler.OptState.UNSCALED, where
    with pytest.raises(RuntimeError, match="unscale_"):
        scaler.unscale_(opt)
    scaler.step(opt)
    grad_scale, found_inf = opt.seen
    assert grad_scale is None and float(found_inf) == 1.0, where  # our flags, no second scale
    scaler.update()
    assert scaler.get_scale() == 2.0, where  # the forced overflow backed the scale off
    # 3. the closure form is refused by the scaler itself (why SAM takes scaler=)
    with pytest.raises(RuntimeError, match="Closure use is not currently supported"):
        scaler.step(opt, closure=lambda: None)


# ------------------------------------------------------ a step inside autocast
_AUTOCAST_METHODS = {
    "sam": lambda params: samkit.SAM(torch.optim.SGD(params, lr=0.1), rho=0.5),
    # steps that decline the ascent move the weights too (the base step)
    "every_k": lambda params: samkit.SAM(
        torch.optim.SGD(params, lr=0.1), rho=0.5, policy=samkit.EveryK(2)
    ),
    "momentum_sam": lambda params: samkit.MomentumSAM(
        torch.optim.SGD(params, lr=0.1, momentum=0.9), rho=0.5
    ),
}


def _autocast_run(method: str, where: str, rho_zero: bool = False) -> list[torch.Tensor]:
    """``where``: autocast in the closure only ("inner"), around each step too ("step"), or one
    block around the whole loop ("loop"); the closure's own block is then a no-op."""
    import contextlib

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    opt = _AUTOCAST_METHODS[method](model.parameters())
    if rho_zero:
        for group in opt.param_groups:
            group[opt.rho_key] = 0.0
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731

    def loss() -> torch.Tensor:
        with autocast():
            return torch.nn.functional.cross_entropy(model(x).float(), y)

    def closure() -> torch.Tensor:
        value = loss()
        value.backward()
        return value

    def step() -> None:
        if method == "momentum_sam":  # one pass, at w + e
            opt.first_step(zero_grad=True)
            loss().backward()
            opt.second_step(zero_grad=True)
        else:
            opt.step(closure)
            opt.zero_grad()

    outer = autocast() if where == "loop" else contextlib.nullcontext()
    with outer:
        for _ in range(5):
            with autocast() if where == "step" else contextlib.nullcontext():
                step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("method", list(_AUTOCAST_METHODS))
@pytest.mark.parametrize("where", ["step", "loop"])
def test_a_step_inside_autocast_is_the_step_autocast_in_the_closure(method, where):
    """Autocast keeps low-precision copies of the weights until its outermost block exits;
    0.3 took the pass at w + e on the copies of w inside one: SAM at rho 0.5 gave the base
    optimizer's weights bit for bit. SAM drops the copies wherever it moves the weights."""
    inner = _autocast_run(method, "inner")
    assert not all_equal(inner, _autocast_run(method, "inner", rho_zero=True))  # SAM did something
    assert all_equal(_autocast_run(method, where), inner)
