"""The laws every method of the SAM family obeys, run over one list of method infos.

``optim_registry.METHODS`` lists each method (SAM and its modes, the
perturbations, the policies, the mixes, the rho controllers, ESAM, K-SAM, mSAM, ...)
with its closure kind and the capabilities it declares; ``BASES`` the base
optimizers. Each law below runs over every method declaring what the law needs
(``methods(...)``), and no law skips at run time, so a new method gets the whole
battery by adding one entry:

* rho = 0 is the base optimizer, bit for bit;
* the weights come back bit for bit, from buffers allocated once;
* the foreach kernels give the per-tensor path's bits;
* resume from a state dict is the run that never stopped;
* BatchNorm statistics come from the unperturbed passes only;
* an exception in the second pass restores the weights and the step can be retried;
* a zero gradient is a zero perturbation, never NaN;
* bad arguments raise ValueError naming them; a bad state dict changes nothing;
* a GradScaler gives the unscaled run's steps and skips overflowed ones (or
  is refused with a clear error, where the method cannot support one);
* each declared capability is the library's, and every public class has an entry.

What is particular to a method (its update against a hand computation) is in
its own test file; DDP replicas are in tests/test_ddp.py.
"""

from __future__ import annotations

import copy
import inspect
import re
import sys
import warnings

import pytest
import torch
from optim_registry import (
    BASE_BY_NAME,
    BASES,
    HORIZON,
    METHOD_BY_NAME,
    METHODS,
    all_equal,
    make_data,
    method_base_pairs,
    methods,
    params_of,
    roundtrip,
    state_equal,
)

import samkit
from samkit.optim import _fsdp


def _pairs(infos, bases=BASES):
    """Each method with each of ``bases`` it supports, as pytest params."""
    return [pytest.param(m, b, id=f"{m.name}-{b.name}") for m, b in method_base_pairs(infos, bases)]


def _names(info):
    return info.name


COMBOS = _pairs(methods())
TWO_BASES = [BASE_BY_NAME["sgd_nesterov"], BASE_BY_NAME["adam"]]
COMBOS2 = _pairs(methods(), TWO_BASES)
STEPS = 4


def _train(info, opt, model, x, y, steps=STEPS, form="closure", sched=None):
    for _ in range(steps):
        info.step(opt, model, x, y, form)
        if sched is not None:
            sched.step()


# ------------------------------------------------------------------- rho = 0


# mSAM averages micro-batch gradients, K-SAM steps on the top-k samples: their own files
@pytest.mark.parametrize(("info", "base"), _pairs(methods("rho_zero_is_base")))
def test_rho_zero_is_exactly_the_base_optimizer(info, base):
    x, y = make_data(4)
    ref_model = info.model(4)
    ref = base.make(info.groups(ref_model, 0.0))
    for _ in range(STEPS):
        ref.zero_grad()
        loss = info.base_loss(ref_model, x, y)
        loss.backward()
        if "max_grad_norm" in info.kwargs:
            torch.nn.utils.clip_grad_norm_(
                list(ref_model.parameters()), info.kwargs["max_grad_norm"]
            )
        ref.step()
    for form in info.forms:
        model = info.model(4)
        opt = info.make(base, model, rho=0.0)
        _train(info, opt, model, x, y, form=form)
        assert all_equal(params_of(model), params_of(ref_model)), form
        assert state_equal(opt.base_optimizer.state_dict()["state"], ref.state_dict()["state"]), (
            form
        )
        assert (opt.steps, opt.ascents) == (STEPS, 0)


# ------------------------------------------------------------ exact restore


@pytest.mark.parametrize(("info", "base"), COMBOS)
def test_weights_come_back_exactly_from_buffers_allocated_once(info, base, monkeypatch):
    model = info.model(3)
    x, y = make_data(3)
    opt = info.make(base, model)
    _train(info, opt, model, x, y, steps=1)  # the base optimizer's state (Momentum-SAM's momentum)
    monkeypatch.setattr(opt.base_optimizer, "step", lambda closure=None: None)
    w0 = params_of(model)
    moved = []
    original_first_step = opt.first_step

    def spy(*args, **kwargs):
        ascended = original_first_step(*args, **kwargs)
        moved.append(ascended and not all_equal(params_of(model), w0))
        return ascended

    monkeypatch.setattr(opt, "first_step", spy)
    buffers: dict[int, int] = {}
    for form in info.forms:
        for _ in range(4):
            _train(info, opt, model, x, y, steps=1, form=form)
            assert all_equal(params_of(model), w0), form
            now = {id(k): v.data_ptr() for k, v in opt._backups.items()}
            assert {k: now[k] for k in buffers} == buffers, "a backup buffer was reallocated"
            buffers = now
    assert opt.ascents > 0 and any(moved), "the ascent never moved the weights"
    assert not opt.perturbed


# ------------------------------------------------------- foreach == for-loop


@pytest.mark.parametrize(("info", "base"), COMBOS)
def test_foreach_equals_the_per_tensor_path_bit_for_bit(info, base):
    x, y = make_data(5)
    runs = []
    for foreach in (True, False):
        model = info.model(5)
        opt = info.make(base, model, foreach=foreach)
        _train(info, opt, model, x, y)
        runs.append((params_of(model), opt.state_dict()))
    assert all_equal(runs[0][0], runs[1][0])
    assert state_equal(runs[0][1], runs[1][1])


# --------------------------------------------------------------------- resume


@pytest.mark.parametrize(("info", "base"), COMBOS)
def test_resume_from_a_state_dict_is_the_run_that_never_stopped(info, base):
    total, k = 6, 3
    x, y = make_data(7)

    def run(model, steps, opt=None, sched=None):
        opt = opt or info.make(base, model)
        sched = sched or torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        _train(info, opt, model, x, y, steps=steps, sched=sched)
        return opt, sched

    ref_model = info.model(7)
    ref_opt, _ = run(ref_model, total)

    model = info.model(7)
    opt, sched = run(model, k)
    ckpt = roundtrip(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}
    )
    assert ckpt["opt"]["samkit"]["steps"] == k

    model2 = info.model(99)  # other weights: everything must come from the checkpoint
    model2.load_state_dict(ckpt["model"])
    opt2 = info.make(base, model2)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.5)
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    run(model2, total - k, opt2, sched2)
    run(model, total - k, opt, sched)  # saving did not disturb the original

    assert all_equal(params_of(model2), params_of(ref_model))
    assert all_equal(params_of(model), params_of(ref_model))
    assert state_equal(opt2.state_dict(), ref_opt.state_dict())


# ---------------------------------------------------------------- BatchNorm


@pytest.mark.parametrize("info", methods(), ids=_names)
def test_batchnorm_statistics_come_from_the_unperturbed_passes_only(info):
    """With ``model=``, the running statistics after each step are those of the
    first pass at ``w`` (one forward per micro-batch), whatever the method does after.

    A method whose only pass is at ``w + e`` (Momentum-SAM) takes them from
    that pass: the twin runs at the weights the step's first forward saw."""
    from optim_registry import make_model

    model = make_model(6, bn=True)
    x, y = make_data(6)
    opt = info.make(info.base("sgd_nesterov"), model, model=model)
    bn = model[1]
    seen: list[list[torch.Tensor]] = []
    model.register_forward_pre_hook(lambda m, args: seen.append(params_of(m)))
    for _ in range(STEPS):
        twin = copy.deepcopy(model)
        seen.clear()
        info.step(opt, model, x, y)
        if info.needs_gradient:
            assert all_equal(seen[0], params_of(twin)), "the first forward was not at w"
        with torch.no_grad():
            for p, w in zip(twin.parameters(), seen[0]):
                p.copy_(w)
            for xb in x.chunk(info.micro_batches):
                twin(xb)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(bn, name), getattr(twin[1], name)), name
        assert bn.track_running_stats
    assert opt.ascents > 0


# ----------------------------------------------------------------- failures


class _Boom(Exception):
    pass


@pytest.mark.parametrize("info", methods(), ids=_names)
def test_exception_in_the_second_pass_restores_and_the_step_can_be_retried(info):
    from optim_registry import make_model

    model = make_model(8, bn=True)
    x, y = make_data(8)
    opt = info.make(info.base("adam"), model, model=model)
    ascending = info.ascent_step(at_least=2)  # a step with a second pass, after state to restore
    _train(info, opt, model, x, y, steps=ascending)
    w, state = params_of(model), roundtrip(opt.state_dict())
    inner = info.closure(model, x, y)
    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) == info.second_pass_call:  # the pass at w + e
            raise _Boom
        return inner(*args)

    with pytest.raises(_Boom):  # (no second pass: the declared ascent on this step is wrong)
        opt.step(failing)
    assert len(calls) == info.second_pass_call
    assert all_equal(params_of(model), w)
    assert state_equal(roundtrip(opt.state_dict())["state"], state["state"])
    assert not opt.perturbed and model[1].track_running_stats
    opt.zero_grad()
    _train(info, opt, model, x, y, steps=1)  # and training goes on
    assert opt.steps == ascending + 1


@pytest.mark.parametrize("info", methods(), ids=_names)
def test_zero_gradient_is_a_zero_perturbation_never_nan(info):
    model = info.model(9)
    for p in model.parameters():
        p.requires_grad_(True)
    x = torch.zeros(12, 4)
    opt = info.make(info.base("sgd"), model)
    w0 = params_of(model)

    def flat_closure(*args):
        out = model(x).sum() * 0.0
        if info.closure_kind == "per_sample":
            return out.expand(x.shape[0] if args[0] is None else len(args[0])).clone()
        out.backward()
        return out

    for _ in range(3):
        opt.step(flat_closure)
        opt.zero_grad()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all_equal(params_of(model), w0)


@pytest.mark.parametrize(
    ("info", "kwargs", "match"),
    [
        pytest.param(m, kw, match, id=f"{m.name}-{match}")
        for m in methods("bad_args")
        for kw, match in m.bad_args
    ],
)
def test_bad_arguments_raise_value_error_naming_them(info, kwargs, match):
    model = info.model(0)
    with pytest.raises(ValueError, match=match):
        info.make(info.base("sgd"), model, **kwargs)


@pytest.mark.parametrize("info", methods(), ids=_names)
@pytest.mark.parametrize(
    "corrupt",
    ["group_rho", "steps", "group_count", "samkit_entry", "lr_type"],
)
def test_a_bad_state_dict_is_refused_and_changes_nothing(info, corrupt):
    model = info.model(10)
    x, y = make_data(10)
    opt = info.make(info.base("adam"), model)
    _train(info, opt, model, x, y, steps=2)
    before = roundtrip(opt.state_dict())
    sd = roundtrip(opt.state_dict())
    sd["param_groups"][0]["lr"] = 1e6  # valid alone: must not stay after a refused load
    if corrupt == "group_rho":
        sd["param_groups"][-1]["rho"] = -1.0
    elif corrupt == "steps":
        sd["samkit"]["steps"] = "many"
    elif corrupt == "group_count":
        sd["param_groups"] = sd["param_groups"][:1]
    elif corrupt == "samkit_entry":
        sd["samkit"] = ["not", "a", "dict"]
    else:
        sd["param_groups"][1]["lr"] = "fast"
    with pytest.raises(ValueError, match="Invalid"):
        opt.load_state_dict(sd)
    assert state_equal(roundtrip(opt.state_dict()), before)
    # and the next steps are those of an optimizer that never saw the bad dict
    twin_model = info.model(10)
    twin_model.load_state_dict(model.state_dict())
    twin = info.make(info.base("adam"), twin_model)
    twin.load_state_dict(before)
    _train(info, opt, model, x, y, steps=2)
    _train(info, twin, twin_model, x, y, steps=2)
    assert all_equal(params_of(model), params_of(twin_model))


@pytest.mark.parametrize("info", methods(), ids=_names)
def test_loading_a_plain_torch_state_dict_keeps_each_groups_rho(info):
    model = info.model(11)
    base = info.base("sgd_nesterov")
    opt = info.make(base, model)
    rhos = [g["rho"] for g in opt.param_groups]
    plain = base.make(info.groups(info.model(11)))
    for g in plain.param_groups:
        g.pop("rho", None)
    opt.load_state_dict(plain.state_dict())
    assert [g["rho"] for g in opt.param_groups] == rhos


# ------------------------------------------------------------ huge radii


@pytest.mark.parametrize("info", methods(), ids=_names)
def test_a_radius_beyond_float32_is_refused(info):
    """rho=1e308 gave NaN weights after one step, with no error."""
    model = info.model(0)
    with pytest.raises(ValueError, match=r"Invalid rho\S* value: 1e\+308"):
        info.make(info.base("sgd"), model, rho=1e308)


@pytest.mark.parametrize("info", methods(), ids=_names)
def test_an_overflowing_perturbation_never_gives_nan_weights(info):
    """A radius within float32 whose pass at w + e overflows (1e30 on this tiny MLP):
    such a step is skipped, weights and state untouched, with a warning (never NaN
    weights, which the step after one such step gave)."""
    model = info.model(14)
    x, y = make_data(14)
    opt = info.make(info.base("adam"), model, rho=1e30)
    warned = 0
    for _ in range(STEPS):
        w, state = params_of(model), roundtrip(opt.base_optimizer.state_dict()["state"])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            info.step(opt, model, x, y)
        assert all(torch.isfinite(p).all() for p in model.parameters())
        ours = [c for c in caught if "the gradient at w + e overflows" in str(c.message)]
        if ours:
            assert re.search(r"rho = [\d.]+e\+(29|30)", str(ours[0].message))
            assert issubclass(ours[0].category, RuntimeWarning)
            assert all_equal(params_of(model), w)
            assert state_equal(opt.base_optimizer.state_dict()["state"], state)
            warned += 1
    # (NormOnly perturbs BatchNorm's affine weights only, which Tanh saturates: finite)
    assert warned or info.needs_norm_layer, "no step overflowed: the test needs a larger rho"


# ------------------------------------------------------ closures and grads


@pytest.mark.parametrize("info", methods(closure_kind="standard"), ids=_names)
def test_a_closure_that_never_calls_backward_is_refused(info):
    """A closure without backward() made a counted step that moved nothing."""
    model = info.model(15)
    x, y = make_data(15)
    opt = info.make(info.base("adam"), model)
    _train(info, opt, model, x, y, steps=2)  # state to leave untouched
    w, state = params_of(model), roundtrip(opt.base_optimizer.state_dict())
    for closure in (lambda: info.base_loss(model, x, y), lambda: torch.tensor(1.0)):
        with pytest.raises(
            ValueError, match=r"Invalid closure value.*must call loss\.backward\(\)"
        ):
            opt.step(closure)
        assert all_equal(params_of(model), w) and not opt.perturbed and opt.steps == 2
        assert state_equal(roundtrip(opt.base_optimizer.state_dict()), state)
    _train(info, opt, model, x, y, steps=1)  # and training goes on
    assert opt.steps == 3


@pytest.mark.parametrize("info", methods("supports_two_step", "needs_gradient"), ids=_names)
def test_first_step_without_any_gradient_is_refused(info):
    model = info.model(16)
    opt = info.make(info.base("sgd"), model)
    w = params_of(model)
    with pytest.raises(RuntimeError, match=r"no parameter has a gradient.*loss\.backward\(\)"):
        opt.first_step()
    assert all_equal(params_of(model), w) and not opt.perturbed and opt.steps == 0
    with pytest.raises(RuntimeError, match="without first_step"):
        opt.second_step()


# ------------------------------------------------- state dicts across methods


@pytest.mark.parametrize("info", methods(), ids=_names)
def test_another_methods_state_dict_is_refused_unless_base_only(info):
    """SAM(rho=0.05) became rho=3 after loading a Momentum-SAM's state dict, silently."""
    x, y = make_data(17)
    writer_model = info.model(17)
    writer = info.make(info.base("adam"), writer_model)
    _train(info, writer, writer_model, x, y, steps=2)
    sd = roundtrip(writer.state_dict())
    assert sd["samkit"]["method"] == writer.method
    model = info.model(17)
    groups = info.groups(model)
    for g in groups:
        g.pop("rho", None)
    loader = samkit.SAM(info.base("adam").make(groups), rho=0.01)
    if loader.method == writer.method:  # the same method with other settings: torch's rule
        loader.load_state_dict(sd)
        assert [g["rho"] for g in loader.param_groups] == [g["rho"] for g in writer.param_groups]
        return
    before = roundtrip(loader.state_dict())
    with pytest.raises(ValueError, match=rf"written by {type(writer).__name__}.*base_only=True"):
        loader.load_state_dict(sd)
    assert state_equal(roundtrip(loader.state_dict()), before)
    loader.load_state_dict(sd, base_only=True)
    assert [g["rho"] for g in loader.param_groups] == [0.01] * len(groups)
    assert loader.steps == 0 and loader.method == before["samkit"]["method"]
    assert state_equal(loader.base_optimizer.state_dict()["state"], sd["state"])
    assert [g["lr"] for g in loader.param_groups] == [g["lr"] for g in sd["param_groups"]]


# -------------------------------------------------------------- GradScaler


def _scaler():
    return torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)


@pytest.mark.parametrize(("info", "base"), COMBOS2)
def test_grad_scaler_gives_the_unscaled_steps(info, base):
    x, y = make_data(12)
    ref_model = info.model(12)
    ref = info.make(base, ref_model)
    _train(info, ref, ref_model, x, y)
    model = info.model(12)
    opt = info.make(base, model)
    scaler = _scaler()
    if not info.supports_scaler:
        with pytest.raises(ValueError, match="Invalid scaler value"):
            info.step(opt, model, x, y, scaler=scaler)
        assert all_equal(params_of(model), params_of(info.model(12)))
        return
    for i in range(STEPS):
        info.step(opt, model, x, y, form=info.forms[i % len(info.forms)], scaler=scaler)
        scaler.update()
    assert scaler.get_scale() == 2.0**10
    # a power-of-two scale unscales exactly: only the base step's rounding differs
    torch.testing.assert_close(params_of(model), params_of(ref_model), rtol=1e-6, atol=1e-7)
    assert (opt.steps, opt.ascents) == (ref.steps, ref.ascents)


@pytest.mark.parametrize("info", methods("supports_scaler"), ids=_names)
@pytest.mark.parametrize("bad_pass", ["first", "second"])
def test_grad_scaler_overflow_skips_the_step_and_backs_off(info, bad_pass):
    model = info.model(13)
    x, y = make_data(13)
    opt = info.make(info.base("adam"), model)
    scaler = _scaler()
    for _ in range(info.ascent_step(at_least=2)):  # good steps: non-trivial state; this one ascends
        info.step(opt, model, x, y, scaler=scaler)
        scaler.update()
    w, state, scale = (
        params_of(model),
        roundtrip(opt.base_optimizer.state_dict()),
        scaler.get_scale(),
    )
    rho_state = roundtrip(opt.state_dict()["samkit"]["rho"])
    ascents = opt.ascents
    call = info.first_pass_call if bad_pass == "first" else info.second_pass_call
    opt.step(info.closure(model, x, y, scaler=scaler, poison={call}), scaler=scaler)
    if bad_pass == "second":  # the declared ascent: there was a pass at w + e to poison
        assert opt.ascents == ascents + 1
    assert all_equal(params_of(model), w)
    if bad_pass == "first" or opt.rho_controller is None:
        assert state_equal(opt.base_optimizer.state_dict(), state)
    else:
        # The first pass was finite: a rho controller may have set this step's
        # radius from it (the group's rho); the base optimizer's own state is untouched.
        assert state_equal(
            _without_sam_keys(opt, opt.base_optimizer.state_dict()), _without_sam_keys(opt, state)
        )
    if bad_pass == "first":  # a rho controller learnt nothing from the non-finite gradient
        assert state_equal(opt.state_dict()["samkit"]["rho"], rho_state)
    scaler.update()
    assert scaler.get_scale() == scale / 2
    opt.zero_grad()
    info.step(opt, model, x, y, scaler=scaler)  # and training goes on
    assert not all_equal(params_of(model), w)


def _without_sam_keys(opt, state_dict):
    keys = set(opt.group_keys.values())
    groups = [{k: v for k, v in g.items() if k not in keys} for g in state_dict["param_groups"]]
    return {**state_dict, "param_groups": groups}


# ----------------------------------------------------------- the registry

# Public classes with no entry of their own, and why (kept exported: checked below).
NOT_IN_REGISTRY = {
    "Perturbation": "the abstract base of perturbations",
    "Policy": "the abstract base of policies",
    "Mix": "the abstract base of mixes",
    "RhoController": "the abstract base of rho controllers",
    "AdaptivePolicy": "the deprecated name of GradNormTrigger (grad_norm_trigger's entry)",
}


def _public_classes():
    """Every optimizer class samkit and samkit.optim export, and every public perturbation,
    policy, mix and rho controller."""
    pieces = (
        torch.optim.Optimizer,
        samkit.Perturbation,
        samkit.Policy,
        samkit.Mix,
        samkit.RhoController,
    )
    out = {}
    for module in (samkit, samkit.optim):
        for name in module.__all__:
            obj = getattr(module, name)
            if isinstance(obj, type) and issubclass(obj, pieces):
                out[name] = obj
    return out


def test_every_public_class_of_samkit_is_in_the_registry():
    """A new optimizer class or piece exported by samkit must get a registry entry (and so
    every law); an entry builds the class itself, not only a subclass or a parent of it."""
    built = set()
    for info in METHODS:
        opt = info.make(info.base("sgd"), info.model(0))
        built.add(type(opt))
        for piece in (opt.perturbation, opt.policy, opt.mix, opt.rho_controller):
            while piece is not None:
                built.add(type(piece))
                piece = getattr(piece, "inner", None)
    public = _public_classes()
    assert set(NOT_IN_REGISTRY) <= set(public), "an exemption names a class that is gone"
    assert issubclass(samkit.AdaptivePolicy, samkit.GradNormTrigger)
    assert {k for k in vars(samkit.AdaptivePolicy) if not k.startswith("__")} == set()
    missing = {name for name, cls in public.items() if cls not in built}
    assert sorted(missing - set(NOT_IN_REGISTRY)) == [], "no registry entry builds these"
    assert missing == set(NOT_IN_REGISTRY), "an exempted class has an entry now: drop the exemption"
    optimizers = {name for name, cls in public.items() if issubclass(cls, torch.optim.Optimizer)}
    assert {"SAM", "GSAM", "LookSAM", "ESAM", "MicroBatchSAM", "MomentumSAM", "KSAM"} <= optimizers


def _laws():
    """(module, law, argnames, argvalues) of every parametrized law of the registry's batteries."""
    modules = [sys.modules[__name__]]
    for name in ("test_sam", "test_compile"):
        modules.append(__import__(name))
    for module in modules:
        for law_name, law in inspect.getmembers(module, inspect.isfunction):
            if law_name.startswith("test_"):
                for mark in getattr(law, "pytestmark", []):
                    if mark.name == "parametrize":
                        yield module.__name__, law_name, mark.args[0], list(mark.args[1])


def test_no_law_has_an_empty_parametrization():
    """pytest would skip such a law with "got empty parameter set": a method could escape it
    silently. (methods() already refuses to select none.)"""
    laws = list(_laws())
    assert len({(m, name) for m, name, _, _ in laws}) >= 30  # the scan sees the batteries
    empty = [f"{m}::{name}[{argnames}]" for m, name, argnames, values in laws if not values]
    assert empty == [], "these laws run over no method"


@pytest.mark.parametrize("info", methods(), ids=_names)
def test_each_declared_capability_is_the_librarys(info):
    """What a method declares is what samkit does: its ascent's source, FSDP2's verdict
    (refused before any weight moves, or accepted), a closed-form ascent being plain SAM."""
    model = info.model(0)
    opt = info.make(info.base("sgd"), model)
    assert info.needs_gradient == opt.perturbation.needs_gradient
    verdict = (opt.mix, opt.perturbation, None, type(opt).__name__)
    if info.supports_fsdp2:
        _fsdp.check_supported(*verdict)
    else:
        with pytest.raises(ValueError, match=r"Invalid (mix|perturbation) value.*FSDP2"):
            _fsdp.check_supported(*verdict)
    plain = (
        type(opt) is samkit.SAM
        and opt.policy is None
        and opt.mix is None
        and opt.rho_controller is None
        and type(opt.perturbation) in (samkit.L2, samkit.Adaptive)
    )
    assert info.closed_form_ascent == plain
    assert all(info.supports(info.base(b)) for b in ("sgd", "adam"))


@pytest.mark.parametrize("info", methods(), ids=_names)
def test_each_method_ascends_on_the_steps_it_declares(info):
    """The step pattern the laws read (an exception in, or an overflow of, the pass at
    w + e needs a step that has one) is the method's, step by step."""
    model = info.model(18)
    x, y = make_data(18)
    opt = info.make(info.base("adam"), model)
    ascended = []
    for _ in range(HORIZON):
        before = opt.ascents
        info.step(opt, model, x, y)
        ascended.append(opt.ascents > before)
    assert ascended == [info.ascends(step) for step in range(HORIZON)], info.ascends
    assert any(ascended)


# The study's methods (samkit compare) that are a registry method, by the study's name.
STUDY_NAMES = {
    "sam": "sam",
    "asam": "asam",
    "fisher_sam": "fisher",
    "sam_on": "norm_only",
    "swp": "random_subset",
    "sam_every_k": "every_k",
    "rst": "rst",
    "ae_sam": "grad_norm_trigger",
    "late_sam": "late",
    "gsam": "gsam",
    "looksam": "looksam",
    "esam": "esam",
    "msam": "msam",
    "momentum_sam": "momentum_sam",
    "momentum_sam_late": "momentum_sam_late",
    "asam_every_k": "every_k_asam",
    "ksam": "ksam",
    "vsam": "vsam",
}
NOT_A_SAM_METHOD = {"sgd", "adam", "saf", "mesa"}  # a base optimizer, or a loss term (SAF, MESA)


@pytest.mark.parametrize("study_name", sorted(STUDY_NAMES))
def test_the_study_declares_what_the_registry_does(study_name):
    """samkit.experiments' capability flags and this registry's agree (the study said GSAM and
    LookSAM could not take a GradScaler while this battery ran its GradScaler laws on both)."""
    from samkit.experiments.methods import list_methods, method_info

    assert set(list_methods()) >= set(STUDY_NAMES) | NOT_A_SAM_METHOD
    study, info = method_info(study_name), METHOD_BY_NAME[STUDY_NAMES[study_name]]
    assert study.supports_scaler == info.supports_scaler
    assert study.per_sample_loss == (info.closure_kind == "per_sample")


def test_every_sam_method_of_the_study_is_in_the_registry():
    from samkit.experiments.methods import list_methods

    assert set(list_methods()) - NOT_A_SAM_METHOD <= set(STUDY_NAMES)
