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

__all__ = ["disable", "disable_frame", "protocol"]

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


def protocol(method: Callable[..., Any]) -> Callable[..., Any]:
    """A step method: under ``no_grad``, and opaque to ``torch.compile``.

    Under compilation it runs as ``torch.compiler.disable`` (dynamo would drop
    SAM's attribute writes), made on first use (:func:`disable`: no
    ``torch._dynamo`` import at load); in eager mode it skips that wrapper and
    the ``no_grad`` decorator, which together cost more per step than SAM's own
    bookkeeping on a small model, and sets the grad mode directly.
    """
    compiled = disable(torch.no_grad()(method))

    @functools.wraps(method)
    def run(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return compiled(*args, **kwargs)
        enabled = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        try:
            return method(*args, **kwargs)
        finally:
            torch.set_grad_enabled(enabled)

    return run
