"""A read-only view of one SAM step, for the pieces that shape it.

Policies, mixes and rho controllers see a :class:`StepView`, never the
:class:`~samkit.SAM` object: the step count, the gradients SAM gathered, the
squared gradient norm on demand, the process group to agree on, and the param
groups' radius (:class:`RhoGroups`, what a rho controller reads and writes).
Perturbations see each group's settings under their plain names
(:func:`sam_settings`). That keeps each piece testable on its own and SAM's
private state private.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .. import functional
from . import _ddp

if TYPE_CHECKING:  # pragma: no cover
    from torch.distributed import ProcessGroup

    from ._fsdp import Sharding

__all__ = ["StepView", "RhoGroups", "sam_settings", "Gathered", "OptimizerState"]

#: ``(group, params, grads)`` for each param group with gradients, the group read
#: through SAM's plain names (:func:`sam_settings`); ``grads[i]`` is ``params[i]``'s
#: gradient (or the vector the ascent starts from).
Gathered = Sequence[tuple[Mapping[str, Any], list[Tensor], list[Tensor]]]

#: A torch optimizer's per-parameter state (``optimizer.state``): ``param -> {key: value}``.
OptimizerState = Mapping[Tensor, dict[str, Any]]


class RhoGroups:
    """The param groups as a rho controller sees them: read the lr, read and write the radius.

    A live view of the base optimizer's param groups (groups added with
    ``add_param_group`` and groups replaced by ``load_state_dict`` included),
    with SAM's radius under :attr:`rho_key` (``"rho"``, or ``"sam_rho"`` when
    the base optimizer uses ``"rho"`` itself, as Adadelta does). SAM gives it
    to a controller's ``bind`` and carries it in every :class:`StepView`
    (``view.groups``); the controller never holds the SAM object.

    Attributes:
        rho_key: the group key under which SAM keeps the radius.
    """

    __slots__ = ("_optimizer", "rho_key")

    def __init__(self, optimizer: torch.optim.Optimizer, rho_key: str) -> None:
        self._optimizer = optimizer
        self.rho_key = rho_key

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The base optimizer's param groups (read ``"lr"``; write only :attr:`rho_key`)."""
        return self._optimizer.param_groups

    def __repr__(self) -> str:
        return f"RhoGroups({len(self.param_groups)} groups, rho_key={self.rho_key!r})"


class _Renamed(Mapping[str, Any]):
    """A param group read through SAM's plain names (``"rho"`` -> ``"sam_rho"``, ...); live."""

    __slots__ = ("_group", "_names")

    def __init__(self, group: dict[str, Any], names: dict[str, str]) -> None:
        self._group = group
        self._names = names

    def __getitem__(self, key: str) -> Any:
        return self._group[self._names.get(key, key)]

    def __iter__(self) -> Iterator[str]:
        return iter([*(k for k in self._group if k not in self._names), *self._names])

    def __len__(self) -> int:
        return sum(1 for _ in self)


def sam_settings(group: dict[str, Any], names: dict[str, str]) -> Mapping[str, Any]:
    """``group`` as the ascent and the perturbations read it: SAM's settings under their plain
    names (``names`` maps each to its key in the group). The group itself when the names are
    the keys; otherwise a live read-only view (it reads what a rho controller wrote)."""
    if all(key == name for key, name in names.items()):
        return group
    return _Renamed(group, names)


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
        groups: the param groups' radius, for a rho controller to read and
            write (:class:`RhoGroups`); ``None`` in a view built by hand.
        skips_nonfinite: a non-finite gradient makes this step a skipped one
            (a GradScaler, or ``skip_nonfinite=True``); without either, SAM
            steps with whatever the gradient holds. ``True`` in a view built
            by hand.
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
        "groups",
        "skips_nonfinite",
        "_sq_norm",
        "_distributed",
    )

    def __init__(
        self,
        *,
        steps: int,
        ascents: int,
        gradients: Gathered,
        state: OptimizerState,
        foreach: bool,
        eps: float,
        local: bool,
        process_group: ProcessGroup | None,
        sharding: Sharding | None = None,
        groups: RhoGroups | None = None,
        skips_nonfinite: bool = True,
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
        self.groups = groups
        self.skips_nonfinite = skips_nonfinite
        self._sq_norm: Tensor | None = None
        self._distributed: bool | None = None

    @property
    def distributed(self) -> bool:
        """More than one replica in the process group (asked once per step)."""
        if self._distributed is None:
            self._distributed = _ddp.world_size(self.process_group) > 1
        return self._distributed

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
