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
from typing import ParamSpec, TypeVar

import torch

__all__ = ["disable", "disable_frame", "protocol"]

_P = ParamSpec("_P")
_R = TypeVar("_R")


def disable(fn: Callable[_P, _R], *, recursive: bool = True) -> Callable[_P, _R]:
    """``torch.compiler.disable(fn, recursive=recursive)``, made on the first compiled call."""
    made: list[Callable[_P, _R]] = []

    def under_compile(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        if not made:
            # (torch.compiler.disable is not annotated)
            made.append(torch.compiler.disable(fn, recursive=recursive))  # type: ignore[no-untyped-call]
        return made[0](*args, **kwargs)

    @functools.wraps(fn)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        if torch.compiler.is_compiling():
            return under_compile(*args, **kwargs)
        return fn(*args, **kwargs)

    return run


def disable_frame(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """:func:`disable` with ``recursive=False``: Dynamo skips ``fn``'s own frame
    (a step's attribute writes) but still compiles what it calls (the closure)."""
    return disable(fn, recursive=False)


def protocol(method: Callable[_P, _R]) -> Callable[_P, _R]:
    """A step method: under ``no_grad``, and opaque to ``torch.compile``.

    Under compilation it runs as ``torch.compiler.disable`` (dynamo would drop
    SAM's attribute writes), made on first use (:func:`disable`: no
    ``torch._dynamo`` import at load); in eager mode it skips that wrapper and
    the ``no_grad`` decorator, which together cost more per step than SAM's own
    bookkeeping on a small model, and sets the grad mode directly.
    """
    compiled = disable(torch.no_grad()(method))

    @functools.wraps(method)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        if torch.compiler.is_compiling():
            return compiled(*args, **kwargs)
        enabled = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        try:
            return method(*args, **kwargs)
        finally:
            torch.set_grad_enabled(enabled)

    return run
