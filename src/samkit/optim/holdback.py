r"""A slice of the samples held back from training, for ``rho="auto"`` to learn from.

A loop that evaluates nothing can still give the radius a held-out signal:
the closure hands SAM one loss per sample and each sample's id (its index in
the dataset), and SAM keeps a fixed ``fraction`` of the *samples*, chosen by
id, out of training for good::

    def closure():
        losses = F.cross_entropy(model(x), y, reduction="none")
        loss = opt.hold_back(losses, ids, epoch=epoch)   # the kept samples' mean loss
        loss.backward()
        return loss

The held-back samples still ride in the batch (their forward costs what it
did), but they weigh 0 in the mean that is back-propagated; their losses at
``w`` (the first pass of each step) are summed, and at the first step of the
next epoch (when ``epoch`` changes, or, without it, when a held-back id comes
round again) their mean is reported to the controller as a validation loss, as
``opt.observe_validation`` would. A sample is held back when the top ten bits
of its id's multiplicative hash (Knuth's, 2^32 / the golden ratio, of the id's
low 31 bits) fall below ``round(fraction * 1024)``: the same samples in every
epoch, on every rank and in every process, whatever the batch order.
"""

from __future__ import annotations

import math
import operator
import warnings
from typing import Any

import torch

from .._checks import check_pos

Tensor = torch.Tensor

#: Knuth's multiplicative hash constant: the prime 2654435761, near 2^32 / the golden ratio.
_KNUTH = 2654435761
#: Held-back ids remembered for the warnings (about 100 bytes each in a Python set).
TRACKED = 1 << 20


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


#: Loss dtypes whose held-back sum and kept mean are computed in float32 (1 / kept is
#: subnormal in float16 above 16,384 samples, and bfloat16 rounds a sum at ~2e-3).
_LOW = (torch.float16, torch.bfloat16)


def _check_epoch(epoch: Any) -> int | None:
    if epoch is None:
        return None
    try:
        value = operator.index(epoch) if not isinstance(epoch, bool) else -1
    except TypeError:
        value = -1
    if value < 0:
        raise ValueError(f"Invalid epoch value: {epoch!r} (the loop's epoch: an int >= 0)")
    return value


class HeldBack:
    """The held-back samples' losses of the current round (an epoch), and the ids seen in it.

    A round ends when the loop's ``epoch`` changes, or, without one, when a held-back id comes
    round again (a sampler that passes each sample once an epoch)."""

    def __init__(self) -> None:
        self.fraction: float | None = None
        self.total: Tensor | float = 0.0  # the sum of held-back losses at w, in float64
        self.count = 0
        # the round's held-back ids, kept only without ``epoch``: a repeat ends the round
        self.round: set[int] = set()
        self.epoch: int | None = None  # the round's epoch, where the loop gives one
        # this step's split of its ids tensor (the pass at w + e hands the same one)
        self._split: tuple[Any, ...] | None = None
        # the optimizer step last recorded and the held-back ids recorded in it: a second
        # call with them in the same step (a loss logged twice) records nothing
        self._step: tuple[int, set[int]] = (-1, set())
        self._ever: set[int] = set()  # every held-back id seen (not saved: for the warning)
        self.closed = 0  # the held-back losses of the round closed last
        self._since = 0  # the round's count when _ever started (a resumed run's: not saved)
        self._warned: set[str] = set()

    def _positions(
        self, losses: Tensor, ids: Any, fraction: float, step: int
    ) -> tuple[Tensor, Tensor, list[int]]:
        """(the kept samples' weights in their mean, the held-back ones' mask, their ids) on
        ``losses``'s device; within one optimizer step the same ids tensor, unchanged, is
        split once (the pass at w + e reuses the first's)."""
        if not isinstance(losses, Tensor):
            _check_inputs(losses, ids)  # (raises)
        cached = isinstance(ids, Tensor) and not ids.is_inference()  # (no version counter)
        version = ids._version if cached else None
        key = (step, version, fraction, losses.device, losses.dtype, losses.shape)
        split = self._split
        if cached and split is not None and split[0] is ids and split[1] == key:
            return split[2], split[3], split[4]
        values = _check_inputs(losses, ids)
        mask = held_back(values, fraction)
        held_ids = values[mask].tolist()
        # 1 / kept for a sample trained on, 0 for one held back
        dtype = torch.float32 if losses.dtype in _LOW else losses.dtype
        weights = torch.where(mask, 0.0, 1.0 / max(len(values) - len(held_ids), 1)).to(dtype)
        if losses.device.type != "cpu":
            weights, mask = weights.to(losses.device), mask.to(losses.device)
        self._split = (ids, key, weights, mask, held_ids) if cached else None
        return weights, mask, held_ids

    def take(
        self,
        losses: Tensor,
        ids: Any,
        fraction: Any,
        *,
        at_w: bool,
        step: int,
        epoch: Any = None,
    ) -> tuple[Tensor, float | None]:
        """The mean loss of the samples kept for training, and the held-back samples' mean
        loss over the round that this call closes (None while it is open)."""
        if type(fraction) is not float or fraction != self.fraction:  # (else checked already)
            fraction = _check_fraction(fraction)
            if self.fraction is not None and fraction != self.fraction:
                raise ValueError(
                    f"Invalid fraction value: {fraction!r}, where this run holds back "
                    f"{self.fraction!r} (a sample held back so far would be trained on)"
                )
        epoch = _check_epoch(epoch)
        weights, mask, held_ids = self._positions(losses, ids, fraction, step)
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
                self._record(losses, mask, held_ids, by_ids=epoch is None)
        # the kept samples' mean as one dot product: the held-back weigh 0 (their gradient is
        # 0; a non-finite one makes it non-finite, as in a plain mean: a selection or a mask
        # took 30-50 us more a step on a CPU) and a batch held back whole trains on nothing
        if losses.dtype in _LOW:
            return torch.dot(losses.float(), weights), report
        return torch.dot(losses, weights), report

    def _record(self, losses: Tensor, mask: Tensor, held_ids: list[int], by_ids: bool) -> None:
        """Add the batch's held-back losses at w to the round (a selection: a trained sample's
        non-finite loss stays out of it; detached, so it costs no backward)."""
        if by_ids:
            self.round.update(held_ids)
        if len(self._ever) < TRACKED:  # (for the warnings only: bounded)
            self._ever.update(held_ids)
        dtype = torch.float64 if losses.dtype == torch.float64 else torch.float32
        part = torch.where(mask, losses.detach(), 0.0).sum(dtype=dtype)
        if isinstance(self.total, Tensor):
            self.total.add_(part)
        else:
            self.total = part.double() + self.total
        self.count += len(held_ids)
        seen = self.count - self._since  # (the losses recorded since _ever started)
        if not by_ids and len(self._ever) < TRACKED and seen > 3 * len(self._ever):
            # every held-back sample seen three times over in one round: the epoch given
            # never changes (a sampler with replacement draws each about 1.6 times)
            self._warn(
                "epoch",
                f"hold_back: {seen} held-back losses of {len(self._ever)} samples in "
                f"epoch={self.epoch} and the epoch has not changed, so nothing is reported: "
                "pass the loop's epoch (opt.hold_back(losses, ids, epoch=epoch)).",
            )

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
        total, count = float(self.total), self.count
        self.closed = count
        self.total, self.count, self.round, self._since = 0.0, 0, set(), 0
        if self.epoch is not None:  # (with the loop's epoch: the samples of one round)
            self._ever.clear()
        if count and not math.isfinite(total):
            self._warn(
                "nonfinite",
                "hold_back: a held-back sample's loss was not finite in the epoch just "
                "ended, so that epoch is not reported, nor any later one where that happens "
                "(the model diverged on it, or the sample is corrupt).",
            )
            return None
        return total / count if count else None

    def _check_sampler(self) -> None:
        """Ids that repeat before the held-back samples came round (a sampler with
        replacement, or a DistributedSampler's share that changes each epoch) end rounds
        early: the run's held-back ids then outnumber a round's by far. Say so, once."""
        if len(self._ever) > 1.5 * self.closed:
            self._warn(
                "sampler",
                f"hold_back: a held-back id came round again after {self.closed} held-back "
                f"losses, where {len(self._ever)} held-back samples have been seen: this "
                "loop's sampler does not pass each sample once an epoch (it draws with "
                "replacement, a DistributedSampler's share, or drop_last=True), so the "
                "epoch's end cannot be read from the ids. Pass the loop's epoch: "
                "opt.hold_back(losses, ids, epoch=epoch).",
            )

    def _warn(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            from .autorho import _caller_level  # (autorho imports this module)

            warnings.warn(message, RuntimeWarning, stacklevel=_caller_level())

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
            total, count, ids = state["total"], state["count"], state["round"]
            ok = (
                (state["fraction"] is None or _fraction_ok(state["fraction"]))
                and type(total) is float
                # (a non-finite sum: a held-back loss that was, which the report skips)
                and (math.isfinite(total) or count > 0)
                and type(count) is int
                and isinstance(ids, list)
                and all(type(i) is int and -(1 << 63) <= i < 1 << 63 for i in ids)
                and len(set(ids)) == len(ids) <= count
                and (count > 0 or total == 0.0)
                and (
                    state["epoch"] is None or (type(state["epoch"]) is int and state["epoch"] >= 0)
                )
            )
        if not ok:
            raise ValueError(f"Invalid state value: the held-back samples' state {state!r:.200}")
        self.fraction, self.total, self.count = state["fraction"], state["total"], state["count"]
        self.round, self.epoch = set(state["round"]), state["epoch"]
        self._since = self.count  # (the ids seen before are not saved: count from here)


def _fraction_ok(value: Any) -> bool:
    try:
        _check_fraction(value)
    except ValueError:
        return False
    return True
