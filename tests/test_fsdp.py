"""SAM under FSDP2 (``fully_shard``): 2 processes, gloo backend, CPU.

One pair of worker processes (tests/distributed_harness.py) runs every
scenario; each returns the full (gathered) weights. The tests compare them,
in this process, with single-process SAM on the full batch, which FSDP2 must
equal up to the order of floating-point reductions (each rank's half-batch
mean, reduce-scattered, against one mean over the batch; the shard norms
summed by all-reduce against one sum). In float64 that difference is of
order 1e-16 per operation; the tests allow ``rtol=1e-10, atol=1e-12`` after
:data:`STEPS` steps. A wrong ascent norm (e.g. the local shard's, or summed
over HSDP's replicas too, a factor sqrt(2)) moves the weights by ~1e-3.

Scenarios: SAM, ASAM, Fisher; HSDP on (2, 1) and (1, 2) meshes (the norm is
summed over the shard dimension only); a gradient-norm policy, a rho
controller and clipping; exact restore of the shards (abort_step, bit for
bit); resume through torch.distributed.checkpoint (bit for bit against the
run that never stopped); the variants that are refused, with their messages.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from distributed_harness import load, run_scenarios
from torch import nn

import samkit
from samkit.optim import _fsdp
from samkit.optim.perturbation import Fisher, Masked, RandomSubset

pytestmark = [
    pytest.mark.ddp,
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()),
        reason="torch.distributed with gloo is not available",
    ),
]

WORLD = 2
STEPS = 5
BATCH = 16  # each rank gets BATCH // WORLD rows
RHO = 0.2
LR = 0.1
RTOL, ATOL = 1e-10, 1e-12  # float64, reduction order only (see the module docstring)
CHECKPOINT_DIR = "SAMKIT_TEST_FSDP_DIR"


# ----------------------------------------------------------------- problem
class Temperature(nn.Module):
    """One learnable scale: a 1-element parameter, so rank 1's shard of it is empty."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def make_model() -> nn.Module:
    torch.manual_seed(0)
    # 12, 3 and 1 rows: even, uneven and empty shards over 2 ranks
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3), Temperature()).double()


def make_base(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=0.9, weight_decay=1e-3)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, 6, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (BATCH,), generator=g
    )


def shard(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch(step)
    n = BATCH // WORLD
    return x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]


def closure_for(model, x, y):
    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


# Each setting: SAM keyword arguments, built fresh (policies and controllers keep state).
SETTINGS = {
    "sam": lambda: dict(rho=RHO, skip_nonfinite=True),
    "asam": lambda: dict(rho=2.0, adaptive=True),
    "fisher": lambda: dict(rho=RHO, perturbation=Fisher(eta=0.5)),
    "policy": lambda: dict(
        rho=samkit.FollowLR(RHO),
        policy=samkit.GradNormTrigger(total_steps=STEPS, c_start=-0.5, c_end=0.5),
        max_grad_norm=0.5,
    ),
    "every_2nd": lambda: dict(rho=RHO, policy=samkit.EveryK(2)),
}


def train_single(setting: str, steps: int = STEPS) -> dict:
    """Single-process SAM on the full batch: what FSDP2 must equal."""
    model = make_model()
    opt = samkit.SAM(make_base(model.parameters()), **SETTINGS[setting]())
    norms = []
    for step in range(steps):
        opt.step(closure_for(model, *batch(step)))
        opt.zero_grad()
        if opt.policy is not None and hasattr(opt.policy, "last_sq_norm"):
            norms.append(opt.policy.last_sq_norm)
    return {
        "weights": [p.detach().clone() for p in model.parameters()],
        "steps": opt.steps,
        "ascents": opt.ascents,
        "norms": norms,
    }


# ------------------------------------------------------------------ worker
def fsdp_model(mesh_shape: tuple[int, ...] = (WORLD,)) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    names = ("replicate", "shard") if len(mesh_shape) == 2 else ("shard",)
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    model = make_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.full_tensor().detach().clone() for p in model.parameters()]  # collective


def local_shards(model: nn.Module) -> list[torch.Tensor]:
    return [p.to_local().detach().clone() for p in model.parameters()]


def _train(rank: int, setting: str, mesh_shape=(WORLD,), steps: int = STEPS) -> dict:
    model = fsdp_model(mesh_shape)
    opt = samkit.SAM(make_base(model.parameters()), **SETTINGS[setting]())
    norms = []
    for step in range(steps):
        opt.step(closure_for(model, *shard(step, rank)))
        opt.zero_grad()
        if opt.policy is not None and hasattr(opt.policy, "last_sq_norm"):
            norms.append(opt.policy.last_sq_norm)
    return {
        "weights": full_weights(model),
        "steps": opt.steps,
        "ascents": opt.ascents,
        "norms": norms,
    }


def _restore(rank: int) -> dict:
    """Two-step form: shards move at w + e and come back bit for bit on abort_step."""
    model = fsdp_model()
    opt = samkit.SAM(make_base(model.parameters()), rho=RHO)
    closure = closure_for(model, *shard(0, rank))
    before = local_shards(model)
    closure()
    assert opt.first_step(zero_grad=True)
    moved = any(not torch.equal(a, b) for a, b in zip(before, local_shards(model)))
    cleared = all(p.grad is None for p in model.parameters())
    closure()
    opt.abort_step()
    opt.zero_grad()
    restored = all(torch.equal(a, b) for a, b in zip(before, local_shards(model)))
    # and through a whole step with lr = 0: the base step leaves w, SAM restored it exactly
    zero = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.0), rho=RHO)
    zero.step(closure_for(model, *shard(1, rank)))
    unchanged = all(torch.equal(a, b) for a, b in zip(before, local_shards(model)))
    # the private DTensor attributes _fsdp reads exist, and the local shard is FSDP2's storage
    p = next(model.parameters())
    with torch.no_grad():
        pinned = all(hasattr(p, name) for name in _fsdp.DTENSOR_ATTRIBUTES) and (
            p._local_tensor.data_ptr() == p.to_local().data_ptr()
        )
    return {
        "moved": moved,
        "cleared": cleared,
        "restored": restored,
        "unchanged": unchanged,
        "pinned": pinned,
    }


def _resume(rank: int) -> dict:
    """Resume through torch.distributed.checkpoint == the run that never stopped."""
    import torch.distributed.checkpoint as dcp

    from samkit.integrations import fsdp

    path = os.path.join(os.environ[CHECKPOINT_DIR], "checkpoint")
    settings = lambda: dict(rho=samkit.FollowLR(RHO), policy=samkit.EveryK(2))  # noqa: E731
    straight = fsdp_model()
    opt = samkit.SAM(make_base(straight.parameters()), **settings())
    for step in range(STEPS):
        opt.step(closure_for(straight, *shard(step, rank)))
        opt.zero_grad()

    first = fsdp_model()
    opt = samkit.SAM(make_base(first.parameters()), **settings())
    for step in range(3):
        opt.step(closure_for(first, *shard(step, rank)))
        opt.zero_grad()
    dcp.save(fsdp.get_state_dict(first, opt), checkpoint_id=path)

    second = fsdp_model()
    torch.manual_seed(123)  # a different initialisation: everything must come from the checkpoint
    with torch.no_grad():
        for p in second.parameters():
            p.to_local().normal_()
    opt2 = samkit.SAM(make_base(second.parameters()), **settings())
    state = fsdp.get_state_dict(second, opt2)
    dcp.load(state, checkpoint_id=path)
    fsdp.set_state_dict(second, opt2, state)
    counters = (opt2.steps, opt2.ascents)
    for step in range(3, STEPS):
        opt2.step(closure_for(second, *shard(step, rank)))
        opt2.zero_grad()
    return {
        "straight": local_shards(straight),
        "resumed": local_shards(second),
        "counters_after_load": counters,
        "counters": (opt2.steps, opt2.ascents),
        "full": full_weights(second),
    }


def _refused(rank: int) -> dict:
    """Variants that would be wrong on shards raise before any weight moves."""
    model = fsdp_model()
    x, y = shard(0, rank)
    cases = {
        "gsam": dict(rho=RHO, mix=samkit.optim.mix.SurrogateGap(0.1)),
        "looksam": dict(
            rho=RHO, policy=samkit.EveryK(2), mix=samkit.optim.mix.ReuseOrthogonal(0.7)
        ),
        "esam_swp": dict(rho=RHO, perturbation=RandomSubset(0.5)),
        "masked": dict(rho=RHO, perturbation=Masked(list(model.parameters())[:1])),
    }
    out = {}
    before = local_shards(model)
    for name, kwargs in cases.items():
        opt = samkit.SAM(make_base(model.parameters()), **kwargs)
        try:
            opt.step(closure_for(model, x, y))
            out[name] = None
        except ValueError as error:
            out[name] = str(error)
        opt.zero_grad()
    scaler = torch.amp.GradScaler("cpu")
    opt = samkit.SAM(make_base(model.parameters()), rho=RHO)

    def scaled():
        loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        return loss

    try:
        opt.step(scaled, scaler=scaler)
        out["scaler"] = None
    except ValueError as error:
        out["scaler"] = str(error)
    out["untouched"] = all(torch.equal(a, b) for a, b in zip(before, local_shards(model)))
    # FSDP1's parameters look like plain tensors: refused when SAM is built
    from torch.distributed.fsdp import FullyShardedDataParallel

    for use_orig_params in (False, True):
        wrapped = FullyShardedDataParallel(
            make_model(), device_id=torch.device("cpu"), use_orig_params=use_orig_params
        )
        try:
            samkit.SAM(make_base(wrapped.parameters()), rho=RHO)
            out[f"fsdp1_{use_orig_params}"] = None
        except ValueError as error:
            out[f"fsdp1_{use_orig_params}"] = str(error)
    return out


def _example(rank: int) -> dict:
    """examples/fsdp.py's training function in these workers (its main() spawns its own)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "fsdp.py"
    spec = importlib.util.spec_from_file_location("samkit_example_fsdp", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    directory = os.path.join(os.environ[CHECKPOINT_DIR], "example")
    common = ["--epochs", "2", "--cpu", "--batch-size", "128"]
    straight = example.fit(rank, WORLD, example.parse_args([*common, "--checkpoint", directory]))
    resume = example.parse_args([*common, "--resume", os.path.join(directory, "epoch1")])
    return {"straight": straight, "resumed": example.fit(rank, WORLD, resume)}


def _agreement_controller() -> samkit.GradientAgreement:
    # a sketch longer than the model: every coordinate, in one process and on each shard
    return samkit.GradientAgreement(RHO, warmup=1, rate=0.5, sketch=256)


def _agreement(rank: int) -> dict:
    """rho="auto"'s controller under FSDP2: each rank sketches its own shards and the dot
    products are summed over the ranks, so every rank writes the same radius, the cosine of
    the whole gradient's sketch."""
    model = fsdp_model()
    ctrl = _agreement_controller()
    opt = samkit.SAM(make_base(model.parameters()), rho=ctrl)
    rhos = []
    for step in range(STEPS):
        opt.step(closure_for(model, *shard(step, rank)))
        opt.zero_grad()
        rhos.append(opt.param_groups[0]["rho"])
    return {"rhos": rhos, "previous": ctrl.state_dict()["previous"]}


def _zeros_kept(rank: int) -> dict:
    """zero_grad(set_to_none=False) between steps: FSDP2 adds into the kept gradients'
    local tensors, whose version moves while the DTensor's does not (a closure was then
    refused as one without backward)."""
    model = fsdp_model()
    opt = samkit.SAM(make_base(model.parameters()), rho=RHO)
    try:
        for step in range(3):
            opt.step(closure_for(model, *shard(step, rank)))
            opt.zero_grad(set_to_none=False)
    except ValueError as exc:
        return {"error": str(exc), "steps": opt.steps}
    return {"error": None, "steps": opt.steps}


SCENARIOS = {
    **{name: (lambda rank, name=name: _train(rank, name)) for name in SETTINGS},
    "agreement": _agreement,
    "zeros_kept": _zeros_kept,
    "hsdp_2x1": lambda rank: _train(rank, "sam", (2, 1)),
    "hsdp_1x2": lambda rank: _train(rank, "sam", (1, 2)),
    "restore": _restore,
    "resume": _resume,
    "refused": _refused,
    "example": _example,
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    os.environ[CHECKPOINT_DIR] = str(tmp_path_factory.mktemp("fsdp_checkpoint"))
    torch.set_num_threads(1)
    return run_scenarios(__name__, "SCENARIOS", world=WORLD, outdir=tmp_path_factory.mktemp("fsdp"))


def assert_close_weights(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------- tests
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_fsdp_equals_single_process(results, setting):
    ranks = load(results, setting)
    want = train_single(setting)
    for got in ranks:
        assert_close_weights(got["weights"], want["weights"])
        assert (got["steps"], got["ascents"]) == (want["steps"], want["ascents"])
        # a policy reading ||g||^2 sees the whole gradient's, not the shard's
        torch.testing.assert_close(got["norms"], want["norms"], rtol=1e-12, atol=0)
    moved = max((a - b).abs().max() for a, b in zip(want["weights"], make_model().parameters()))
    assert moved > 1e-3  # the comparison is not vacuous


def test_gradients_kept_as_zeros_between_steps_are_not_taken_for_no_backward(results):
    assert load(results, "zeros_kept") == [{"error": None, "steps": 3}] * 2


def test_the_gradient_agreement_radius_is_the_same_on_every_rank(results):
    """...and the single process's, to float32 rounding: averaging the ranks' sketches (of
    different coordinates) gave a cosine of nothing, the radius at its ceiling where one
    process's stayed near 0.2."""
    r0, r1 = load(results, "agreement")
    assert r0["rhos"] == r1["rhos"]  # bit for bit: the radius each step
    assert len(set(r0["rhos"])) > 1  # and it moved
    model = make_model()
    opt = samkit.SAM(make_base(model.parameters()), rho=_agreement_controller())
    rhos = []
    for step in range(STEPS):
        opt.step(closure_for(model, *batch(step)))
        opt.zero_grad()
        rhos.append(opt.param_groups[0]["rho"])
    torch.testing.assert_close(r0["rhos"], rhos, rtol=1e-5, atol=0)


@pytest.mark.parametrize("mesh", ["hsdp_2x1", "hsdp_1x2"])
def test_hybrid_sharding_sums_the_norm_over_the_shard_dimension_only(results, mesh):
    want = train_single("sam")
    for got in load(results, mesh):
        assert_close_weights(got["weights"], want["weights"])


def test_the_tolerance_detects_a_wrong_norm():
    """Scaling the norm by sqrt(2) (summing over HSDP replicas too) moves weights beyond it."""
    want = train_single("sam")["weights"]
    model = make_model()
    opt = samkit.SAM(make_base(model.parameters()), rho=RHO / 2**0.5)
    for step in range(STEPS):
        opt.step(closure_for(model, *batch(step)))
        opt.zero_grad()
    with pytest.raises(AssertionError):
        assert_close_weights([p.detach() for p in model.parameters()], want)


def test_sharded_parameters_are_restored_bit_for_bit(results):
    for got in load(results, "restore"):
        assert got == dict(moved=True, cleared=True, restored=True, unchanged=True, pinned=True)


def test_resume_through_distributed_checkpoint_is_bit_for_bit(results):
    ranks = load(results, "resume")
    for got in ranks:
        assert got["counters_after_load"] == (3, 2)  # EveryK(2): steps 0 and 2 ascended
        assert got["counters"] == (STEPS, 3)
        for a, b in zip(got["resumed"], got["straight"]):
            assert torch.equal(a, b)
    assert_close_weights(ranks[0]["full"], train_single("every_2nd")["weights"])


def test_refused_variants_say_why_and_leave_the_weights(results):
    for got in load(results, "refused"):
        assert "Invalid mix value" in got["gsam"] and "FSDP2" in got["gsam"]
        assert "Invalid mix value" in got["looksam"]
        assert "ESAM's stochastic weight perturbation" in got["esam_swp"]
        assert "selects tensors by identity" in got["masked"]
        assert "Invalid scaler value" in got["scaler"] and "bfloat16" in got["scaler"]
        assert got["untouched"]
        for mode in (False, True):
            assert "FullyShardedDataParallel (FSDP1)" in got[f"fsdp1_{mode}"], mode


# ------------------------------------------------- single-process pieces
def test_localize_leaves_plain_parameters_alone():
    model = make_model()
    params = list(model.parameters())
    gathered = [({"rho": RHO}, params, [torch.zeros_like(p) for p in params])]
    same, sharding = _fsdp.localize(gathered)
    assert same is gathered and sharding is None


def test_state_dict_helpers_refuse_bad_input():
    from samkit.integrations import fsdp

    model = make_model()
    opt = samkit.SAM(make_base(model.parameters()), rho=RHO)
    with pytest.raises(ValueError, match="Invalid optimizer value"):
        fsdp.get_state_dict(model, make_base(model.parameters()))
    with pytest.raises(ValueError, match="Invalid state value"):
        fsdp.set_state_dict(model, opt, {"model": {}})
    with pytest.raises(ValueError, match="'samkit' entry"):
        fsdp.set_state_dict(model, opt, {"model": {}, "optimizer": {}, "samkit": b"garbage"})
    buffer = io.BytesIO()
    torch.save({"steps": -1}, buffer)
    with pytest.raises(ValueError, match="samkit steps"):
        fsdp.set_state_dict(model, opt, {"model": {}, "optimizer": {}, "samkit": buffer.getvalue()})
    assert opt.steps == 0


def test_example_trains_and_resumes_bit_for_bit(results):
    """examples/fsdp.py's fit(): it learns, and --resume from epoch 1 ends on the same weights."""
    for got in load(results, "example"):
        straight, resumed = got["straight"], got["resumed"]
        assert straight["steps"] == 2 * 4096 // (WORLD * 128) and resumed["start_epoch"] == 1
        assert straight["losses"][1] < straight["losses"][0] < 2.3  # ln(10) at the start
        assert len(resumed["losses"]) == 1  # only the second epoch ran
        assert resumed["digest"] == straight["digest"]


def test_torch_state_dict_helpers_with_sam_raise_naming_ours():
    """torch's set_state_dict would drop samkit's entry; on a fresh SAM it calls step()
    without a closure to initialise the state, which raises and names the helpers."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = make_model()
    model_sd, optim_sd = get_state_dict(model, make_base(model.parameters()))
    opt = samkit.SAM(make_base(model.parameters()), rho=RHO)
    with pytest.raises(RuntimeError, match="samkit.integrations.fsdp"):
        set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
