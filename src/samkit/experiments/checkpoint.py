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

A checkpoint of another ``version`` (a newer samkit's, or a hand-edited
``"1"``) is refused by :func:`load_checkpoint`, never read as if it were this one.

A checkpoint is a file a user hands us, so :func:`check_checkpoint` validates
every entry before use and takes nothing from it as is: the model must be a
built-in one with plain keyword values, the dataset entry may only hold the
keys of a built-in dataset's spec (never a cache folder or any other path),
the weights must be finite tensors, and the label is made safe to print.
A model written by the user's own code (``"user:..."``) is never imported
from a checkpoint: rebuilding it is refused with a message saying how.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .._atomic import atomic_open

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "atomic_torch_save",
    "check_checkpoint",
    "rebuild_model",
    "rebuild_dataset",
    "safe_label",
]

FORMAT = "samkit-checkpoint"
#: the checkpoint layouts this samkit reads (written by :func:`save_checkpoint`)
VERSIONS = (1,)


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
            "version": VERSIONS[-1],
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
        # (torch's own text is not passed on: escape codes, errno numbers, C++ enforce lines,
        # and advice to load with weights_only=False, which would run the file's code)
        why = (
            "it holds objects other than tensors and plain values, and samkit never runs a "
            "file's code"
            if "weights_only" in str(exc)
            else "damaged, or not a file torch.save wrote"
        )
        raise ValueError(
            f"Invalid path value: {str(path)!r} is not a readable checkpoint ({why})"
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"Invalid path value: {str(path)!r} is not a samkit checkpoint")
    version = ckpt.get("version")
    # exactly an int this samkit knows: not "1", not True, not a newer layout read as the old one
    if type(version) is not int or version not in VERSIONS:
        raise ValueError(
            f"Invalid path value: {str(path)!r} is a samkit checkpoint of unknown version "
            f"{safe_label(repr(version), 40)} (this samkit reads version "
            f"{', '.join(map(str, VERSIONS))})"
        )
    return ckpt


_DATASET_KEYS = {"name": str, "seed": int, "noise": float, "val_fraction": float, "train_size": int}
_SCALARS = (bool, int, float, str, type(None))


def safe_label(text: Any, limit: int = 80) -> str:
    """A label read from a file, safe to print on a terminal and in a plot:
    control characters (escape sequences) become ``?``, ``$`` (matplotlib's
    math mode) is escaped, and it is cut at ``limit`` characters."""
    s = "".join(c if c.isprintable() else "?" for c in str(text))[:limit]
    return s.replace("$", r"\$")


def check_checkpoint(ckpt: dict[str, Any], path: str | os.PathLike[str]) -> dict[str, Any]:
    """Validate a loaded checkpoint; ValueError naming the file and the bad entry.

    Returns ``{"model": (name, kwargs), "dataset": spec or None, "label": str}``
    with every value checked; ``dataset`` is None for data that was not built in.
    """
    from .datasets import list_datasets
    from .models import list_models

    where = f"checkpoint {str(path)!r}"
    model = ckpt.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("name"), str):
        raise ValueError(f"Invalid {where}: no model entry")
    name, kwargs = model["name"], model.get("kwargs", {})
    if name.startswith("user:"):
        raise ValueError(
            f"Invalid {where}: its model was built by your own code ({safe_label(name[5:])}); "
            "samkit never imports code named in a file: load it in Python with your model "
            "factory and use samkit.sharpness"
        )
    if name not in list_models():
        raise ValueError(
            f"Invalid {where}: unknown model {safe_label(name)!r} "
            f"(choose from {', '.join(list_models())})"
        )
    if not isinstance(kwargs, dict) or not all(
        isinstance(k, str) and isinstance(v, _SCALARS) for k, v in kwargs.items()
    ):
        raise ValueError(f"Invalid {where}: model arguments must be plain values")
    spec = ckpt.get("dataset")
    dataset = None
    if (
        isinstance(spec, dict)
        and isinstance(spec.get("name"), str)
        and spec["name"] in list_datasets()
    ):
        unknown = sorted(set(spec) - set(_DATASET_KEYS))
        if unknown:
            raise ValueError(
                f"Invalid {where}: unexpected dataset entries {', '.join(map(safe_label, unknown))}"
            )
        for key, typ in _DATASET_KEYS.items():
            v = spec.get(key)
            ok = v is None or (isinstance(v, typ) and not isinstance(v, bool))
            if typ is float:
                ok = v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
            if not ok:
                raise ValueError(f"Invalid {where}: dataset entry {key} = {safe_label(repr(v))}")
        dataset = dict(spec)
    elif spec is not None and not (
        isinstance(spec, dict) and str(spec.get("name", "")).startswith("user:")
    ):
        raise ValueError(f"Invalid {where}: unknown dataset entry")
    state = ckpt.get("state_dict")
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()
    ):
        raise ValueError(f"Invalid {where}: the weights are not a state dict of tensors")
    for k, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ValueError(
                f"Invalid {where}: weight {safe_label(k)!r} holds NaN or infinite values "
                "(the run diverged); nothing to measure"
            )
    meta = ckpt.get("meta") if isinstance(ckpt.get("meta"), dict) else {}
    label = meta.get("label")
    return {
        "model": (name, dict(kwargs)),
        "dataset": dataset,
        "label": safe_label(label) if isinstance(label, str) and label else None,
        "state_dict": state,
    }


class _TooLarge(Exception):
    pass


@contextlib.contextmanager
def _at_most(count: int) -> Iterator[None]:
    """Stop a model's construction once it has registered ``count`` modules, parameters and
    buffers: on the meta device tensors take no memory, but each module still takes time
    and memory (a file edited to blocks=3000 built for seconds, 10**7 would for hours)."""
    from torch.nn.modules import module

    seen = [0]

    def hook(*_: Any) -> None:
        seen[0] += 1
        if seen[0] > count:
            raise _TooLarge

    handles = [
        module.register_module_module_registration_hook(hook),
        module.register_module_parameter_registration_hook(hook),
        module.register_module_buffer_registration_hook(hook),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def rebuild_model(checked: dict[str, Any]) -> torch.nn.Module:
    """The checkpoint's model with its weights (from :func:`check_checkpoint`'s result)."""
    from .models import build_model

    name, kwargs = checked["model"]
    state = checked["state_dict"]
    # The file's settings are checked against its weights on the meta device first, where a
    # model takes no memory: a settings entry edited to channels=1e7 asked the allocator for
    # a petabyte (a size that fits would have taken the machine's memory).
    try:
        with torch.device("meta"), _at_most(4 * len(state) + 64):
            shell = build_model(name, **kwargs)
    except _TooLarge:
        raise ValueError(
            f"Invalid state_dict value: the weights do not fit {name} with the checkpoint's "
            f"settings (they build a model of far more tensors than the file's {len(state)})"
        ) from None
    except Exception as exc:  # noqa: BLE001 - settings the model refuses: the file's error
        raise ValueError(
            f"Invalid model value: the checkpoint's settings do not build {name} "
            f"({safe_label(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)})"
        ) from exc
    expected = {k: tuple(v.shape) for k, v in shell.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in state.items()}
    if expected != given:
        key = next(k for k in sorted(set(expected) | set(given)) if expected.get(k) != given.get(k))
        raise ValueError(
            f"Invalid state_dict value: the weights do not fit {name} with the checkpoint's "
            f"settings ({safe_label(key)}: {given.get(key, 'absent')} in the file, "
            f"{expected.get(key, 'absent')} in the model)"
        )
    model = build_model(name, **kwargs)
    model.load_state_dict(state)
    return model


def rebuild_dataset(checked: dict[str, Any]) -> Any:
    """The checkpoint's built-in dataset (cache folder: the default, never the file's)."""
    from .datasets import load_dataset

    spec = checked["dataset"]
    if spec is None:
        raise ValueError(
            "Invalid dataset value: the checkpoint was trained on your own data, which samkit "
            "cannot rebuild from a file; measure it in Python with samkit.sharpness"
        )
    return load_dataset(**spec)
