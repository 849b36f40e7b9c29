"""A read-only view of one SAM step, for the pieces that shape it.

Policies, mixes and rho controllers see a :class:`StepView`, never the
:class:`~samkit.SAM` object: the step count, the gradients SAM gathered, the
squared gradient norm on demand, and the process group to agree on. That
keeps each piece testable on its own and SAM's private state private.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .. import functional
from . import _ddp

__all__ = ["StepView"]

Gathered = Sequence[tuple[dict[str, Any], list[Tensor], list[Tensor]]]


class StepView:
    """What a policy, a mix or a rho controller may read about the current step.

    Attributes:
        steps: steps completed before this one (ascending or not).
        ascents: steps that paid for the ascent so far.
        gradients: ``(group, params, grads)`` for each param group with
            gradients; in a first step, the first-pass gradients (unscaled
            when a GradScaler was given). Read them, do not resize them.
        state: the base optimizer's per-parameter state (e.g. momentum buffers).
        foreach: whether SAM uses the foreach kernels.
        eps: SAM's ``ascent_eps``.
        local: the first pass ran under DDP's ``no_sync`` (per-replica gradients).
        process_group: the DDP process group (``None``: the default group).
        sharding: the FSDP2 shards' :class:`~samkit.optim._fsdp.Sharding`
            (``None`` without FSDP2); ``gradients`` then hold local shards.
    """

    __slots__ = (
        "steps",
        "ascents",
        "gradients",
        "state",
        "foreach",
        "eps",
        "local",
        "process_group",
        "sharding",
        "_sq_norm",
    )

    def __init__(
        self,
        *,
        steps: int,
        ascents: int,
        gradients: Gathered,
        state: Any,
        foreach: bool,
        eps: float,
        local: bool,
        process_group: Any,
        sharding: Any = None,
    ) -> None:
        self.steps = steps
        self.ascents = ascents
        self.gradients = gradients
        self.state = state
        self.foreach = foreach
        self.eps = eps
        self.local = local
        self.process_group = process_group
        self.sharding = sharding
        self._sq_norm: Tensor | None = None

    @property
    def distributed(self) -> bool:
        """More than one replica in the process group."""
        return _ddp.world_size(self.process_group) > 1

    def params(self) -> list[Tensor]:
        return [p for _, params, _ in self.gradients for p in params]

    def grads(self) -> list[Tensor]:
        return [g for _, _, grads in self.gradients for g in grads]

    def sq_grad_norm(self) -> Tensor:
        """``||g||^2`` over every gathered gradient (a 0-d tensor; computed once per step).

        Under more than one replica it is averaged over the process group, so
        every replica reads the same value (with global ascent the values are
        equal already). One collective, no host read. Under FSDP2 it is the
        squared norm of the whole gradient (summed over the shards).
        """
        if self._sq_norm is None:
            pieces = [
                functional.sq_norm(bucket, foreach=self.foreach)
                for _, _, grads in self.gradients
                for (_, _), (bucket,) in functional.group_by_device(grads).items()
            ]
            if not pieces:
                self._sq_norm = torch.zeros(())
            elif self.sharding is not None:
                reduce = self.sharding.reduce_
                self._sq_norm = functional.global_norm(pieces, reduce=reduce).square()
            else:
                total = functional.global_norm(pieces).square()
                self._sq_norm = _ddp.average_scalar(total, self.process_group)
        return self._sq_norm

    def average_(self, tensors: list[Tensor]) -> None:
        """Average ``tensors`` over the replicas when the first pass was local (else nothing)."""
        if self.local:
            _ddp.average_(tensors, self.process_group, foreach=self.foreach)
