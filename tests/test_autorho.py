"""Self-tuning rho (samkit.optim.autorho): each controller against a hand computation.

The laws every SAM method obeys (resume, foreach, DDP replicas, compile, bad
arguments, GradScaler...) run over ``rho="auto"`` and each controller through
their entries in tests/optim_registry.py. Here: what each controller computes,
from the formulas of its docstring (LE-SAM, arXiv 2605.10183; the validation
rules), written out independently of samkit in float64.
"""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
from distributed_harness import load, run_scenarios
from torch import nn

import samkit
from samkit.optim import autorho

# ------------------------------------------------------------------ problem


def _problem(seed: int = 0, groups: tuple[float, ...] | None = None, lr: float = 0.1, base=None):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    params = list(model.parameters())
    if groups is None:
        param_groups = [{"params": params}]
    else:
        param_groups = [
            {"params": params[:2], "rho": groups[0]},
            {"params": params[2:], "rho": groups[1]},
        ]
    base = (base or torch.optim.SGD)(param_groups, lr=lr)
    return model, base


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 3, generator=g), torch.randn(8, 2, generator=g)


def _closure(model, x, y):
    def closure():
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    return closure


def _grad_norm(model: nn.Module, x, y) -> float:
    """||g|| at the model's current weights, in float64, by plain autograd on a copy."""
    twin = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    twin.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    loss = nn.functional.mse_loss(twin(x.double()), y.double())
    grads = torch.autograd.grad(loss, list(twin.parameters()))
    return math.sqrt(sum(float((g * g).sum()) for g in grads))


def _perturbation(model: nn.Module, opt: samkit.SAM, x, y) -> float:
    """||e||: run the first pass and first_step, read w + e - w, then undo the step."""
    w = [p.detach().clone() for p in model.parameters()]
    _closure(model, x, y)()
    assert opt.first_step()
    e = math.sqrt(
        sum(float(((p.detach() - q).double() ** 2).sum()) for p, q in zip(model.parameters(), w))
    )
    opt.abort_step()
    opt.zero_grad()
    return e


# --------------------------------------------------------------- the names


def test_auto_builds_the_default_controller_and_asam_starts_at_its_own_default():
    model, base = _problem()
    opt = samkit.SAM(base, rho="auto")
    assert type(opt.rho_controller) is autorho.CONTROLLERS[autorho.DEFAULT_CONTROLLER]
    assert opt.rho_controller.initial_rho == opt.param_groups[0]["rho"] == 0.05
    model, base = _problem()
    asam = samkit.SAM(base, rho="auto", adaptive=True)
    assert asam.rho_controller.initial_rho == 0.5 and isinstance(asam.perturbation, samkit.Adaptive)
    for name, cls in autorho.CONTROLLERS.items():
        model, base = _problem()
        assert type(samkit.SAM(base, rho=f"auto:{name}").rho_controller) is cls


@pytest.mark.parametrize("bad", ["Auto", "auto:", "auto:fast", "0.05", "", "auto:loss_equated:x"])
def test_a_bad_rho_string_is_refused_naming_rho(bad):
    model, base = _problem()
    with pytest.raises(ValueError, match="Invalid rho value"):
        samkit.SAM(base, rho=bad)


def test_the_class_form_refuses_a_bad_rho_string_before_building_the_base_optimizer(monkeypatch):
    built = []
    monkeypatch.setattr(torch.optim.SGD, "__init__", lambda *a, **k: built.append(1))
    with pytest.raises(ValueError, match="Invalid rho value: 'atuo'"):
        samkit.SAM(nn.Linear(2, 2).parameters(), torch.optim.SGD, rho="atuo", lr=0.1)
    assert built == []


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: samkit.GSAM(torch.optim.SGD(ps, lr=0.1), rho="auto"),
        lambda ps: samkit.LookSAM(torch.optim.SGD(ps, lr=0.1), rho="auto", k=2),
        lambda ps: samkit.ESAM(torch.optim.SGD(ps, lr=0.1), rho="auto", gamma=0.5),
        lambda ps: samkit.MicroBatchSAM(torch.optim.SGD(ps, lr=0.1), rho="auto"),
        lambda ps: samkit.SAM(torch.optim.SGD(ps, lr=0.1), rho="auto", policy=samkit.EveryK(2)),
    ],
    ids=["gsam", "looksam", "esam", "msam", "every_k"],
)
def test_the_variants_take_rho_auto(make):
    opt = make(nn.Linear(2, 2).parameters())
    assert isinstance(opt.rho_controller, autorho.AutoRho)


# ------------------------------------------------------------------- LE-SAM


@pytest.mark.parametrize("sigma", [0.003, 0.5])
def test_loss_equated_radius_is_the_budget_over_the_gradient_norm(sigma):
    """rho_t = min(sigma / (||g_t|| + 1e-12), rho_max), so g.e = rho_t ||g|| = sigma when not capped."""
    model, base = _problem()
    opt = samkit.SAM(base, rho=samkit.LossEquated(sigma=sigma, rho_max=0.3, anneal=None))
    for step in range(3):
        x, y = _batch(step)
        norm = _grad_norm(model, x, y)
        expected = min(sigma / (norm + 1e-12), 0.3)
        assert _perturbation(model, opt, x, y) == pytest.approx(expected, rel=1e-5)
        assert opt.param_groups[0]["rho"] == pytest.approx(expected, rel=1e-6)
        opt.step(_closure(model, x, y))
        opt.zero_grad()
    assert (sigma / norm < 0.3) == (sigma == 0.003)  # one case is capped, one is not


def test_loss_equated_calibrates_its_budget_then_anneals_it_with_the_lr():
    """sigma = rho_0 * mean ||g|| over the calibration steps; sigma_t = sigma * lr_t / lr_0."""
    model, base = _problem(lr=0.0)  # the weights stay put: the gradients differ by batch only
    ctrl = samkit.LossEquated(0.04, calibration_steps=3, rho_max=10.0, anneal="lr")
    opt = samkit.SAM(base, rho=ctrl)
    norms = []
    for step in range(3):
        x, y = _batch(step)
        norms.append(_grad_norm(model, x, y))
        rho = opt.param_groups[0]["rho"]
        opt.step(_closure(model, x, y))
        opt.zero_grad()
        if step < 2:
            assert opt.param_groups[0]["rho"] == 0.04 and ctrl.sigma is None
    sigma = 0.04 * sum(norms) / 3
    assert ctrl.sigma == pytest.approx(sigma, rel=1e-6)
    assert opt.param_groups[0]["rho"] == pytest.approx(sigma / norms[2], rel=1e-5)
    opt.param_groups[0]["lr"] = 0.0  # lr_0 was 0: no annealing is possible (and no division by 0)
    x, y = _batch(3)
    assert _perturbation(model, opt, x, y) == pytest.approx(
        sigma / _grad_norm(model, x, y), rel=1e-5
    )
    del rho

    model, base = _problem(lr=0.2)
    opt = samkit.SAM(base, rho=samkit.LossEquated(sigma=0.01, rho_max=10.0, anneal="lr"))
    opt.param_groups[0]["lr"] = 0.05  # a quarter of lr_0
    x, y = _batch(0)
    assert _perturbation(model, opt, x, y) == pytest.approx(
        0.25 * 0.01 / _grad_norm(model, x, y), rel=1e-5
    )


def test_loss_equated_defaults_follow_the_paper_and_samkits_radius():
    ctrl = samkit.LossEquated()
    model, base = _problem()
    samkit.SAM(base, rho=ctrl)
    assert (ctrl.initial_rho, ctrl.rho_max, ctrl.calibration_steps, ctrl.anneal) == (
        0.05,
        0.5,
        200,
        None,
    )


# ------------------------------------------------------ gradient agreement


def _agreement_reference(
    grads: list[list[torch.Tensor]], ctrl_kw: dict, reports=None
) -> list[float]:
    """The radius GradientAgreement writes at each step, from its docstring, in float64:
    the strided sketch, c_t = cos(sketch_t, sketch_{t-1}), the bias-corrected EMA, q against
    its best after the warm-up, the banded drive integrated into log rho, clipped."""
    kw = {"rho": 0.05, "q0": 0.6, "q1": 0.9, "rate": 0.01, "down": 0.25, "low": 0.2}
    kw.update({"high": 20.0, "beta": 0.98, "warmup": 50, "sketch": 4096, **ctrl_kw})
    total = sum(g.numel() for g in grads[0])
    stride = -(-total // kw["sketch"])
    flat_index = list(range(0, total, stride))[: kw["sketch"]]
    log_rho, ema, seen, peak, last, out = 0.0, 0.0, 0, None, None, []
    for gs in grads:
        flat = torch.cat([g.reshape(-1) for g in gs]).double()
        vec = flat[flat_index]
        if last is not None:
            cos = float(vec @ last) / math.sqrt(float(vec @ vec) * float(last @ last))
            ema = kw["beta"] * ema + (1 - kw["beta"]) * cos
            seen += 1
            if seen >= kw["warmup"]:
                current = ema / (1 - kw["beta"] ** seen)
                peak = current if peak is None else max(peak, current)
        last = vec
        if peak is not None and peak >= kw.get("min_agreement", 0.05):
            q = max(ema / (1 - kw["beta"] ** seen) / peak, 1e-3)
            if q < kw["q0"]:
                drive = math.log(kw["q0"] / q)
            elif q > kw["q1"]:
                drive = math.log(kw["q1"] / q) * (1.0 if log_rho > 0 else kw["down"])
            else:
                drive = 0.0
            log_rho += kw["rate"] * drive
            log_rho = min(max(log_rho, math.log(kw["low"])), math.log(kw["high"]))
        out.append(kw["rho"] * math.exp(log_rho))
    return out


@pytest.mark.parametrize("sketch", [4096, 8])
def test_gradient_agreement_follows_its_formula(sketch):
    """Real SAM steps; the first-pass gradients recorded; the radius each step used against the
    float64 reference (sketch=8 strides over the 26 weights: every 4th, across tensors)."""
    kw = {"warmup": 2, "rate": 0.3, "beta": 0.5, "sketch": sketch}
    model, base = _problem(4, lr=0.3)
    opt = samkit.SAM(base, rho=samkit.GradientAgreement(0.05, **kw))
    grads, used = [], []
    for step in range(40):
        x, y = _batch(step % 7)  # batches that repeat: agreement comes and goes
        seen = []

        def closure(x=x, y=y, seen=seen):
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            seen.append([p.grad.detach().clone() for p in model.parameters()])
            return loss

        opt.step(closure)
        grads.append(seen[0])
        used.append(opt.param_groups[0]["rho"])
        opt.zero_grad()
    expected = _agreement_reference(grads, kw)
    assert used == pytest.approx(expected, rel=1e-4)
    moves = [b - a for a, b in zip(used, used[1:])]
    assert max(moves) > 0 > min(moves)  # it went both ways here


class _Stub:
    """What GradientAgreement reads of a step: the gradients, on one replica."""

    distributed = local = False
    sharding = process_group = None

    def __init__(self, grads):
        self._grads = grads

    def grads(self):
        return self._grads

    def params(self):  # the same tensors at every step, as a model's
        return _STUB_PARAMS[: len(self._grads)]


_STUB_PARAMS = [torch.zeros(1) for _ in range(8)]


def test_gradient_agreement_reads_each_sketch_norm_once_with_the_same_bits(monkeypatch):
    """A sketch's squared norm is read when it is the new sketch and reused when it is the
    last one (two dots a step, not three): the agreement is bit for bit the one that reads
    it again, through a comparison with a resumed sketch and one after a non-finite step."""
    g = torch.Generator().manual_seed(5)
    shared = torch.randn(700, generator=g)
    grads = [shared + torch.randn(700, generator=g) for _ in range(40)]
    grads[25] = grads[25].clone()
    grads[25][0] = float("inf")  # (a sketch coordinate)
    cached = samkit.GradientAgreement(0.05, warmup=2, rate=0.5, sketch=256)
    fresh = samkit.GradientAgreement(0.05, warmup=2, rate=0.5, sketch=256)
    calls = []
    dot = torch.dot
    monkeypatch.setattr(torch, "dot", lambda a, b: calls.append(1) or dot(a, b))
    for i, grad in enumerate(grads):
        if i == 12:  # resumed: the last sketch comes back as numbers, its norm unread
            cached.load_state_dict(cached.state_dict())
        calls.clear()
        rho = cached.next_rho(_Stub([grad]))
        if i in (0, 26):  # nothing to compare with (the first step, the one after inf)
            assert calls == []
        elif i in (1, 12, 27):  # the last sketch's norm not read yet (first, resumed, after inf)
            assert len(calls) == 3
        else:
            assert len(calls) == 2
        fresh._last_sq = None  # forget it: three dots every step
        assert rho == fresh.next_rho(_Stub([grad]))
        assert cached.agreement == fresh.agreement and cached.peak == fresh.peak
    assert cached.seen == fresh.seen == 37  # 39 comparisons but the inf one and the next


def test_gradient_agreement_covers_its_whole_range_both_ways():
    """Batches that stop agreeing take the radius from 0.05 to 20x within 500 steps; batches
    that agree as at their best bring it back to the start, then to 0.2x (the slow way)."""
    ctrl = samkit.GradientAgreement(0.05)
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(300, generator=g)
    rhos = []
    for step in range(4200):
        if step < 200:  # learning: a shared direction plus a little noise
            grad = shared + 0.3 * torch.randn(300, generator=g)
        elif step < 700:  # memorising: each batch its own direction
            grad = torch.randn(300, generator=g)
        else:  # every batch agrees again
            grad = shared.clone()
        rhos.append(ctrl.next_rho(_Stub([grad])))
    assert rhos[199] == pytest.approx(0.05, rel=0.05)  # held while batches agree as usual
    assert max(rhos[200:700]) == pytest.approx(1.0)  # up to 20x
    assert next(i for i, r in enumerate(rhos) if r > 0.999) < 700  # within 500 steps
    back = next(i for i, r in enumerate(rhos) if i > 700 and r < 0.05)
    assert 700 + 2000 < back < 700 + 3500  # back below the start in ~2,800 steps (docstring)
    ctrl2 = samkit.GradientAgreement(0.05, down=1.0)
    for _ in range(2000):
        rho = ctrl2.next_rho(_Stub([shared.clone()]))
    assert rho == pytest.approx(0.01)  # the floor, 0.2x


def test_gradient_agreement_sketch_strides_over_tensors_shorter_than_the_stride():
    """Every 5th of 9 coordinates: the third tensor (offset 6, length 3) holds none of them
    (the stride's next one, 10, is past it), as an FSDP2 shard or a small bias may."""
    ctrl = samkit.GradientAgreement(sketch=2)
    grads = [torch.arange(5.0), torch.tensor([7.0]), torch.tensor([1.0, 2.0, 3.0])]
    assert ctrl._read(_Stub(grads))[0].tolist() == [0.0, 7.0]  # coordinates 0 and 5


def test_gradient_agreement_learns_without_reports_and_does_not_warn(recwarn):
    runs = []
    for rho in (samkit.GradientAgreement(0.05, warmup=1, rate=0.5), 0.05):
        model, base = _problem(3)
        opt = samkit.SAM(base, rho=rho)
        _steps(opt, model, 1200)
        runs.append([p.detach().clone() for p in model.parameters()])
    assert not all(torch.equal(a, b) for a, b in zip(*runs))
    assert not [w for w in recwarn if issubclass(w.category, samkit.NoValidationWarning)]


def test_gradient_agreement_raises_its_radius_on_a_validation_plateau():
    """With reports, each plateau multiplies the radius by factor on top of the agreement rule
    (which a huge warm-up keeps out of the way here)."""
    model, base = _problem()
    ctrl = samkit.GradientAgreement(0.05, warmup=10_000, factor=2.0, patience=1)
    opt = samkit.SAM(base, rho=ctrl)
    used = _train_with_reports(opt, model, [1.0, 0.9, 0.95, 0.8, 0.85, 0.9])
    assert used == pytest.approx([0.05, 0.05, 0.05, 0.1, 0.1, 0.2, 0.4])


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"q0": 0.95, "q1": 0.9}, "q0/q1"),
        ({"q1": 1.5}, "q0/q1"),
        ({"low": 2.0}, "low/high"),
        ({"high": 0.5}, "low/high"),
        ({"beta": 1.0}, "beta"),
        ({"rate": 0.0}, "rate"),
        ({"sketch": 1}, "sketch"),
        ({"warmup": -1}, "warmup"),
        ({"factor": 0.5}, "factor"),
        ({"down": -0.1}, "down"),
        ({"min_agreement": 0.0}, "min_agreement"),
        ({"min_agreement": 1.0}, "min_agreement"),  # a cosine's average never reaches it
        ({"tol": 1.0}, "tol"),  # every report would be a plateau
    ],
)
def test_gradient_agreement_refuses_bad_arguments_naming_them(kw, match):
    with pytest.raises(ValueError, match=match):
        samkit.GradientAgreement(**kw)


def test_gradient_agreement_state_resumes_the_same_radii_and_refuses_a_bad_sketch():
    def run(split: int | None):
        model, base = _problem(5)
        opt = samkit.SAM(base, rho=samkit.GradientAgreement(0.05, warmup=1, rate=0.5, sketch=8))
        used = []
        for step in range(20):
            if step == split:
                sd = opt.state_dict()
                model2, base2 = _problem(5)
                model2.load_state_dict(model.state_dict())
                model = model2
                opt = samkit.SAM(
                    base2, rho=samkit.GradientAgreement(0.05, warmup=1, rate=0.5, sketch=8)
                )
                opt.load_state_dict(sd)
            opt.step(_closure(model, *_batch(step % 5)))
            used.append(opt.param_groups[0]["rho"])
            opt.zero_grad()
        return used, opt

    straight, opt = run(None)
    assert run(9)[0] == straight  # bit for bit
    assert len(set(straight)) > 5
    sd = opt.state_dict()
    assert len(sd["samkit"]["rho"]["previous"]) == 8
    sd["samkit"]["rho"]["previous"] = [0.0] * 7
    with pytest.raises(ValueError, match="previous has 7 numbers"):
        opt.load_state_dict(sd)


# --------------------------------------------------------- validation rules


def _train_with_reports(opt, model, reports):
    """One step, then one report, per value; return rho as each step used it."""
    used = []
    for step, loss in enumerate(reports):
        x, y = _batch(step)
        opt.step(_closure(model, x, y))
        used.append(opt.param_groups[0]["rho"])
        opt.zero_grad()
        opt.observe_validation(loss)
    x, y = _batch(len(reports))
    opt.step(_closure(model, x, y))
    used.append(opt.param_groups[0]["rho"])
    return used


def test_validation_plateau_raises_rho_after_patience_reports_without_improvement():
    reports = [1.0, 0.9, 0.95, 0.92, 0.8999, 0.85, 0.86, 0.87, 0.88, 0.84]
    # hand computation: best 1.0, 0.9 (better); 0.95 bad 1; 0.92 bad 2 -> x1.5, reset; 0.8999 is not
    # 0.1 % better than 0.9: bad 1; 0.85 best; 0.86 bad 1; 0.87 bad 2 -> x1.5; 0.88 bad 1; 0.84 best
    rho = 0.05
    expected = [
        rho,
        rho,
        rho,
        rho,
        rho * 1.5,
        rho * 1.5,
        rho * 1.5,
        rho * 1.5,
        rho * 2.25,
        rho * 2.25,
        rho * 2.25,
    ]
    model, base = _problem()
    opt = samkit.SAM(base, rho=samkit.ValidationPlateau(rho, factor=1.5, patience=2, tol=1e-3))
    assert _train_with_reports(opt, model, reports) == pytest.approx(expected, rel=1e-12)


def test_validation_plateau_stops_at_its_ceiling():
    model, base = _problem()
    opt = samkit.SAM(base, rho=samkit.ValidationPlateau(0.1, factor=2.0, patience=1, rho_max=0.3))
    used = _train_with_reports(opt, model, [1.0, 1.0, 1.0, 1.0])
    assert used == pytest.approx([0.1, 0.1, 0.2, 0.3, 0.3])


def test_validation_search_moves_against_the_second_difference_of_the_validation_loss():
    c, s, rho = 1.5, 1.15, 0.05
    reports = [1.0, 0.8, 0.7, 0.66, 0.6, 0.59, 0.5]
    # hand computation: no probe before the first report, then arm +1, flipping at every
    # report; deltas d_k = v_k - v_{k-1}; from the 4th report on, the estimate
    # arm_k (d_k - 2 d_{k-1} + d_{k-2}) moves the centre against its sign
    center, arm, deltas, expected = rho, 0.0, [], [rho]
    for k, v in enumerate(reports):
        if k > 0:
            deltas.append(v - reports[k - 1])
        if len(deltas) >= 3:
            estimate = arm * (deltas[-1] - 2 * deltas[-2] + deltas[-3])
            center = min(max(center * (s if estimate < 0 else 1 / s), rho / 8), rho * 8)
        arm = -arm if arm else 1.0
        expected.append(center * c**arm)
    model, base = _problem()
    opt = samkit.SAM(base, rho=samkit.ValidationSearch(rho, probe=c, step=s))
    used = _train_with_reports(opt, model, reports)
    assert used == pytest.approx(expected, rel=1e-12)
    assert len({round(r, 12) for r in used}) > 3  # it did move


@pytest.mark.parametrize("name", ["validation_plateau", "validation_search"])
def test_without_validation_reports_a_validation_controller_is_sam_at_its_starting_radius(name):
    runs = []
    for rho in (f"auto:{name}", 0.05):
        model, base = _problem(3)
        opt = samkit.SAM(base, rho=rho)
        for step in range(5):
            opt.step(_closure(model, *_batch(step)))
            opt.zero_grad()
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def _steps(opt, model, n: int, report_at: tuple[int, ...] = ()) -> None:
    for step in range(n):
        opt.step(_closure(model, *_batch(step)))
        opt.zero_grad()
        if step in report_at:
            opt.observe_validation(1.0)


@pytest.mark.parametrize("cls", [samkit.ValidationPlateau, samkit.ValidationSearch])
def test_a_validation_controller_told_nothing_warns_once_naming_observe_validation(cls):
    model, base = _problem()
    opt = samkit.SAM(base, rho=cls(0.05, warn_after=4))
    with pytest.warns(samkit.NoValidationWarning, match=r"observe_validation\(val_loss\)") as got:
        _steps(opt, model, 12)
    assert len(got) == 1
    assert got[0].filename == __file__  # points at the user's call, not at samkit
    assert "in 4 steps" in str(got[0].message) and "0.05" in str(got[0].message)
    assert "rho='auto', the default, which learns from the gradients" in str(got[0].message)


def test_micro_batch_sam_counts_steps_not_micro_batches_for_the_warning(recwarn):
    """mSAM begins each of its micro-batches: the silent steps were counted 4 per step,
    so ValidationPlateau(warn_after=8) warned after 2 steps, not 8."""
    model, base = _problem()
    opt = samkit.MicroBatchSAM(base, rho=samkit.ValidationPlateau(0.05, warn_after=8))

    def warned() -> int:
        return len([w for w in recwarn if issubclass(w.category, samkit.NoValidationWarning)])

    for step in range(9):
        x, y = _batch(step)

        def closure(j: int, x=x, y=y) -> torch.Tensor:
            loss = nn.functional.mse_loss(model(x[2 * j : 2 * j + 2]), y[2 * j : 2 * j + 2])
            loss.backward()
            return loss

        opt.step(closure)
        opt.zero_grad()
        assert warned() == (1 if step >= 7 else 0), step
    assert "in 8 steps" in str(recwarn[0].message)


@pytest.mark.parametrize(
    "rho,report_at",
    [
        (lambda: samkit.ValidationPlateau(0.05, warn_after=4), (1,)),  # a report in time
        (lambda: samkit.ValidationPlateau(0.05, warn_after=None), ()),  # silenced
        (lambda: samkit.LossEquated(0.05, calibration_steps=2), ()),  # needs no validation
        (lambda: "auto", ()),  # learns without it
        (lambda: 0.05, ()),  # fixed radius
    ],
    ids=["reported", "silenced", "loss_equated", "auto", "fixed"],
)
def test_no_warning_where_validation_arrives_or_is_not_needed(rho, report_at, recwarn):
    model, base = _problem()
    opt = samkit.SAM(base, rho=rho())
    _steps(opt, model, 12, report_at)
    assert not [w for w in recwarn if issubclass(w.category, samkit.NoValidationWarning)]


def test_validation_plateau_warns_after_a_thousand_silent_steps():
    assert autorho.WARN_AFTER == 1000
    model, base = _problem()
    opt = samkit.SAM(base, rho="auto:validation_plateau")
    with pytest.warns(samkit.NoValidationWarning):
        _steps(opt, model, 1000)


def test_the_default_auto_learns_without_reports_and_does_not_warn(recwarn):
    """rho="auto" is GradientAgreement: in a loop that never reports a validation loss its
    radius still moves (here within the first 200 steps), and nothing warns."""
    assert autorho.DEFAULT_CONTROLLER == "gradient_agreement"
    model, base = _problem(2, lr=0.02)
    teacher = torch.randn(3, 2, generator=torch.Generator().manual_seed(7))
    opt = samkit.SAM(base, rho="auto")
    rhos, g = [], torch.Generator().manual_seed(1)
    for _ in range(600):  # a learnable target: batches agree, then (fitted) stop agreeing
        x = torch.randn(64, 3, generator=g)
        opt.step(_closure(model, x, torch.tanh(x @ teacher)))
        opt.zero_grad()
        rhos.append(opt.param_groups[0]["rho"])
    assert rhos[49] == 0.05 and len({round(r, 9) for r in rhos}) > 10  # held, then it moved
    assert max(rhos) > 0.1
    assert not [w for w in recwarn if issubclass(w.category, samkit.NoValidationWarning)]


@pytest.mark.parametrize("bad", [0, -3, 2.5, "10", True])
def test_a_bad_warn_after_is_refused_naming_it(bad):
    with pytest.raises(ValueError, match="warn_after"):
        samkit.ValidationPlateau(warn_after=bad)


def test_a_non_finite_validation_loss_is_ignored_and_said_so():
    model, base = _problem()
    opt = samkit.SAM(base, rho=samkit.ValidationPlateau(0.05, patience=1))
    with pytest.warns(RuntimeWarning, match="validation loss (nan|inf) is not finite") as caught:
        used = _train_with_reports(opt, model, [1.0, float("nan"), float("inf"), 2.0])
    assert used == pytest.approx([0.05, 0.05, 0.05, 0.05, 0.075])
    assert [w.filename for w in caught] == [__file__] * 2  # the loop's line, not samkit's


@pytest.mark.parametrize("rho", [0.05, "auto", "auto:validation_plateau"])
@pytest.mark.parametrize(
    "loss",
    ["0.5", True, None, [0.5], torch.ones(2), torch.tensor(True), object(), np.ones(2)]
    + [np.array("0.5"), np.array(True)],
)
def test_observe_validation_refuses_what_is_not_one_number(rho, loss):
    """With a fixed radius too: a loop that reports garbage is told at once, not when it
    switches to rho='auto'."""
    model, base = _problem()
    opt = samkit.SAM(base, rho=rho)
    with pytest.raises(ValueError, match="Invalid loss value"):
        opt.observe_validation(loss)


@pytest.mark.parametrize(
    "loss",
    [0.5, 1, np.float32(0.5), torch.tensor(0.5), torch.tensor([0.5]), 10**400]
    + [np.array(0.5), np.array([0.5], dtype=np.float32)],
)
def test_observe_validation_takes_a_number_or_a_one_element_tensor(loss):
    model, base = _problem()
    opt = samkit.SAM(base, rho="auto:validation_plateau")
    if isinstance(loss, int) and loss > 10**300:  # beyond float: infinite, ignored, said so
        with pytest.warns(RuntimeWarning, match="not finite"):
            opt.observe_validation(loss)
        assert opt.rho_controller._pending[:2] == [0.0, 0.0]
        return
    opt.observe_validation(loss)
    assert opt.rho_controller._pending[:2] == [
        0.5 if isinstance(loss, np.ndarray) else float(loss),
        1.0,
    ]


@pytest.mark.parametrize("name", ["validation_plateau", "gradient_agreement"])
def test_a_negative_validation_loss_that_worsens_is_a_plateau(name):
    """``(1 - tol) * best`` lies above a negative best: the rule takes the improvement's
    size from |best|, so a loss shifted below zero gives the same radii as above zero."""
    rises = [-10.0 + 0.005 * k for k in range(6)]  # worse and worse
    runs = {}
    for shift in (0.0, 20.0):
        model, base = _problem()
        opt = samkit.SAM(base, rho=f"auto:{name}")
        runs[shift] = _train_with_reports(opt, model, [v + shift for v in rises])
    assert runs[0.0] == runs[20.0]
    assert runs[0.0][-1] > runs[0.0][0]  # the plateaus raised it


# ---------------------------------------------------- what a user can get wrong


def test_a_controller_instance_under_asam_starts_at_asams_scale_as_the_name_does():
    """ "Default 0.05; 0.5 for ASAM" holds for ``rho=GradientAgreement()`` as for
    ``rho="auto"``, and for an Adaptive perturbation inside a wrapper; a radius given is
    kept."""
    w = torch.nn.Parameter(torch.zeros(3))
    for cls in autorho.CONTROLLERS.values():
        opt = samkit.SAM(torch.optim.SGD([w], lr=0.1), rho=cls(), adaptive=True)
        assert opt.rho_controller.initial_rho == 0.5, cls
        assert opt.param_groups[0]["rho"] == 0.5
    wrapped = samkit.RandomSubset(0.5, inner=samkit.Adaptive())
    opt = samkit.SAM(torch.optim.SGD([w], lr=0.1), rho="auto", perturbation=wrapped)
    assert opt.rho_controller.initial_rho == 0.5
    opt = samkit.ESAM(torch.optim.SGD([w], lr=0.1), rho="auto", gamma=1.0,
                      perturbation=samkit.Adaptive())  # fmt: skip
    assert opt.rho_controller.initial_rho == 0.5
    given = samkit.SAM(torch.optim.SGD([w], lr=0.1), rho=samkit.GradientAgreement(0.2),
                       adaptive=True)  # fmt: skip
    assert given.rho_controller.initial_rho == 0.2


def test_one_controller_for_two_optimizers_is_refused():
    w, v = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    controller = samkit.ValidationPlateau()
    samkit.SAM(torch.optim.SGD([w], lr=0.1), rho=controller)
    base = torch.optim.SGD([v], lr=0.1)
    with pytest.raises(ValueError, match="Invalid rho value: .*already sets another"):
        samkit.SAM(base, rho=controller)
    assert "rho" not in base.param_groups[0]  # refused before SAM touched the base


@pytest.mark.parametrize(
    "controller",
    [
        lambda: samkit.ValidationPlateau(0.1, rho_max=0.05),
        lambda: samkit.LossEquated(0.1, rho_max=0.05),
        lambda: samkit.ValidationPlateau(rho_max=0.3),  # below ASAM's start 0.5
    ],
)
def test_a_ceiling_below_the_start_is_refused(controller):
    w = torch.nn.Parameter(torch.zeros(3))
    base = torch.optim.SGD([w], lr=0.1)
    with pytest.raises(ValueError, match="Invalid rho_max value: .* below the starting"):
        samkit.SAM(base, rho=controller(), adaptive=True)
    assert "rho" not in base.param_groups[0]


def _skipping_steps(opt: samkit.SAM, a, b, ga, steps: range, noise: float) -> list[float]:
    """Steps of two tensors, B without a gradient on even steps (a layer skipped, an expert
    or a head not used; zero_grad(set_to_none=True)); A's gradient ``ga`` plus noise growing
    with the step, B's random."""
    rhos = []
    for step in steps:
        opt.zero_grad(set_to_none=True)
        gen = torch.Generator().manual_seed(step)
        grads = {a: ga + torch.randn(1000, generator=gen) * noise * step / 20}
        if step % 2:
            grads[b] = torch.randn(1000, generator=gen)
        for p, g in grads.items():
            p.grad = g.clone()
        opt.first_step()
        for p, g in grads.items():  # (the pass at w + e)
            p.grad = g.clone()
        opt.second_step()
        rhos.append(opt.param_groups[0]["rho"])
    return rhos


def _skipping_sam():
    a, b = torch.nn.Parameter(torch.zeros(1000)), torch.nn.Parameter(torch.zeros(1000))
    opt = samkit.SAM(
        torch.optim.SGD([a, b], lr=0.0), rho=samkit.GradientAgreement(warmup=0, sketch=256)
    )
    return opt, a, b


def test_gradient_agreement_reads_the_tensors_with_a_gradient_in_both_steps():
    """A tensor without a gradient on some steps (a layer skipped, as LayerDrop does, an
    expert or a head not used) leaves the sketch's coordinates where they were, and the
    cosine is read over the tensors that had a gradient in both steps: here A alone, whose
    gradient repeats exactly, so every cosine is 1 (B's random gradient, on every other
    step, is never compared with a step without it). 0.3 compared only sketches of the
    same tensors: such a loop read no cosine at all and stayed at its starting radius."""
    opt, a, b = _skipping_sam()
    ga = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    _skipping_steps(opt, a, b, ga, range(40), noise=0.0)
    # every step compares with the last but the first two: step 1 gave B its first gradient,
    # which lays the sketch over B too (a tensor takes coordinates once it has had one)
    assert opt.rho_controller.seen == 38
    assert opt.rho_controller.relative() == pytest.approx(1.0, abs=1e-6)


def test_gradient_agreement_resumes_bit_for_bit_after_a_step_without_a_tensor():
    """The last sketch is saved with NaN at the coordinates of the tensors that had no
    gradient in its step, and a resumed run continues bit for bit."""
    ga = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    opt, a, b = _skipping_sam()
    whole = _skipping_steps(opt, a, b, ga, range(60), noise=1.0)
    assert max(whole) > 0.05 * 1.05  # the noise was read: the radius rose

    opt, a, b = _skipping_sam()
    first = _skipping_steps(opt, a, b, ga, range(30), noise=1.0)  # step 29 had B: then 30
    first += _skipping_steps(opt, a, b, ga, range(30, 31), noise=1.0)  # without B
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    previous = state["samkit"]["rho"]["previous"]
    assert sum(x != x for x in previous) > 0  # B's coordinates, marked
    resumed, a2, b2 = _skipping_sam()
    with torch.no_grad():
        a2.copy_(a), b2.copy_(b)
    resumed.load_state_dict(state)
    rest = _skipping_steps(resumed, a2, b2, ga, range(31, 60), noise=1.0)
    assert first + rest == whole


def test_gradient_agreement_compares_only_sketches_of_the_same_parameters():
    """A parameter frozen or unfrozen (requires_grad changed) changes the sketch's
    coordinates: no cosine across that change, then cosines again, so a gradient that
    repeats exactly on A reads as full agreement, not as noise."""
    a, b = torch.nn.Parameter(torch.zeros(1000)), torch.nn.Parameter(torch.zeros(1000))
    ga = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    opt = samkit.SAM(
        torch.optim.SGD([a, b], lr=0.0), rho=samkit.GradientAgreement(warmup=0, sketch=256)
    )
    controller = opt.rho_controller
    for step in range(40):
        opt.zero_grad(set_to_none=True)
        b.requires_grad_(step % 2 == 1)  # frozen on even steps, trained on odd ones
        a.grad = ga.clone()
        if step % 2:
            b.grad = torch.randn(1000, generator=torch.Generator().manual_seed(step))
        opt.first_step()
        a.grad = ga.clone()  # (the pass at w + e)
        if step % 2:
            b.grad = torch.randn(1000, generator=torch.Generator().manual_seed(step))
        opt.second_step()
    assert controller.seen == 0  # every step changed the parameters: no cosine across them
    opt.zero_grad(set_to_none=True)
    b.requires_grad_(False)
    for _ in range(30):  # A alone (B frozen), the same gradient: cosines of 1
        a.grad = ga.clone()
        opt.first_step()
        a.grad = ga.clone()  # (the pass at w + e)
        opt.second_step()
    assert controller.seen == 29
    assert controller.relative() == pytest.approx(1.0)


def test_gradient_agreement_reads_no_cosine_from_a_zero_gradient():
    """A zero gradient (a batch held back whole by hold_back) agrees with nothing and
    disagrees with nothing: no cosine is folded in (0.3 folded in a cosine of 0, read as
    disagreement), and the next step compares with the last sketch that had a gradient."""
    a = torch.nn.Parameter(torch.zeros(1000))
    ga = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    opt = samkit.SAM(torch.optim.SGD([a], lr=0.0), rho=samkit.GradientAgreement(warmup=0))
    controller = opt.rho_controller
    for step in range(30):
        grad = ga * 0.0 if step % 3 == 2 else ga
        a.grad = grad.clone()
        opt.first_step()
        a.grad = grad.clone()
        opt.second_step()
        opt.zero_grad()
    assert controller.seen == 19  # the 10 zero steps read no cosine; the 20 others, 19
    assert controller.relative() == pytest.approx(1.0)  # every cosine read was 1


# ------------------------------------------------------------------ groups


@pytest.mark.parametrize("name", list(autorho.CONTROLLERS))
def test_each_group_keeps_its_ratio_to_the_radius_and_rho_zero_stays_unperturbed(name):
    model, base = _problem(groups=(0.1, 0.0))
    opt = samkit.SAM(base, rho=f"auto:{name}")
    for step, loss in enumerate([1.0, 1.0, 1.0, 1.0]):
        opt.step(_closure(model, *_batch(step)))
        opt.zero_grad()
        opt.observe_validation(loss)
        first, second = (g["rho"] for g in opt.param_groups)
        assert first == pytest.approx(2.0 * opt.rho_controller.rho) and second == 0.0
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})  # the default rho: ratio 1
    opt.step(_closure(model, *_batch(9)))
    assert opt.param_groups[2]["rho"] == opt.rho_controller.rho


def test_a_base_optimizer_with_its_own_rho_key_reads_this_steps_radius():
    """Adadelta keeps its decay in "rho"; SAM's radius is "sam_rho", and the ascent must use
    the value the controller has just written, not the one of the step before."""
    model, base = _problem(lr=1.0, base=torch.optim.Adadelta)
    opt = samkit.SAM(base, rho=samkit.FollowLR(0.08))
    assert opt.rho_key == "sam_rho" and opt.param_groups[0]["rho"] == 0.9
    opt.param_groups[0]["lr"] = 0.25
    x, y = _batch(0)
    assert _perturbation(model, opt, x, y) == pytest.approx(0.02, rel=1e-5)
    assert opt.param_groups[0]["rho"] == 0.9  # Adadelta's decay untouched


# ------------------------------------------------------------------- state


def test_a_controller_state_of_another_kind_or_incomplete_is_refused_and_changes_nothing():
    model, base = _problem()
    opt = samkit.SAM(base, rho="auto:validation_plateau")
    _train_with_reports(opt, model, [1.0, 1.1, 1.2])
    good = opt.state_dict()
    for corrupt in (
        {"name": "loss_equated"},
        {"best": "low"},
        {"rho": -1.0},
        {"scales": [float("nan")]},
        {"scales": [1.0, "x"]},
        {"pending": [1.0]},
        {"pending": [1.0, -1.0]},
    ):
        sd = opt.state_dict()
        sd["samkit"]["rho"] = {**sd["samkit"]["rho"], **corrupt}
        with pytest.raises(ValueError, match="Invalid state value"):
            opt.load_state_dict(sd)
        assert opt.state_dict()["samkit"] == good["samkit"]
    sd = opt.state_dict()
    del sd["samkit"]["rho"]["bad"]
    with pytest.raises(ValueError, match=r"has no \['bad'\]"):
        opt.load_state_dict(sd)


_NAN = float("nan")
#: per controller, fields a hand-edited or damaged checkpoint may hold (each refused)
MALFORMED = {
    "gradient_agreement": [
        {"log_rho": None}, {"log_rho": _NAN}, {"agreement": _NAN}, {"agreement": 3.0},
        {"peak": _NAN}, {"seen": -1}, {"seen": 2.5}, {"bad": -3}, {"bad": 1.5},
        {"best": _NAN}, {"previous": [float("inf")] * 4096}, {"pending": [5.0, 0.5]},
        {"pending": [_NAN, 1.0]}, {"scales": [1.0, 1.0]},
    ],
    "validation_plateau": [
        {"rho_max": _NAN}, {"rho_max": -1.0}, {"rho_max": None}, {"bad": None}, {"best": _NAN},
    ],
    "loss_equated": [
        {"sigma": _NAN}, {"norm_count": -1}, {"norm_sum": None}, {"rho_max": 0.0},
        {"lr0": -1.0},
    ],
    "validation_search": [
        {"arm": 50}, {"center": -1.0}, {"center": None}, {"last": _NAN}, {"deltas": [1, 2, 3, 4]},
        {"deltas": [_NAN]},
    ],
}  # fmt: skip


@pytest.mark.parametrize(
    ("name", "corrupt"), [(n, c) for n, cases in MALFORMED.items() for c in cases]
)
def test_a_malformed_controller_state_is_refused_and_changes_nothing(name, corrupt):
    model, base = _problem()
    opt = samkit.SAM(base, rho=f"auto:{name}")
    _train_with_reports(opt, model, [1.0, 1.1, 1.2, 1.3])
    good = opt.state_dict()
    sd = opt.state_dict()
    sd["samkit"]["rho"] = {**sd["samkit"]["rho"], **corrupt}
    with pytest.raises(ValueError, match=f"Invalid state value: .*{next(iter(corrupt))}"):
        opt.load_state_dict(sd)
    assert opt.state_dict()["samkit"] == good["samkit"]


def test_a_state_saved_before_a_new_group_stepped_keeps_that_groups_scale():
    """A run saved between add_param_group and its next step has one scale fewer; the group
    keeps the scale this optimizer gave it, not one read from the loaded radius."""
    model, base = _problem(groups=(0.1, 0.0))
    opt = samkit.SAM(base, rho=samkit.ValidationPlateau(0.05, patience=1))
    _train_with_reports(opt, model, [1.0, 1.1, 1.2])  # the radius rose
    extra = nn.Parameter(torch.zeros(2))
    opt.add_param_group({"params": [extra], "rho": 0.1})
    sd = opt.state_dict()
    assert len(sd["samkit"]["rho"]["scales"]) == 2
    model2, base2 = _problem(groups=(0.1, 0.0))
    opt2 = samkit.SAM(base2, rho=samkit.ValidationPlateau(0.05, patience=1))
    opt2.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "rho": 0.1})
    opt2.load_state_dict(sd)
    opt.zero_grad()
    opt.step(_closure(model, *_batch(5)))
    opt2.step(_closure(model2, *_batch(5)))
    assert opt2.rho_controller.scales == opt.rho_controller.scales == [2.0, 0.0, 2.0]
    assert [g["rho"] for g in opt2.param_groups] == [g["rho"] for g in opt.param_groups]
    # a state with no scales at all (hand-edited) keeps this optimizer's, not ones read
    # back from the loaded radius
    sd["samkit"]["rho"]["scales"] = []
    opt2.load_state_dict(sd)
    assert opt2.rho_controller.scales == [2.0, 0.0, 2.0]


@pytest.mark.parametrize("name", list(autorho.CONTROLLERS))
def test_a_checkpoint_from_a_fixed_rho_run_loads_and_the_controller_starts_afresh(name):
    model, base = _problem()
    fixed = samkit.SAM(base, rho=0.05)
    fixed.step(_closure(model, *_batch(0)))
    fresh = samkit.SAM(_problem()[1], rho=f"auto:{name}").rho_controller.state_dict()
    model2, base2 = _problem()
    opt = samkit.SAM(base2, rho=f"auto:{name}")
    opt.load_state_dict(fixed.state_dict())
    assert opt.rho_controller.state_dict() == fresh
    # also into a controller that has stepped and been told validation losses (it kept
    # what it had learnt: 0.3's first controllers returned early on a state without one)
    for step in range(60):
        opt.step(_closure(model2, *_batch(step)))
        opt.zero_grad()
        opt.observe_validation(1.0 + step % 3)
    assert opt.rho_controller.state_dict() != fresh
    opt.load_state_dict(fixed.state_dict())
    assert opt.rho_controller.state_dict() == fresh


# --------------------------------------------------------------------- DDP
WORLD = 2


def _ddp_rho(rank: int) -> dict:
    """Each replica has its own data (local ascent); only rank 0 reports validation losses."""
    import torch.distributed as dist

    out = {}
    for name in autorho.CONTROLLERS:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        ddp = nn.parallel.DistributedDataParallel(net)
        ctrl = autorho.CONTROLLERS[name](0.05)
        if name == "loss_equated":
            ctrl.calibration_steps = 2
        if name == "validation_plateau":
            ctrl.patience = 1
        if name == "gradient_agreement":
            ctrl.warmup, ctrl.rate = 1, 0.5
        opt = samkit.SAM(torch.optim.SGD(ddp.parameters(), lr=0.1), rho=ctrl, model=ddp)
        rhos, norms = [], []
        for step in range(6):
            x, y = _batch(10 * step + rank)
            opt.step(_closure(ddp, x, y))
            rhos.append(opt.param_groups[0]["rho"])
            norms.append(_grad_norm(net, x, y))
            opt.zero_grad()
            if rank == 0:
                opt.observe_validation([1.0, 0.9, 0.95, 0.97, 0.99, 1.0][step])
        dist.barrier()
        out[name] = {"rhos": rhos, "norms": norms, "state": opt.state_dict()["samkit"]["rho"]}
    return out


class _Skipping(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x, skip: bool = False):
        x = torch.tanh(self.a(x))
        return self.head(x if skip else x + torch.tanh(self.b(x)))


def _ddp_skip(rank: int) -> dict:
    """A layer skipped on rank 1 only, on every third step (LayerDrop drawn per replica)."""
    import torch.distributed as dist

    torch.manual_seed(0)
    net = _Skipping()
    ddp = nn.parallel.DistributedDataParallel(net, find_unused_parameters=True)
    rho = samkit.GradientAgreement(0.05, warmup=1, rate=0.5)
    opt = samkit.SAM(torch.optim.SGD(ddp.parameters(), lr=0.1), rho=rho, model=ddp)
    rhos, skipped = [], 0
    for step in range(12):
        x, y = _batch(10 * step + rank)
        skip = rank == 1 and step % 3 == 1

        def closure(x=x, y=y, skip=skip):
            loss = nn.functional.mse_loss(ddp(x, skip), y)
            loss.backward()
            return loss

        opt.zero_grad(set_to_none=True)
        with opt.first_pass():
            closure()
        skipped += net.b.weight.grad is None
        opt.first_step()
        closure()
        opt.second_step()
        rhos.append(opt.param_groups[0]["rho"])
    dist.barrier()
    return {"rhos": rhos, "seen": rho.seen, "skipped": skipped}


SCENARIOS = {"rho": _ddp_rho, "skip": _ddp_skip}


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    return run_scenarios(
        __name__, "SCENARIOS", world=WORLD, outdir=tmp_path_factory.mktemp("autorho")
    )


@pytest.mark.ddp
@pytest.mark.parametrize("name", list(autorho.CONTROLLERS))
def test_every_replica_uses_the_same_rho_under_local_ascent(ddp_results, name):
    r0, r1 = (r[name] for r in load(ddp_results, "rho"))
    assert r0["rhos"] == r1["rhos"]  # bit for bit, every step
    # the same state, except the inbox of reports not yet applied (rank 0's last report)
    assert {**r0["state"], "pending": None} == {**r1["state"], "pending": None}
    assert r0["norms"] != r1["norms"]  # the replicas' own gradients differ
    assert len(set(r0["rhos"])) > 1  # and the radius moved (the reports reached rank 1 too)


@pytest.mark.parametrize(
    "name",
    [
        "auto",
        "auto_asam",
        "gradient_agreement",
        "validation_plateau",
        "validation_search",
        "loss_equated",
    ],
)
def test_the_family_battery_sees_each_controller_move_its_radius(name):
    """The registry entries that tests/test_family.py, test_ddp.py and test_compile.py run are
    not a fixed rho in disguise: within the battery's 6 steps the radius changes."""
    from optim_registry import BASE_BY_NAME, METHOD_BY_NAME, make_data

    info = METHOD_BY_NAME[name]
    model = info.model(0)
    x, y = make_data(0)
    opt = info.make(BASE_BY_NAME["sgd"], model)
    rhos = []
    for _ in range(6):
        info.step(opt, model, x, y)
        rhos.append(opt.param_groups[0]["rho"])
    assert len(set(rhos)) > 1, rhos


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradient_agreement_sketch_is_the_same_gathered_whole_or_tensor_by_tensor(
    monkeypatch, dtype
):
    """A small float32 model's sketch is gathered from one copy of the whole gradient, a large
    one's (or another dtype's) tensor by tensor: the same coordinates, the same bits."""
    g = torch.Generator().manual_seed(1)
    steps = [
        [torch.randn(s, generator=g, dtype=dtype) for s in [(7, 5), (7,), (1,), (30, 11), (3,)]]
        for _ in range(6)
    ]

    def radii(limit: int) -> tuple[list[float], list[torch.Tensor]]:
        monkeypatch.setattr(autorho, "FLAT_LIMIT", limit)
        ctrl = samkit.GradientAgreement(0.05, sketch=64, warmup=1, rate=0.5)
        vecs = [ctrl._read(_Stub(gs))[0].clone() for gs in steps]  # (two buffers, used in turn)
        used = [ctrl.next_rho(_Stub(gs)) for gs in steps]
        assert (ctrl._flat is not None) == (limit > 0 and dtype == torch.float32)
        return used, vecs

    (whole, vec_whole), (by_tensor, vec_by_tensor) = radii(1 << 20), radii(0)
    assert whole == by_tensor
    assert all(torch.equal(a, b) for a, b in zip(vec_whole, vec_by_tensor))
    assert vec_whole[0].shape == (64,) and vec_whole[0].dtype == torch.float32


def test_gradient_agreement_learns_nothing_from_a_non_finite_gradient_it_is_not_skipped_for():
    """Without a GradScaler or skip_nonfinite SAM steps with a non-finite gradient; the
    controller then neither folds it into its agreement nor compares the next step with it."""
    g = torch.Generator().manual_seed(2)
    grads = [torch.randn(50, generator=g) for _ in range(12)]
    bad = grads[5].clone()
    bad[3] = float("nan")
    clean = samkit.GradientAgreement(0.05, warmup=1, rate=0.5)
    hit = samkit.GradientAgreement(0.05, warmup=1, rate=0.5)
    for i, grad in enumerate(grads):
        clean_rho = clean.next_rho(_Stub([grad])) if i not in (5, 6) else clean.rho
        rho = hit.next_rho(_Stub([bad if i == 5 else grad]))
        assert math.isfinite(rho) and math.isfinite(hit.agreement)
        if i == 6:  # the step after: no comparison with the bad sketch, a fresh start
            clean._last = hit._last
        assert rho == clean_rho or i in (5, 6)
    assert hit.seen == clean.seen  # the two cosines around the bad step are not counted


@pytest.mark.parametrize(
    "kwargs, scaled, expected",
    [({}, False, False), ({"skip_nonfinite": True}, False, True), ({}, True, True)],
)
def test_the_view_says_whether_a_non_finite_gradient_skips_the_step(kwargs, scaled, expected):
    seen = []

    class Recorder(samkit.GradientAgreement):
        def begin_step(self, view):
            seen.append(view.skips_nonfinite)
            super().begin_step(view)

    model, base = _problem(0)
    opt = samkit.SAM(base, rho=Recorder(0.05), **kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0) if scaled else None
    x, y = _batch(0)
    loss = nn.functional.mse_loss(model(x), y)
    (scaler.scale(loss) if scaled else loss).backward()
    opt.first_step(zero_grad=True, scaler=scaler) if scaled else opt.first_step(zero_grad=True)
    assert seen == [expected]


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: samkit.ValidationPlateau(tol=1.0), "Invalid tol value: 1.0"),
        (lambda: samkit.LossEquated(sigma=0.0), "Invalid sigma value: 0.0"),
    ],
)
def test_settings_that_would_leave_a_controller_inert_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_gradient_agreement_resumes_under_a_float64_default_dtype():
    """Its sketch buffers took the default dtype (float64) while a resumed sketch comes
    back as float32: the first step after a resume failed in torch.dot."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        runs = []
        for resume in (False, True):
            model, base = _problem(3)
            opt = samkit.SAM(base, rho=samkit.GradientAgreement(warmup=0, rate=0.5))
            for step in range(6):
                if resume and step == 3:
                    state = opt.state_dict()
                    model2, base2 = _problem(3)
                    model2.load_state_dict(model.state_dict())
                    opt = samkit.SAM(base2, rho=samkit.GradientAgreement(warmup=0, rate=0.5))
                    opt.load_state_dict(state)
                    model = model2
                opt.step(_closure(model, *(t.double() for t in _batch(step))))
                opt.zero_grad()
            runs.append(
                (opt.param_groups[0]["rho"], [p.detach().clone() for p in model.parameters()])
            )
        assert runs[0][0] == runs[1][0]
        assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    finally:
        torch.set_default_dtype(old)


def _agreement_steps(opt, params, steps, *, grad_of=None):
    """SAM steps with hand-set gradients: ``grad_of(p, step)`` (None: no gradient), by
    default a random one per tensor that requires one; returns (rho, seen) per step."""
    out = []
    for step in steps:
        gen = torch.Generator().manual_seed(step)
        grads = {}
        for i, p in enumerate(params):
            g = torch.randn(p.numel(), generator=gen) if grad_of is None else grad_of(i, step)
            if g is not None and p.requires_grad:
                grads[p] = g
        opt.zero_grad(set_to_none=True)
        for p, g in grads.items():
            p.grad = g.clone()
        opt.first_step()
        for p, g in grads.items():
            p.grad = g.clone()
        opt.second_step()
        out.append((opt.param_groups[0]["rho"], opt.rho_controller.seen))
    return out


def test_a_parameter_that_never_has_a_gradient_takes_no_coordinate():
    """An unused parameter (a pooler a task never calls) takes none of the sketch's
    coordinates: the radius is the same, bit for bit, as without it (a review saw a 5000-
    element unused tensor move the final radius from 0.14 to 1.0 with a 64-number sketch
    when every parameter was sketched)."""

    def run(extra: bool):
        ps = [nn.Parameter(torch.zeros(300)), nn.Parameter(torch.zeros(50))]
        unused = [nn.Parameter(torch.zeros(5000))] if extra else []
        opt = samkit.SAM(
            torch.optim.SGD(ps + unused, lr=0.0),
            rho=samkit.GradientAgreement(warmup=0, sketch=64),
        )
        ga = torch.randn(350, generator=torch.Generator().manual_seed(1))

        def grad_of(i, step):
            noisy = ga + torch.randn(350, generator=torch.Generator().manual_seed(step)) * step / 30
            return (noisy[:300], noisy[300:])[i] if i < 2 else None

        return _agreement_steps(opt, ps + unused, range(120), grad_of=grad_of)

    plain = run(False)
    assert plain[-1][0] > 0.05 * 1.05  # the radius moved
    assert run(True) == plain


def test_a_resumed_run_reads_no_cosine_across_a_parameter_frozen_after_the_save():
    """The tensors the sketch is laid over are saved with it: a parameter frozen right after
    a resume changes them as it would have in the run that never stopped (no cosine across
    the change), where the resumed run used to read one."""

    def make():
        ps = [nn.Parameter(torch.zeros(100)), nn.Parameter(torch.zeros(100))]
        rho = samkit.GradientAgreement(warmup=0, sketch=64)
        return samkit.SAM(torch.optim.SGD(ps, lr=0.0), rho=rho), ps

    opt, ps = make()
    _agreement_steps(opt, ps, range(5))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    ps[1].requires_grad_(False)
    whole = _agreement_steps(opt, ps, range(5, 8))
    assert [seen for _, seen in whole] == [4, 5, 6]  # the freeze: no cosine at step 5
    resumed, ps2 = make()
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    ps2[1].requires_grad_(False)
    assert _agreement_steps(resumed, ps2, range(5, 8)) == whole
    with pytest.raises(ValueError, match="Invalid state value: .*layout"):
        state = copy.deepcopy(opt.state_dict())
        state["samkit"]["rho"]["layout"] = [0, 7]  # (a position past the parameters)
        make()[0].load_state_dict(state)


def test_a_sketch_with_no_tensor_in_common_with_the_last_does_not_stall_the_controller():
    """Two steps with no tensor with a gradient in common (W alone, then V alone) give no
    cosine, and the later one becomes the sketch the next step compares with (a review saw
    the earlier one kept, and no cosine read again, for good); the state saves and loads."""
    w, v = nn.Parameter(torch.zeros(100)), nn.Parameter(torch.zeros(100))
    opt = samkit.SAM(
        torch.optim.SGD([w, v], lr=0.0), rho=samkit.GradientAgreement(warmup=0, sketch=16)
    )
    g = torch.randn(100, generator=torch.Generator().manual_seed(0))
    both = _agreement_steps(opt, [w, v], range(2), grad_of=lambda i, s: g)
    w_alone = _agreement_steps(opt, [w, v], range(1), grad_of=lambda i, s: None if i else g)
    v_alone = _agreement_steps(opt, [w, v], range(10), grad_of=lambda i, s: g if i else None)
    assert [seen for _, seen in both + w_alone] == [0, 1, 2]
    assert [seen for _, seen in v_alone] == list(range(2, 12))  # none at the first
    assert opt.rho_controller.relative() == pytest.approx(1.0)
    state = copy.deepcopy(opt.state_dict())
    samkit.SAM(
        torch.optim.SGD([nn.Parameter(torch.zeros(100)), nn.Parameter(torch.zeros(100))], lr=0),
        rho=samkit.GradientAgreement(warmup=0, sketch=16),
    ).load_state_dict(state)


@pytest.mark.ddp
def test_replicas_agree_when_a_layer_is_skipped_on_one_of_them(ddp_results):
    """Under DDP's local first pass a layer skipped on one replica (LayerDrop drawn per
    replica) changes the tensors with gradients there only: no replica compares with its
    last sketch at that step, so every replica reads the same cosines and writes the same
    radius (each used to decide alone, and the radii parted)."""
    r0, r1 = load(ddp_results, "skip")
    assert r1["skipped"] == 4 and r0["skipped"] == 0
    assert r0["rhos"] == r1["rhos"] and r0["seen"] == r1["seen"]
    assert 0 < r0["seen"] < 11 and len(set(r0["rhos"])) > 1  # cosines read on other steps
