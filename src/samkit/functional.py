"""Tensor-list kernels used by every SAM variant.

Each kernel takes lists of tensors (one entry per parameter) and has two
paths: a plain per-tensor loop that reads like the maths (the reference), and
a ``torch._foreach_*`` path that removes the per-tensor Python overhead. Both
paths issue the same element-wise operations in the same order, so they give
bit-identical results (tested in ``tests/test_functional.py``).

Callers group tensors by device and dtype first (:func:`group_by_device`), as
foreach kernels need homogeneous lists.

:func:`sam_ascent` is the whole ascent of one param group written as the
papers write it, one tensor at a time: the reference the kernels below are
tested against. SAM itself runs the ascent as three kernels over
:class:`AscentGroup` lists:
:func:`measure_` (the global norm of the perturbation's ``u``),
:func:`perturb_` (back up ``w`` and move to ``w + e``) and :func:`restore_`
(copy ``w`` back, bit for bit).

None of these kernels reads a value back to the host, except
:func:`scale_for`, which does so only for CPU tensors, where reading a 0-d
tensor is a plain memory load, not a device synchronisation.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = [
    "group_by_device",
    "sq_norm",
    "global_norm",
    "copy_",
    "add_scaled_",
    "mul_",
    "neg_",
    "add_",
    "abs_plus_",
    "scale_for",
    "buffers_like",
    "AscentGroup",
    "prepare_ascent",
    "measure_",
    "perturb_",
    "restore_",
    "forget_autocast_copies",
    "sam_ascent",
]

TensorList = list[Tensor]


def group_by_device(
    *lists: Sequence[Tensor],
) -> dict[tuple[torch.device, torch.dtype], list[TensorList]]:
    """Split parallel tensor lists into groups of one device and dtype.

    The key is taken from the first list. Order within a group is preserved.
    """
    out: dict[tuple[torch.device, torch.dtype], list[TensorList]] = {}
    first = lists[0]
    if not first:
        return out
    # Fast path: the common case of one device and one dtype costs one scan.
    device, dtype = first[0].device, first[0].dtype
    if all(t.device == device and t.dtype == dtype for t in first):
        return {(device, dtype): [list(tensors) for tensors in lists]}
    for i, t in enumerate(first):
        bucket = out.get((t.device, t.dtype))
        if bucket is None:
            bucket = out[(t.device, t.dtype)] = [[] for _ in lists]
        for j, tensors in enumerate(lists):
            bucket[j].append(tensors[i])
    return out


def sq_norm(tensors: TensorList, *, foreach: bool) -> Tensor:
    """Sum of squares of all entries of ``tensors`` (a 0-d tensor).

    Computed as the squared L2 norm of the per-tensor L2 norms, accumulated in
    float32 (half / bfloat16 / float32 inputs) or float64 (if any input is
    float64: norm kernels refuse to narrow it).
    """
    dtypes = {t.dtype for t in tensors}
    if any(d.is_complex for d in dtypes):
        # |z|^2 summed is the squared norm of the (re, im) view, which the real
        # accumulation dtypes below accept (norm kernels refuse a real dtype= for complex)
        tensors = [torch.view_as_real(t) if t.is_complex() else t for t in tensors]
        dtypes = {t.dtype for t in tensors}
    acc = torch.float64 if torch.float64 in dtypes else torch.float32
    # Asking for an output dtype makes the norm kernels markedly slower on many
    # small tensors; when the inputs already are the accumulation dtype the
    # result is the same bits without it.
    kw = {} if dtypes == {acc} else {"dtype": acc}
    norms: tuple[Tensor, ...] | list[Tensor]
    if foreach:
        norms = torch._foreach_norm(tensors, 2, **kw)
    else:
        norms = [torch.linalg.vector_norm(t, 2, **kw) for t in tensors]
    return torch.stack(norms).square().sum()


def global_norm(
    sq_norms: Sequence[Tensor], *, reduce: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """L2 norm from squared-norm pieces that may live on different devices.

    ``reduce`` sums the total squared norm over other processes before the
    square root (the shards of FSDP2 parameters); ``None`` for local tensors.
    """
    if not sq_norms:
        raise ValueError("global_norm needs at least one squared norm")
    device = sq_norms[0].device
    total = sq_norms[0]
    for piece in sq_norms[1:]:
        total = total + piece.to(device)
    if reduce is not None:
        total = reduce(total)
    return total.sqrt()


def copy_(dst: TensorList, src: TensorList, *, foreach: bool) -> None:
    """``dst[i].copy_(src[i])``: exact, bit for bit."""
    if foreach:
        torch._foreach_copy_(dst, src)
    else:
        for target, source in zip(dst, src):
            target.copy_(source)


def mul_(tensors: TensorList, factor: float | Tensor | TensorList, *, foreach: bool) -> None:
    """``t *= factor`` with a number, a 0-d tensor or one tensor per entry."""
    if foreach:
        torch._foreach_mul_(tensors, factor)
    elif isinstance(factor, list):
        for t, f in zip(tensors, factor):
            t.mul_(f)
    else:
        for t in tensors:
            t.mul_(factor)


def neg_(tensors: TensorList, *, foreach: bool) -> None:
    """``t = -t`` (exact; much cheaper than ``mul_(tensors, -1.0)`` on the foreach path)."""
    if foreach:
        torch._foreach_neg_(tensors)
    else:
        for t in tensors:
            t.neg_()


def add_(
    tensors: TensorList,
    others: TensorList | tuple[Tensor, ...],
    alpha: float = 1.0,
    *,
    foreach: bool,
) -> None:
    """``t += alpha * other``."""
    if foreach:
        torch._foreach_add_(tensors, others, alpha=alpha)
    else:
        for t, other in zip(tensors, others):
            t.add_(other, alpha=alpha)


def abs_plus_(out: TensorList, src: TensorList, eta: float, *, foreach: bool) -> None:
    """``out = |src| + eta`` (ASAM's element-wise scale T_w)."""
    if out and out[0].is_complex():
        # |w| is the modulus; in-place abs cannot turn a complex tensor real.
        # One path for both settings keeps them bit-identical (lists share a dtype).
        for target, source in zip(out, src):
            target.copy_(source.abs()).add_(eta)
        return
    copy_(out, src, foreach=foreach)
    if foreach:
        torch._foreach_abs_(out)
        torch._foreach_add_(out, eta)
    else:
        for target in out:
            target.abs_().add_(eta)


def scale_for(rho: float, norm: Tensor, eps: float) -> float | Tensor:
    """``rho / (norm + eps)``, as a Python float on CPU and a 0-d tensor elsewhere.

    On CPU the float lets :func:`add_scaled_` fuse the scaling into one pass
    over parameter memory at no synchronisation cost; on an accelerator the
    tensor keeps the step free of host syncs.
    """
    rounding = _FLOAT_ROUNDING.get(norm.dtype) if norm.device.type == "cpu" else None
    if rounding is not None and isinstance(rho, (int, float)):
        # The same float the tensor arithmetic gives, computed on the host: torch
        # evaluates ``rho / t`` as ``t.reciprocal() * rho`` in the tensor's dtype,
        # and each float32 operation equals the float64 one rounded to float32
        # (53 >= 2 * 24 + 2 bits), so three roundings reproduce it bit for bit
        # (tests/test_functional.py) without three tiny tensor operations a step.
        denominator = rounding(norm.item() + rounding(eps))
        if denominator != 0.0:  # (an eps below float32's range; the tensor path gives inf)
            return rounding(rounding(1.0 / denominator) * rounding(rho))
    scale = rho / (norm + eps)
    if scale.device.type == "cpu":
        return float(scale)
    return scale


_FLOAT32 = struct.Struct("f")


def _round_float32(x: float) -> float:
    """``x`` rounded to the nearest float32 (to +-inf beyond its range), as a Python float."""
    try:
        rounded: float = _FLOAT32.unpack(_FLOAT32.pack(x))[0]
        return rounded
    except OverflowError:
        return math.copysign(math.inf, x)


_FLOAT_ROUNDING: dict[torch.dtype, Callable[[float], float]] = {
    torch.float32: _round_float32,
    torch.float64: float,
}


def add_scaled_(
    params: TensorList, dirs: TensorList, scale: float | Tensor, *, foreach: bool
) -> None:
    """``p += scale * d``.

    With a float ``scale`` this is one fused pass (``add_`` with ``alpha``).
    With a tensor ``scale`` the directions are scaled in place first (they are
    scratch by then) and then added, which needs no host sync.
    """
    if isinstance(scale, Tensor):
        mul_(dirs, scale, foreach=foreach)
        add_(params, dirs, foreach=foreach)
    else:
        add_(params, dirs, alpha=scale, foreach=foreach)


def buffers_like(
    cache: dict[Tensor, Tensor], keys: Sequence[Tensor], likes: Sequence[Tensor] | None = None
) -> TensorList:
    """One buffer per key, shaped like ``likes`` (default: the keys), from ``cache``.

    Allocated on first use and kept, so a step allocates nothing; reallocated
    only if the tensor it mirrors changed dtype, device or shape
    (``model.half()``, ``.to(device)``), so copies into it stay exact.
    """
    out = []
    for key, like in zip(keys, likes if likes is not None else keys):
        buffer = cache.get(key)
        if (
            buffer is None
            or buffer.dtype is not like.dtype
            or buffer.shape != like.shape
            or buffer.get_device() != like.get_device()  # an int: cheaper than comparing devices
        ):
            buffer = cache[key] = torch.empty_like(like, memory_format=torch.preserve_format)
        out.append(buffer)
    return out


# ------------------------------------------------------------------ the ascent


class Perturbation(Protocol):
    """What the ascent kernels need of a perturbation (see ``samkit.optim.perturbation``)."""

    def measure_(
        self,
        params: TensorList,
        grads: TensorList,
        scratch: TensorList,
        group: Mapping[str, Any],
        *,
        foreach: bool,
    ) -> Tensor: ...

    def direction_(
        self,
        params: TensorList,
        grads: TensorList,
        scratch: TensorList,
        group: Mapping[str, Any],
        *,
        foreach: bool,
    ) -> None: ...


@dataclass
class AscentGroup:
    """One param group's share of an ascent: its settings and its tensors,
    bucketed by device and dtype as ``(params, directions, backups)``.

    ``directions`` start as the gradients (or their copies) and are turned in
    place into ``u``, then ``d``, then ``e``; ``backups`` are the buffers that
    receive ``w``.
    """

    group: Mapping[str, Any]
    buckets: list[tuple[TensorList, TensorList, TensorList]]


def prepare_ascent(
    active: Sequence[tuple[Mapping[str, Any], TensorList, TensorList]],
    backups_for: Callable[[TensorList], TensorList],
    *,
    in_place: bool,
    foreach: bool,
    gradients: bool = True,
) -> list[AscentGroup]:
    """Bucket each ``(group, params, grads)`` for the ascent.

    With ``in_place`` the gradients themselves become the direction buffers
    (they are scratch after the first pass); otherwise they are copied first.
    A group's ``ascent_weight_decay`` adds ``wd * w`` to its directions; to the gradients
    of an objective the group maximises (``maximize``) it adds ``-wd * w``, and
    :func:`perturb_` then moves along ``-(g - wd * w)``: the gradient of the loss
    minimised, ``-f`` plus the decay (``gradients`` False: the directions are a base
    optimizer's own vectors, already signed).
    """
    out = []
    for group, params, grads in active:
        directions = grads if in_place else [g.clone() for g in grads]
        decay = group["ascent_weight_decay"]
        if decay and gradients and group.get("maximize", False):
            decay = -decay
        if decay:
            for (_, _), (bucket_params, bucket_dirs) in group_by_device(params, directions).items():
                add_(bucket_dirs, bucket_params, alpha=decay, foreach=foreach)
        buckets = group_by_device(params, directions, backups_for(params)).values()
        out.append(AscentGroup(group, [(p, d, b) for p, d, b in buckets]))
    return out


def measure_(
    groups: Sequence[AscentGroup],
    perturbation: Perturbation,
    *,
    foreach: bool,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Turn each direction into the perturbation's ``u``; return ``||u||`` over all groups.

    ``reduce``: as in :func:`global_norm` (sharded parameters).
    """
    squares = [
        perturbation.measure_(params, directions, backups, ag.group, foreach=foreach)
        for ag in groups
        for params, directions, backups in ag.buckets
    ]
    return global_norm(squares, reduce=reduce)


def perturb_(
    groups: Sequence[AscentGroup],
    norm: Tensor,
    perturbation: Perturbation,
    *,
    rho_factor: float,
    eps: float,
    foreach: bool,
) -> list[tuple[TensorList, TensorList]]:
    r"""Back up ``w`` and move to ``w + e``, :math:`e = \rho\, d / (\lVert u \rVert + \epsilon)`.

    Returns the ``(params, backups)`` pairs that :func:`restore_` takes.
    """
    perturbed = []
    for ag in groups:
        rho = ag.group["rho"] * rho_factor
        if getattr(perturbation, "needs_gradient", True) and ag.group.get("maximize", False):
            # A base optimizer that maximises (torch's maximize=True) holds the gradient of the
            # objective it climbs: the worst case in the ball lies down that gradient, as for the
            # negated objective minimised (a momentum perturbation's vector is already signed)
            rho = -rho
        scale = scale_for(rho, norm, eps)
        for params, directions, backups in ag.buckets:
            perturbation.direction_(params, directions, backups, ag.group, foreach=foreach)
            copy_(backups, params, foreach=foreach)  # w, exactly
            # a 0-d tensor on another accelerator cannot scale this bucket (CPU-offloaded params)
            local_scale = scale.to(params[0].device) if isinstance(scale, Tensor) else scale
            add_scaled_(params, directions, local_scale, foreach=foreach)  # w + e
            perturbed.append((params, backups))
    forget_autocast_copies()
    return perturbed


def forget_autocast_copies() -> None:
    """Drop autocast's cached low-precision copies of the weights, which it keeps until the
    outermost autocast block exits: a step taken inside one (``with torch.autocast(...):
    opt.step(closure)``) would otherwise run its pass at ``w + e`` on the copies of ``w``, a
    gradient at ``w`` again (SAM at any rho was the base optimizer, bit for bit)."""
    torch.clear_autocast_cache()


def restore_(perturbed: Sequence[tuple[TensorList, TensorList]], *, foreach: bool) -> None:
    """Copy each backup back into its parameters: ``w`` bit for bit."""
    for params, backups in perturbed:
        copy_(params, backups, foreach=foreach)
    forget_autocast_copies()  # (the copies of w + e)


# ----------------------------------------------------- the ascent, as in the paper


def sam_ascent(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    *,
    rho: float,
    eps: float = 1e-12,
    adaptive: bool = False,
    eta: float = 0.01,
    weight_decay: float = 0.0,
) -> TensorList:
    r"""The weights at the top of the ascent, ``w + e``, for one param group (a reference).

    SAM (Foret et al., arXiv 2010.01412) and ASAM (Kwon et al., arXiv 2102.11600):

    .. math::

        g \leftarrow g + \lambda w, \qquad T_w = |w| + \eta \ \text{(ASAM; SAM: } T_w = 1)

        u = T_w\, g, \qquad d = T_w^2\, g, \qquad
        e = \rho \, \frac{d}{\lVert u \rVert_2 + \epsilon}, \qquad w \leftarrow w + e

    with :math:`\lVert u \rVert_2` taken over the whole group. One tensor at a
    time, nothing in place (the inputs are not modified), real float tensors on
    one device. :class:`~samkit.SAM` computes the same with :func:`prepare_ascent`,
    :func:`measure_` and :func:`perturb_`, in place, foreach, over several groups
    sharing one norm; ``tests/test_functional.py`` checks the two agree (bit for
    bit where they round alike; on CPU the kernels fuse ``w + s d`` and
    ``g + \lambda w`` into one rounding each, so there to one rounding).
    """
    g = [g_i + weight_decay * w_i for w_i, g_i in zip(params, grads)] if weight_decay else grads
    if adaptive:
        t = [w_i.abs() + eta for w_i in params]  # T_w = |w| + eta
        u = [t_i * g_i for t_i, g_i in zip(t, g)]  # u = T_w g
        d = [t_i * u_i for t_i, u_i in zip(t, u)]  # d = T_w^2 g
    else:
        u = d = list(g)
    norm = torch.stack([torch.linalg.vector_norm(u_i) for u_i in u]).square().sum().sqrt()
    e = [rho / (norm + eps) * d_i for d_i in d]  # e = rho d / (||u|| + eps)
    return [w_i + e_i for w_i, e_i in zip(params, e)]
