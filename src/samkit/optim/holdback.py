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
import warnings
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
    if isinstance(ids, Tensor) and ids.dtype == torch.int64 and ids.device.type == "cpu":
        if ids.dim() == 1 and ids.numel() == losses.numel():  # (as a DataLoader gives them)
            return ids
    what = (
        "each sample's index in its dataset: a 1-D integer tensor or array, or a sequence of ints"
    )
    values: Any = ids
    if not isinstance(ids, Tensor):
        try:
            items = list(ids)
            if any(isinstance(i, bool) or type(i).__name__ == "bool_" for i in items):
                raise TypeError("bools")
            values = torch.as_tensor(ids if hasattr(ids, "__array__") else items)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            raise ValueError(f"Invalid ids value: {ids!r:.200} ({what})") from None
    if (
        values.dim() != 1
        or values.is_floating_point()
        or values.is_complex()
        or values.dtype == torch.bool
    ) and not (values.numel() == 0 and not isinstance(ids, Tensor)):
        raise ValueError(
            f"Invalid ids value: a {values.dtype} of shape {tuple(values.shape)} ({what})"
        )
    checked: Tensor = values.detach().to("cpu", torch.int64).reshape(-1)
    if checked.numel() != losses.numel():
        raise ValueError(
            f"Invalid ids value: {checked.numel()} ids for {losses.numel()} losses (one id per "
            "sample)"
        )
    return checked


class HeldBack:
    """The held-back samples' losses of the current round (an epoch), and the ids seen in it.

    A round ends when the loop's ``epoch`` changes, or, without one, when an id comes round
    again (a sampler that passes each sample once an epoch)."""

    def __init__(self) -> None:
        self.fraction: float | None = None
        self.total: Tensor | float = 0.0  # the sum of held-back losses at w, in float64
        self.count = 0
        self.round: set[int] = set()
        self.epoch: int | None = None  # the round's epoch, where the loop gives one
        # the last ids tensor's split (the two passes of a step hand the same one)
        self._split: tuple[Any, ...] | None = None
        # the optimizer step last recorded and the held-back ids recorded in it: a second
        # call with them in the same step (a loss logged twice) records nothing
        self._step: tuple[int, set[int]] = (-1, set())
        self._ever: set[int] = set()  # every held-back id seen (not saved: for the warning)
        self.closed = 0  # the held-back losses of the round closed last
        self._warned = False

    def _positions(self, losses: Tensor, ids: Any, fraction: float) -> tuple[Any, ...]:
        """(the kept samples' weights in their mean, the held-back ones' 1s, their ids) on
        ``losses``'s device and dtype; the same ids tensor, unchanged since, is split once (the
        pass at w + e reuses the first's)."""
        if not isinstance(losses, Tensor):
            _check_inputs(losses, ids)  # (raises)
        key = (fraction, losses.device, losses.dtype, losses.shape)
        split = self._split
        if split is not None and split[0] is ids and split[1] == ids._version and split[2] == key:
            return split[3:]
        values = _check_inputs(losses, ids)
        mask = held_back(values, fraction)
        held_ids = values[mask].tolist()
        # 1 / kept for a sample trained on, 0 for one held back; and 1 for a held-back one
        weights = torch.where(mask, 0.0, 1.0 / max(len(values) - len(held_ids), 1))
        weights, held = weights.to(losses.dtype), mask.to(losses.dtype)
        if losses.device.type != "cpu":
            weights, held = weights.to(losses.device), held.to(losses.device)
        parts = (weights, held, held_ids)
        if isinstance(ids, Tensor):
            self._split = (ids, ids._version, key, *parts)
        return parts

    def take(
        self,
        losses: Tensor,
        ids: Any,
        fraction: Any,
        *,
        at_w: bool,
        step: int,
        epoch: int | None = None,
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
        if epoch is not None and (type(epoch) is not int or epoch < 0):
            raise ValueError(f"Invalid epoch value: {epoch!r} (the loop's epoch: an int >= 0)")
        weights, held, held_ids = self._positions(losses, ids, fraction)
        self.fraction = fraction
        report = None
        if at_w and torch.is_grad_enabled():
            if epoch is not None:
                # a new epoch closes the round at its first step, held-back samples in the
                # batch or not (under DDP every replica then reports at the same step)
                if self.epoch is not None and epoch != self.epoch:
                    report = self._close()
                self.epoch = epoch
            if held_ids and self._new_in_step(step, held_ids):
                if epoch is None and not self.round.isdisjoint(held_ids):  # comes round again
                    report = self._close()
                    self._check_sampler()
                self._record(losses, held, held_ids)
        # the kept samples' mean as one dot product: the held-back weigh 0 (their gradient is
        # 0; a non-finite one makes it non-finite, as in a plain mean: a selection or a mask
        # took 30-50 us more a step on a CPU) and a batch held back whole trains on nothing
        return torch.dot(losses, weights), report

    def _record(self, losses: Tensor, held: Tensor, held_ids: list[int]) -> None:
        """Add the batch's held-back losses at w to the round."""
        self.round.update(held_ids)
        self._ever.update(held_ids)
        # (summed in the losses' dtype, accumulated over the epoch in float64)
        part = torch.dot(losses.detach(), held)
        if isinstance(self.total, Tensor):
            self.total.add_(part)
        else:
            self.total = part.double() + self.total
        self.count += len(held_ids)

    def _new_in_step(self, step: int, held_ids: list[int]) -> bool:
        """Whether ``held_ids`` are not yet recorded in optimizer step ``step`` (then they are
        now): a loss computed twice in one pass is recorded once."""
        if self._step[0] != step:
            self._step = (step, set(held_ids))
            return True
        if self._step[1].issuperset(held_ids):
            return False
        self._step[1].update(held_ids)
        return True

    def _close(self) -> float | None:
        report = float(self.total) / self.count if self.count else None
        self.closed = self.count
        self.total, self.count, self.round = 0.0, 0, set()
        return report

    def _check_sampler(self) -> None:
        """Ids that repeat before the held-back samples came round (a sampler with
        replacement, or a DistributedSampler's share that changes each epoch) end rounds
        early: the run's held-back ids then outnumber a round's by far. Say so, once."""
        if not self._warned and len(self._ever) > 1.5 * self.closed:
            self._warned = True
            warnings.warn(
                f"hold_back: a held-back id came round again after {self.closed} held-back "
                f"losses, where {len(self._ever)} held-back samples have been seen: this loop's "
                "sampler repeats samples within an epoch (with replacement, or a "
                "DistributedSampler's share), so the epoch's end cannot be read from the ids. "
                "Pass the loop's epoch: opt.hold_back(losses, ids, epoch=epoch).",
                RuntimeWarning,
                stacklevel=3,
            )

    # ---- state: plain numbers
    def state_dict(self) -> dict[str, Any]:
        return {
            "fraction": self.fraction,
            "total": float(self.total),
            "count": self.count,
            "round": sorted(self.round),
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: Any) -> None:
        keys = {"fraction", "total", "count", "round", "epoch"}
        ok = isinstance(state, dict) and set(state) == keys
        if ok:
            total, count, ids, epoch = (
                state["total"],
                state["count"],
                state["round"],
                state["epoch"],
            )
            ok = (
                (state["fraction"] is None or _fraction_ok(state["fraction"]))
                and type(total) is float
                and math.isfinite(total)
                and type(count) is int
                and isinstance(ids, list)
                and all(type(i) is int and -(1 << 63) <= i < 1 << 63 for i in ids)
                and len(set(ids)) == len(ids) <= count
                and (count > 0 or total == 0.0)
                and (epoch is None or (type(epoch) is int and epoch >= 0))
            )
        if not ok:
            raise ValueError(f"Invalid state value: the held-back samples' state {state!r:.200}")
        self.fraction, self.total, self.count = state["fraction"], state["total"], state["count"]
        self.round, self.epoch = set(state["round"]), state["epoch"]


def _fraction_ok(value: Any) -> bool:
    try:
        _check_fraction(value)
    except ValueError:
        return False
    return True
