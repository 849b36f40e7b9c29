"""SAM under DistributedDataParallel: 2 processes, gloo backend, CPU.

One pair of worker processes (tests/distributed_harness.py) runs every
scenario in turn and saves each rank's final weights, buffers and counters;
the test functions compare them, in this process, with single-process
references that do not use DDP at all:

* global ascent == single-process SAM on the full batch;
* local ascent (m-sharpness) == each replica ascending along its own
  half-batch gradient, the second-pass gradients then averaged.

Every method of the family (tests/optim_registry.py) also runs under local
ascent and must keep the replicas identical; GSAM and LookSAM on two DDP
subgroups of a 4-process world must average over their own subgroup only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from distributed_harness import load, run_scenarios
from torch import nn

import samkit
from samkit.optim.batchnorm import freeze_bn_stats

pytestmark = [
    pytest.mark.ddp,
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()),
        reason="torch.distributed with gloo is not available",
    ),
]

WORLD = 2
STEPS = 6
BATCH = 16  # full batch; each replica gets BATCH // WORLD rows
RHO = 0.2  # large enough that local and global ascent visibly differ
LR = 0.1
DEADLINE_S = 150.0  # all scenarios together; normally ~10 s
COLLECTIVE_TIMEOUT_S = 30.0


# ----------------------------------------------------------------- problem
def make_model(bn: bool = False) -> nn.Module:
    torch.manual_seed(0)
    if bn:
        return nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 3))
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))


def make_base(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=0.9, weight_decay=1e-3)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(BATCH, 6, generator=g)
    y = torch.randint(0, 3, (BATCH,), generator=g)
    return x, y


def shard(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch(step)
    n = BATCH // WORLD
    return x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, y)


class EvenSteps(samkit.Policy):
    """Ascend on even steps only (a deterministic, replica-consistent policy)."""

    def should_ascend(self, sam):
        return sam.steps % 2 == 0


class EvenStepsConsistent(EvenSteps):
    """The same, declaring that replicas agree without being asked."""

    replica_consistent = True


class RankDependent(samkit.Policy):
    """Replicas disagree on odd steps (rank 0 wants the ascent, rank 1 does not),
    as a policy reading the local gradient would under local ascent."""

    def should_ascend(self, sam):
        return sam.steps % 2 == 0 or dist.get_rank() == 0


# ------------------------------------------------------------------ worker
def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _ddp(
    model: nn.Module, counter: dict | None = None, **ddp_kwargs
) -> nn.parallel.DistributedDataParallel:
    ddp = nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
    if counter is not None:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        def counting_allreduce(state, bucket):
            state["allreduce"] += 1
            return default_hooks.allreduce_hook(None, bucket)

        ddp.register_comm_hook(counter, counting_allreduce)
    return ddp


def _closure(model, x, y, *, scaler=None, poison=None):
    """Forward + backward; ``poison`` ("first" / "second") makes that call's loss NaN."""
    calls = []

    def closure():
        loss = loss_fn(model(x), y)
        calls.append("first" if not calls else "second")
        if calls[-1] == poison:
            loss = loss * float("nan")
        (scaler.scale(loss) if scaler is not None else loss).backward()
        return loss

    return closure


def _train(
    rank,
    *,
    mode="local",
    policy=None,
    bn=False,
    explicit=False,
    skip_nonfinite=None,
    poison=None,
    amp=False,
    ddp_kwargs=None,
):
    """Run STEPS SAM steps on this rank's shards; return what the parent checks.

    ``poison``: {step: "first" | "second"}: on rank 1 only, that pass's loss is
    multiplied by NaN (a non-finite gradient on one replica).
    """
    counter = {"allreduce": 0}
    ddp = _ddp(make_model(bn), counter, **(ddp_kwargs or {}))
    opt = samkit.SAM(
        make_base(ddp.parameters()),
        rho=RHO,
        model=ddp,
        ddp_ascent=mode,
        policy=policy,
        skip_nonfinite=skip_nonfinite,
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if amp else None
    scales = []
    poison = poison or {}
    history = []  # buffers (BatchNorm statistics) after each step
    with _counting_all_reduce() as total:
        _steps(
            rank,
            ddp,
            opt,
            explicit=explicit,
            scaler=scaler,
            poison=poison,
            history=history,
            scales=scales,
        )
    return {
        "state": _snapshot(ddp.module),
        "history": history,
        "allreduce": counter["allreduce"],
        "sam_allreduce": total["n"] - counter["allreduce"],  # SAM's own collectives
        "steps": opt.steps,
        "ascents": opt.ascents,
        "scales": scales,
    }


@contextlib.contextmanager
def _counting_all_reduce():
    """Count torch.distributed.all_reduce calls (DDP's Python comm hook included)."""
    calls = {"n": 0}
    real = dist.all_reduce

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    dist.all_reduce = counting
    try:
        yield calls
    finally:
        dist.all_reduce = real


def _steps(rank, ddp, opt, *, explicit, scaler, poison, history, scales):
    for step in range(STEPS):
        x, y = shard(step, rank)
        closure = _closure(ddp, x, y, scaler=scaler, poison=poison.get(step) if rank == 1 else None)

        if explicit:
            with opt.first_pass():
                closure()
            if opt.first_step(zero_grad=True):
                closure()
            opt.second_step(zero_grad=True)
        elif scaler is not None:
            opt.step(closure, scaler=scaler)
            scaler.update()
            scales.append(scaler.get_scale())
            opt.zero_grad()
        else:
            opt.step(closure)
            opt.zero_grad()
        history.append({k: v.detach().clone() for k, v in ddp.module.named_buffers()})


def _accumulated(rank, *, mode, chunks=2):
    """The documented gradient-accumulation pattern: every micro-batch but the
    last under ``no_sync``, in a closure that ``step`` calls for both passes."""
    counter = {"allreduce": 0}
    ddp = _ddp(make_model(), counter)
    opt = samkit.SAM(make_base(ddp.parameters()), rho=RHO, model=ddp, ddp_ascent=mode)

    def accumulating_closure(xs, ys):
        def closure():
            total = 0.0
            for i, (xi, yi) in enumerate(zip(xs, ys)):
                with ddp.no_sync() if i < chunks - 1 else contextlib.nullcontext():
                    loss = loss_fn(ddp(xi), yi) / chunks
                    loss.backward()
                total += loss.detach()
            return total

        return closure

    for step in range(STEPS):
        x, y = shard(step, rank)
        opt.step(accumulating_closure(x.chunk(chunks), y.chunk(chunks)))
        opt.zero_grad()
    return {"state": _snapshot(ddp.module), "allreduce": counter["allreduce"]}


class Branchy(nn.Module):
    """A head used by rank 0 only: needs find_unused_parameters=True."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(6, 3)
        self.extra = nn.Linear(6, 3)

    def forward(self, x, use_extra: bool):
        out = self.trunk(x)
        return out + self.extra(x) if use_extra else out


def _unused_parameters(rank):
    ddp = nn.parallel.DistributedDataParallel(Branchy(), find_unused_parameters=True)
    init = _snapshot(ddp.module)
    opt = samkit.SAM(make_base(ddp.parameters()), rho=RHO, model=ddp, policy=EvenSteps())
    for step in range(STEPS):
        x, y = shard(step, rank)
        opt.step(_closure(lambda inp: ddp(inp, rank == 0), x, y))
        opt.zero_grad()
    return {"state": _snapshot(ddp.module), "init": init, "ascents": opt.ascents}


def _different_settings(rank, what):
    """Each rank builds SAM with other settings: refused at the first step, on every rank,
    the weights untouched (they drifted apart silently, or a rank hung)."""
    ddp = _ddp(make_model())
    init = _snapshot(ddp.module)
    settings = {
        "policy": dict(rho=RHO, policy=samkit.EveryK(2 if rank == 0 else 3)),
        "rho": dict(rho=RHO if rank == 0 else 0.0),
    }[what]
    opt = samkit.SAM(make_base(ddp.parameters()), model=ddp, **settings)
    x, y = shard(0, rank)
    try:
        opt.step(_closure(ddp, x, y))
    except ValueError as exc:
        return {"error": str(exc), "same": _identical(init, _snapshot(ddp.module))}
    return {"error": None}


def _explicit_without_first_pass(rank):
    """The two-step form with no first_pass(): DDP all-reduced the first backward, so the
    ascent was global under ddp_ascent='local', silently."""
    ddp = _ddp(make_model())
    opt = samkit.SAM(make_base(ddp.parameters()), rho=RHO, model=ddp)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(2):
            x, y = shard(step, rank)
            loss_fn(ddp(x), y).backward()
            if opt.first_step(zero_grad=True):
                loss_fn(ddp(x), y).backward()
            opt.second_step(zero_grad=True)
    return {"warnings": [str(w.message) for w in caught if w.category is RuntimeWarning]}


def _identical(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def _static_graph_local(rank):
    ddp = _ddp(make_model(), static_graph=True)
    try:
        samkit.SAM(make_base(ddp.parameters()), model=ddp)
    except ValueError as exc:
        return {"error": str(exc)}
    return {"error": None}


def _forward_outside_first_pass(rank):
    """The documented mistake: forward outside first_pass(), only backward inside."""
    ddp = _ddp(make_model())
    opt = samkit.SAM(make_base(ddp.parameters()), rho=RHO, model=ddp)
    x, y = shard(0, rank)
    loss = loss_fn(ddp(x), y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with opt.first_pass():
            loss.backward()
    if opt.first_step(zero_grad=True):
        loss_fn(ddp(x), y).backward()
    opt.second_step(zero_grad=True)
    return {"warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]}


# ------------------------------------------------- the family, and subgroups
def _family(rank):
    """Every DDP-capable method of the registry under local ascent, on this rank's half."""
    from optim_registry import BASE_BY_NAME, make_data, methods

    from samkit.optim._ddp import DDP_ATTRIBUTES

    out = {}
    for info in methods("supports_ddp"):
        net = info.model(21)
        ddp = nn.parallel.DistributedDataParallel(net)
        if info.name == "sam":
            out["missing_ddp_attributes"] = [a for a in DDP_ATTRIBUTES if not hasattr(ddp, a)]
        opt = info.make(BASE_BY_NAME["sgd_nesterov"], ddp, model=ddp)
        for step in range(4):
            x, y = make_data(30 + step, n=12)
            info.step(opt, ddp, x[rank::WORLD], y[rank::WORLD])
        out[info.name] = {
            "params": [p.detach().clone() for p in net.parameters()],
            "ascents": opt.ascents,
            "policy": opt.policy.state_dict() if opt.policy is not None else {},
            "rho": [g[opt.rho_key] for g in opt.param_groups],
        }
    return out


def _momentum_sam(rank):
    """Momentum-SAM under DDP: its only pass is an ordinary all-reduced one."""
    counter = {"allreduce": 0}
    ddp = _ddp(make_model(), counter)
    opt = samkit.MomentumSAM(make_base(ddp.parameters()), rho=5 * RHO, model=ddp)
    _steps(rank, ddp, opt, explicit=False, scaler=None, poison={}, history=[], scales=[])
    return {
        "state": _snapshot(ddp.module),
        "allreduce": counter["allreduce"],
        "ascents": opt.ascents,
    }


SCENARIOS = {
    "family_local": _family,
    "momentum_sam": _momentum_sam,
    "global": lambda r: _train(r, mode="global"),
    "local": lambda r: _train(r),
    "explicit_local": lambda r: _train(r, explicit=True),
    "explicit_global": lambda r: _train(r, mode="global", explicit=True),
    "policy_local": lambda r: _train(r, policy=EvenSteps()),
    "consistent_policy_local": lambda r: _train(r, policy=EvenStepsConsistent()),
    "bucket_view_policy_local": lambda r: _train(
        r, policy=EvenSteps(), ddp_kwargs={"gradient_as_bucket_view": True}
    ),
    "static_graph_global": lambda r: _train(r, mode="global", ddp_kwargs={"static_graph": True}),
    "static_graph_local": _static_graph_local,
    "disagreeing_policy": lambda r: _train(r, policy=RankDependent()),
    "bn_local": lambda r: _train(r, bn=True),
    "bn_global": lambda r: _train(r, mode="global", bn=True),
    "bn_policy_local": lambda r: _train(r, bn=True, policy=EvenSteps()),
    "forward_outside": _forward_outside_first_pass,
    "accumulated_local": lambda r: _accumulated(r, mode="local"),
    "accumulated_global": lambda r: _accumulated(r, mode="global"),
    "unused_parameters": _unused_parameters,
    "different_policy": lambda r: _different_settings(r, "policy"),
    "explicit_without_first_pass": _explicit_without_first_pass,
    "different_rho": lambda r: _different_settings(r, "rho"),
    # Most likely to hang when broken: last.
    "nonfinite_local": lambda r: _train(r, skip_nonfinite=True, poison={1: "first", 3: "second"}),
    "nonfinite_amp_local": lambda r: _train(
        r, amp=True, policy=EvenSteps(), poison={1: "first", 4: "first"}
    ),
    "nonfinite_policy_local": lambda r: _train(
        r, skip_nonfinite=True, policy=EvenSteps(), poison={1: "first", 2: "first", 4: "second"}
    ),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_scenarios(
        __name__,
        "SCENARIOS",
        world=WORLD,
        outdir=tmp_path_factory.mktemp("ddp"),
        deadline_s=DEADLINE_S,
    )


# -------------------------------------------------------------- references
def _grads(model: nn.Module, x, y) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def sam_single_process(*, bn: bool = False) -> dict[str, torch.Tensor]:
    """samkit's SAM in one process on the full batch: what global ascent must equal."""
    model = make_model(bn)
    opt = samkit.SAM(make_base(model.parameters()), rho=RHO, model=model)
    for step in range(STEPS):
        opt.step(_closure(model, *batch(step)))
        opt.zero_grad()
    return _snapshot(model)


def simulate(
    *, mode="local", bn=False, ascend=lambda step: True, skip=()
) -> list[dict[str, torch.Tensor]]:
    """Data-parallel SAM written out by hand, without samkit or DDP.

    Each step: every replica r starts from rank 0's BatchNorm buffers (DDP's
    broadcast), computes g_r on its shard at w (updating its buffers once),
    ascends to w + rho g_r / ||g_r|| and takes the gradient there with the
    statistics frozen; the base optimizer then steps with the mean over
    replicas of those gradients. Steps the policy declines use the mean of
    the g_r instead; steps in ``skip`` change nothing. With ``mode="global"``
    every replica ascends along the mean of the g_r. Returns, per rank, the
    weights and that rank's buffers after the last step, and that rank's
    buffers after every step.
    """
    model = make_model(bn)
    base = make_base(model.parameters())
    params = list(model.parameters())
    buffer_names = [k for k, _ in model.named_buffers()]
    local_buffers = [None] * WORLD
    history = [[] for _ in range(WORLD)]
    for step in range(STEPS):
        w = [p.detach().clone() for p in params]
        start = {k: v.clone() for k, v in model.named_buffers()}
        firsts, final, ends = [], [], []
        for r in range(WORLD):
            with torch.no_grad():
                for k, v in model.named_buffers():
                    v.copy_(start[k])
            x, y = shard(step, r)
            firsts.append(_grads(model, x, y))
            ends.append({k: v.clone() for k, v in model.named_buffers()})
        if mode == "global":
            firsts = [[sum(t) / WORLD for t in zip(*firsts)]] * WORLD
        for r in range(WORLD):
            x, y = shard(step, r)
            g = firsts[r]
            if ascend(step):
                norm = torch.stack([t.norm() for t in g]).norm()
                with torch.no_grad():
                    for p, t in zip(params, g):
                        p.add_(t, alpha=RHO / (float(norm) + 1e-12))
                with freeze_bn_stats(model):
                    g = _grads(model, x, y)
                with torch.no_grad():
                    for p, t in zip(params, w):
                        p.copy_(t)
            final.append(g)
        with torch.no_grad():
            for k, v in model.named_buffers():  # rank 0's buffers are the model's
                v.copy_(ends[0][k])
        local_buffers = ends
        for r in range(WORLD):
            history[r].append(ends[r])
        if step in skip:
            continue
        for i, p in enumerate(params):
            p.grad = sum(f[i] for f in final) / WORLD
        base.step()
    state = _snapshot(model)
    out = []
    for r in range(WORLD):
        s = dict(state)
        s.update({k: local_buffers[r][k] for k in buffer_names})
        out.append((s, history[r]))
    return out


def _params(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.endswith(("weight", "bias"))}


def assert_close(a: dict, b: dict, **kw) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(
            a[k], b[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}", **kw
        )


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), (
            f"replicas differ in {k}: max |diff| {(a[k] - b[k]).abs().max()}"
        )


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# -------------------------------------------------------------------- tests
def test_global_ascent_equals_single_process_full_batch(results):
    r0, r1 = load(results, "global")
    assert_identical(r0["state"], r1["state"])
    assert_close(r0["state"], sam_single_process())
    assert_close(r0["state"], simulate(mode="global")[0][0])
    # Both passes are all-reduced: one bucket per backward, two backwards per step.
    assert r0["allreduce"] == r1["allreduce"] == 2 * STEPS


def test_momentum_sam_equals_single_process_full_batch(results):
    """One all-reduced pass per step, at w + e from the (replica-identical) momentum."""
    r0, r1 = load(results, "momentum_sam")
    assert_identical(r0["state"], r1["state"])
    model = make_model()
    opt = samkit.MomentumSAM(make_base(model.parameters()), rho=5 * RHO, model=model)
    for step in range(STEPS):
        opt.step(_closure(model, *batch(step)))
        opt.zero_grad()
    assert_close(r0["state"], _snapshot(model))
    assert r0["allreduce"] == STEPS and r0["ascents"] == opt.ascents == STEPS - 1


def test_local_ascent_is_per_replica_and_first_pass_does_not_communicate(results):
    r0, r1 = load(results, "local")
    assert_identical(r0["state"], r1["state"])
    assert_close(r0["state"], simulate()[0][0])
    # Only the second pass reaches DDP's reducer: the first ran under no_sync.
    assert r0["allreduce"] == r1["allreduce"] == STEPS
    # And it is not global ascent in disguise.
    g0 = load(results, "global")[0]
    assert max_diff(r0["state"], g0["state"]) > 1e-3


@pytest.mark.parametrize("mode", ["local", "global"])
def test_explicit_two_step_form_equals_step_closure(results, mode):
    for explicit, closure in zip(load(results, f"explicit_{mode}"), load(results, mode)):
        assert_identical(explicit["state"], closure["state"])
        assert explicit["allreduce"] == closure["allreduce"]


@pytest.mark.parametrize("scenario", ["policy_local", "consistent_policy_local"])
def test_declined_steps_under_local_ascent_all_reduce_the_gradient(results, scenario):
    r0, r1 = load(results, scenario)
    assert_identical(r0["state"], r1["state"])
    assert r0["ascents"] == r1["ascents"] == STEPS // 2
    assert_close(r0["state"], simulate(ascend=lambda s: s % 2 == 0)[0][0])
    # SAM's own collectives: one flat all-reduce per declined step (one dtype,
    # one device), plus the agreement on the decision unless the policy
    # declares itself replica-consistent, plus the settings check at the first step.
    agreement = STEPS if scenario == "policy_local" else 0
    assert r0["sam_allreduce"] == r1["sam_allreduce"] == STEPS // 2 + agreement + SETTINGS_CHECK


@pytest.mark.parametrize(
    ("scenario", "same_as"),
    [("bucket_view_policy_local", "policy_local"), ("static_graph_global", "global")],
)
def test_ddp_options_give_the_same_steps(results, scenario, same_as):
    """gradient_as_bucket_view (.grad aliases DDP's buckets) and static_graph."""
    for r, ref in zip(load(results, scenario), load(results, same_as)):
        assert_identical(r["state"], ref["state"])
        assert r["allreduce"] == ref["allreduce"]


def test_the_explicit_form_without_first_pass_warns_once_that_it_is_global(results):
    for r in load(results, "explicit_without_first_pass"):
        assert len(r["warnings"]) == 1, r["warnings"]
        assert r["warnings"][0].startswith("SAM.first_step() without first_pass(): under DDP")


@pytest.mark.parametrize("scenario", ["different_policy", "different_rho"])
def test_settings_that_differ_across_replicas_are_refused_at_the_first_step(results, scenario):
    for r in load(results, scenario):
        assert r["error"] is not None and r["error"].startswith(
            "Invalid settings: the replicas' SAM settings differ"
        )
        assert r["same"]  # the weights untouched


#: SAM's one collective of its own when it ascends on every step: the replicas' settings
#: compared once, at the first step (_ddp.check_replicas_agree)
SETTINGS_CHECK = 1


@pytest.mark.parametrize("scenario", ["local", "global"])
def test_always_ascending_sam_adds_no_collective_of_its_own(results, scenario):
    """... but the settings check at its first step."""
    assert [r["sam_allreduce"] for r in load(results, scenario)] == [SETTINGS_CHECK] * 2


def test_replicas_that_disagree_on_the_policy_take_the_same_branch(results):
    """Any replica asking for the ascent makes all of them ascend (else their
    collectives would not match and DDP would hang)."""
    r0, r1 = load(results, "disagreeing_policy")
    assert_identical(r0["state"], r1["state"])
    assert r0["ascents"] == r1["ascents"] == STEPS
    assert_identical(r0["state"], load(results, "local")[0]["state"])


def _bn_buffers(state):
    return {k: v for k, v in state.items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("scenario", ["bn_local", "bn_policy_local", "bn_global"])
def test_batchnorm_statistics_under_ddp(results, scenario):
    """DDP broadcasts rank 0's buffers at the start of each step (broadcast_buffers);
    each replica then updates them once, with its own shard, in the first pass.

    So rank 0's statistics are those of a single-process model fed rank 0's
    shards, one update per step; after a step that ascends every replica holds
    rank 0's (the second forward is synchronised and broadcasts them again);
    after a declined step, the other ranks hold their own one-shard update
    until the next forward, as in plain DDP.
    """
    ascend = (lambda s: s % 2 == 0) if scenario == "bn_policy_local" else (lambda s: True)
    mode = "global" if scenario == "bn_global" else "local"
    r0, r1 = load(results, scenario)
    assert_identical(_params(r0["state"]), _params(r1["state"]))
    (final, hist0), (_, hist1) = simulate(mode=mode, bn=True, ascend=ascend)
    assert_close(_params(r0["state"]), _params(final))
    assert int(r0["state"]["1.num_batches_tracked"]) == STEPS  # once per step, not twice
    for step in range(STEPS):
        b0, b1 = r0["history"][step], r1["history"][step]
        assert_close(b0, hist0[step])
        if ascend(step):
            assert_identical(b0, b1)
        else:
            assert_close(b1, hist1[step])
            assert max_diff(b0, b1) > 0  # legitimately different until the next forward


@pytest.mark.parametrize("mode", ["local", "global"])
def test_gradient_accumulation_with_no_sync(results, mode):
    """Two micro-batches per replica give the same step as one, with DDP's
    communication once per synchronised pass."""
    acc, whole = load(results, f"accumulated_{mode}"), load(results, mode)
    assert_identical(acc[0]["state"], acc[1]["state"])
    assert_close(acc[0]["state"], whole[0]["state"])
    assert acc[0]["allreduce"] == whole[0]["allreduce"]


def test_parameters_unused_on_one_replica(results):
    """With find_unused_parameters=True a layer only rank 0 uses has no
    first-pass gradient on rank 1; the declined steps' all-reduce must still
    reduce the same tensors on both (else gloo aborts on mismatched sizes)."""
    r0, r1 = load(results, "unused_parameters")
    assert_identical(r0["state"], r1["state"])
    assert r0["ascents"] == STEPS // 2
    assert max_diff(_params(r0["state"]), _params(r0["init"])) > 1e-3
    assert not torch.equal(r0["state"]["extra.weight"], r0["init"]["extra.weight"])


def test_static_graph_needs_global_ascent(results):
    """no_sync on a static-graph DDP model crashes in torch (pytorch#143580):
    local ascent is refused up front, naming the way out."""
    for r in load(results, "static_graph_local"):
        assert r["error"] is not None and "static_graph" in r["error"] and "global" in r["error"]


def test_forward_outside_first_pass_warns(results):
    for r in load(results, "forward_outside"):
        assert any("first_pass" in w and "forward" in w for w in r["warnings"]), r["warnings"]


@pytest.mark.parametrize(
    ("scenario", "ascend", "skip"),
    [
        ("nonfinite_local", lambda s: True, {1, 3}),
        ("nonfinite_policy_local", lambda s: s % 2 == 0, {1, 2, 4}),
        ("nonfinite_amp_local", lambda s: s % 2 == 0, {1, 4}),
    ],
)
def test_nonfinite_gradient_on_one_replica_skips_the_step_on_all(results, scenario, ascend, skip):
    r0, r1 = load(results, scenario)
    assert_identical(r0["state"], r1["state"])
    assert r0["steps"] == r1["steps"] == STEPS
    assert_close(r0["state"], simulate(ascend=ascend, skip=skip)[0][0])
    for v in r0["state"].values():
        assert torch.isfinite(v).all()
    if r0["scales"]:  # GradScaler: both replicas backed off on exactly the skipped steps
        assert r0["scales"] == r1["scales"]
        assert [b < a for a, b in zip([2.0**8] + r0["scales"], r0["scales"])] == [
            s in skip for s in range(STEPS)
        ]


def test_example_script_trains_and_keeps_replicas_identical():
    """examples/ddp.py as a user runs it: spawns 2 gloo processes by itself."""
    script = Path(__file__).resolve().parents[1] / "examples" / "ddp.py"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    # its own process group, so a timeout kills the workers it spawned too
    proc = subprocess.Popen(
        [sys.executable, str(script), "--epochs", "1", "--accumulate", "2", "--cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        # a hang guard, not a timing test: ~10 s idle, minutes on a loaded machine
        stdout, stderr = proc.communicate(timeout=4 * DEADLINE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("examples/ddp.py did not finish: hang?")
    proc = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[-1] == "replicas identical: True", proc.stdout
    assert len(lines) == 2 and lines[0].startswith("epoch  1"), proc.stdout
    loss = float(lines[0].split("train loss")[1].split()[0])
    accuracy = float(lines[0].split("test acc")[1].split("%")[0]) / 100
    assert loss < 2.0  # ln(10) = 2.3 at the start
    assert accuracy > 0.5  # ten classes: chance is 0.1


def test_every_method_keeps_the_replicas_identical_under_local_ascent(results):
    """Each replica ascends along its own gradient; what the base step receives
    (mixes, policies' decisions, ESAM's selection) must still agree across replicas."""
    from optim_registry import methods

    r0, r1 = load(results, "family_local")
    assert r0["missing_ddp_attributes"] == [], "torch's DDP changed: update samkit/optim/_ddp.py"
    for info in methods("supports_ddp"):
        a, b = r0[info.name], r1[info.name]
        assert all(torch.equal(p, q) for p, q in zip(a["params"], b["params"])), info.name
        assert a["ascents"] == b["ascents"] > 0, info.name
        assert str(a["policy"]) == str(b["policy"]), info.name
        assert a["rho"] == b["rho"], info.name  # a rho controller's radius agrees too


# 4 processes, two DDP subgroups {0, 1} and {2, 3}: GSAM and LookSAM average
# their kept first-pass gradient over DDP's own group. Group B's data changes
# between the two scenarios; group A's result must not.
SUBGROUP_WORLD = 4


def _subgroups(rank, variant):
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    mine = groups[rank // 2]
    out = {}
    for name, make in (
        (
            "gsam",
            lambda ps, m: samkit.GSAM(
                torch.optim.SGD(ps, lr=0.1, momentum=0.9), rho=0.3, alpha=0.5, model=m
            ),
        ),
        (
            "looksam",
            lambda ps, m: samkit.LookSAM(
                torch.optim.SGD(ps, lr=0.1), rho=0.3, k=2, alpha=0.5, model=m
            ),
        ),
    ):
        ddp = nn.parallel.DistributedDataParallel(make_model(), process_group=mine)
        opt = make(ddp.parameters(), ddp)
        for step in range(4):
            seed = step if rank < 2 else 100 * (variant + 1) + step
            x, y = batch(seed)
            half = BATCH // 2
            xs, ys = (
                x[(rank % 2) * half : (rank % 2 + 1) * half],
                y[(rank % 2) * half : (rank % 2 + 1) * half],
            )
            opt.step(_closure(ddp, xs, ys))
            opt.zero_grad()
        out[name] = [p.detach().clone() for p in ddp.module.parameters()]
    return out


SUBGROUP_SCENARIOS = {
    "subgroups_0": lambda r: _subgroups(r, 0),
    "subgroups_1": lambda r: _subgroups(r, 1),
}


@pytest.fixture(scope="module")
def subgroup_results(tmp_path_factory):
    return run_scenarios(
        __name__,
        "SUBGROUP_SCENARIOS",
        world=SUBGROUP_WORLD,
        outdir=tmp_path_factory.mktemp("subgroups"),
        deadline_s=DEADLINE_S,
    )


@pytest.mark.parametrize("method", ["gsam", "looksam"])
def test_mixes_average_over_ddps_own_subgroup_only(subgroup_results, method):
    first, second = load(subgroup_results, "subgroups_0"), load(subgroup_results, "subgroups_1")
    for run in (first, second):
        for a, b in ((0, 1), (2, 3)):
            assert all(torch.equal(p, q) for p, q in zip(run[a][method], run[b][method])), (a, b)
    # group A's weights do not depend on group B's data
    assert all(torch.equal(p, q) for p, q in zip(first[0][method], second[0][method]))
    # and group B's do (the scenario is not trivially insensitive)
    assert not all(torch.equal(p, q) for p, q in zip(first[2][method], second[2][method]))
