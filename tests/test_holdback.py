"""opt.hold_back: a slice of the samples, chosen by id, kept out of training for rho="auto".

What is checked: which samples are held back (a function of the id alone, the
share asked for), that they never reach the weights (the gradient is the kept
samples' mean loss, a non-finite held-back loss stays out), that the controller
is told exactly their mean loss at w once per epoch (not the pass at w + e),
that a resumed run is the run that never stopped, bit for bit, and the refusals.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import samkit
from samkit.optim import autorho
from samkit.optim.holdback import held_back

N, BATCH = 120, 20


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 5, generator=g)
    y = (x[:, 0] + 0.3 * torch.randn(N, generator=g) > 0).long()
    return x, y


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))


class _Recorder(autorho.ValidationPlateau):
    """ValidationPlateau that keeps every loss it is told."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.told: list[float] = []

    def on_validation(self, loss: float) -> None:
        self.told.append(loss)
        super().on_validation(loss)


def _epoch_order(epoch: int) -> torch.Tensor:
    return torch.randperm(N, generator=torch.Generator().manual_seed(1000 + epoch))


def _train(opt, model, x, y, epochs: int, *, start=(0, 0), stop=None, log=None, fraction=0.1):
    """A plain loop over shuffled batches; ``log`` collects each held-back loss at w."""
    for epoch in range(start[0], epochs):
        order = _epoch_order(epoch)
        for b in range(start[1] if epoch == start[0] else 0, N // BATCH):
            if stop == (epoch, b):
                return
            ids = order[b * BATCH : (b + 1) * BATCH]

            def closure(ids=ids, epoch=epoch):
                losses = nn.functional.cross_entropy(model(x[ids]), y[ids], reduction="none")
                if log is not None and not opt.perturbed:
                    mask = held_back(ids, fraction)
                    log.append((epoch, losses.detach()[mask].double().tolist()))
                loss = opt.hold_back(losses, ids, fraction)
                loss.backward()
                return loss

            opt.step(closure)
            opt.zero_grad()


# ------------------------------------------------------------------ which samples


def test_the_held_back_share_is_the_fraction_asked_for_and_fixed_per_id():
    ids = torch.arange(200_000)
    for fraction in (0.05, 0.1, 0.25):
        share = held_back(ids, fraction).double().mean().item()
        assert abs(share - round(fraction * 1024) / 1024) < 0.003, (fraction, share)
    # consecutive ids are spread out: every block of 1000 holds back about a tenth
    blocks = held_back(ids, 0.1).reshape(-1, 1000).double().mean(1)
    assert 0.05 < blocks.min() and blocks.max() < 0.15


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=60), st.randoms())
def test_whether_a_sample_is_held_back_depends_on_its_id_alone(ids, rnd):
    ids_t = torch.tensor(ids)
    perm = list(range(len(ids)))
    rnd.shuffle(perm)
    mask = held_back(ids_t, 0.1)
    assert torch.equal(held_back(ids_t[perm], 0.1), mask[perm])
    assert [bool(held_back(torch.tensor([i]), 0.1)) for i in ids] == mask.tolist()


# ------------------------------------------------------------------ what trains


def test_the_returned_loss_is_the_kept_samples_mean_and_held_back_ones_never_reach_the_gradient():
    x, y = _data()
    model = _model()
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho="auto", model=model)
    ids = torch.arange(N)
    mask = held_back(ids, 0.1)
    assert 0 < int(mask.sum()) < N
    losses = nn.functional.cross_entropy(model(x), y, reduction="none")
    # the held-back samples' losses made large: neither the value nor the gradient moves
    trained = opt.hold_back(torch.where(mask, losses * 1000 + 7, losses), ids)
    expected = losses[~mask].mean()
    assert torch.allclose(trained, expected, rtol=1e-6, atol=0)
    trained.backward(retain_graph=True)
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected.backward()
    for a, b in zip(got, (p.grad for p in model.parameters())):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    # a non-finite held-back loss makes the mean non-finite, as it would a plain mean (the
    # docs say so): a weighting, not a selection
    poisoned = torch.where(mask, torch.full_like(losses, float("inf")), losses)
    assert not torch.isfinite(opt.hold_back(poisoned, ids))


def test_ids_as_lists_tuples_ranges_arrays_or_narrow_ints_hold_back_the_same_samples():
    import numpy as np

    x, y = _data()
    model = _model()
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho="auto")
    losses = nn.functional.cross_entropy(model(x), y, reduction="none")
    with torch.no_grad():
        a = opt.hold_back(losses, torch.arange(N))
        for ids in (
            list(range(N)),
            tuple(range(N)),
            range(N),
            np.arange(N),
            list(np.arange(N)),
            torch.arange(N, dtype=torch.int32),
            torch.arange(N, dtype=torch.uint8),
        ):
            assert torch.equal(opt.hold_back(losses, ids), a), type(ids)


def test_the_controller_is_told_each_epochs_held_back_mean_loss_at_w_once_per_epoch():
    x, y = _data()
    model = _model()
    controller = _Recorder(warn_after=None)
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=controller, model=model)
    log: list = []
    _train(opt, model, x, y, epochs=4, log=log)
    # one report per finished epoch, at the first step of the next: epochs 0-2 here
    assert len(controller.told) == 3
    held_per_epoch = int(held_back(torch.arange(N), 0.1).sum())
    for epoch, told in enumerate(controller.told):
        values = [v for e, vs in log if e == epoch for v in vs]
        assert len(values) == held_per_epoch  # the pass at w + e is not counted
        # (each step's held-back losses summed in float32, the epoch's sum in float64)
        assert told == pytest.approx(sum(values) / len(values), rel=1e-6)


def _loop(opt, model, x, y, orders, *, extra=None, epoch_arg=False, batch=BATCH):
    """Epochs over ``orders`` (one id tensor per epoch); ``extra(losses, ids)`` runs in the
    closure's pass at w after hold_back."""
    for epoch, order in enumerate(orders):
        for b in range(0, len(order), batch):
            ids = order[b : b + batch]

            def closure(ids=ids, epoch=epoch):
                losses = nn.functional.cross_entropy(model(x[ids]), y[ids], reduction="none")
                kw = {"epoch": epoch} if epoch_arg else {}
                loss = opt.hold_back(losses, ids, **kw)
                if extra is not None and not opt.perturbed:
                    extra(losses, ids)
                loss.backward()
                return loss

            opt.step(closure)
            opt.zero_grad()


def _recorded(epochs=4, **kw):
    x, y = _data()
    model = _model()
    controller = _Recorder(warn_after=None)
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=controller, model=model)
    orders = kw.pop("orders", None) or [_epoch_order(e) for e in range(epochs)]
    _loop(opt, model, x, y, orders, **kw)
    return controller.told


def test_the_same_batch_twice_in_one_pass_and_a_no_grad_call_record_nothing_more():
    """(Recorded per id and step, a second call would close the round at every step.)"""
    assert len(_recorded()) == 3
    opt_holder = {}

    def again(losses, ids):
        opt_holder["opt"].hold_back(losses, ids)  # the same ids again, in the same step
        with torch.no_grad():  # an evaluation's call, other ids: nothing recorded
            opt_holder["opt"].hold_back(losses.detach() + 100.0, torch.arange(len(ids)))

    x, y = _data()
    model = _model()
    controller = _Recorder(warn_after=None)
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=controller, model=model)
    opt_holder["opt"] = opt
    _loop(opt, model, x, y, [_epoch_order(e) for e in range(4)], extra=again)
    assert controller.told == _recorded()


def test_with_the_loops_epoch_a_round_ends_when_the_epoch_changes_whatever_the_sampler():
    # sampling with replacement: ids repeat within an epoch
    g = torch.Generator().manual_seed(3)
    orders = [torch.randint(0, N, (N,), generator=g) for _ in range(4)]
    told = _recorded(orders=orders, epoch_arg=True)
    assert len(told) == 3  # one report per finished epoch
    with pytest.warns(RuntimeWarning, match="does not pass each sample once an epoch.*epoch=epoch"):
        without = _recorded(orders=orders)
    assert len(without) > 6  # (what the warning is about: rounds end at every repeat)
    # a sampler that passes each sample once an epoch: the same reports either way
    assert _recorded(epoch_arg=True) == _recorded()


def test_hold_back_silences_the_no_validation_warning():
    import warnings

    x, y = _data()
    model = _model()
    opt = samkit.SAM(
        torch.optim.SGD(model.parameters(), lr=0.1),
        rho=autorho.ValidationPlateau(warn_after=3),
        model=model,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", autorho.NoValidationWarning)
        _loop(opt, model, x, y, [_epoch_order(0)])  # 6 steps, no report yet
    plain = samkit.SAM(
        torch.optim.SGD(model.parameters(), lr=0.1),
        rho=autorho.ValidationPlateau(warn_after=3),
    )

    def closure():
        loss = model(x).sum()
        loss.backward()
        return loss

    with pytest.warns(autorho.NoValidationWarning):  # (what is silenced: the same loop without)
        for _ in range(4):
            plain.step(closure)
            plain.zero_grad()


def test_the_default_controller_learns_from_held_back_reports():
    """rho='auto' with hold_back and nothing reported raises its radius on held-back plateaus:
    here the held-back loss is made to rise, epoch after epoch, whatever the weights."""
    x, y = _data()
    model = _model()
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.0), rho="auto", model=model)
    rho0 = opt.param_groups[0]["rho"]
    for epoch in range(6):
        order = _epoch_order(epoch)
        for b in range(N // BATCH):
            ids = order[b * BATCH : (b + 1) * BATCH]

            def closure(ids=ids, epoch=epoch):
                losses = nn.functional.cross_entropy(model(x[ids]), y[ids], reduction="none")
                loss = opt.hold_back(losses + epoch, ids)  # a held-back loss that only rises
                loss.backward()
                return loss

            opt.step(closure)
            opt.zero_grad()
    # five reports (epochs 0-4), each worse than the first: two plateaus of 2, each x1.5
    # (lr 0: the weights never move, and the gradients' rule holds)
    assert opt.rho_controller.best is not None and opt.rho_controller.bad == 0
    assert opt.param_groups[0]["rho"] == pytest.approx(rho0 * 1.5**2, rel=0.02)


# ------------------------------------------------------------------ resume


@pytest.mark.parametrize("stop", [(1, 2), (2, 0)])
def test_a_resumed_run_is_the_run_that_never_stopped(stop):
    x, y = _data()

    def fresh():
        model = _model()
        controller = _Recorder(warn_after=None)
        return (
            model,
            controller,
            samkit.SAM(
                torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                rho=controller,
                model=model,
            ),
        )

    model_a, ctl_a, opt_a = fresh()
    _train(opt_a, model_a, x, y, epochs=4)

    model_b, _, opt_b = fresh()
    _train(opt_b, model_b, x, y, epochs=4, stop=stop)
    saved = copy.deepcopy((model_b.state_dict(), opt_b.state_dict()))
    assert "held" in saved[1]["samkit"]["rho"]
    model_c, ctl_c, opt_c = fresh()
    model_c.load_state_dict(saved[0])
    opt_c.load_state_dict(saved[1])
    _train(opt_c, model_c, x, y, epochs=4, start=stop)

    for a, c in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(a, c)
    assert ctl_c.told == ctl_a.told[len(ctl_a.told) - len(ctl_c.told) :]
    assert opt_a.param_groups[0]["rho"] == opt_c.param_groups[0]["rho"]


_GOOD = {"fraction": 0.1, "total": 1.0, "count": 2, "round": [3, 4], "epoch": None}


@pytest.mark.parametrize(
    "held",
    [
        {**_GOOD, "count": -1},
        {**_GOOD, "count": 1},  # fewer losses than ids
        {**_GOOD, "count": 0, "round": [], "total": 3.0},  # a sum of nothing
        {**_GOOD, "count": True},
        {**_GOOD, "fraction": 0.9},
        {**_GOOD, "count": 0, "round": [], "total": float("inf")},
        {**_GOOD, "total": 1},
        {**_GOOD, "round": [1.5, 4]},
        {**_GOOD, "round": [True, 5]},
        {**_GOOD, "round": [4, 4]},
        {**_GOOD, "round": [2**63, 4]},
        {**_GOOD, "epoch": -1},
        {**_GOOD, "epoch": 1.0},
        {k: v for k, v in _GOOD.items() if k != "epoch"},
        "rows",
    ],
)
def test_a_malformed_held_back_state_is_refused_and_changes_nothing(held):
    x, y = _data()
    model = _model()
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho="auto", model=model)
    _train(opt, model, x, y, epochs=2)
    before = copy.deepcopy(opt.state_dict())
    good = copy.deepcopy(before)
    good["samkit"]["rho"]["held"] = dict(_GOOD)
    opt.load_state_dict(copy.deepcopy(good))  # (the good one loads)
    bad = copy.deepcopy(before)
    bad["samkit"]["rho"]["held"] = held
    with pytest.raises(ValueError, match="held-back"):
        opt.load_state_dict(bad)
    assert repr(opt.state_dict()) == repr(good)


# ------------------------------------------------------------------ refusals


def _losses_ids():
    x, y = _data()
    model = _model()
    return model, nn.functional.cross_entropy(model(x), y, reduction="none"), torch.arange(N)


@pytest.mark.parametrize(
    "rho", [0.05, "auto:loss_equated", samkit.FollowLR(0.05)], ids=["fixed", "le", "follow"]
)
def test_a_controller_that_learns_nothing_from_validation_refuses_hold_back(rho):
    model, losses, ids = _losses_ids()
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=rho)
    with pytest.raises(ValueError, match="Invalid rho value.*held-back"):
        opt.hold_back(losses, ids)


def test_momentum_sam_whose_one_pass_is_at_w_plus_e_refuses_hold_back():
    model, losses, ids = _losses_ids()
    opt = samkit.MomentumSAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho="auto")
    with pytest.raises(ValueError, match="Invalid perturbation value.*w \\+ e"):
        opt.hold_back(losses, ids)


@pytest.mark.parametrize("name", ["ESAM", "K-SAM"])
def test_esam_and_ksam_whose_closures_return_per_sample_losses_refuse_hold_back(name):
    model, losses, ids = _losses_ids()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = (
        samkit.ESAM(base, rho="auto", gamma=0.5)
        if name == "ESAM"
        else samkit.KSAM(base, rho="auto", fraction=0.5)
    )
    with pytest.raises(ValueError, match=f"Invalid closure value: {name}'s closure"):
        opt.hold_back(losses, ids)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda v, i: (v.mean(), i), "losses"),
        (lambda v, i: (v.reshape(-1, 2), i), "losses"),
        (lambda v, i: (v.long(), i), "losses"),
        (lambda v, i: (v.tolist(), i), "losses"),
        (lambda v, i: (v, i.double()), "ids"),
        (lambda v, i: (v, i[:-1]), "ids"),
        (lambda v, i: (v, [2**63] * len(i)), "ids"),
        (lambda v, i: (v, [float(v) for v in i.tolist()]), "ids"),
        (lambda v, i: (v, [True] * len(i)), "ids"),
        (lambda v, i: (v, 7), "ids"),
        (lambda v, i: (v, [True] + list(range(len(i) - 1))), "ids"),
        (lambda v, i: (v, i.numpy().astype("float32")), "ids"),
        (lambda v, i: (v, i.reshape(-1, 2)), "ids"),
    ],
)
def test_bad_losses_or_ids_are_refused_naming_the_argument(change, match):
    model, losses, ids = _losses_ids()
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho="auto")
    bad_losses, bad_ids = change(losses, ids)
    with pytest.raises(ValueError, match=f"Invalid {match} value"):
        opt.hold_back(bad_losses, bad_ids)
    assert opt.rho_controller._held.fraction is None  # nothing recorded


@pytest.mark.parametrize("fraction", [0.0, -0.1, 0.6, float("nan"), "0.1", True])
def test_a_bad_fraction_is_refused(fraction):
    model, losses, ids = _losses_ids()
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho="auto")
    with pytest.raises(ValueError, match="Invalid fraction value"):
        opt.hold_back(losses, ids, fraction)


def test_changing_the_fraction_mid_run_is_refused():
    model, losses, ids = _losses_ids()
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho="auto")
    opt.hold_back(losses, ids, 0.1)
    with pytest.raises(ValueError, match="Invalid fraction value.*holds back 0.1"):
        opt.hold_back(losses, ids, 0.2)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.integers(-(2**63), 2**63 - 1), max_size=80), st.sampled_from([0.01, 0.1, 0.3, 0.5])
)
def test_the_held_back_mask_is_the_hash_of_its_docstring(ids, fraction):
    from samkit.optim.holdback import _KNUTH

    # the top ten bits of the hash of the id's low 31 bits, in plain Python integers
    expected = [(((i % 2**31) * _KNUTH) % 2**32) >> 22 < round(fraction * 1024) for i in ids]
    assert held_back(torch.tensor(ids, dtype=torch.int64), fraction).tolist() == expected


def test_a_batch_held_back_whole_trains_on_nothing():
    model = _model()
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho="auto")
    ids = torch.arange(5000)
    ids = ids[held_back(ids, 0.1)][:4]
    x, _ = _data()
    losses = model(x[:4]).sum(1)
    loss = opt.hold_back(losses, ids)
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())


def test_an_ids_tensor_changed_in_place_is_split_again():
    model = _model()
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho="auto")
    x, _ = _data()
    losses = model(x[:4]).sum(1)
    ids = torch.arange(5000)
    held = ids[held_back(ids, 0.1)][:4].clone()
    kept = ids[~held_back(ids, 0.1)][:4].clone()
    batch = kept.clone()
    assert opt.hold_back(losses, batch).item() == pytest.approx(losses.mean().item())
    batch.copy_(held)  # the same tensor object, other ids
    assert opt.hold_back(losses, batch).item() == 0.0


# ------------------------------------------------------------------ DDP


def _ddp_held_back(rank: int) -> dict:
    """Two replicas, each on its own half of every epoch's samples, a new half each epoch (a
    DistributedSampler's shuffled split), each holding back its own samples and passing the
    loop's epoch: the reports are averaged over the replicas."""
    x, y = _data()
    out = {}
    for case in ("drift", "constant", "validation"):
        model = _model()
        ddp = nn.parallel.DistributedDataParallel(model)
        controller = _Recorder(patience=1, warn_after=None)
        opt = samkit.SAM(torch.optim.SGD(ddp.parameters(), lr=0.1), rho=controller, model=ddp)
        rhos, told_at = [], []
        for epoch in range(5):
            mine = _epoch_order(epoch)[rank::2]
            for b in range(0, len(mine), 10):
                ids = mine[b : b + 10]

                def closure(ids=ids, epoch=epoch, ddp=ddp, case=case, opt=opt):
                    losses = nn.functional.cross_entropy(ddp(x[ids]), y[ids], reduction="none")
                    if case == "drift":
                        # rank 0's held-back loss rises by 0.3 an epoch, rank 1's falls by
                        # 0.1: alone, rank 0 would raise the radius at every report and rank 1
                        # never; their mean rises, so both raise it at every report
                        losses = losses + (0.3 * epoch if rank == 0 else -0.1 * epoch)
                    elif case == "constant":  # every held-back loss 1 on rank 0, 3 on rank 1
                        losses = losses * 0 + (1.0 if rank == 0 else 3.0)
                    else:  # held-back losses of 100, and a validation loss of 1 (rank 0)
                        losses = losses * 0 + 100.0
                    loss = opt.hold_back(losses, ids, epoch=epoch)
                    loss.backward()
                    return loss

                before = len(controller.told)
                opt.step(closure)
                opt.zero_grad()
                rhos.append(opt.param_groups[0]["rho"])
                if len(controller.told) > before:
                    told_at.append(opt.steps)
            if case == "validation" and rank == 0:  # (one replica's report is enough)
                opt.observe_validation(1.0)
        out[case] = {"rhos": rhos, "told": controller.told, "told_at": told_at}
    return out


SCENARIOS = {"held_back": _ddp_held_back}


@pytest.mark.ddp
def test_every_replica_uses_the_same_rho_when_each_holds_back_its_own_samples(tmp_path):
    from distributed_harness import load, run_scenarios

    results = run_scenarios(__name__, "SCENARIOS", world=2, outdir=tmp_path)
    r0, r1 = load(results, "held_back")
    # one report per finished epoch, at the same step on both replicas: the mean of theirs
    assert r0["constant"]["told"] == r1["constant"]["told"] == [2.0] * 4
    assert r0["constant"]["told_at"] == r1["constant"]["told_at"]
    assert r0["drift"]["rhos"] == r1["drift"]["rhos"]  # bit for bit, every step
    assert len(set(r0["drift"]["rhos"])) > 1  # and the reports moved it
    # validation losses reported on rank 0 only take precedence on both replicas, from the
    # first: rank 1's held-back loss of that epoch, recorded before it knew, is not mixed in
    assert r0["validation"]["told"] == r1["validation"]["told"] == [1.0] * 4


# ------------------------------------------------------------------ second review


def test_a_non_finite_loss_of_a_trained_sample_stays_out_of_the_held_back_sum():
    from samkit.optim.holdback import HeldBack

    ids = torch.arange(40)
    mask = held_back(ids, 0.1)
    losses = torch.ones(40)
    losses[int(torch.nonzero(~mask)[0])] = float("inf")  # a sample trained on
    hb = HeldBack()
    hb.take(losses.requires_grad_(), ids, 0.1, at_w=True, step=0, epoch=0)
    assert float(hb.total) == float(mask.sum())  # the held-back losses of 1, and only them


def test_a_non_finite_held_back_loss_skips_its_epochs_report_with_a_warning_and_resumes():
    from samkit.optim.holdback import HeldBack

    ids = torch.arange(40)
    mask = held_back(ids, 0.1)
    hb = HeldBack()
    losses = torch.where(mask, torch.full((40,), float("nan")), torch.ones(40))
    hb.take(losses.requires_grad_(), ids, 0.1, at_w=True, step=0, epoch=0)
    state = hb.state_dict()
    assert state["count"] > 0 and state["total"] != state["total"]  # NaN
    again = HeldBack()
    again.load_state_dict(state)  # its own state loads
    with pytest.warns(RuntimeWarning, match="not finite in the epoch just ended"):
        _, report = again.take(
            torch.ones(40, requires_grad=True), ids, 0.1, at_w=True, step=1, epoch=1
        )
    assert report is None


def test_a_fraction_is_stored_as_a_float_and_a_tensor_fraction_is_refused():
    import io

    import numpy as np

    model, losses, ids = _losses_ids()
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho="auto")
    opt.hold_back(losses, ids, np.float64(0.1))
    held = opt.state_dict()["samkit"]["rho"]["held"]
    assert type(held["fraction"]) is float
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    torch.load(buffer)  # (weights_only: plain numbers)
    with pytest.raises(ValueError, match="Invalid fraction value"):
        opt.hold_back(losses, ids, torch.tensor(0.1))


def test_an_ids_buffer_refilled_behind_torchs_back_is_split_again_at_the_next_step():
    import numpy as np

    from samkit.optim.holdback import HeldBack

    array = np.zeros(20, np.int64)
    ids = torch.from_numpy(array)  # (writes to the array do not bump the tensor's version)
    hb = HeldBack()
    for step, start in enumerate((0, 20, 40)):
        array[:] = np.arange(start, start + 20)
        hb.take(torch.ones(20, requires_grad=True), ids, 0.1, at_w=True, step=step, epoch=0)
    expected = sum(int(held_back(torch.arange(s, s + 20), 0.1).sum()) for s in (0, 20, 40))
    assert hb.count == expected


def test_ids_made_under_inference_mode_work():
    model, losses, _ = _losses_ids()
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho="auto")
    with torch.inference_mode():
        ids = torch.arange(N)
    assert torch.isfinite(opt.hold_back(losses, ids))


def test_an_epoch_that_never_changes_is_warned_and_no_grad_calls_do_not_silence_the_warning():
    x, y = _data()
    model = _model()
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho="auto", model=model)
    orders = [_epoch_order(e) for e in range(5)]
    with pytest.warns(RuntimeWarning, match="epoch=0 and the epoch has not changed") as seen:
        for order in orders:
            for b in range(0, N, BATCH):
                ids = order[b : b + BATCH]

                def closure(ids=ids):
                    losses = nn.functional.cross_entropy(model(x[ids]), y[ids], reduction="none")
                    loss = opt.hold_back(losses, ids, epoch=0)
                    loss.backward()
                    return loss

                opt.step(closure)
                opt.zero_grad()
    assert seen[0].filename == __file__  # (pointing at the loop's line)
    # calls under no_grad only record nothing: the no-validation warning still comes
    plain = samkit.SAM(
        torch.optim.SGD(model.parameters(), lr=0.1),
        rho=autorho.ValidationPlateau(warn_after=3),
    )

    def closure():
        with torch.no_grad():
            plain.hold_back(
                nn.functional.cross_entropy(model(x), y, reduction="none"), torch.arange(N)
            )
        loss = model(x).sum()
        loss.backward()
        return loss

    with pytest.warns(autorho.NoValidationWarning):
        for _ in range(4):
            plain.step(closure)
            plain.zero_grad()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_losses_are_averaged_and_summed_in_float32(dtype):
    from samkit.optim.holdback import HeldBack

    n = 100_000
    ids = torch.arange(n)
    mask = held_back(ids, 0.1)
    losses = (torch.rand(n, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    hb = HeldBack()
    trained, _ = hb.take(losses.requires_grad_(), ids, 0.1, at_w=True, step=0, epoch=0)
    exact = losses.detach().double()
    assert trained.dtype == torch.float32
    assert float(trained.detach()) == pytest.approx(float(exact[~mask].mean()), rel=1e-5)
    assert float(hb.total) == pytest.approx(float(exact[mask].sum()), rel=1e-5)


def test_a_run_resumed_mid_epoch_with_epoch_given_is_not_warned_of_an_epoch_that_never_changes():
    """The ids seen before a resume are not saved; the losses counted then are: a check of
    the one against the other warned of an epoch that never changes."""
    import warnings

    x, y = _data()

    def fresh():
        model = _model()
        return model, samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho="auto")

    def steps(model, opt, batches):  # (epoch, first sample) pairs of 10 samples
        for epoch, b in batches:
            ids = _epoch_order(epoch)[b : b + 10]

            def closure(ids=ids, epoch=epoch):
                losses = nn.functional.cross_entropy(model(x[ids]), y[ids], reduction="none")
                loss = opt.hold_back(losses, ids, epoch=epoch)
                loss.backward()
                return loss

            opt.step(closure)
            opt.zero_grad()

    every = [(e, b) for e in range(3) for b in range(0, N, 10)]
    cut = every.index((1, N - 10))  # saved before epoch 1's last batch
    model, opt = fresh()
    steps(model, opt, every[:cut])
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    assert saved[1]["samkit"]["rho"]["held"]["count"] > 3  # (what the check once read)
    model2, opt2 = fresh()
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        steps(model2, opt2, every[cut:])


def _both_reporting_run(epochs, *, validation_from=0, resume_at=None):
    """A loop that holds samples back (with the loop's epoch) and also reports a validation
    loss of 5.0 after each epoch from ``validation_from`` on; the held-back losses are
    about 0.7. Returns what the controller was told, and whether a warning was given."""
    x, y = _data()
    model = _model()
    controller = _Recorder(warn_after=None)
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=controller, model=model)
    import warnings as _warnings

    with _warnings.catch_warnings(record=True) as caught:
        _warnings.simplefilter("always")
        for epoch in range(epochs):
            if epoch == resume_at:  # a fresh optimizer resumes from the saved state
                state = copy.deepcopy(opt.state_dict())
                told = controller.told
                controller = _Recorder(warn_after=None)
                controller.told = told
                opt = samkit.SAM(
                    torch.optim.SGD(model.parameters(), lr=0.1), rho=controller, model=model
                )
                opt.load_state_dict(state)
            _loop(opt, model, x, y, [_epoch_order(epoch)], epoch_arg=False, extra=None)
            if epoch >= validation_from:
                opt.observe_validation(5.0)
    warned = [w for w in caught if "take precedence" in str(w.message)]
    return controller.told, warned


def test_validation_reports_take_precedence_over_held_back_losses_with_a_warning():
    """A loop that reports validation losses and holds samples back: the two arrived between
    the same two steps and were averaged into one number (a review found 3.0 told for a
    validation loss of 5.0 and held-back losses of 1.0). The validation losses are told as
    they are, the held-back losses no more, and a RuntimeWarning says so once."""
    told, warned = _both_reporting_run(4)  # (the last report waits for a next step)
    assert told == [5.0, 5.0, 5.0] and len(warned) == 1
    # held-back losses told before the first validation report stay told; then only 5.0
    told, warned = _both_reporting_run(5, validation_from=2)
    assert [t < 2.0 for t in told] == [True, True, False, False]
    assert told[2:] == [5.0, 5.0] and len(warned) == 1
    # ... and a resumed run keeps to it (the state says the loop reports validation)
    assert _both_reporting_run(5, validation_from=2, resume_at=4)[0] == told


def test_validation_losses_too_large_to_average_are_ignored_and_the_state_still_loads():
    """Two finite losses near 1e308 overflowed the sum of the reports, which went into the
    state as inf: a checkpoint that could not be loaded. The one that would overflow is
    ignored with a warning."""
    w = torch.nn.Parameter(torch.zeros(3))
    opt = samkit.SAM(torch.optim.SGD([w], lr=0.1), rho="auto")
    opt.observe_validation(1e308)
    with pytest.warns(RuntimeWarning, match="too large to average"):
        opt.observe_validation(1e308)
    state = opt.state_dict()
    assert state["samkit"]["rho"]["pending"] == [1e308, 1.0]
    samkit.SAM(torch.optim.SGD([w], lr=0.1), rho="auto").load_state_dict(state)
    with pytest.raises(ValueError, match="Invalid state value: .*validated"):
        bad = copy.deepcopy(state)
        bad["samkit"]["rho"]["validated"] = "yes"
        samkit.SAM(torch.optim.SGD([w], lr=0.1), rho="auto").load_state_dict(bad)
