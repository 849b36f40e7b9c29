"""Model checkpoints written by the trainer and read by the instruments.

A checkpoint is one ``torch.save`` file holding::

    {
      "format": "samkit-checkpoint", "version": 1,
      "model": {"name": str, "kwargs": dict},        # samkit.experiments.models.build_model
      "dataset": {"name": str, ...},                # samkit.experiments.datasets spec
      "state_dict": model.state_dict(),
      "meta": dict,                                 # method, seed, epoch, metrics ...
    }

Writes are atomic (temporary file + ``os.replace``), so a crash never leaves
a half-written checkpoint behind.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .._atomic import atomic_open

__all__ = ["save_checkpoint", "load_checkpoint", "atomic_torch_save"]

FORMAT = "samkit-checkpoint"


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename over it."""
    with atomic_open(path, "wb") as fh:
        torch.save(obj, fh)


def save_checkpoint(
    path: str | os.PathLike[str],
    model: torch.nn.Module,
    *,
    model_name: str,
    model_kwargs: dict[str, Any],
    dataset: dict[str, Any],
    meta: dict[str, Any] | None = None,
) -> None:
    """Save ``model`` with what is needed to rebuild it and its data."""
    atomic_torch_save(
        {
            "format": FORMAT,
            "version": 1,
            "model": {"name": model_name, "kwargs": dict(model_kwargs)},
            "dataset": dict(dataset),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "meta": dict(meta or {}),
        },
        path,
    )


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint; ValueError if it is missing or not a samkit checkpoint."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"Invalid path value: {str(path)!r} is not a file")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise ValueError(
            f"Invalid path value: {str(path)!r} is not a readable checkpoint ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"Invalid path value: {str(path)!r} is not a samkit checkpoint")
    return ckpt
