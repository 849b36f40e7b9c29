r"""ESAM: efficient SAM (Du et al., ICLR 2022, arXiv 2110.03141).

Two savings on top of SAM:

* **Stochastic weight perturbation (SWP)**: only a random fraction ``beta``
  of the weights is perturbed, rescaled by ``1/beta``
  (:class:`~samkit.optim.perturbation.RandomSubset`).
* **Sharpness-sensitive data selection (SDS)**: after the ascent, one
  forward pass without gradients measures each sample's loss increase
  :math:`\ell_i(w + e) - \ell_i(w)`; the second backward pass runs only on
  the ``gamma`` fraction of the batch whose loss rose most:

  .. math:: \tilde g = \nabla_w \frac{1}{|B^+|} \sum_{i \in B^+} \ell_i(w + e),
            \qquad B^+ = \operatorname{top}_{\lceil \gamma |B| \rceil}
            \big(\ell_i(w + e) - \ell_i(w)\big)

Per step: one forward/backward on the batch, one forward on the batch, one
forward/backward on ``gamma`` of it (``gamma=1`` skips the selection and is
plain SAM with SWP).

Because the selection needs per-sample losses, ESAM's closure differs from
SAM's: it takes the indices of the samples to use (``None`` for the whole
batch) and returns the **per-sample** losses *without* calling backward;
ESAM does the backward passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .._checks import check_unit_interval
from . import _args, _compile, _feedback
from .perturbation import Perturbation, RandomSubset
from .sam import SAM

if TYPE_CHECKING:  # pragma: no cover
    from torch.optim.optimizer import ParamsT

__all__ = ["ESAM", "backward_mean"]


def backward_mean(losses: Tensor, scaler: torch.amp.GradScaler | None, *, method: str) -> None:
    """Backward of the mean of the per-sample ``losses`` a closure returned
    (ESAM's closure convention), scaled by ``scaler`` when it is enabled."""
    if losses.dim() != 1:
        raise ValueError(
            f"Invalid closure value: {method}'s closure must return per-sample losses of shape [n] "
            f"(reduction='none'), got shape {tuple(losses.shape)}"
        )
    loss = losses.mean()
    scaled = scaler.scale(loss) if scaler is not None and scaler.is_enabled() else loss
    scaled.backward()  # type: ignore[no-untyped-call]  # (Tensor.backward is not annotated)


_NO_GAMMA = (
    "Invalid gamma value: None; ESAM needs gamma, the share of each batch its update is "
    "computed on (the samples whose loss rose most). That selection is the method and it "
    "costs accuracy: at the paper's 0.5, 7-27 points below the base optimizer in short runs "
    "of samkit's MNIST-1D CNN, GRU and ResNet (on the CNN after 30 epochs -5 to +5 with SGD, "
    "-18 to -22 with Adam), where gamma=1 (every sample) trails it by 1-5, as SAM does. Pass "
    "gamma=0.5 for the paper's ESAM, or gamma=1.0 (docs/variants.md, Defaults)"
)


class ESAM(SAM):
    r"""ESAM (arXiv 2110.03141); see the module docstring.

    Args:
        params_or_optimizer, base_optimizer: as :class:`~samkit.SAM`.
        rho: the radius (default 0.05).
        beta: SWP's fraction of perturbed weights, in (0, 1] (default 0.5;
            the paper uses 0.5 to 0.6). 1 turns SWP off.
        gamma: SDS's fraction of samples in the second pass, in (0, 1];
            required (the paper's 0.5; see ``_NO_GAMMA`` for why there is no
            default). 1 turns SDS off.
        seed: seed of the SWP mask generator (saved in ``state_dict``).
        perturbation: the perturbation SWP masks (default L2; e.g.
            ``Adaptive()`` for ESAM on ASAM).
        **kwargs: the other :class:`~samkit.SAM` arguments.

    Use :meth:`step` with a per-sample closure::

        def closure(index=None):
            xb, yb = (x, y) if index is None else (x[index], y[index])
            return F.cross_entropy(model(xb), yb, reduction="none")

        loss = opt.step(closure)

    Works with ``model=`` (BatchNorm statistics from the first pass only),
    DDP (each replica selects among its own samples; the second backward
    all-reduces as usual) and ``scaler=`` (fp16 AMP). Gradient accumulation
    over several micro-batches inside one step is not supported: the
    selection is per batch.
    """

    def hold_back(self, losses: Tensor, ids: Any, fraction: float = 0.1, **kw: Any) -> Tensor:
        raise _feedback.refuse_hold_back("ESAM")

    def __init__(
        self,
        params_or_optimizer: ParamsT | torch.optim.Optimizer,
        base_optimizer: type[torch.optim.Optimizer] | None = None,
        *,
        rho: float | str = 0.05,
        beta: float = 0.5,
        gamma: float | None = None,
        seed: int = 0,
        perturbation: Perturbation | None = None,
        **kwargs: Any,
    ) -> None:
        if gamma is None:
            raise ValueError(_NO_GAMMA)
        gamma = check_unit_interval("gamma", gamma, closed_low=False, closed_high=True)
        if kwargs.get("adaptive"):
            raise ValueError("Invalid adaptive value: pass perturbation=Adaptive() to ESAM instead")
        if perturbation is not None and not isinstance(perturbation, Perturbation):
            raise ValueError(
                f"Invalid perturbation value: {perturbation!r} is not a samkit Perturbation"
            )
        swp = RandomSubset(beta, seed=seed, inner=perturbation)  # validates beta and seed
        super().__init__(params_or_optimizer, base_optimizer, rho=rho, perturbation=swp, **kwargs)
        self.beta = swp.beta
        self.gamma = float(gamma)
        self.last_selected: Tensor | None = None  # indices used by the last second pass

    def __repr__(self) -> str:
        return (
            f"ESAM(rho={self._sam_defaults['rho']}, beta={self.beta}, gamma={self.gamma}, "
            f"base={self.base_optimizer!r})"
        )

    def select(self, before: Tensor, after: Tensor) -> Tensor:
        """Indices of the ``ceil(gamma * n)`` samples whose loss rose most (SDS)."""
        n = before.numel()
        m = max(1, math.ceil(self.gamma * n))
        return torch.topk((after - before).reshape(-1), m, sorted=False).indices

    @_compile.disable_frame
    def step(  # type: ignore[override]
        self,
        closure: Callable[..., Tensor] | None = None,
        *,
        scaler: torch.amp.GradScaler | None = None,
    ) -> Tensor | None:
        """One ESAM step; returns the mean loss at ``w`` (detached).

        ``closure(index)`` returns per-sample losses (shape ``[n]``) for the
        samples ``index`` (``None``: the whole batch) and does not call
        backward.
        """
        if closure is None:
            return super().step(None)
        # gradients left in .grad would join the first pass (SAM.step refuses them too)
        _args.existing_grads(self._all_params(), "error")
        sign = _args.objective_sign(self.param_groups, "ESAM")

        def backward(losses: Tensor) -> None:
            backward_mean(losses, scaler, method="ESAM")

        with torch.enable_grad():
            with self.first_pass():
                before = closure(None)
                backward(before)
            before = before.detach()
            try:
                if self.first_step(zero_grad=True, scaler=scaler):
                    if self.gamma < 1.0:
                        with torch.no_grad():
                            after = closure(None)
                        # (maximize=True: the samples whose value climbed falls most)
                        index = self.select(sign * before, sign * after.detach())
                    else:
                        index = None
                    self.last_selected = index
                    backward(closure(index))
            except BaseException:
                self.abort_step()  # never leave perturbed weights behind
                raise
        if scaler is not None and scaler.is_enabled():
            scaler.step(self)
        else:
            self.second_step()
        return before.mean()
