"""FSDP2 (``torch.distributed.fsdp.fully_shard``): checkpoints of SAM through ``torch.distributed.checkpoint``.

SAM itself needs no glue under FSDP2: build it over the sharded module's
parameters and step as usual; the ascent norm is the norm of the whole
gradient and the restore is exact (see :mod:`samkit.optim._fsdp`). What needs
glue is the sharded checkpoint. torch's ``get_state_dict`` /
``set_state_dict`` (``torch.distributed.checkpoint.state_dict``) keep only an
optimizer's ``state`` and ``param_groups`` (samkit's counters and the state
of its policy and rho controller would be dropped), and initialise an empty
optimizer state by calling ``step()`` without a closure, which SAM refuses.
These two functions run torch's on the base optimizer and carry samkit's
entry beside it, as one opaque value (the same on every rank)::

    import torch.distributed.checkpoint as dcp
    from samkit.integrations import fsdp

    dcp.save(fsdp.get_state_dict(model, opt), checkpoint_id=path)      # save

    state = fsdp.get_state_dict(model, opt)                            # resume
    dcp.load(state, checkpoint_id=path)
    fsdp.set_state_dict(model, opt, state)

A resumed run is bit for bit the run that never stopped (tested on 2 gloo
processes).
"""

from __future__ import annotations

import io
from typing import Any

import torch
from torch import nn

from ..optim.sam import SAM

__all__ = ["get_state_dict", "set_state_dict"]


def _check(model: Any, optimizer: Any) -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(f"Invalid model value: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, SAM):
        raise ValueError(
            f"Invalid optimizer value: expected a samkit SAM, got {type(optimizer).__name__} "
            "(for a plain torch optimizer use torch.distributed.checkpoint.state_dict directly)"
        )


def get_state_dict(model: nn.Module, optimizer: SAM, *, options: Any = None) -> dict[str, Any]:
    """``{"model", "optimizer", "samkit"}`` for ``torch.distributed.checkpoint.save`` / ``load``.

    ``model`` and ``optimizer`` are torch's sharded state dicts (of the model
    and of SAM's base optimizer); ``samkit`` is SAM's own entry, serialised.
    ``options``: torch's ``StateDictOptions``.
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict as torch_get_state_dict

    _check(model, optimizer)
    model_sd, optim_sd = torch_get_state_dict(model, optimizer.base_optimizer, options=options)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict()["samkit"], buffer)
    return {"model": model_sd, "optimizer": optim_sd, "samkit": buffer.getvalue()}


def set_state_dict(
    model: nn.Module, optimizer: SAM, state: dict[str, Any], *, options: Any = None
) -> None:
    """Load what :func:`get_state_dict` gave (after ``torch.distributed.checkpoint.load``).

    samkit's entry is validated and loaded first; if it is bad this raises
    ``ValueError`` and nothing has changed.
    """
    from torch.distributed.checkpoint.state_dict import set_state_dict as torch_set_state_dict

    _check(model, optimizer)
    if not isinstance(state, dict) or not {"model", "optimizer", "samkit"} <= state.keys():
        raise ValueError(
            "Invalid state value: expected the dict of samkit.integrations.fsdp.get_state_dict "
            "(keys 'model', 'optimizer', 'samkit')"
        )
    blob = state["samkit"]
    if not isinstance(blob, (bytes, bytearray)):
        raise ValueError(
            "Invalid state value: its 'samkit' entry is not the bytes get_state_dict wrote"
        )
    try:
        own = torch.load(io.BytesIO(blob), weights_only=True)
    except Exception as error:
        raise ValueError(
            f"Invalid state value: its 'samkit' entry does not load ({error})"
        ) from None
    previous = optimizer.state_dict()
    current = optimizer.base_optimizer.state_dict()
    current["samkit"] = own
    optimizer.load_state_dict(current)  # validates; base state unchanged (its own round trip)
    try:
        torch_set_state_dict(
            model,
            optimizer.base_optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=options,
        )
    except BaseException:
        optimizer.load_state_dict(previous)
        raise
