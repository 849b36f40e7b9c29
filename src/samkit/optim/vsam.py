r"""vSAM: SAM on a few sampled steps, its second-order part reused in between
(Deng, Pang, Zhang and Wang, 2024, arXiv 2403.08821).

SAM's gradient splits into SGD's gradient and the *PSF*, the projection of
the second-order gradient onto the first-order one:

.. math::

    g_s = \nabla L(w + \rho\, g / \lVert g \rVert)
        \approx g + \rho\, H g / \lVert g \rVert = g + \mathrm{psf}, \qquad
    \mathrm{psf} = g_s - g

vSAM pays for SAM's two passes on a few *sampled* steps only, where it
measures ``psf``, and on the other steps (one pass each) adds the last
``psf`` back with a decaying weight (the paper's reuse):

.. math::

    \tilde g_t = g_t + \beta^{j}\, \mathrm{psf}, \qquad j = 1, 2, \ldots, J

(``j`` counts the steps since the last sampled one; after ``J`` of them the
step is plain SGD's). How many steps are sampled follows how fast ``psf``
changes: in every window of ``K`` steps, ``n`` are SAM steps (at random, with
probability ``n/K``, forced at the window's end if fewer were drawn), and at
each window's start

.. math::

    n \leftarrow \operatorname{clip}\big(n\,(1 + \alpha_1 \overline{\Delta r}
        + \alpha_2 \overline{\Delta s}),\ 1,\ \lfloor p_{\max} K \rfloor\big)

where :math:`\overline{\Delta r}` is the mean relative change (clipped to
[-1, 1]) of :math:`r = \lVert \mathrm{psf} \rVert / \lVert g \rVert` over the
last ``K`` sampled steps and :math:`\overline{\Delta s}` that of ``s``, the
mean variance within ``B`` blocks of the sorted last ``K`` values of
:math:`\lVert \mathrm{psf} \rVert`. Norms are taken over the last
``last_tensors`` parameter tensors (the layers nearest the output). The first
``warmup_steps`` (the paper: 3 epochs) are all SAM steps, and ``n`` starts at 1.

The defaults are those of the authors' training script (github.com/ajiaaa/vSAM:
K = 50, B = 5, p_max = 0.8, alpha = (0.13, 0.13), beta = 0.7, J = 6, the
last 10 tensors). Their script divides by history entries that start at
zero; here a relative change is taken only between two recorded values
(none yet: no change), and its window counter starts at zero.

vSAM is SAM with a policy (:class:`PSFVariation`, the sampling) and a mix
(:class:`ReusePSF`, the reuse) that tells the policy what it measured; this
module assembles them. Cost: ``1 + n/K`` passes per step on average, plus one
host read of two norms on each sampled step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .. import functional
from .._checks import check_int, check_nonneg, check_unit_interval
from .mix import GradientStore, Mix, dot, load_vectors
from .policy import Policy
from .sam import SAM
from .view import StepView

if TYPE_CHECKING:  # pragma: no cover
    from torch.optim.optimizer import ParamsT

__all__ = ["VSAM", "ReusePSF", "PSFVariation"]


class ReusePSF(Mix):
    r"""vSAM's reuse of the PSF, ``psf = g_s - g``, on the steps between SAM steps.

    On a SAM step it keeps ``psf`` (the weight starts again at 1); on the
    next ``max_reuse`` plain steps the base step receives
    ``g + beta^j psf`` (``j = 1 .. max_reuse``), then plain ``g``. ``psf`` is
    saved in the state dict.

    Args:
        beta: the decay of the reused term per step, in (0, 1) (default 0.7).
        max_reuse: how many plain steps add it (default 6).
        last_tensors: the norms reported to ``observer`` are over the last
            this-many parameter tensors (default 10).
    """

    name = "reuse_psf"

    def __init__(self, beta: float = 0.7, max_reuse: int = 6, last_tensors: int = 10) -> None:
        self.beta = check_unit_interval("beta", beta, closed_low=False, closed_high=False)
        self.max_reuse = check_int("max_reuse", max_reuse, 0)
        self.last_tensors = check_int("last_tensors", last_tensors, 1)
        self.first = GradientStore()
        self.psf: dict[Tensor, Tensor] = {}
        self.age = 0  # plain steps since the last SAM step
        self.reused = 0  # plain steps that added psf
        #: called with (||psf||, ||g||) over the last tensors after each SAM step
        self.observer: Callable[[float, float], None] | None = None

    def before_ascent(self, view: StepView) -> None:
        self.first.capture(view)

    def after_ascent(self, view: StepView) -> None:
        params, g, g_s = self.first.pairs()
        if not g_s:
            return
        # allocated once, re-made if g_s changed dtype, device or shape (model.double())
        stored = functional.buffers_like(self.psf, params, g_s)
        for (_, _), (out, second, first) in functional.group_by_device(stored, g_s, g).items():
            functional.copy_(out, second, foreach=view.foreach)
            functional.add_(out, first, alpha=-1.0, foreach=view.foreach)  # psf = g_s - g
        self.age = 0
        if self.observer is not None:
            tail = slice(max(0, len(stored) - self.last_tensors), None)
            psf_norm = float(dot(stored[tail], stored[tail]).sqrt())
            grad_norm = float(dot(g[tail], g[tail]).sqrt())
            self.observer(psf_norm, grad_norm)

    def after_plain(self, view: StepView) -> None:
        if not self.psf or self.age >= self.max_reuse:
            return
        self.age += 1
        weight = self.beta**self.age
        grads, stored = [], []
        for _, params, group_grads in view.gradients:
            for p, g in zip(params, group_grads):
                v = self.psf.get(p)
                if v is not None:
                    grads.append(g)
                    stored.append(v)
        for (_, _), (bucket_grads, bucket_stored) in functional.group_by_device(
            grads, stored
        ).items():
            functional.add_(bucket_grads, bucket_stored, alpha=weight, foreach=view.foreach)
        self.reused += 1

    def state_dict(self, params: list[Tensor]) -> dict[str, Any]:
        index = {p: i for i, p in enumerate(params)}
        return {
            "psf": {index[p]: v.clone() for p, v in self.psf.items() if p in index},
            "age": self.age,
            "reused": self.reused,
        }

    def load_state_dict(self, state: dict[str, Any], params: list[Tensor]) -> None:
        if not state:
            return
        psf = load_vectors("vSAM's psf", state.get("psf"), params)
        age: Any = state.get("age")
        reused: Any = state.get("reused", 0)
        for name, value, high in (("age", age, self.max_reuse), ("reused", reused, None)):
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < 0
                or (high is not None and value > high)
            ):
                bound = f"0..{high}" if high is not None else "a count"
                raise ValueError(f"Invalid state value: vSAM's {name} = {value!r} ({bound})")
        self.psf, self.age, self.reused = psf, age, reused

    def __repr__(self) -> str:
        return f"ReusePSF(beta={self.beta}, max_reuse={self.max_reuse}, last_tensors={self.last_tensors})"


def _mean_relative_change(values: Sequence[float]) -> float:
    """Mean of ``(v[i+1] - v[i]) / v[i]`` over consecutive pairs, clipped to [-1, 1]."""
    changes = [(b - a) / a for a, b in zip(values, values[1:]) if a != 0]
    if not changes:
        return 0.0
    return min(1.0, max(-1.0, sum(changes) / len(changes)))


class PSFVariation(Policy):
    """vSAM's sampling: how many steps of each window of ``window`` are SAM steps.

    Reads the PSF statistics that :class:`ReusePSF` reports (:meth:`observe`);
    see the module docstring for the rule. Draws come from its own generator
    (seeded, saved in the state dict), so a resumed run and every DDP replica
    make the same choices.

    Args:
        warmup_steps: the first steps, all SAM steps (the paper: 3 epochs).
        window: ``K``, the window in steps (default 50).
        blocks: ``B``, blocks of the sorted window for the variance (default 5).
        max_fraction: ``p_max``, the largest share of SAM steps (default 0.8).
        alpha: ``(alpha_1, alpha_2)``, weights of the two relative changes
            (default (0.13, 0.13)).
        seed: seed of the generator.
    """

    name = "psf_variation"
    replica_consistent = True

    def __init__(
        self,
        warmup_steps: int,
        *,
        window: int = 50,
        blocks: int = 5,
        max_fraction: float = 0.8,
        alpha: tuple[float, float] = (0.13, 0.13),
        seed: int = 0,
    ) -> None:
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 0)
        self.window = check_int("window", window, 2)
        self.blocks = check_int("blocks", blocks, 1)
        if self.blocks > self.window:
            raise ValueError(f"Invalid blocks value: {blocks!r} (must be <= window = {window})")
        self.max_fraction = check_unit_interval(
            "max_fraction", max_fraction, closed_low=False, closed_high=True
        )
        if not isinstance(alpha, (tuple, list)) or len(alpha) != 2:
            raise ValueError(f"Invalid alpha value: {alpha!r} (must be a pair of numbers >= 0)")
        self.alpha = (check_nonneg("alpha", alpha[0]), check_nonneg("alpha", alpha[1]))
        self.seed = check_int("seed", seed, -(2**63))
        self.max_sam = max(1, int(self.window * self.max_fraction))
        self._gen = torch.Generator()
        self._gen.manual_seed(self.seed)
        self.sam_per_window = 1.0  # n, the SAM steps per window
        self.taken = 0  # SAM steps taken in the current window
        self.ratios: list[float] = []  # ||psf|| / ||g|| at the last `window` SAM steps
        self.norms: list[float] = []  # ||psf|| at the last `window` SAM steps
        self.spreads: list[float] = []  # s after each SAM step since the last window start

    def observe(self, psf_norm: float, grad_norm: float) -> None:
        """Record one SAM step's ``||psf||`` and ``||g||`` (called by :class:`ReusePSF`)."""
        if not (math.isfinite(psf_norm) and math.isfinite(grad_norm)):
            return
        self.norms = (self.norms + [psf_norm])[-self.window :]
        self.ratios = (self.ratios + [psf_norm / grad_norm if grad_norm > 0 else 0.0])[
            -self.window :
        ]
        self.spreads.append(self._spread())

    def _spread(self) -> float:
        """Mean variance within ``blocks`` blocks of the sorted recorded norms."""
        ordered = sorted(self.norms)
        width = len(ordered) // self.blocks
        if width < 2:
            return 0.0
        variances = [
            torch.tensor(ordered[j * width : (j + 1) * width], dtype=torch.float64).var().item()
            for j in range(self.blocks)
        ]
        return sum(variances) / len(variances)

    def should_ascend(self, view: StepView) -> bool:
        if view.steps < self.warmup_steps:
            self.taken += 1
            return True
        position = (view.steps - self.warmup_steps) % self.window
        if position == 0:
            self._new_window(update=view.steps > self.warmup_steps)
        quota = int(self.sam_per_window)
        drawn = float(torch.rand((), generator=self._gen))  # one draw per step: stream aligned
        forced = self.window - position <= quota - self.taken
        ascend = (self.taken < quota and drawn < self.sam_per_window / self.window) or forced
        self.taken += int(ascend)
        return ascend

    def _new_window(self, update: bool) -> None:
        """Start a window; after the first one, rescale ``n`` by the relative changes."""
        self.taken = 0
        if not update:
            return
        self.spreads = self.spreads[-self.window :]
        a1, a2 = self.alpha
        change = a1 * _mean_relative_change(self.ratios) + a2 * _mean_relative_change(self.spreads)
        self.sam_per_window = min(float(self.max_sam), max(1.0, self.sam_per_window * (1 + change)))

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self._gen.get_state(),
            "sam_per_window": self.sam_per_window,
            "taken": self.taken,
            "ratios": list(self.ratios),
            "norms": list(self.norms),
            "spreads": list(self.spreads),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self._gen.set_state(state["generator"].cpu())
        self.sam_per_window = float(state["sam_per_window"])
        self.taken = int(state["taken"])
        self.ratios = [float(v) for v in state["ratios"]]
        self.norms = [float(v) for v in state["norms"]]
        self.spreads = [float(v) for v in state["spreads"]]

    def __repr__(self) -> str:
        return (
            f"PSFVariation(warmup_steps={self.warmup_steps}, window={self.window}, "
            f"blocks={self.blocks}, max_fraction={self.max_fraction}, alpha={self.alpha}, "
            f"seed={self.seed})"
        )


class VSAM(SAM):
    r"""vSAM (arXiv 2403.08821); see the module docstring.

    Args:
        params_or_optimizer, base_optimizer: as :class:`~samkit.SAM`.
        warmup_steps: the first steps, all SAM steps (the paper: 3 epochs,
            ``3 * len(loader)``).
        rho: the radius of the SAM steps (default 0.05).
        window, blocks, max_fraction, alpha, seed: the sampling
            (:class:`PSFVariation`).
        beta, max_reuse, last_tensors: the reuse (:class:`ReusePSF`).
        **kwargs: the other :class:`~samkit.SAM` arguments except ``policy``
            and ``mix``.

    Works with DDP (the kept ``g`` is averaged over the replicas after a
    local first pass, so ``psf``, the statistics and the draws agree), a
    ``GradScaler`` and ``state_dict`` (the stored ``psf``, the statistics and
    the generator are saved).
    """

    mix: ReusePSF  # (typing only: its PSF-reuse mix, set by __init__)

    def __init__(
        self,
        params_or_optimizer: ParamsT | torch.optim.Optimizer,
        base_optimizer: type[torch.optim.Optimizer] | None = None,
        *,
        warmup_steps: int,
        rho: float = 0.05,
        window: int = 50,
        blocks: int = 5,
        max_fraction: float = 0.8,
        alpha: tuple[float, float] = (0.13, 0.13),
        seed: int = 0,
        beta: float = 0.7,
        max_reuse: int = 6,
        last_tensors: int = 10,
        **kwargs: Any,
    ) -> None:
        for name in ("policy", "mix"):
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"Invalid {name} value: vSAM chooses its own steps and mix; pass its "
                    "options instead, or build SAM(..., policy=PSFVariation(...), mix=ReusePSF(...))"
                )
            kwargs.pop(name, None)
        policy = PSFVariation(
            warmup_steps,
            window=window,
            blocks=blocks,
            max_fraction=max_fraction,
            alpha=alpha,
            seed=seed,
        )
        mix = ReusePSF(beta, max_reuse, last_tensors)
        mix.observer = policy.observe
        super().__init__(
            params_or_optimizer, base_optimizer, rho=rho, policy=policy, mix=mix, **kwargs
        )

    @property
    def reused(self) -> int:
        """Plain steps that added the stored PSF."""
        return self.mix.reused

    def __repr__(self) -> str:
        return f"VSAM(rho={self.defaults[self.rho_key]}, policy={self.policy!r}, mix={self.mix!r}, base={self.base_optimizer!r})"
