"""A run's training state: the file that lets an interrupted run continue with the same numbers.

Written atomically after every epoch by :func:`~samkit.experiments.trainer.train`
(:func:`save_state`): the model, the method, the history, the early-stopping
bookkeeping, whether the run already stopped or diverged, and the RNG states.
:func:`load_state` reads and checks one (:class:`ResumeError` if it cannot be
resumed from).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .checkpoint import atomic_torch_save
from .registry import Method

__all__ = ["ResumeError", "load_state", "save_state"]


class ResumeError(ValueError):
    """A training-state file that cannot be resumed from."""


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


_STATE_KEYS = ("model", "method", "history", "train_time", "best", "bad_epochs")


def read_state(path: str | os.PathLike[str], hint: str) -> Any:
    """``torch.load`` a training-state file (tensors and plain data only), or
    :class:`ResumeError` saying it cannot be read, followed by ``hint``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every unreadable file is the same user error
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ResumeError(
            f"Invalid training state: {str(path)!r} cannot be read ({reason[:200]}); {hint}"
        ) from exc


def load_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a training-state file; :class:`ResumeError` if it cannot be resumed."""
    hint = "delete it to restart this run from its first epoch"
    st = read_state(path, hint)
    if not isinstance(st, dict) or any(k not in st for k in _STATE_KEYS):
        raise ResumeError(f"Invalid training state: {str(path)!r} is incomplete; {hint}")
    bad = _malformed(st)
    if bad:
        raise ResumeError(f"Invalid training state: {str(path)!r} is malformed ({bad}); {hint}")
    return st


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _malformed(st: dict[str, Any]) -> str | None:
    """What is wrong with a training state's bookkeeping (a file is checked, not trusted):
    the epochs 1..n in order, finite times, counts and flags of their types."""
    history, best = st["history"], st["best"]
    if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
        return "history"
    if [r.get("epoch") for r in history] != list(range(1, len(history) + 1)):
        return "history's epochs are not 1, 2, ..."
    if not (_number(st["train_time"]) and 0 <= st["train_time"] < float("inf")):
        return "train_time"
    if not (isinstance(st["bad_epochs"], int) and not isinstance(st["bad_epochs"], bool)):
        return "bad_epochs"
    if st["bad_epochs"] < 0 or st["bad_epochs"] > len(history):
        return "bad_epochs"
    if not isinstance(best, (list, tuple)) or len(best) != 3:
        return "best"
    score, epoch, weights = best
    if not (_number(score) and score == score) or not isinstance(epoch, int):
        return "best"
    if not (weights is None or isinstance(weights, dict)):
        return "best"
    for flag in ("stopped", "diverged"):
        if not isinstance(st.get(flag, False), bool):
            return flag
    if not isinstance(st.get("rng", {}), dict):
        return "rng"
    return None


def save_state(
    path: str | os.PathLike[str],
    model: nn.Module,
    method: Method,
    *,
    history: list[dict[str, Any]],
    train_time: float,
    best: tuple[float, int, Any],
    bad_epochs: int,
    stopped: bool,
    diverged: bool,
    device: torch.device,
    tag: Any = None,
) -> None:
    """Write the training state to ``path`` atomically (read back by :func:`load_state`).
    ``tag``: what the run is (its settings), so that a state is resumed only by its run."""
    atomic_torch_save(
        {
            "tag": tag,
            "model": model.state_dict(),
            "method": method.state_dict(),
            "history": history,
            "train_time": train_time,
            "best": list(best),
            "bad_epochs": bad_epochs,
            "stopped": stopped,
            "diverged": diverged,
            "rng": _rng_state(device),
        },
        path,
    )
