"""Everything SAM needs to know about ``DistributedDataParallel``, in one place.

With ``ddp_ascent="local"`` the first forward/backward runs under
``no_sync``: each replica ascends along its own gradient (m-sharpness, as in
the original SAM) and the first pass costs no all-reduce. That leaves three
duties, all here:

* replicas must take the same branch (ascend or not, skip or not), or their
  collectives stop matching and DDP hangs: :func:`any_replica`;
* a step that does not ascend feeds the first-pass gradient to the base
  step, so it must be averaged as DDP would have: :func:`average_gradients`
  (also what GSAM and LookSAM use for the first-pass gradient they keep);
* DDP broadcasts rank 0's buffers (BatchNorm statistics) at the forward that
  follows a synchronised one; the local first pass was not, so the broadcast
  is requested explicitly: :func:`request_buffer_broadcast`.

Every collective runs on DDP's own process group (``model.process_group``),
never on the default group, so SAM on a subgroup averages over that subgroup.
The private DDP attributes read here are listed in :data:`DDP_ATTRIBUTES`; a
test pins them to the installed torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import warnings
import weakref
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .. import functional

if TYPE_CHECKING:  # pragma: no cover
    from torch.distributed import ProcessGroup

    from .policy import Policy
    from .view import StepView

__all__ = [
    "DDP_ATTRIBUTES",
    "is_distributed",
    "process_group",
    "world_size",
    "uses_local_ascent",
    "local_first_pass",
    "request_buffer_broadcast",
    "any_replica",
    "average_",
    "average_gradients",
    "average_scalar",
    "sum_scalars",
]

#: The DDP attributes (public and private) this module reads or writes.
DDP_ATTRIBUTES = (
    "no_sync",
    "process_group",
    "static_graph",
    "find_unused_parameters",
    "require_forward_param_sync",
    "_use_python_reducer",
    "_delay_all_reduce_all_params",
)


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def process_group(model: nn.Module | None) -> ProcessGroup | None:
    """DDP's process group (``None``: the default group, also without DDP)."""
    group: ProcessGroup | None = getattr(model, "process_group", None)
    return group


def world_size(group: ProcessGroup | None) -> int:
    return torch.distributed.get_world_size(group) if is_distributed() else 1


def uses_local_ascent(model: nn.Module | None, ddp_ascent: str) -> bool:
    """Whether the first pass should run under ``no_sync`` (local ascent)."""
    return ddp_ascent == "local" and hasattr(model, "no_sync") and is_distributed()


def check_static_graph(model: nn.Module | None, ddp_ascent: str) -> None:
    """Refuse local ascent on a static-graph DDP model before any step."""
    if (
        ddp_ascent == "local"
        and hasattr(model, "no_sync")
        and getattr(model, "static_graph", False)
    ):
        # torch's DDP crashes (or silently stops all-reducing) when a
        # static-graph model runs a pass under no_sync: pytorch#143580.
        raise ValueError(
            "Invalid ddp_ascent value: 'local' runs the first pass under no_sync, which DDP with "
            "static_graph=True does not support; use ddp_ascent='global' or static_graph=False"
        )


@contextlib.contextmanager
def local_first_pass(model: nn.Module) -> Iterator[None]:
    """``model.no_sync()``, warning when no DDP forward ran inside it.

    DDP decides at forward time whether the backward all-reduces, so a forward
    run outside the context makes the "local" pass a global one.
    """
    # (nn.Module's stub types an unknown attribute as Tensor | Module: not callable)
    with model.no_sync():  # type: ignore[operator]
        yield
    # DDP clears this flag after a forward run under no_sync; still set, no
    # forward ran inside and the backward was all-reduced anyway.
    if (
        getattr(model, "require_forward_param_sync", False)
        and not getattr(model, "_use_python_reducer", False)
        and not getattr(model, "_delay_all_reduce_all_params", False)
    ):
        warnings.warn(
            "SAM.first_pass(): no DDP forward ran inside it, so the first-pass gradients were "
            "all-reduced (global, not local, ascent); run the forward inside first_pass() too",
            RuntimeWarning,
            stacklevel=4,
        )


def warn_without_first_pass(opt: Any, had_first_pass: bool) -> None:
    """The explicit two-step form under DDP local ascent without ``first_pass()``: the first
    backward was all-reduced, so the step is a global ascent. Said once per optimizer (it
    went on silently)."""
    if had_first_pass or opt in _WARNED or not opt.perturbation.needs_gradient:
        return
    if uses_local_ascent(opt.model, opt.ddp_ascent):
        _WARNED.add(opt)
        warnings.warn(
            "SAM.first_step() without first_pass(): under DDP the first forward and backward "
            "were all-reduced, so this is a global ascent, not the local one ddp_ascent="
            "'local' asks for; run them inside `with opt.first_pass():` (or give "
            "ddp_ascent='global')",
            RuntimeWarning,
            stacklevel=5,
        )


_WARNED: weakref.WeakSet[Any] = weakref.WeakSet()  # optimizers told they skipped first_pass()
_AGREED: weakref.WeakSet[Any] = weakref.WeakSet()  # optimizers whose replicas were compared


def check_replicas_agree(opt: Any, view: StepView) -> None:
    """Once, at an optimizer's first step under DDP (``model=`` the DDP module) or FSDP2:
    refuse settings that differ across the replicas (one scalar all-reduce). A radius, a
    policy or a perturbation that differs on one rank went on silently: the replicas'
    collectives then paired up wrongly (DDP's buckets against SAM's flat buffer, of the
    same size) and their weights drifted apart, or a rank that declined hung the others."""
    if opt in _AGREED or not view.distributed:
        return
    if view.sharding is None and not hasattr(opt.model, "no_sync"):
        return  # (not DDP's or FSDP2's: a model trained on one rank only must not wait)
    _AGREED.add(opt)
    groups = [
        [len(g["params"]), *(g.get(opt.group_keys[k]) for k in sorted(opt.group_keys))]
        for g in opt.param_groups
    ]
    mine = repr(
        [type(opt).__name__, view.local, opt.perturbation, opt.policy, opt.mix,
         opt.rho_controller, groups]
    )  # fmt: skip
    mine = re.sub(r" at 0x[0-9a-fA-F]+", "", mine)  # (a user's class without a repr of its own)
    digest = int.from_bytes(hashlib.sha1(mine.encode()).digest()[:7], "big")  # < 2**56
    # on a parameter's device (Momentum-SAM's view holds no gradient; NCCL wants CUDA)
    device = next(p.device for g in opt.param_groups for p in g["params"])
    flags = torch.tensor([digest, -digest], dtype=torch.int64, device=device)
    # over the groups SAM itself reduces over: DDP's, or FSDP2's shard groups (not the
    # whole world: pipeline stages hold other models)
    reduce_over: Sequence[ProcessGroup | None] = (
        view.sharding.groups if view.sharding is not None else (view.process_group,)
    )
    for group in reduce_over:
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, group=group)
    if int(flags[0]) != -int(flags[1]):
        raise ValueError(
            f"Invalid settings: the replicas' {type(opt).__name__} settings differ (this rank: "
            f"{mine[:500]}); give every rank the same rho, policy (and seed), perturbation "
            "and param groups"
        )


def request_buffer_broadcast(model: nn.Module | None) -> None:
    """Ask DDP to broadcast rank 0's buffers at the next forward.

    Without it, replicas' BatchNorm statistics drift apart on steps that run
    no synchronised pass (a local first pass and no second pass).
    """
    if model is not None and hasattr(model, "require_forward_param_sync"):
        # (nn.Module's stub accepts only a Tensor or a Module in an attribute write)
        model.require_forward_param_sync = True  # type: ignore[assignment]


def agree_to_ascend(
    view: StepView, active: bool, policy: Policy | None, model: nn.Module | None
) -> bool:
    """Whether this step ascends: some group has a radius and the policy agrees (on every replica)."""
    if view.local:
        # DDP broadcasts rank 0's buffers at the forward after a synchronised
        # one; the local first pass was not, so ask for it explicitly.
        request_buffer_broadcast(model)
    ascend = active and (policy is None or policy.should_ascend(view))
    if view.local and active and policy is not None and not policy.replica_consistent:
        # A policy reading the local gradient may answer differently on each
        # replica: any replica asking for the ascent makes all ascend.
        device = view.gradients[0][1][0].device
        ascend = any_replica(torch.tensor(ascend, device=device), view.process_group, local=True)
    return ascend


def any_replica(flag: Tensor, group: ProcessGroup | None, *, local: bool) -> bool:
    """Host read of a 0-d bool flag; with ``local``, True if it is set on any replica."""
    if local:
        value = flag.float().reshape(1)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX, group=group)
        return bool(value.item() > 0)
    return bool(flag)


def average_(tensors: Sequence[Tensor], group: ProcessGroup | None, *, foreach: bool) -> None:
    """Average tensors in place across the replicas of ``group``.

    One flat buffer per device and dtype, so a few collectives rather than
    one per tensor; the same arithmetic as DDP's bucketed all-reduce.
    """
    if not tensors:
        return
    world = world_size(group)
    for (_, _), (bucket,) in functional.group_by_device(list(tensors)).items():
        # (torch._utils leaves these two helpers unannotated)
        flat: Tensor = torch._utils._flatten_dense_tensors(bucket)  # type: ignore[no-untyped-call]
        torch.distributed.all_reduce(flat, group=group)
        flat.div_(world)
        views: tuple[Tensor, ...] = torch._utils._unflatten_dense_tensors(flat, bucket)  # type: ignore[no-untyped-call]
        functional.copy_(bucket, list(views), foreach=foreach)


def average_gradients(params: Sequence[Tensor], model: nn.Module | None, *, foreach: bool) -> None:
    """Average the ``.grad`` of ``params`` across DDP's replicas, as DDP would have.

    With ``find_unused_parameters`` a parameter unused on this replica has no
    gradient here but may have one elsewhere: the replicas first agree on the
    set (zeros where missing), or a mismatch would hang the collective.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    group = process_group(model)
    if getattr(model, "find_unused_parameters", False):
        has = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
        torch.distributed.all_reduce(has, op=torch.distributed.ReduceOp.MAX, group=group)
        for p, present in zip(params, has.tolist()):
            if present and p.grad is None:
                p.grad = torch.zeros_like(p)
    average_([p.grad for p in params if p.grad is not None], group, foreach=foreach)


def average_scalar(value: Tensor, group: ProcessGroup | None) -> Tensor:
    """The mean of a 0-d tensor over ``group`` (itself when not distributed)."""
    if world_size(group) <= 1:
        return value
    total = value.reshape(1).clone()
    torch.distributed.all_reduce(total, group=group)
    return (total / world_size(group)).reshape(())


def sum_scalars(values: Sequence[float], group: ProcessGroup | None) -> list[float]:
    """Python floats summed over ``group`` in one collective (float64, on the CPU for gloo,
    on the current accelerator for NCCL); themselves when not distributed."""
    if world_size(group) <= 1:
        return [float(v) for v in values]
    backend = torch.distributed.get_backend(group)
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if backend == "nccl"
        else torch.device("cpu")
    )
    total = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total, group=group)
    return [float(v) for v in total.tolist()]
