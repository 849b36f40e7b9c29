"""LookSAM: the reused orthogonal component by hand, with momentum SGD and
Adam; one pass on the steps in between; resume between full steps."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from optim_registry import all_equal, make_data, make_model, params_of, roundtrip, state_equal
from torch import nn

from samkit.optim.looksam import LookSAM
from samkit.optim.mix import SurrogateGap
from samkit.optim.policy import EveryK

A = torch.tensor([[2.0, 0.3, 0.0], [0.3, 1.0, 0.4], [0.0, 0.4, 3.0]], dtype=torch.float64)
B = torch.tensor([1.0, -0.5, 0.2], dtype=torch.float64)


def loss_of(w):
    return 0.5 * w @ A @ w + B @ w + 0.1 * (w**4).sum()


def grad_of(w):
    return A @ w + B + 0.4 * w**3


BASES = {
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.05),
}


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("k", [1, 3])
def test_update_matches_hand_computation(base, k):
    rho, alpha, steps = 0.1, 0.7, 8
    w = nn.Parameter(torch.tensor([1.0, -1.5, 0.8], dtype=torch.float64))
    opt = LookSAM(BASES[base]([w]), rho=rho, k=k, alpha=alpha)
    # reference: the same base optimizer fed the paper's gradients
    w_ref = nn.Parameter(w.detach().clone())
    ref = BASES[base]([w_ref])
    gv = None
    calls = [0]

    def closure():
        calls[0] += 1
        loss = loss_of(w)
        loss.backward()
        return loss

    for t in range(steps):
        wr = w_ref.detach().clone()
        g = grad_of(wr)
        if t % k == 0:
            gs = grad_of(wr + rho * g / g.norm())
            gv = gs - (gs @ g) / (g @ g) * g
            assert abs(float(gv @ g)) < 1e-9  # orthogonal to g
            update = gs
        else:
            update = g + alpha * g.norm() / gv.norm() * gv
        w_ref.grad = update
        ref.step()
        opt.step(closure)
        opt.zero_grad()
        torch.testing.assert_close(w.detach(), w_ref.detach(), rtol=1e-6, atol=1e-8)
    full = math.ceil(steps / k)
    assert calls[0] == steps + full
    assert opt.reused == steps - full


@given(
    w0=st.lists(st.floats(-1.5, 1.5), min_size=3, max_size=3),
    rho=st.sampled_from([0.05, 0.2, 0.5]),
    alpha=st.sampled_from([0.2, 0.7, 1.5]),
)
def test_in_between_gradient_is_g_plus_alpha_norm_g_along_global_gv(w0, rho, alpha):
    """Algorithm 1's in-between step, read off a plain SGD step (lr 1, no
    momentum): the base optimizer receives g + alpha ||g|| g_v / ||g_v||, with
    g_v and both norms taken over *all* parameters (here two tensors, so a
    per-tensor scaling would fail), g computed at w in one pass."""
    w = torch.tensor(w0, dtype=torch.float64)
    g0 = grad_of(w)
    assume(float(g0.norm()) > 1e-3)
    a, b = nn.Parameter(w[:2].clone()), nn.Parameter(w[2:].clone())
    opt = LookSAM(torch.optim.SGD([a, b], lr=1.0), rho=rho, k=2, alpha=alpha)
    calls = [0]

    def closure():
        calls[0] += 1
        loss = loss_of(torch.cat([a, b]))
        loss.backward()
        return loss

    opt.step(closure)  # step 0: full SAM step, stores g_v
    opt.zero_grad()
    gs = grad_of(w + rho * g0 / g0.norm())
    gv = gs - (gs @ g0) / (g0 @ g0) * g0
    assume(float(gv.norm()) > 1e-6 * float(gs.norm()))
    w1 = w - gs
    torch.testing.assert_close(torch.cat([a, b]).detach(), w1)
    opt.step(closure)  # step 1: one pass at w1, reuses g_v
    fed = w1 - torch.cat([a, b]).detach()
    g1 = grad_of(w1)
    torch.testing.assert_close(fed, g1 + alpha * g1.norm() / gv.norm() * gv, rtol=1e-7, atol=1e-9)
    extra = fed - g1
    torch.testing.assert_close(
        extra.norm(), alpha * g1.norm(), rtol=1e-7, atol=1e-9
    )  # size set by alpha, not by SAM
    assert (
        abs(float(extra @ g0)) <= 1e-7 * float(extra.norm() * g0.norm()) + 1e-9
    )  # orthogonal to step 0's g
    assert calls[0] == 3 and (opt.ascents, opt.reused) == (1, 1)


def test_closure_runs_once_on_the_steps_in_between():
    """k=5, 10 steps: 10 first passes + 2 second passes (the peer runs 20)."""
    model = make_model(0)
    x, y = make_data(0)
    opt = LookSAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.05, k=5)
    calls = [0]

    def closure():
        calls[0] += 1
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(10):
        opt.step(closure)
        opt.zero_grad()
    assert calls[0] == 12
    assert (opt.steps, opt.ascents, opt.reused) == (10, 2, 8)


def test_alpha_zero_is_sam_every_k_without_rho_scaling():
    import samkit

    x, y = make_data(1)
    m1, m2 = make_model(1), make_model(1)
    o1 = LookSAM(torch.optim.Adam(m1.parameters(), lr=1e-2), rho=0.05, k=3, alpha=0.0)
    o2 = samkit.SAM(
        torch.optim.Adam(m2.parameters(), lr=1e-2), rho=0.05, policy=EveryK(3, scale_rho=False)
    )
    for _ in range(7):
        for m, o in ((m1, o1), (m2, o2)):

            def closure(m=m):
                loss = torch.nn.functional.mse_loss(m(x), y)
                loss.backward()
                return loss

            o.step(closure)
            o.zero_grad()
    assert all_equal(params_of(m1), params_of(m2))


@pytest.mark.parametrize("base", sorted(BASES))
def test_resume_between_full_steps_continues_bit_for_bit(base):
    """Saved at step 4 with k=3: steps 4 and 5 reuse g_v, which must come from the checkpoint."""
    total, stop = 9, 4
    x, y = make_data(2)

    def build(model):
        return LookSAM(BASES[base](model.parameters()), rho=0.1, k=3, alpha=0.7)

    def run(opt, model, n):
        for _ in range(n):

            def closure():
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
            opt.zero_grad()

    ref = make_model(2)
    ref_opt = build(ref)
    run(ref_opt, ref, total)
    model = make_model(2)
    opt = build(model)
    run(opt, model, stop)
    ckpt = roundtrip({"m": model.state_dict(), "o": opt.state_dict()})
    assert len(ckpt["o"]["samkit"]["mix"]["gv"]) == 4
    model2 = make_model(60)
    model2.load_state_dict(ckpt["m"])
    opt2 = build(model2)
    opt2.load_state_dict(ckpt["o"])
    run(opt2, model2, total - stop)
    assert all_equal(params_of(model2), params_of(ref))
    assert state_equal(opt2.state_dict(), ref_opt.state_dict())


def test_batchnorm_statistics_come_from_the_first_pass_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    x, y = make_data(3)
    opt = LookSAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05, k=2, model=model)
    for _ in range(5):

        def closure():
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        opt.zero_grad()
    assert int(model[1].num_batches_tracked) == 5


def test_unsupported_combinations_raise_clear_errors():
    w = nn.Parameter(torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="Invalid policy value: LookSAM chooses its own steps"):
        LookSAM(torch.optim.SGD([w], lr=0.1), policy=EveryK(2))
    with pytest.raises(ValueError, match="Invalid mix value: LookSAM chooses its own steps"):
        LookSAM(torch.optim.SGD([w], lr=0.1), mix=SurrogateGap(0.1))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"k": 0}, "Invalid k value: 0"),
        ({"k": 2.0}, "Invalid k value: 2.0"),
        ({"alpha": -1}, "Invalid alpha value: -1"),
    ],
)
def test_invalid_arguments_raise_value_error_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LookSAM(torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1), **kwargs)


# ------------------------------------------------------------------- DDP
def _ddp_worker(rank: int, port: int, out: str) -> None:
    import datetime
    import os

    import torch.distributed as dist

    import samkit
    from samkit.optim.gsam import GSAM
    from samkit.optim.policy import GradNormTrigger

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        results = {}
        makers = {
            "looksam": lambda ps, m: LookSAM(
                torch.optim.SGD(ps, lr=0.1, momentum=0.9), rho=0.3, k=2, model=m
            ),
            "gsam": lambda ps, m: GSAM(torch.optim.Adam(ps, lr=0.01), rho=0.3, alpha=0.5, model=m),
            "ae_sam": lambda ps, m: samkit.SAM(
                torch.optim.SGD(ps, lr=0.1), rho=0.3, policy=GradNormTrigger(6, decay=0.5), model=m
            ),
        }
        from samkit.optim.esam import ESAM

        makers["esam"] = lambda ps, m: ESAM(
            torch.optim.SGD(ps, lr=0.1), rho=0.3, beta=0.5, gamma=0.5, seed=3, model=m
        )
        for name, make in makers.items():
            torch.manual_seed(0)
            net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
            ddp = nn.parallel.DistributedDataParallel(net)
            opt = make(
                ddp.parameters(), ddp
            )  # ddp_ascent="local": each replica ascends on its own half
            for step in range(6):
                g = torch.Generator().manual_seed(100 + step)
                x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
                xs, ys = x[rank * 8 : (rank + 1) * 8], y[rank * 8 : (rank + 1) * 8]

                def closure(ddp=ddp, xs=xs, ys=ys):
                    loss = torch.nn.functional.cross_entropy(ddp(xs), ys)
                    loss.backward()
                    return loss

                def per_sample(index=None, ddp=ddp, xs=xs, ys=ys):
                    xb, yb = (xs, ys) if index is None else (xs[index], ys[index])
                    return torch.nn.functional.cross_entropy(ddp(xb), yb, reduction="none")

                opt.step(per_sample if name == "esam" else closure)
                opt.zero_grad()
            extra = {"mean": opt.policy.mean, "var": opt.policy.var} if name == "ae_sam" else {}
            results[name] = {
                "params": [p.detach().clone() for p in net.parameters()],
                "ascents": opt.ascents,
                **extra,
            }
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_ddp_local_ascent_keeps_replicas_identical(tmp_path):
    """GSAM and LookSAM mix the (local) first-pass gradient into the update,
    AE-SAM decides from it and ESAM selects samples per replica: all must keep
    the replicas' weights equal."""
    import socket

    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for name in ("looksam", "gsam", "ae_sam", "esam"):
        assert all_equal(r0[name]["params"], r1[name]["params"]), name
        assert r0[name]["ascents"] == r1[name]["ascents"]
    assert r0["looksam"]["ascents"] == 3
    assert (
        r0["ae_sam"]["mean"] == r1["ae_sam"]["mean"] and r0["ae_sam"]["var"] == r1["ae_sam"]["var"]
    )
    assert 0 < r0["ae_sam"]["ascents"] < 6
