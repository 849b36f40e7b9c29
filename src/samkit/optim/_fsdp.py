r"""Everything SAM needs to know about FSDP2 (``torch.distributed.fsdp.fully_shard``), in one place.

Under FSDP2 every parameter is a ``DTensor``: each rank holds one shard of it
(a slice along dim 0), and after the backward its gradient is the matching
shard of the full gradient, already averaged over the data-parallel ranks
(reduce-scatter). That leaves SAM three duties, all here:

* **the norm of the whole gradient.** The ascent is
  :math:`e = \rho\, d / \lVert u \rVert` with :math:`\lVert u \rVert^2 =
  \sum_\text{shards} \lVert u_\text{shard} \rVert^2`: the squared norms of
  the local shards are summed over the mesh dimensions on which the
  parameters are *sharded* (one all-reduce each). With hybrid sharding
  (HSDP, a ``(replicate, shard)`` mesh) that is the shard dimension only:
  the replicas hold the same shard, and summing over them too would count
  every entry once per replica (:class:`Sharding`);
* **element-wise kernels on the local shards.** torch has no DTensor rule for
  ``_foreach_copy_`` (the backup and the restore), and the local tensors skip
  DTensor's dispatch: the ascent, the backup and the exact restore run on
  each parameter's local shard (``DTensor._local_tensor``, the storage FSDP2
  itself updates; listed in :data:`DTENSOR_ATTRIBUTES` and pinned by a test);
* **refusing what would be per shard.** A mix (GSAM, LookSAM) takes inner
  products and keeps gradients, a random mask (ESAM's SWP) would be drawn per
  shard, a mask of parameters (:class:`~samkit.optim.perturbation.Masked`)
  names tensors FSDP2 replaced, and a GradScaler's overflow flag would be per
  shard: each is refused with a ``ValueError`` at the first step, before any
  weight moves (:func:`check_supported`). FSDP1 (``FullyShardedDataParallel``)
  shards flat parameters that look like whole tensors: refused when SAM is
  built (:func:`refuse_fsdp1`).

The ascent under FSDP2 is always the global one (``ddp_ascent`` has no
effect): the backward reduce-scatters the first-pass gradient before SAM sees
it. Everything that does not involve a DTensor goes through untouched, so
plain and DDP training take exactly the path they took before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor, nn

from .. import functional

if TYPE_CHECKING:  # pragma: no cover
    from torch.distributed import ProcessGroup
    from torch.distributed.tensor import DTensor

    from .mix import Mix
    from .perturbation import Perturbation
    from .view import Gathered

__all__ = [
    "DTENSOR_ATTRIBUTES",
    "FSDP1_ATTRIBUTES",
    "Sharding",
    "localize",
    "check_supported",
    "refuse_fsdp1",
    "holds_dtensors",
    "full",
    "grad_norm",
]

#: The DTensor attributes (public and private) this module reads.
DTENSOR_ATTRIBUTES = ("_local_tensor", "device_mesh", "placements")

#: The markers FSDP1 (``FullyShardedDataParallel``) sets on its flat parameter and,
#: with ``use_orig_params=True``, on the original parameters it turned into shard views.
FSDP1_ATTRIBUTES = ("_is_flat_param", "_fsdp_flattened")

_PLAIN = (Tensor, nn.Parameter)


def _dtensor_type() -> type[DTensor] | None:
    if not torch.distributed.is_available():  # pragma: no cover - builds without distributed
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def _reduce_groups(p: DTensor, name: str) -> tuple[ProcessGroup, ...]:
    """The process groups over which ``p``'s squared norm is summed: its sharded mesh dims."""
    groups = []
    for dim, placement in enumerate(p.placements):
        if placement.is_shard():
            groups.append(p.device_mesh.get_group(dim))
        elif not placement.is_replicate():
            raise ValueError(
                f"Invalid parameter: {name} has placement {placement} on mesh dim {dim}; SAM under FSDP2 "
                "supports Shard and Replicate placements (fully_shard's, with or without HSDP)"
            )
    return tuple(groups)


class _BackupsFor(Protocol):
    """``SAM._backups_for``: one weight buffer per parameter, keyed by ``keys`` if given."""

    def __call__(self, params: list[Tensor], keys: list[Tensor] | None = None) -> list[Tensor]: ...


class Sharding:
    """The local shards of one step's DTensor parameters and how to sum over them.

    Attributes:
        groups: the process groups whose all-reduce (sum) turns a local
            squared norm into the squared norm of the whole tensor list.
        owners: ``id(local shard) -> DTensor parameter``, to key the weight
            backups by the parameter (a local view may be replaced by FSDP2).
    """

    __slots__ = ("groups", "owners")

    def __init__(self, groups: tuple[ProcessGroup, ...], owners: dict[int, Tensor]) -> None:
        self.groups = groups
        self.owners = owners

    def reduce_(self, sq_norm: Tensor) -> Tensor:
        """The sum over the shards of a local squared norm (a 0-d tensor), or of any local
        partial sums (dot products over each rank's coordinates)."""
        total = sq_norm.reshape(-1).clone()
        for group in self.groups:
            torch.distributed.all_reduce(total, group=group)
        return total.reshape(sq_norm.shape)

    def backups_for(self, backups_for: _BackupsFor) -> Callable[[list[Tensor]], list[Tensor]]:
        """``backups_for(local shards)``, with the backups keyed by their DTensor parameters."""
        return lambda local: backups_for(local, keys=[self.owners[id(t)] for t in local])


def localize(gathered: Gathered) -> tuple[Gathered, Sharding | None]:
    """``gathered`` with every DTensor replaced by its local shard, and their :class:`Sharding`.

    Without DTensors (plain or DDP training) it returns ``gathered`` itself and
    ``None`` after one type check per parameter.
    """
    if all(type(p) in _PLAIN for _, params, _ in gathered for p in params):
        return gathered, None
    dtensor = _dtensor_type()
    if dtensor is None or not any(isinstance(p, dtensor) for _, ps, _ in gathered for p in ps):
        return gathered, None  # Parameter subclasses of other kinds
    out = []
    owners: dict[int, Tensor] = {}
    signature: tuple[ProcessGroup, ...] | None = None
    for group, params, grads in gathered:
        local_params, local_grads = [], []
        for i, (p, g) in enumerate(zip(params, grads)):
            name = f"parameter {i} of a param group ({tuple(p.shape)})"
            if not isinstance(p, dtensor):
                raise ValueError(
                    f"Invalid parameter: {name} is a plain tensor beside FSDP2's sharded ones; its gradient "
                    "is not synchronised across ranks. Apply fully_shard to the root module too."
                )
            groups = _reduce_groups(p, name)
            if signature is None:
                signature = groups
            elif groups != signature:
                raise ValueError(
                    f"Invalid parameter: {name} is sharded over other mesh dimensions than the first "
                    "parameter; SAM under FSDP2 needs every parameter sharded over the same ones"
                )
            local = p._local_tensor
            owners[id(local)] = p
            local_params.append(local)
            local_grads.append(g._local_tensor if isinstance(g, dtensor) else g)
        out.append((group, local_params, local_grads))
    return out, Sharding(signature or (), owners)


def check_supported(
    mix: Mix | None,
    perturbation: Perturbation,
    scaler: torch.amp.GradScaler | None,
    name: str,
) -> None:
    """Refuse, before any weight moves, what SAM (the class ``name``) cannot do right on shards."""
    from .perturbation import Masked, RandomSubset

    if mix is not None:
        raise ValueError(
            f"Invalid mix value: {mix!r} is not supported under FSDP2: it takes inner products "
            "of and keeps per-parameter gradients, which are sharded here. Use SAM or ASAM (with any "
            f"policy or rho controller) under FSDP2; {name} with a mix runs under DDP."
        )
    if scaler is not None and scaler.is_enabled():
        raise ValueError(
            "Invalid scaler value: a GradScaler is not supported with SAM under FSDP2 (its overflow flag "
            "would be per shard); use bfloat16 (FSDP2's MixedPrecisionPolicy or autocast), which needs no scaler"
        )
    inner = getattr(perturbation, "inner", None)
    if isinstance(perturbation, Masked) or isinstance(inner, Masked):
        raise ValueError(
            f"Invalid perturbation value: {perturbation!r} selects tensors by identity, and FSDP2 replaces "
            "each parameter by a sharded one; not supported under FSDP2"
        )
    if isinstance(perturbation, RandomSubset) and perturbation.beta < 1.0:
        raise ValueError(
            f"Invalid perturbation value: {perturbation!r} (ESAM's stochastic weight perturbation) would "
            "draw its mask per shard under FSDP2; not supported (beta=1 turns it off)"
        )


def holds_dtensors(params: Sequence[Tensor]) -> bool:
    """Whether any of ``params`` is a DTensor (FSDP2 shards them when fully_shard is applied,
    before an optimizer is built over them); when none is, :func:`localize` is skipped."""
    if all(type(p) in _PLAIN for p in params):
        return False
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(p, dtensor) for p in params)


def refuse_fsdp1(params: Sequence[Tensor]) -> None:
    """Refuse FSDP1's parameters when SAM is built (they look like plain tensors).

    FSDP1 shards a flat parameter with no DTensor to tell it by; SAM would take
    the norm of the local shard only, a silently wrong ascent.
    """
    for p in params:
        if any(getattr(p, name, False) for name in FSDP1_ATTRIBUTES):
            raise ValueError(
                "Invalid params value: parameters of FullyShardedDataParallel (FSDP1) are local shards "
                "SAM cannot tell from whole tensors, so the ascent norm would be the shard's; use FSDP2's "
                "torch.distributed.fsdp.fully_shard (see docs/fsdp.md)"
            )


def grad_norm(gathered: Gathered, foreach: bool) -> Tensor:
    """The global L2 norm of the gradients in ``gathered`` (summed over the shards under FSDP2)."""
    local, sharding = localize(gathered)
    squares = [
        functional.sq_norm(bucket, foreach=foreach)
        for _, _, grads in local
        for (_, _), (bucket,) in functional.group_by_device(grads).items()
    ]
    return functional.global_norm(squares, reduce=None if sharding is None else sharding.reduce_)


def full(total: Tensor) -> Tensor:
    """A norm returned by ``clip_grad_norm_`` as a plain tensor (DTensor norms are gathered)."""
    dtensor = _dtensor_type() if type(total) not in _PLAIN else None
    if dtensor is not None and isinstance(total, dtensor):
        return total.full_tensor()
    return total
