r"""mSAM: micro-batch-averaged SAM (Behdin et al., 2023, arXiv 2302.09693).

SAM's "m-sharpness" (Foret et al., Sec. 4.1): perturbing with the gradient of
a small sub-batch generalises better than with the whole batch's. mSAM makes
that explicit on one device: the batch is split into ``m`` micro-batches,
each gets its own ascent, and the perturbed gradients are averaged:

.. math::

    e_j = \rho \frac{g_j}{\lVert g_j \rVert}, \quad g_j = \nabla L_j(w),
    \qquad \tilde g = \frac{1}{m} \sum_{j=1}^{m} \nabla L_j(w + e_j)

Cost: two passes over the batch, as SAM, but in ``m`` pieces (smaller
kernels; no extra memory beyond SAM's weight backup and one gradient
accumulator). Under DDP, plain SAM with ``ddp_ascent="local"`` already gives
per-replica m-sharpness.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .. import functional
from . import _args, _compile, _ddp
from .sam import SAM

if TYPE_CHECKING:  # pragma: no cover
    from torch.optim.optimizer import ParamsT

__all__ = ["MicroBatchSAM", "MSAM"]


class MicroBatchSAM(SAM):
    r"""mSAM, micro-batch SAM (arXiv 2302.09693); see the module docstring.

    Named ``MSAM`` up to samkit 0.2 (that name is a deprecated alias: "MSAM"
    is also what the Momentum-SAM paper calls its method,
    :class:`~samkit.optim.momentum_sam.MomentumSAM`).

    Args:
        params_or_optimizer, base_optimizer: as :class:`~samkit.SAM`.
        rho: the radius of each micro-batch's ascent (default 0.05).
        micro_batches: ``m``, the number of micro-batches (default 4).
        **kwargs: the other :class:`~samkit.SAM` arguments except ``policy``.

    The closure takes the micro-batch number ``j`` (0 to m - 1), runs forward
    and backward on that micro-batch (mean loss) and returns the loss::

        xs, ys = x.chunk(4), y.chunk(4)
        def closure(j):
            loss = F.cross_entropy(model(xs[j]), ys[j])
            loss.backward()
            return loss

        loss = opt.step(closure)   # mean of the micro-batch losses at w

    Works with ``model=`` (BatchNorm statistics are updated by the first pass
    of every micro-batch, not by the perturbed passes). Not supported, with a
    ``ValueError``: a ``policy`` (each micro-batch would consult it), a
    ``GradScaler`` (the micro-batch gradients would be mixed across scale
    updates), and an initialised multi-process group (use SAM with
    ``ddp_ascent="local"``, which is mSAM across replicas).
    """

    def __init__(
        self,
        params_or_optimizer: ParamsT | torch.optim.Optimizer,
        base_optimizer: type[torch.optim.Optimizer] | None = None,
        *,
        rho: float | str = 0.05,
        micro_batches: int = 4,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("policy") is not None:
            raise ValueError(
                "Invalid policy value: mSAM ascends on every micro-batch; policies are not supported"
            )
        kwargs.pop("policy", None)
        if (
            isinstance(micro_batches, bool)
            or not isinstance(micro_batches, int)
            or micro_batches < 1
        ):
            raise ValueError(
                f"Invalid micro_batches value: {micro_batches!r} (must be an int >= 1)"
            )
        super().__init__(params_or_optimizer, base_optimizer, rho=rho, **kwargs)
        self.micro_batches = micro_batches
        self._left: list[tuple[Tensor | None, int]] = []  # the gradients the last step left
        self._acc: dict[Tensor, Tensor] = {}

    def __repr__(self) -> str:
        return f"MicroBatchSAM(rho={self._sam_defaults['rho']}, micro_batches={self.micro_batches}, base={self.base_optimizer!r})"

    @property
    def method(self) -> dict[str, str | None]:
        """As :attr:`SAM.method`; the deprecated ``MSAM`` alias records ``MicroBatchSAM``."""
        method = super().method
        if method["class"] == "MSAM":
            method["class"] = "MicroBatchSAM"
        return method

    def load_state_dict(self, state_dict: dict[str, Any], *, base_only: bool = False) -> None:
        """As :meth:`SAM.load_state_dict`; a state dict written by samkit 0.2's
        ``MSAM`` (the same method) loads too."""
        own = state_dict.get("samkit") if isinstance(state_dict, dict) else None
        written = own.get("method") if isinstance(own, dict) else None
        if isinstance(own, dict) and isinstance(written, dict) and written.get("class") == "MSAM":
            own = {**own, "method": {**written, "class": "MicroBatchSAM"}}
            state_dict = {**state_dict, "samkit": own}
        super().load_state_dict(state_dict, base_only=base_only)

    def _accumulate(self, into: dict[Tensor, Tensor]) -> None:
        """Add the current gradients into this step's accumulators (buffers allocated once)."""
        for _, params, grads in self._gather():
            accumulators = functional.buffers_like(self._acc, params, grads)
            fresh = [i for i, p in enumerate(params) if p not in into]
            for i in fresh:  # first micro-batch this parameter appears in
                accumulators[i].zero_()
            into.update(zip(params, accumulators))
            for (_, _), (bucket_acc, bucket_grads) in functional.group_by_device(
                accumulators, grads
            ).items():
                functional.add_(bucket_acc, bucket_grads, foreach=self.foreach)

    @_compile.disable_frame
    def step(  # type: ignore[override]
        self,
        closure: Callable[[int], Tensor] | None = None,
        *,
        scaler: torch.amp.GradScaler | None = None,
    ) -> Tensor | None:
        """One mSAM step over ``micro_batches`` calls of ``closure(j)``; returns the mean loss at ``w``."""
        if closure is None:
            raise RuntimeError(
                "MicroBatchSAM.step() needs a closure(j) that does forward + backward on micro-batch j"
            )
        if scaler is not None and scaler.is_enabled():
            raise ValueError(
                "Invalid scaler value: mSAM does not support a GradScaler (fp16 AMP); use bfloat16 autocast"
            )
        if _ddp.world_size(None) > 1:
            raise ValueError(
                "mSAM under DDP is not supported: use SAM(..., model=ddp_model, ddp_ascent='local'), "
                "where each replica's ascent already uses its own micro-batch"
            )
        params = self._all_params()
        if not _args.same_marks(_args.grad_marks(params), self._left):
            # micro-batch 0 clears .grad: what the last step left goes, a backward since is refused
            _args.existing_grads(params, "error")
        closure = torch.enable_grad()(closure)
        m = self.micro_batches
        losses = []
        used: dict[
            Tensor, Tensor
        ] = {}  # parameter -> its accumulator (micro-batches before the last)
        for j in range(m):
            self.zero_grad()
            losses.append(closure(j).detach())
            try:
                if self.first_step(zero_grad=True):
                    closure(j)
            except BaseException:
                self.abort_step()
                raise
            if j < m - 1:
                # w back exactly, no base step; a non-finite micro-batch leaves
                # NaN in its accumulator, which the final step's check sees
                self.abort_step()
                self._accumulate(used)
        # last micro-batch: its gradient is in .grad; add the others and average
        if m > 1:
            last = {p for _, params, _ in self._gather() for p in params}
            for p in used.keys() - last:  # a parameter unused by the last micro-batch
                p.grad = torch.zeros_like(p)
            for _, params, grads in self._gather():
                accumulators = [used[p] for p in params if p in used]
                with_acc = [g for p, g in zip(params, grads) if p in used]
                for (_, _), (bucket_grads, bucket_acc) in functional.group_by_device(
                    with_acc, accumulators
                ).items():
                    functional.add_(bucket_grads, bucket_acc, foreach=self.foreach)
                for (_, _), (bucket,) in functional.group_by_device(grads).items():
                    functional.mul_(bucket, 1.0 / m, foreach=self.foreach)
        self.second_step()
        self._left = _args.grad_marks(params)
        return torch.stack(losses).mean()


class MSAM(MicroBatchSAM):
    """Deprecated alias of :class:`MicroBatchSAM` (renamed in samkit 0.3: Momentum-SAM
    is "MSAM" in its paper); constructing it warns ``DeprecationWarning``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        warnings.warn(
            "samkit.MSAM is deprecated: it was renamed MicroBatchSAM (micro-batch SAM); "
            "MSAM will be removed in a later release",
            DeprecationWarning,
            stacklevel=2,
        )
        super().__init__(*args, **kwargs)
