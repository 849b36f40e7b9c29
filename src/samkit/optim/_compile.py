"""``torch.compile`` safety without importing ``torch._dynamo`` at load.

``torch.compiler.disable`` imports ``torch._dynamo`` (over a second) the
moment it decorates a function. :func:`disable` defers that to the first call
made under compilation: in eager mode the function runs as it is, and under
``torch.compiler.is_compiling()`` (a flag read, no import) it runs through
``torch.compiler.disable(fn, recursive=...)``, made then and kept. A program
that never compiles never imports Dynamo.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

__all__ = ["disable", "disable_frame"]

_F = TypeVar("_F", bound=Callable[..., Any])


def disable(fn: _F, *, recursive: bool = True) -> _F:
    """``torch.compiler.disable(fn, recursive=recursive)``, made on the first compiled call."""
    made: list[Callable[..., Any]] = []

    def under_compile(*args: Any, **kwargs: Any) -> Any:
        if not made:
            made.append(torch.compiler.disable(fn, recursive=recursive))
        return made[0](*args, **kwargs)

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return under_compile(*args, **kwargs)
        return fn(*args, **kwargs)

    return run  # type: ignore[return-value]


def disable_frame(fn: _F) -> _F:
    """:func:`disable` with ``recursive=False``: Dynamo skips ``fn``'s own frame
    (a step's attribute writes) but still compiles what it calls (the closure)."""
    return disable(fn, recursive=False)
