r"""A slice of each batch held back from training, for ``rho="auto"`` to learn from.

A loop that evaluates nothing can still give the radius a held-out signal:
the closure hands SAM one loss per sample and each sample's id (its index in
the dataset), and SAM keeps a fixed ``fraction`` of the *samples*, chosen by
id, out of training for good::

    def closure():
        losses = F.cross_entropy(model(x), y, reduction="none")
        loss = opt.hold_back(losses, ids)   # the mean loss of the samples trained on
        loss.backward()
        return loss

The held-back samples still ride in the batch (their forward costs what it
did), but their losses are left out of the mean that is back-propagated; their
losses at ``w`` (the first pass of each step) are summed, and once an id comes
round again (an epoch has passed) their mean is reported to the controller as
a validation loss, as ``opt.observe_validation`` would. A sample is held back
when the top ten bits of its id's multiplicative hash (Knuth's, 2^32 / the
golden ratio) fall below ``fraction`` x 1024: the same samples in every epoch,
on every rank and in every process, whatever the batch order.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .._checks import check_pos

Tensor = torch.Tensor

#: floor(2^32 / golden ratio): Knuth's multiplicative hash.
_KNUTH = 2654435761


def held_back(ids: Tensor, fraction: float) -> Tensor:
    """Which of ``ids`` (a 1-D int64 tensor) a hold-back of ``fraction`` keeps out of training:
    those whose hash's top ten bits fall below ``round(fraction * 1024)``, i.e. whose hash is
    below that times 2^22. The hash is of an id's low 31 bits (their product with the constant
    stays within int64), so any int64 id works, and ids equal modulo 2^31 share their fate."""
    return (((ids & 0x7FFFFFFF) * _KNUTH) & 0xFFFFFFFF) < (round(fraction * 1024) << 22)


def _check_fraction(fraction: Any) -> float:
    value = check_pos("fraction", fraction)
    if not 1 / 1024 <= value <= 0.5:
        raise ValueError(
            f"Invalid fraction value: {fraction!r} (the share of samples held back: "
            "between 1/1024 and 0.5)"
        )
    return value


def _check_inputs(losses: Any, ids: Any) -> Tensor:
    """``ids`` as an int64 CPU tensor, checked, and ``losses`` checked against them."""
    if not isinstance(losses, Tensor) or losses.dim() != 1 or not losses.is_floating_point():
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(
            f"Invalid losses value: {shape} (one loss per sample: a 1-D float tensor, e.g. "
            "F.cross_entropy(out, y, reduction='none'))"
        )
    if isinstance(ids, Tensor):
        if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(
                f"Invalid ids value: a {ids.dtype} tensor of shape {tuple(ids.shape)} (each "
                "sample's index in its dataset: a 1-D integer tensor)"
            )
        values = ids.detach().to("cpu", torch.int64)
    else:
        try:
            items = list(ids)
        except TypeError:
            items = None
        if items is None or not all(type(i) is int for i in items):
            raise ValueError(
                f"Invalid ids value: {ids!r:.200} (each sample's index in its dataset: a 1-D "
                "integer tensor or a sequence of ints)"
            )
        if items and not -(1 << 63) <= min(items) <= max(items) < 1 << 63:
            raise ValueError(f"Invalid ids value: {ids!r:.200} (an id beyond int64's range)")
        values = torch.tensor(items, dtype=torch.int64)
    if values.numel() != losses.numel():
        raise ValueError(
            f"Invalid ids value: {values.numel()} ids for {losses.numel()} losses (one id per "
            "sample)"
        )
    return values


class HeldBack:
    """The held-back samples' losses of the current round (epoch), and the ids seen in it."""

    def __init__(self) -> None:
        self.fraction: float | None = None
        self.total: Tensor | float = 0.0  # the sum of held-back losses at w, in float64
        self.count = 0
        self.round: set[int] = set()
        # the last ids tensor's split (the two passes of a step hand the same one)
        self._split: tuple[Any, ...] | None = None

    def _positions(self, losses: Tensor, ids: Any, fraction: float) -> tuple[Any, ...]:
        """(the kept samples' weights, the held-back ones', their ids) on ``losses``'s device
        and dtype; the same ids tensor, unchanged since, is split once (the pass at w + e
        reuses the first's)."""
        if not isinstance(losses, Tensor):
            _check_inputs(losses, ids)  # (raises)
        key = (fraction, losses.device, losses.dtype, losses.shape)
        split = self._split
        if split is not None and split[0] is ids and split[1] == ids._version and split[2] == key:
            return split[3:]
        values = _check_inputs(losses, ids)
        mask = held_back(values, fraction)
        held_ids = values[mask].tolist()
        kept = values.numel() - len(held_ids)
        # 1 / kept for a sample trained on, 0 for one held back (and 0 / 1 for the report)
        weights = torch.where(mask, 0.0, 1.0 / max(kept, 1)).to(losses.dtype)
        held = mask.to(losses.dtype)
        if losses.device.type != "cpu":
            weights, held = weights.to(losses.device), held.to(losses.device)
        parts = (weights, held, held_ids)
        if isinstance(ids, Tensor):
            self._split = (ids, ids._version, key, *parts)
        return parts

    def take(
        self, losses: Tensor, ids: Any, fraction: Any, *, at_w: bool
    ) -> tuple[Tensor, float | None]:
        """The mean loss of the samples kept for training, and the held-back samples' mean
        loss over the round that this call closes (None while it is open)."""
        if self.fraction is None or fraction != self.fraction:  # (the same: checked already)
            fraction = _check_fraction(fraction)
            if self.fraction is not None:
                raise ValueError(
                    f"Invalid fraction value: {fraction!r}, where this run holds back "
                    f"{self.fraction!r} (a sample held back so far would be trained on)"
                )
        weights, held, held_ids = self._positions(losses, ids, fraction)
        self.fraction = fraction
        report = None
        if at_w and held_ids:
            if not self.round.isdisjoint(held_ids):  # an id comes round again: a round is over
                report = float(self.total) / self.count
                self.total, self.count, self.round = 0.0, 0, set()
            self.round.update(held_ids)
            # (summed in the losses' dtype, accumulated over the epoch in float64)
            self.total = self.total + torch.dot(losses.detach(), held).double()
            self.count += len(held_ids)
        # the kept samples' mean as one dot product (the held-back weigh 0: their gradient
        # is 0, and a batch held back whole trains on nothing)
        return torch.dot(losses, weights), report

    # ---- state: plain numbers
    def state_dict(self) -> dict[str, Any]:
        return {
            "fraction": self.fraction,
            "total": float(self.total),
            "count": self.count,
            "round": sorted(self.round),
        }

    def load_state_dict(self, state: Any) -> None:
        ok = (
            isinstance(state, dict)
            and set(state) == {"fraction", "total", "count", "round"}
            and (state["fraction"] is None or _fraction_ok(state["fraction"]))
            and isinstance(state["total"], float)
            and not math.isnan(state["total"])
            and isinstance(state["count"], int)
            and not isinstance(state["count"], bool)
            and state["count"] >= 0
            and isinstance(state["round"], list)
            and all(type(i) is int and -(1 << 63) <= i < 1 << 63 for i in state["round"])
        )
        if not ok:
            raise ValueError(f"Invalid state value: the held-back samples' state {state!r:.200}")
        self.fraction, self.total, self.count = state["fraction"], state["total"], state["count"]
        self.round = set(state["round"])


def _fraction_ok(value: Any) -> bool:
    try:
        _check_fraction(value)
    except ValueError:
        return False
    return True
