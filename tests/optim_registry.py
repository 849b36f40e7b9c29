"""One registry of base optimizers and of the methods of the SAM family, for every battery.

Like torch's ``OptimizerInfo`` (torch/testing/_internal/common_optimizers.py):
each :class:`BaseInfo` knows how to build one torch optimizer on a list of
param groups, and each :class:`MethodInfo` knows how to wrap it in its SAM
method, which closure that method takes, and the capabilities it declares
(GradScaler, the two-step form, DDP, FSDP2, a first-pass gradient, the steps it
ascends on, rho=0 being the base optimizer, a closed-form ascent, the
arguments it refuses, ...). A law runs over ``methods(<capability>)``: every
method that declares what it needs, and no law skips at run time. For the
methods with a closed-form ascent, :meth:`MethodInfo.reference_e` is, independently
of samkit's kernels, what the ascent vector ``e`` must be (the formulas of the
papers, written out element-wise in float64).

The tiny model has three param groups (first layer; second layer's weight;
second layer's bias), so per-group keys, the global norm across groups and the
group-with-rho-0 exclusion are exercised by every method.
"""

from __future__ import annotations

import copy
import inspect
import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import samkit
from samkit.optim import autorho

# --------------------------------------------------------------------- model


def make_model(
    seed: int, d_in: int = 4, hidden: int = 5, d_out: int = 3, *, bn: bool = False
) -> nn.Module:
    """A tiny MLP with deterministic weights drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(d_in, hidden)]
    if bn:
        layers.append(nn.BatchNorm1d(hidden))
    layers += [nn.Tanh(), nn.Linear(hidden, d_out)]
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.7)
    return model


def make_data(seed: int, n: int = 12, d_in: int = 4, d_out: int = 3) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(10_000 + seed)
    return torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g)


def loss_fn(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return torch.nn.functional.mse_loss(model(x), y)


def split_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    """Three groups: first Linear (weight, bias), last Linear weight, last Linear bias."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    first, last = linears[0], linears[-1]
    rest = [
        p for m in model.modules() if m not in (first, last) for p in m.parameters(recurse=False)
    ]
    return [[first.weight, first.bias, *rest], [last.weight], [last.bias]]


def closure_for(
    opt: torch.optim.Optimizer, model: nn.Module, x: Tensor, y: Tensor
) -> Callable[[], Tensor]:
    def closure() -> Tensor:
        loss = loss_fn(model, x, y)
        loss.backward()
        return loss

    return closure


# --------------------------------------------------------------------- bases


@dataclass(frozen=True)
class BaseInfo:
    """One base optimizer configuration."""

    name: str
    cls: type[torch.optim.Optimizer]
    kwargs: Mapping[str, Any]
    lr_range: tuple[float, float]  # for hypothesis

    @property
    def lr(self) -> float:
        return float(self.kwargs["lr"])

    def make(self, groups: Sequence[Any], **override: Any) -> torch.optim.Optimizer:
        kw = {**self.kwargs, **override}
        return self.cls([g if isinstance(g, dict) else {"params": list(g)} for g in groups], **kw)

    def __repr__(self) -> str:  # readable pytest ids
        return self.name


BASES: list[BaseInfo] = [
    BaseInfo("sgd", torch.optim.SGD, {"lr": 0.1}, (1e-3, 0.5)),
    BaseInfo(
        "sgd_nesterov",
        torch.optim.SGD,
        {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
        (1e-3, 0.2),
    ),
    BaseInfo("adam", torch.optim.Adam, {"lr": 1e-2}, (1e-4, 0.1)),
    BaseInfo("adamw", torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}, (1e-4, 0.1)),
    BaseInfo("rmsprop", torch.optim.RMSprop, {"lr": 1e-2, "momentum": 0.5}, (1e-4, 0.05)),
    BaseInfo("adagrad", torch.optim.Adagrad, {"lr": 0.1}, (1e-3, 0.5)),
]
BASE_BY_NAME = {b.name: b for b in BASES}


# ------------------------------------------------------------------ helpers


def params_of(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def all_equal(a: Sequence[Tensor], b: Sequence[Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def state_equal(a: Any, b: Any) -> bool:
    """Recursive torch.equal over (nested) optimizer state dicts."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.dtype == b.dtype
            and torch.equal(a, b)
        )
    if isinstance(a, Mapping):
        return (
            isinstance(b, Mapping)
            and a.keys() == b.keys()
            and all(state_equal(a[k], b[k]) for k in a)
        )
    if isinstance(a, (list, tuple)):
        return (
            isinstance(b, (list, tuple))
            and len(a) == len(b)
            and all(state_equal(x, y) for x, y in zip(a, b))
        )
    return a == b


def roundtrip(obj: Any) -> Any:
    """Through torch.save / torch.load, as a checkpoint would go."""
    buf = io.BytesIO()
    torch.save(copy.deepcopy(obj), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


# ------------------------------------------------------------------ methods
#
# Every method of the SAM family, once: how to build it on a base optimizer and
# a model, which closure it takes, and the capabilities it declares. Each law
# (tests/test_family.py, test_sam.py, test_compile.py, test_ddp.py) runs over
# ``methods(<the capability it needs>)``, never over a list of its own, and no
# law skips at run time. A new method = one entry here (and its own
# hand-computation test in its own file); tests/test_family.py fails while a
# public class of samkit has no entry.


def per_sample_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The registry's MSE, per sample (ESAM's closure returns these)."""
    return ((model(x) - y) ** 2).mean(dim=1)


# The steps a method ascends on (a declared capability, which the laws that need
# an ascending step read, and tests/test_family.py checks against the library).
HORIZON = 8  # the laws' steps are counted within the first HORIZON


@dataclass(frozen=True)
class Steps:
    """The steps on which a method ascends, by SAM's step count before the step (0, 1, ...)."""

    label: str
    rule: Callable[[int], bool]

    def __call__(self, step: int) -> bool:
        return bool(self.rule(step))

    def __repr__(self) -> str:
        return self.label


EVERY_STEP = Steps("every step", lambda step: True)


def every(k: int, start: int = 0) -> Steps:
    """EveryK(k) (from ``start``), Late(start) (k=1); Momentum-SAM from step 1 (no momentum before)."""
    return Steps(f"every {k} from {start}", lambda s: s >= start and (s - start) % k == 0)


def drawn(p: float, seed: int) -> Steps:
    """RandomPolicy(p, seed): step i ascends iff the i-th draw of a CPU generator seeded ``seed`` is below p."""
    g = torch.Generator().manual_seed(seed)
    draws = tuple(float(torch.rand((), generator=g)) < p for _ in range(HORIZON))
    return Steps(f"drawn p={p} seed={seed}", lambda s: s < HORIZON and draws[s])


def observed(pattern: str) -> Steps:
    """A policy deciding from gradient statistics (AE-SAM, vSAM's PSF variation): its decisions
    on the battery's data ("1" ascends), one character per step; no ascent is declared after."""
    return Steps(f"observed {pattern}", lambda s: s < len(pattern) and pattern[s] == "1")


@dataclass(frozen=True)
class MethodInfo:
    """One method of the SAM family and the capabilities it declares.

    Capabilities (what laws select on, with :func:`methods`):

    * ``closure_kind``: "standard" | "per_sample" (ESAM, K-SAM) | "micro_batch" (mSAM);
      ``first_pass_call`` / ``second_pass_call``: which call of the closure is the
      backward at ``w`` / at ``w + e`` (K-SAM selects first; Momentum-SAM has one pass, at ``w + e``);
    * ``needs_gradient``: the ascent starts from the first pass's gradient (Momentum-SAM's
      from the base optimizer's momentum; equal to ``perturbation.needs_gradient``);
    * ``ascends``: the steps it ascends on (its policy's pattern, :class:`Steps`);
    * ``supports_scaler`` (a GradScaler, or refused with "Invalid scaler value"),
      ``supports_two_step`` (first_step / second_step by hand), ``supports_ddp``
      (replicas under local ascent, tests/test_ddp.py), ``supports_fsdp2`` (accepted on
      FSDP2's shards, or refused before any weight moves);
    * ``rho_zero_is_base``: rho=0 gives the base optimizer's steps bit for bit;
    * ``closed_form_ascent``: plain SAM / ASAM (no policy, controller, mix or other
      perturbation): ``e`` is :meth:`reference_e`, the papers' formula (tests/test_sam.py);
    * ``bad_args``: arguments it refuses, with the error's regex;
    * ``reports_validation``: a validation loss is reported after every step (rho controllers).
    """

    name: str
    make_opt: Callable[..., samkit.SAM]  # (base_optimizer_instance, net, **sam_kwargs) -> SAM
    kwargs: Mapping[str, Any] = field(default_factory=dict)  # SAM keyword arguments
    closure_kind: str = "standard"
    group_rho: tuple[float, ...] | None = None
    micro_batches: int = 1
    first_pass_call: int = 1
    second_pass_call: int = 2
    bases: tuple[str, ...] | None = (
        None  # the BASES it supports (None: all); the first is its fallback
    )
    needs_gradient: bool = True
    ascends: Steps = EVERY_STEP
    supports_scaler: bool = True
    supports_two_step: bool = True
    supports_ddp: bool = True
    supports_fsdp2: bool = True
    rho_zero_is_base: bool = True
    closed_form_ascent: bool = False
    needs_norm_layer: bool = False
    bad_args: tuple[tuple[Mapping[str, Any], str], ...] = ()
    reports_validation: bool = False

    def model(self, seed: int) -> nn.Module:
        return make_model(seed, bn=self.needs_norm_layer)

    def supports(self, base: BaseInfo) -> bool:
        return self.bases is None or base.name in self.bases

    def base(self, name: str) -> BaseInfo:
        """The base optimizer ``name``, or this method's first one if it does not support it."""
        return BASE_BY_NAME[name if self.bases is None or name in self.bases else self.bases[0]]

    def ascent_step(self, at_least: int) -> int:
        """The first step, from ``at_least``, on which this method declares an ascent."""
        for step in range(at_least, HORIZON):
            if self.ascends(step):
                return step
        raise LookupError(f"{self.name} declares no ascent in steps {at_least}..{HORIZON - 1}")

    def groups(self, model: nn.Module, rho: float | None = None) -> list[dict[str, Any]]:
        """Param groups for the base optimizer (with per-group rho keys when the method has them)."""
        out: list[dict[str, Any]] = [{"params": ps} for ps in split_groups(model)]
        if self.group_rho is not None:
            for g, r in zip(out, self.group_rho):
                g["rho"] = r if rho is None else rho
        return out

    def make(
        self,
        base: BaseInfo,
        net: nn.Module,
        *,
        rho: float | None = None,
        base_kw: Mapping[str, Any] | None = None,
        **extra: Any,
    ) -> samkit.SAM:
        """Base optimizer + this method on ``net``; ``extra`` are SAM keywords (``model=net`` too)."""
        kw = dict(self.kwargs)
        if rho is not None:
            kw["rho"] = rho
        kw.update(extra)
        return self.make_opt(base.make(self.groups(net, rho), **(base_kw or {})), net, **kw)

    # ---- one step, in the method's own closure form
    def closure(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        *,
        scaler: Any = None,
        poison: set[int] | None = None,
    ):
        """The closure this method's ``step`` takes; ``poison``: call numbers whose loss is made inf."""
        calls: list[int] = []

        def scaled_backward(loss: Tensor) -> None:
            calls.append(1)
            out = loss * float("inf") if poison and len(calls) in poison else loss
            (scaler.scale(out) if scaler is not None else out).backward()

        if self.closure_kind == "per_sample":

            def per_sample(index: Tensor | None = None) -> Tensor:
                calls.append(1)
                xs, ys = (x, y) if index is None else (x[index], y[index])
                losses = per_sample_loss(model, xs, ys)
                return losses * float("inf") if poison and len(calls) in poison else losses

            return per_sample
        if self.closure_kind == "micro_batch":
            xs, ys = x.chunk(self.micro_batches), y.chunk(self.micro_batches)

            def micro(j: int) -> Tensor:
                loss = loss_fn(model, xs[j], ys[j])
                scaled_backward(loss)
                return loss

            return micro

        def standard() -> Tensor:
            loss = loss_fn(model, x, y)
            scaled_backward(loss)
            return loss

        return standard

    def step(
        self,
        opt: samkit.SAM,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        form: str = "closure",
        scaler: Any = None,
    ) -> None:
        """One training step (closure form or the explicit two-step form), then zero_grad."""
        if form == "closure":
            if scaler is not None:
                opt.step(self.closure(model, x, y, scaler=scaler), scaler=scaler)
            else:
                opt.step(self.closure(model, x, y))
        elif not self.needs_gradient:  # Momentum-SAM: perturb, then the only pass
            opt.first_step(zero_grad=True, scaler=scaler)
            self.closure(model, x, y, scaler=scaler)()
            if scaler is not None:
                scaler.step(opt)
            else:
                opt.second_step()
        else:
            assert self.supports_two_step, self.name
            closure = self.closure(model, x, y, scaler=scaler)
            closure()
            if opt.first_step(zero_grad=True, scaler=scaler):
                closure()
            if scaler is not None:
                scaler.step(opt)
            else:
                opt.second_step()
        opt.zero_grad()
        if self.reports_validation:
            opt.observe_validation(validation_loss(opt.steps))

    def base_loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """The loss whose gradient the base optimizer sees at rho = 0."""
        return (
            per_sample_loss(model, x, y).mean()
            if self.closure_kind == "per_sample"
            else loss_fn(model, x, y)
        )

    @property
    def forms(self) -> tuple[str, ...]:
        return ("closure", "explicit") if self.supports_two_step else ("closure",)

    # The paper's ascent, element-wise in float64, independent of samkit.
    def reference_e(self, groups: Sequence[dict[str, Any]]) -> list[list[Tensor | None]]:
        """``e`` per parameter (None where the parameter has no gradient), for the methods
        declaring ``closed_form_ascent``.

        ``groups`` are SAM's param groups (with their rho / eta /
        ascent_weight_decay keys) whose params hold the first-pass ``.grad``.

        L2 (Foret et al., arXiv 2010.01412): ``e = rho g / ||g||``.
        ASAM (Kwon et al., arXiv 2102.11600): ``e = rho T^2 g / ||T g||``,
        ``T = |w| + eta``. The gradient first gets ``+ wd * w`` (ascent weight
        decay). ``||.||`` is one norm over all groups whose rho is > 0.
        """
        assert self.closed_form_ascent, f"{self.name} declares no closed-form ascent"
        adaptive = bool(self.kwargs.get("adaptive", False))
        us, ds = [], []
        sq = torch.zeros((), dtype=torch.float64)
        for group in groups:
            u_g, d_g = [], []
            for p in group["params"]:
                if p.grad is None or not p.requires_grad:
                    u_g.append(None)
                    d_g.append(None)
                    continue
                w = p.detach().double()
                g = p.grad.double() + group["ascent_weight_decay"] * w
                if adaptive:
                    t = w.abs() + group["eta"]
                    u, d = t * g, t * t * g
                else:
                    u, d = g, g
                if group["rho"] > 0:
                    sq = sq + (u * u).sum()
                u_g.append(u)
                d_g.append(d)
            us.append(u_g)
            ds.append(d_g)
        norm = sq.sqrt()
        eps = 1e-12
        out: list[list[Tensor | None]] = []
        for group, d_g in zip(groups, ds):
            rho = group["rho"]
            out.append(
                [
                    None
                    if d is None
                    else (rho / (norm + eps)) * d
                    if rho > 0
                    else torch.zeros_like(d)
                    for d in d_g
                ]
            )
        return out

    def __repr__(self) -> str:
        return self.name


def validation_loss(step: int) -> float:
    """A made-up validation loss that falls, then rises and plateaus (rho controllers react to both)."""
    return 1.0 / (1 + step) + 0.05 * (step % 3)


def _auto(
    controller: type, controller_kw: Mapping[str, Any] | None = None, **sam_kw: Any
) -> Callable[..., samkit.SAM]:
    """SAM with a self-tuning rho. A string such as "auto" goes to SAM as it is (the user's
    path); a number is the starting radius of ``controller`` (rho=0: the base optimizer).
    Keywords the controller takes go to it, the others to SAM."""
    accepted = set(inspect.signature(controller).parameters)

    def make(
        base: torch.optim.Optimizer, net: nn.Module, rho: Any = "auto", **kw: Any
    ) -> samkit.SAM:
        ckw = {**(controller_kw or {}), **{k: kw.pop(k) for k in list(kw) if k in accepted}}
        radius = rho if isinstance(rho, str) else controller(rho, **ckw)
        return samkit.SAM(base, rho=radius, **sam_kw, **kw)

    return make


_DEFAULT_AUTO = autorho.CONTROLLERS[autorho.DEFAULT_CONTROLLER]
_AUTO_BAD = (
    ({"rho": "automatic"}, r"Invalid rho value: 'automatic'"),
    ({"rho": "auto:nope"}, r"Invalid rho value: 'auto:nope'"),
    ({"rho": -1.0}, r"Invalid rho value: -1\.0"),
)


def _sam(base: torch.optim.Optimizer, net: nn.Module, **kw: Any) -> samkit.SAM:
    return samkit.SAM(base, **kw)


def _with(factory: Callable[[nn.Module], dict[str, Any]]) -> Callable[..., samkit.SAM]:
    """SAM with extra keyword arguments built from the model (perturbations that need it)."""

    def make(base: torch.optim.Optimizer, net: nn.Module, **kw: Any) -> samkit.SAM:
        return samkit.SAM(base, **{**factory(net), **kw})

    return make


_COMMON_BAD = (
    ({"rho": -1.0}, r"Invalid rho value: -1\.0"),
    ({"rho": float("nan")}, r"Invalid rho value: nan"),
    ({"foreach": "x"}, r"Invalid foreach value: 'x'"),
    ({"skip_nonfinite": "yes"}, r"Invalid skip_nonfinite value: 'yes'"),
)

METHODS: list[MethodInfo] = [
    MethodInfo("sam", _sam, {"rho": 0.05}, closed_form_ascent=True, bad_args=_COMMON_BAD),
    MethodInfo(
        "asam",
        _sam,
        {"rho": 0.5, "adaptive": True, "eta": 0.01},
        closed_form_ascent=True,
        bad_args=(({"eta": -1.0}, "Invalid eta value"),),
    ),
    MethodInfo(
        "ascent_wd", _sam, {"rho": 0.05, "ascent_weight_decay": 0.1}, closed_form_ascent=True
    ),
    MethodInfo(
        "max_grad_norm", _sam, {"rho": 0.05, "max_grad_norm": 0.05}, closed_form_ascent=True
    ),
    MethodInfo(
        "per_group_rho", _sam, {"rho": 0.05}, group_rho=(0.1, 0.03, 0.0), closed_form_ascent=True
    ),
    MethodInfo(
        "follow_lr",
        lambda base, net, rho=0.05, **kw: samkit.SAM(
            base, rho=samkit.FollowLR(rho, rho_min=0.2 * rho), **kw
        ),
        {"rho": 0.05},
    ),
    # rho="auto" has the same battery as a fixed rho. "auto" is exactly what a user
    # writes (with a validation report after every step, as a training loop would
    # after every epoch: the made-up losses raise rho within 5 steps); the other
    # entries start their controllers' adaptation within the battery's few steps.
    MethodInfo(
        "auto", _auto(_DEFAULT_AUTO), {"rho": "auto"}, reports_validation=True, bad_args=_AUTO_BAD
    ),
    MethodInfo(
        "auto_asam",
        _auto(_DEFAULT_AUTO, adaptive=True),
        {"rho": "auto"},
        reports_validation=True,
        bad_args=(({"rho": "auto:x"}, r"Invalid rho value: 'auto:x'"),),
    ),
    MethodInfo(
        "loss_equated",
        _auto(samkit.LossEquated, {"calibration_steps": 2}),
        {"rho": 0.05},
        bad_args=(
            ({"calibration_steps": 0}, "Invalid calibration_steps value: 0"),
            ({"sigma": -1.0}, r"Invalid sigma value: -1\.0"),
        ),
    ),
    MethodInfo(
        # no reports: it learns from the gradients alone (a one-step warm-up and a fast gain
        # so that it moves within the battery's few steps; the strided sketch is exercised)
        "gradient_agreement",
        _auto(samkit.GradientAgreement, {"warmup": 1, "rate": 0.5, "sketch": 16}),
        {"rho": 0.05},
        bad_args=(({"q0": 0.95, "q1": 0.9}, r"Invalid q0/q1 value"),),
    ),
    MethodInfo(
        "validation_plateau",
        _auto(samkit.ValidationPlateau, {"patience": 1}),
        {"rho": 0.05},
        reports_validation=True,
        bad_args=(({"factor": 0.5}, r"Invalid factor value: 0\.5"),),
    ),
    MethodInfo(
        "validation_search",
        _auto(samkit.ValidationSearch),
        {"rho": 0.05},
        reports_validation=True,
        bad_args=(({"probe": 1.0}, r"Invalid probe/step value: 1\.0"),),
    ),
    MethodInfo(
        "fisher",
        # with the Always policy spelt out (what policy=None does): every public policy has an entry
        lambda base, net, eta=1.0, **kw: samkit.SAM(
            base, perturbation=samkit.Fisher(eta), policy=samkit.Always(), **kw
        ),
        {"rho": 0.05},
        bad_args=(({"eta": 0.0}, "Invalid eta value: 0.0"),),
    ),
    MethodInfo(
        "norm_only",
        _with(lambda m: {"perturbation": samkit.NormOnly(m)}),
        {"rho": 0.5},
        needs_norm_layer=True,
        supports_fsdp2=False,  # selects tensors by identity
    ),
    MethodInfo(
        "masked_asam",
        _with(
            lambda m: {
                "perturbation": samkit.Masked([split_groups(m)[1][0]], inner=samkit.Adaptive())
            }
        ),
        {"rho": 0.5},
        supports_fsdp2=False,  # selects tensors by identity
    ),
    MethodInfo(
        "random_subset",
        lambda base, net, beta=0.5, **kw: samkit.SAM(
            base, perturbation=samkit.RandomSubset(beta, seed=3), **kw
        ),
        {"rho": 0.05},
        supports_fsdp2=False,  # its mask would be drawn per shard
        bad_args=(
            ({"beta": 0.0}, r"Invalid beta value: 0\.0"),
            ({"beta": 1.5}, "Invalid beta value"),
        ),
    ),
    MethodInfo(
        "every_k",
        lambda base, net, k=2, **kw: samkit.SAM(base, policy=samkit.EveryK(k), **kw),
        {"rho": 0.05},
        ascends=every(2),
        bad_args=(({"k": 0}, "Invalid k value: 0"),),
    ),
    MethodInfo(
        "rst",
        lambda base, net, p=0.5, **kw: samkit.SAM(
            base, policy=samkit.RandomPolicy(p, seed=1), **kw
        ),
        {"rho": 0.05},
        ascends=drawn(0.5, seed=1),
        bad_args=(({"p": 1.5}, r"Invalid p value: 1\.5"),),
    ),
    MethodInfo(
        "grad_norm_trigger",
        lambda base, net, decay=0.5, **kw: samkit.SAM(
            base, policy=samkit.GradNormTrigger(8, c_start=-2.0, c_end=0.0, decay=decay), **kw
        ),
        {"rho": 0.05},
        # the falling gradient norm meets the rising threshold after 4 steps
        ascends=observed("11110000"),
        bad_args=(({"decay": 1.0}, r"Invalid decay value: 1\.0"),),
    ),
    MethodInfo(
        "late",
        lambda base, net, start=2, **kw: samkit.SAM(base, policy=samkit.Late(start), **kw),
        {"rho": 0.05},
        ascends=every(1, start=2),
        bad_args=(({"start": -1}, "Invalid start_step value: -1"),),
    ),
    MethodInfo(
        "gsam",
        lambda base, net, **kw: samkit.GSAM(base, **kw),
        {"rho": 0.05, "alpha": 0.3},
        supports_fsdp2=False,  # its mix keeps per-parameter gradients
        bad_args=(
            ({"alpha": -0.1}, r"Invalid alpha value: -0\.1"),
            ({"rho_min": 1.0}, "Invalid rho_min value"),
        ),
    ),
    MethodInfo(
        "looksam",
        lambda base, net, **kw: samkit.LookSAM(base, **kw),
        {"rho": 0.05, "k": 2, "alpha": 0.4},
        ascends=every(2),
        supports_fsdp2=False,  # its mix keeps per-parameter gradients
        bad_args=(({"k": 0}, "Invalid k value: 0"), ({"alpha": -1}, "Invalid alpha value: -1")),
    ),
    MethodInfo(
        "esam",
        lambda base, net, **kw: samkit.ESAM(base, seed=1, **{"gamma": 0.5, **kw}),
        {"rho": 0.05, "beta": 0.6, "gamma": 0.5},
        closure_kind="per_sample",
        second_pass_call=3,  # after the selection forward
        supports_two_step=False,
        supports_fsdp2=False,  # its weight perturbation's mask would be drawn per shard
        bad_args=(
            ({"gamma": 0.0}, r"Invalid gamma value: 0\.0"),
            ({"beta": 2.0}, "Invalid beta value"),
        ),
    ),
    MethodInfo(
        "every_k_asam",
        lambda base, net, k=2, **kw: samkit.SAM(base, adaptive=True, policy=samkit.EveryK(k), **kw),
        {"rho": 0.5},
        ascends=every(2),
    ),
    MethodInfo(
        "momentum_sam",
        lambda base, net, **kw: samkit.MomentumSAM(base, **kw),
        {"rho": 0.5},
        second_pass_call=1,  # the only pass, at w + e
        needs_gradient=False,  # the ascent follows the base optimizer's momentum
        ascends=every(1, start=1),  # step 0 has no momentum to follow
        bases=("adam", "sgd_nesterov", "adamw", "rmsprop"),  # a momentum to follow
        bad_args=(
            *_COMMON_BAD,
            ({"ascent_weight_decay": 0.1}, r"Invalid ascent_weight_decay value: 0\.1"),
            ({"adaptive": True}, "Invalid adaptive value"),
            ({"buffer": ""}, "Invalid buffer value"),
            ({"buffer": "nope"}, "Invalid buffer value: 'nope'"),
        ),
    ),
    MethodInfo(
        "momentum_sam_late",
        lambda base, net, start=2, **kw: samkit.MomentumSAM(base, policy=samkit.Late(start), **kw),
        {"rho": 0.5},
        second_pass_call=1,
        needs_gradient=False,
        ascends=every(1, start=2),
        bases=("adam", "sgd_nesterov"),
        bad_args=(({"start": -1}, "Invalid start_step value: -1"),),
    ),
    MethodInfo(
        "ksam",
        lambda base, net, **kw: samkit.KSAM(base, **{"fraction": 0.5, **kw}),
        {"rho": 0.05, "fraction": 0.5},
        closure_kind="per_sample",
        first_pass_call=2,  # after the selection forward
        second_pass_call=3,
        supports_two_step=False,
        rho_zero_is_base=False,  # the base step sees the top-k samples only (its own file)
        bad_args=(
            ({"fraction": 0.0}, r"Invalid fraction value: 0\.0"),
            ({"fraction": 1.5}, r"Invalid fraction value: 1\.5"),
        ),
    ),
    MethodInfo(
        "vsam",
        lambda base, net, **kw: samkit.VSAM(base, warmup_steps=3, window=3, blocks=1, **kw),
        {"rho": 0.05},
        # SAM on its 3 warm-up steps, then its PSF variation decides per window
        ascends=observed("11100110"),
        supports_fsdp2=False,  # its mix keeps per-parameter gradients
        bad_args=(
            ({"beta": 1.0}, r"Invalid beta value: 1\.0"),
            ({"max_fraction": 0.0}, r"Invalid max_fraction value: 0\.0"),
            ({"alpha": (0.1,)}, "Invalid alpha value"),
        ),
    ),
    MethodInfo(
        "msam",
        lambda base, net, **kw: samkit.MicroBatchSAM(base, **kw),
        {"rho": 0.05, "micro_batches": 3},
        closure_kind="micro_batch",
        micro_batches=3,
        supports_scaler=False,
        supports_two_step=False,
        supports_ddp=False,
        rho_zero_is_base=False,
        bad_args=(({"micro_batches": 0}, "Invalid micro_batches value: 0"),),
    ),
]
METHOD_BY_NAME = {m.name: m for m in METHODS}


def methods(*capabilities: str, **declared: Any) -> list[MethodInfo]:
    """The methods declaring each of ``capabilities`` (flags that are true) and each of
    ``declared`` (``closure_kind="standard"``). Never empty: a law with no method to
    run over is an error at collection, not a silent pass."""
    chosen = [
        m
        for m in METHODS
        if all(getattr(m, c) for c in capabilities)
        and all(getattr(m, k) == v for k, v in declared.items())
    ]
    if not chosen:
        raise LookupError(f"no method declares {capabilities} {declared}")
    return chosen


def method_base_pairs(
    infos: Sequence[MethodInfo], bases: Sequence[BaseInfo] = BASES
) -> list[tuple[MethodInfo, BaseInfo]]:
    """Each method with each of ``bases`` it supports."""
    return [(m, b) for m in infos for b in bases if m.supports(b)]
