"""Every method ``samkit compare`` can train, each declared by one ``@register`` builder.

Adding a method is one builder here (plus its tests): see the contract in
:mod:`samkit.experiments.registry` and the walk-through in docs/compare.md.
Each description names the paper; ``docs/variants.md`` says which to pick
when, with measured costs.

Passes are counted in units of one forward+backward pass over the whole
batch (see :class:`~samkit.experiments.registry.Method`). A forward pass alone
(ESAM's selection pass, MESA's teacher) is counted as 1/3 of one, the usual
rule that a backward costs about twice a forward.

Random variants (RST, SWP, ESAM) take a ``seed`` option; by default it is
drawn from torch's global seed, which the study sets per run, so different
seeds give different random choices and a given seed always the same.

The study is built on samkit's public constructors only (``samkit.SAM``,
``samkit.GSAM``, ... and the loss terms ``samkit.SAF`` / ``samkit.MESA``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .. import (
    ESAM,
    GSAM,
    KSAM,
    MESA,
    SAF,
    SAM,
    VSAM,
    EveryK,
    Fisher,
    Late,
    LookSAM,
    MicroBatchSAM,
    MomentumSAM,
    NormOnly,
    RandomPolicy,
    RandomSubset,
)
from .. import optim as _optim
from .._checks import check_nonneg
from .registry import (
    Amp,
    Method,
    MethodInfo,
    OptimizerMethod,
    SAMMethod,
    build_method,
    list_methods,
    make_base_optimizer,
    method_info,
    register,
    register_method,
)
from .types import BASE_DEFAULTS, TrainSpec

__all__ = [
    "TrainSpec",
    "Amp",
    "Method",
    "OptimizerMethod",
    "SAMMethod",
    "ESAMMethod",
    "KSAMMethod",
    "MSAMMethod",
    "SAFMethod",
    "MESAMethod",
    "MethodInfo",
    "register",
    "register_method",
    "build_method",
    "list_methods",
    "method_info",
    "make_base_optimizer",
    "BASE_DEFAULTS",
    "FORWARD_ONLY",
]

#: cost of a forward pass without backward, in forward+backward passes
FORWARD_ONLY = 1.0 / 3.0


def _seed(seed: Any) -> int:
    if seed is None:
        return int(torch.initial_seed() % (2**31))
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"Invalid seed value: {seed!r} (must be an int >= 0)")
    return seed


def _base(model: nn.Module, spec: TrainSpec) -> torch.optim.Optimizer:
    return make_base_optimizer(model.parameters(), spec)


# ------------------------------------------------------------ plain optimizers
@register("sgd", description="SGD with momentum (one pass per step)", base="sgd")
def _sgd(model: nn.Module, spec: TrainSpec) -> Method:
    return OptimizerMethod(make_base_optimizer(model.parameters(), spec.replace(base="sgd")), "sgd")


@register("adam", description="Adam (one pass per step)", base="adam")
def _adam(model: nn.Module, spec: TrainSpec) -> Method:
    base = spec.base if spec.base in ("adam", "adamw") else "adam"
    return OptimizerMethod(make_base_optimizer(model.parameters(), spec.replace(base=base)), base)


# --------------------------------------------------------------- SAM, ASAM
@register(
    "sam",
    description="SAM, Foret et al. 2021 (arXiv 2010.01412): two passes per step",
    defaults={"rho": 0.05},
)
def _sam(model: nn.Module, spec: TrainSpec, *, rho: float) -> Method:
    return SAMMethod(SAM(_base(model, spec), rho=rho, model=model), "sam")


@register(
    "asam",
    description="ASAM, Kwon et al. 2021 (arXiv 2102.11600): scale-invariant ascent",
    defaults={"rho": 0.5, "eta": 0.01},
    rho_scale=10.0,
)
def _asam(model: nn.Module, spec: TrainSpec, *, rho: float, eta: float) -> Method:
    opt = SAM(_base(model, spec), rho=rho, adaptive=True, eta=eta, model=model)
    return SAMMethod(opt, "asam")


# ------------------------------------------------- perturbations and policies
@register(
    "fisher_sam",
    description="Fisher SAM, Kim et al. 2022 (arXiv 2206.04920): Fisher-metric ascent; 2 passes",
    defaults={"rho": 0.05, "eta": 1.0},
)
def _fisher_sam(model, spec, *, rho: float, eta: float) -> Method:
    opt = SAM(_base(model, spec), rho=rho, perturbation=Fisher(eta), model=model)
    return SAMMethod(opt, "fisher_sam")


@register(
    "sam_on",
    description="SAM-ON, Mueller et al. 2023 (arXiv 2306.04226): perturb norm layers only; "
    "needs a model with normalisation layers; 2 passes",
    defaults={"rho": 0.5},
    rho_scale=10.0,
)
def _sam_on(model, spec, *, rho: float) -> Method:
    opt = SAM(_base(model, spec), rho=rho, perturbation=NormOnly(model), model=model)
    return SAMMethod(opt, "sam_on")


@register(
    "swp",
    description="ESAM's stochastic weight perturbation alone (arXiv 2110.03141): random beta "
    "of the weights; 2 passes",
    defaults={"rho": 0.05, "beta": 0.5, "seed": None},
)
def _swp(model, spec, *, rho: float, beta: float, seed: int | None = None) -> Method:
    pert = RandomSubset(beta, seed=_seed(seed))
    return SAMMethod(SAM(_base(model, spec), rho=rho, perturbation=pert, model=model), "swp")


@register(
    "sam_every_k",
    description="SAM every k steps, rho scaled by k (Composer); 1 + 1/k passes",
    defaults={"rho": 0.05, "k": 5, "scale_rho": True},
)
def _every_k(model, spec, *, rho: float, k: int, scale_rho: bool) -> Method:
    pol = EveryK(k, scale_rho=scale_rho)
    return SAMMethod(SAM(_base(model, spec), rho=rho, policy=pol, model=model), "sam_every_k")


@register(
    "rst",
    description="RST, Zhao et al. 2022 (arXiv 2203.09962): SAM with probability p; 1 + p passes",
    defaults={"rho": 0.05, "p": 0.5, "p_end": None, "seed": None},
)
def _rst(
    model, spec, *, rho: float, p: float, p_end: float | None = None, seed: int | None = None
) -> Method:
    pol = RandomPolicy(p, p_end=p_end, total_steps=spec.total_steps, seed=_seed(seed))
    return SAMMethod(SAM(_base(model, spec), rho=rho, policy=pol, model=model), "rst")


@register(
    "ae_sam",
    description="AE-SAM, Jiang et al. 2023 (arXiv 2304.14647): SAM where ||g||^2 is high; "
    "adaptive cost",
    defaults={"rho": 0.05, "c_start": -1.0, "c_end": 1.0, "decay": 0.9},
)
def _ae_sam(model, spec, *, rho: float, c_start: float, c_end: float, decay: float) -> Method:
    pol = _optim.GradNormTrigger(spec.total_steps, c_start=c_start, c_end=c_end, decay=decay)
    return SAMMethod(SAM(_base(model, spec), rho=rho, policy=pol, model=model), "ae_sam")


@register(
    "late_sam",
    description="SAM on the last fraction of training only (arXiv 2410.10373); 1 + fraction passes",
    defaults={"rho": 0.05, "fraction": 0.2},
)
def _late_sam(model, spec, *, rho: float, fraction: float) -> Method:
    pol = Late(total_steps=spec.total_steps, fraction=fraction)
    return SAMMethod(SAM(_base(model, spec), rho=rho, policy=pol, model=model), "late_sam")


# ------------------------------------------------ variants with an update of their own
@register(
    "gsam",
    description="GSAM, Zhuang et al. 2022 (arXiv 2203.08065): surrogate-gap ascent, rho follows "
    "lr; 2 passes",
    defaults={"rho": 0.05, "alpha": 0.1, "rho_min": 0.0},
)
def _gsam(model, spec, *, rho: float, alpha: float, rho_min: float) -> Method:
    opt = GSAM(_base(model, spec), rho=rho, alpha=alpha, rho_min=rho_min, model=model)
    return SAMMethod(opt, "gsam")


@register(
    "looksam",
    description="LookSAM, Liu et al. 2022 (arXiv 2203.02714): SAM every k, reused direction in "
    "between; 1 + 1/k passes (alpha 0.2 here: the paper's 0.7 broke training on small models, "
    "docs/variants.md)",
    defaults={"rho": 0.05, "k": 5, "alpha": 0.2},
)
def _looksam(model, spec, *, rho: float, k: int, alpha: float) -> Method:
    opt = LookSAM(_base(model, spec), rho=rho, k=k, alpha=alpha, model=model)
    return SAMMethod(opt, "looksam")


class ESAMMethod(Method):
    """ESAM: the closure gives per-sample losses of a subset of the batch."""

    name = "esam"

    def step(self, model, x, y, idx, loss_fn):
        opt: ESAM = self.optimizer  # type: ignore[assignment]
        n = y.shape[0]

        def closure(index: Tensor | None = None) -> Tensor:
            if index is None:
                out = loss_fn(self.forward(model, x), y)
                # the no-grad selection pass is a forward only
                self.passes += 1.0 if torch.is_grad_enabled() else FORWARD_ONLY
                return out
            self.passes += index.numel() / n
            return loss_fn(self.forward(model, x[index]), y[index])

        if self.scaler is not None:
            loss = opt.step(closure, scaler=self.scaler)
            self.scaler.update()
        else:
            loss = opt.step(closure)
        opt.zero_grad(set_to_none=True)
        return loss.detach()


@register(
    "esam",
    description="ESAM, Du et al. 2022 (arXiv 2110.03141): weight subset + sharpest gamma of the "
    "batch",
    defaults={"rho": 0.05, "beta": 0.5, "gamma": 0.5, "seed": None},
    per_sample_loss=True,
)
def _esam(model, spec, *, rho: float, beta: float, gamma: float, seed: int | None = None) -> Method:
    return ESAMMethod(
        ESAM(_base(model, spec), rho=rho, beta=beta, gamma=gamma, seed=_seed(seed), model=model)
    )


class MSAMMethod(Method):
    """mSAM: the batch is split into ``micro_batches`` pieces, each with its own ascent."""

    name = "msam"

    def step(self, model, x, y, idx, loss_fn):
        opt: MicroBatchSAM = self.optimizer  # type: ignore[assignment]
        m = min(opt.micro_batches, y.shape[0])
        xs, ys = x.chunk(m), y.chunk(m)
        n = y.shape[0]

        def closure(j: int) -> Tensor:
            loss = loss_fn(self.forward(model, xs[j]), ys[j]).mean()
            self.backward(loss)
            self.passes += ys[j].shape[0] / n
            return loss

        if m != opt.micro_batches:  # a batch smaller than m: fewer, single-sample pieces
            opt.micro_batches = m
        loss = opt.step(closure)
        opt.zero_grad(set_to_none=True)
        return loss.detach()


@register(
    "msam",
    description="mSAM, Behdin et al. 2023 (arXiv 2302.09693): one ascent per micro-batch; 2 passes",
    defaults={"rho": 0.05, "micro_batches": 4},
    in_default_study=False,  # 4-8x SGD per epoch here: left to --optimizers all
    supports_scaler=False,
)
def _msam(model, spec, *, rho: float, micro_batches: int) -> Method:
    return MSAMMethod(
        MicroBatchSAM(_base(model, spec), rho=rho, micro_batches=micro_batches, model=model)
    )


# ------------------------------------------------------------- loss terms
class SAFMethod(OptimizerMethod):
    """SAF: the base optimizer on the task loss + the trajectory loss; one pass per step."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        spec: TrainSpec,
        *,
        lam: float,
        tau: float,
        delay: int,
    ):
        super().__init__(optimizer, "saf")
        self.spec = spec
        self.lam, self.tau, self.delay = lam, tau, delay
        self.saf: SAF | None = None  # sized at the first batch
        self.epoch = 0
        self._pending_state: dict[str, Any] | None = None
        SAF(1, 1, lam=lam, tau=tau, delay=delay)  # validate the options now

    def _ensure(self, batch: int, classes: int, device: torch.device) -> SAF:
        if self.saf is None:
            # the trainer drops the last partial batch, so N < (steps_per_epoch + 1) * batch
            n = (self.spec.steps_per_epoch + 1) * batch
            self.saf = SAF(n, classes, lam=self.lam, tau=self.tau, delay=self.delay, device=device)
            if self._pending_state is not None:
                self.saf.load_state_dict(self._pending_state)
                self._pending_state = None
        return self.saf

    def step(self, model, x, y, idx, loss_fn):
        logits = self.forward(model, x)
        saf = self._ensure(y.shape[0], logits.shape[1], logits.device)
        if int(idx.max()) >= saf.num_samples:
            raise ValueError(
                f"Invalid idx value: sample index {int(idx.max())} beyond SAF's memory ({saf.num_samples})"
            )
        ce = loss_fn(logits, y).mean()
        self.backward(ce + saf(logits, idx, self.epoch))
        self.passes += 1.0
        self.base_step()
        return ce.detach()

    def on_epoch_end(self, epoch: int, model: nn.Module) -> None:
        self.epoch = epoch + 1

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["epoch"] = self.epoch
        sd["saf"] = self.saf.state_dict() if self.saf is not None else self._pending_state
        return sd

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.epoch = int(state.get("epoch", 0))
        own = state.get("saf")
        if own is not None:
            if self.saf is not None:
                self.saf.load_state_dict(own)
            else:
                self._pending_state = own


@register(
    "saf",
    description="SAF, Du et al. 2022 (arXiv 2205.14083): KL to outputs from `delay` epochs ago; "
    "1 pass; classification",
    defaults={"lam": 0.3, "tau": 5.0, "delay": 3},
    needs_index=True,
    classification_only=True,
)
def _saf(model, spec, *, lam: float, tau: float, delay: int) -> Method:
    return SAFMethod(_base(model, spec), spec, lam=lam, tau=tau, delay=delay)


class MESAMethod(OptimizerMethod):
    """MESA: the base optimizer on the task loss + KL to an EMA teacher."""

    def __init__(self, optimizer: torch.optim.Optimizer, mesa: MESA):
        super().__init__(optimizer, "mesa")
        self.mesa = mesa

    def step(self, model, x, y, idx, loss_fn):
        logits = self.forward(model, x)
        ce = loss_fn(logits, y).mean()
        with self.autocast():
            extra = self.mesa(logits, x)
        if self.mesa.steps >= self.mesa.start_step and self.mesa.lam:
            self.passes += FORWARD_ONLY
        self.backward(ce + extra.float())
        self.passes += 1.0
        self.base_step()
        self.mesa.update()
        return ce.detach()

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["mesa"] = self.mesa.state_dict()
        return sd

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "mesa" in state:
            self.mesa.load_state_dict(state["mesa"])


@register(
    "mesa",
    description="MESA, Du et al. 2022 (arXiv 2205.14083): KL to an EMA teacher; 1 pass + 1 "
    "forward; classification",
    defaults={"lam": 0.8, "tau": 5.0, "decay": 0.999, "start_epoch": 1.0},
    in_default_study=False,  # 4-8x SGD per epoch here: left to --optimizers all
    classification_only=True,
)
def _mesa(model, spec, *, lam: float, tau: float, decay: float, start_epoch: float) -> Method:
    if (
        isinstance(start_epoch, bool)
        or not isinstance(start_epoch, (int, float))
        or not 0 <= start_epoch < math.inf
    ):
        raise ValueError(f"Invalid start_epoch value: {start_epoch!r} (must be >= 0)")
    start = int(math.ceil(start_epoch * spec.steps_per_epoch))
    return MESAMethod(
        _base(model, spec), MESA(model, lam=lam, tau=tau, decay=decay, start_step=start)
    )


# ------------------------------------------------ SAM at SGD's cost (issue 12)
@register(
    "momentum_sam",
    description="Momentum-SAM, Becker et al. 2024 (arXiv 2401.12033): ascent along the optimizer's "
    "momentum, no extra gradient; 1 pass (rho 0.5, 10x SAM's: the paper's 3 breaks training on the "
    "5k-parameter CNN, docs/variants.md)",
    defaults={"rho": 0.5},
    rho_scale=10.0,
)
def _momentum_sam(model, spec, *, rho: float) -> Method:
    return SAMMethod(MomentumSAM(_base(model, spec), rho=rho, model=model), "momentum_sam")


@register(
    "momentum_sam_late",
    description="Momentum-SAM on the last fraction of training only (arXiv 2410.10373's late "
    "phase); 1 pass",
    defaults={"rho": 0.5, "fraction": 0.2},
    rho_scale=10.0,
)
def _momentum_sam_late(model, spec, *, rho: float, fraction: float) -> Method:
    pol = Late(total_steps=spec.total_steps, fraction=fraction)
    opt = MomentumSAM(_base(model, spec), rho=rho, policy=pol, model=model)
    return SAMMethod(opt, "momentum_sam_late")


@register(
    "asam_every_k",
    description="ASAM every k steps; 1 + 1/k passes (rho not scaled by k: Composer's x k on ASAM's "
    "10x radius breaks training on the MNIST-1D CNN, docs/variants.md)",
    defaults={"rho": 0.5, "eta": 0.01, "k": 5, "scale_rho": False},
    rho_scale=10.0,
)
def _asam_every_k(model, spec, *, rho: float, eta: float, k: int, scale_rho: bool) -> Method:
    pol = EveryK(k, scale_rho=scale_rho)
    opt = SAM(_base(model, spec), rho=rho, adaptive=True, eta=eta, policy=pol, model=model)
    return SAMMethod(opt, "asam_every_k")


class KSAMMethod(ESAMMethod):
    """K-SAM: ESAM's per-sample closure; the selection forward counts 1/3, the top-k passes k/n."""

    name = "ksam"


@register(
    "ksam",
    description="K-SAM, Ni et al. 2022 (arXiv 2210.12864): both gradients on the top-k loss "
    "samples; 1/3 + 2 fraction passes",
    defaults={"rho": 0.05, "fraction": 1.0 / 3.0},
    per_sample_loss=True,
)
def _ksam(model, spec, *, rho: float, fraction: float) -> Method:
    return KSAMMethod(KSAM(_base(model, spec), rho=rho, fraction=fraction, model=model))


@register(
    "vsam",
    description="vSAM, Deng et al. 2024 (arXiv 2403.08821): SAM on sampled steps, its "
    "second-order part reused in between; adaptive cost",
    defaults={"rho": 0.05, "warmup_epochs": 3.0},
)
def _vsam(model, spec, *, rho: float, warmup_epochs: float) -> Method:
    warmup = check_nonneg("warmup_epochs", warmup_epochs)
    opt = VSAM(
        _base(model, spec),
        warmup_steps=int(round(warmup * spec.steps_per_epoch)),
        rho=rho,
        model=model,
    )
    return SAMMethod(opt, "vsam")
