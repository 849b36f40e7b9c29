"""When the ascent (the second forward/backward pass) is paid for.

A policy is asked once per step, after the first backward pass, whether this
step does the SAM ascent. Steps it declines are plain base-optimizer steps
with the gradient already computed, so they cost one pass instead of two.
It sees a read-only :class:`~samkit.optim.view.StepView` of the step (step
count, gradients, their squared norm on demand), not the optimizer.

Policies keep their own state (counters, running statistics, random
generators) in :meth:`Policy.state_dict`, which SAM saves with its own, so a
resumed run makes the same choices as one that never stopped.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from .._checks import check_flag, check_int, check_prob, check_unit_interval, is_number
from .view import StepView

__all__ = [
    "Policy",
    "Always",
    "EveryK",
    "RandomPolicy",
    "GradNormTrigger",
    "AdaptivePolicy",
    "Late",
]


class Policy:
    """Base class. Subclasses override :meth:`should_ascend`.

    Under DDP with local ascent, replicas must take the same decision. A policy
    whose answer is the same on every replica by construction (a function of
    the step count, a generator seeded alike, statistics of all-reduced
    values) sets ``replica_consistent = True``; for any other, SAM all-reduces
    the decision (one scalar and a host read per step).
    """

    name = "policy"
    replica_consistent = False
    #: Decides from the first-pass gradient (``view.gradients``): unusable with
    #: a perturbation that needs no gradient (Momentum-SAM), which SAM refuses.
    reads_gradients = False

    def should_ascend(self, view: StepView) -> bool:
        """Return True to pay for the ascent on this step (``view.steps`` steps done so far)."""
        raise NotImplementedError

    def rho_factor(self, view: StepView) -> float:
        """Multiplier applied to every group's rho on the steps that ascend."""
        return 1.0

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Always(Policy):
    """Every step ascends: plain SAM."""

    name = "always"
    replica_consistent = True

    def should_ascend(self, view: StepView) -> bool:
        return True


# --------------------------------------------------------------------------
# Variants: every k steps, random (RST), adaptive (AE-SAM), late.
# --------------------------------------------------------------------------
class EveryK(Policy):
    r"""Ascend on one step in ``k`` (steps 0, k, 2k, ...): MosaicML Composer's
    "SAM every k steps".

    Composer's advice is to scale rho with the interval (k 10, rho 0.5 where
    every-step SAM uses 0.05): ``scale_rho=True`` multiplies every group's
    rho by ``k`` on the steps that ascend. It is not the default (since 0.3):
    on the MNIST-1D CNN with SGD, SAM's rho 0.05 x 10 put test accuracy 17-27
    points below SGD's, where unscaled k=10 was within 1 point
    (docs/variants.md, "Defaults"). Cost: ``1 + 1/k`` passes per step.

    Args:
        k: the interval (>= 1; 1 is plain SAM; default 10, Composer's).
        scale_rho: multiply rho by ``k`` (default False: rho is used as given).
    """

    name = "every_k"
    replica_consistent = True

    def __init__(self, k: int = 10, *, scale_rho: bool = False) -> None:
        self.k = check_int("k", k, 1)
        self.scale_rho = check_flag("scale_rho", scale_rho)

    def should_ascend(self, view: StepView) -> bool:
        return view.steps % self.k == 0

    def rho_factor(self, view: StepView) -> float:
        return float(self.k) if self.scale_rho else 1.0

    def __repr__(self) -> str:
        return f"EveryK(k={self.k}, scale_rho={self.scale_rho})"


class RandomPolicy(Policy):
    r"""Randomized sharpness-aware training (RST; Zhao et al., 2022, arXiv 2203.09962).

    Each step ascends with probability ``p_t`` (a Bernoulli trial), which is
    ``p`` throughout, or moves linearly from ``p`` to ``p_end`` over
    ``total_steps`` steps. Expected cost: ``1 + mean(p_t)`` passes per step.

    The draws come from this policy's own CPU generator, seeded by ``seed``
    and saved in :meth:`state_dict`: a resumed run makes the same choices, and
    all DDP replicas (same seed) agree without communicating.

    Args:
        p: probability of a SAM step (default 0.5), or the start of the schedule.
        p_end: the probability at ``total_steps`` (default: ``p``, constant).
        total_steps: length of the linear schedule; needed with ``p_end``.
        seed: seed of the generator.
    """

    name = "random"
    replica_consistent = True

    def __init__(
        self,
        p: float = 0.5,
        *,
        p_end: float | None = None,
        total_steps: int | None = None,
        seed: int = 0,
    ) -> None:
        self.p = check_prob("p", p)
        self.p_end = self.p if p_end is None else check_prob("p_end", p_end)
        if self.p_end != self.p and total_steps is None:
            raise ValueError("Invalid total_steps value: None (needed to move p to p_end)")
        self.total_steps = None if total_steps is None else check_int("total_steps", total_steps, 1)
        self.seed = check_int("seed", seed, -(2**63))
        self._gen = torch.Generator()
        self._gen.manual_seed(seed)

    def probability(self, step: int) -> float:
        """``p_t`` at a given step count."""
        if self.total_steps is None:
            return self.p
        frac = min(step / self.total_steps, 1.0)
        return self.p + (self.p_end - self.p) * frac

    def should_ascend(self, view: StepView) -> bool:
        # one draw per step, whatever p is, so the stream stays aligned
        u = float(torch.rand((), generator=self._gen))
        return u < self.probability(view.steps)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self._gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "generator" in state:
            self._gen.set_state(state["generator"].cpu())

    def __repr__(self) -> str:
        return f"RandomPolicy(p={self.p}, p_end={self.p_end}, total_steps={self.total_steps}, seed={self.seed})"


class GradNormTrigger(Policy):
    r"""AE-SAM (Jiang et al., ICLR 2023, arXiv 2304.14647): ascend where the
    landscape looks sharp, i.e. when the gradient norm is unusually large.

    With ``x_t = ||g_t||^2`` the squared norm of the first-pass gradient,
    exponential moving estimates of its mean and variance

    .. math:: \mu_t = \delta \mu_{t-1} + (1-\delta) x_t, \qquad
              \sigma^2_t = \delta \sigma^2_{t-1} + (1-\delta)(x_t - \mu_t)^2

    and a threshold coefficient ``c_t`` moving linearly from ``c_start`` to
    ``c_end`` over ``total_steps``, the step ascends iff
    ``x_t >= mu_t + c_t sigma_t``. Raising ``c`` over training spends fewer
    SAM steps late (where SAM matters less according to the paper); the
    defaults give roughly half the steps early and fewer later.

    Costs: one extra pass over the gradients and **one host read per step**
    (the decision is a Python bool; on a GPU this is a device sync).

    Under DDP the squared norm is averaged across replicas with one scalar
    all-reduce before deciding (:meth:`StepView.sq_grad_norm`), so every
    replica takes the same decision.

    Args:
        total_steps: the training length (for the ``c`` schedule).
        c_start, c_end: the threshold coefficient at the start and at the end
            (default -1 and 1).
        decay: ``delta``, the moving-average decay, in [0, 1) (default 0.9).
    """

    name = "grad_norm_trigger"
    replica_consistent = True
    reads_gradients = True

    def __init__(
        self, total_steps: int, *, c_start: float = -1.0, c_end: float = 1.0, decay: float = 0.9
    ) -> None:
        self.total_steps = check_int("total_steps", total_steps, 1)
        for name, value in (("c_start", c_start), ("c_end", c_end)):
            if not is_number(value) or not math.isfinite(value):
                raise ValueError(f"Invalid {name} value: {value!r} (must be a finite number)")
        decay = check_unit_interval("decay", decay, closed_low=True, closed_high=False)
        self.c_start, self.c_end, self.decay = float(c_start), float(c_end), decay
        self.mean: float | None = None
        self.var = 0.0
        self.last_sq_norm = float("nan")

    def threshold_coefficient(self, step: int) -> float:
        frac = min(step / self.total_steps, 1.0)
        return self.c_start + (self.c_end - self.c_start) * frac

    def should_ascend(self, view: StepView) -> bool:
        x = float(view.sq_grad_norm())
        self.last_sq_norm = x
        if not math.isfinite(x):
            return True  # let SAM's non-finite handling see it; stats stay clean
        if self.mean is None:
            self.mean, self.var = x, 0.0
        else:
            d = self.decay
            self.mean = d * self.mean + (1.0 - d) * x
            self.var = d * self.var + (1.0 - d) * (x - self.mean) ** 2
        return x >= self.mean + self.threshold_coefficient(view.steps) * math.sqrt(self.var)

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "mean" in state:
            self.mean = None if state["mean"] is None else float(state["mean"])
            self.var = float(state["var"])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(total_steps={self.total_steps}, c_start={self.c_start}, "
            f"c_end={self.c_end}, decay={self.decay})"
        )


class AdaptivePolicy(GradNormTrigger):
    """Deprecated name of :class:`GradNormTrigger` (AE-SAM), kept for samkit 0.1 code.

    The name collided with ASAM's ``Adaptive`` perturbation, which is unrelated.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        warnings.warn(
            "samkit.AdaptivePolicy is now samkit.GradNormTrigger (AE-SAM); the old name will go",
            DeprecationWarning,
            stacklevel=2,
        )
        super().__init__(*args, **kwargs)


class Late(Policy):
    r"""SAM only in the last part of training (Zhou et al., 2024, arXiv 2410.10373).

    The paper finds that SAM selects flatter minima late in training: a few
    final epochs of SAM after plain training give most of its benefit. Steps
    before ``start_step`` are plain base-optimizer steps.

    Args:
        start_step: the first step that ascends; or give both
        total_steps and fraction: SAM on the last ``fraction`` of the steps.
    """

    name = "late"
    replica_consistent = True

    def __init__(
        self,
        start_step: int | None = None,
        *,
        total_steps: int | None = None,
        fraction: float | None = None,
    ) -> None:
        if start_step is not None:
            if total_steps is not None or fraction is not None:
                raise ValueError(
                    "Invalid start_step value: give start_step, or total_steps and fraction, not both"
                )
            self.start_step = check_int("start_step", start_step, 0)
        else:
            if total_steps is None or fraction is None:
                raise ValueError(
                    "Invalid start_step value: None (give start_step, or total_steps and fraction)"
                )
            total = check_int("total_steps", total_steps, 1)
            frac = check_prob("fraction", fraction)
            self.start_step = int(round(total * (1.0 - frac)))

    def should_ascend(self, view: StepView) -> bool:
        return view.steps >= self.start_step

    def __repr__(self) -> str:
        return f"Late(start_step={self.start_step})"
