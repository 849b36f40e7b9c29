r"""How an operator computes its products: eager or ``torch.compile``'d, and the graph budget.

``product="eager"`` is the operator's own path (double backward through a
kept graph, or ``torch.func``), ``"compiled"`` compiles the per-chunk product
(reverse-over-reverse :math:`\nabla(\nabla L^\top v)` for the autograd
back-end, forward-over-reverse ``jvp(grad(L))`` for ``"func"``, the GGN's
:math:`J^\top H_z J v`) and its ``vmap`` over many vectors with
``torch.compile``, recomputing the forward and backward passes for every
product (so no graph is kept). ``"auto"`` (default) runs eager and compiles
only once the eager products have taken :data:`COMPILE_AFTER_S` seconds, about
what a compile costs on a CPU: the rent-or-buy rule, which never spends more
than about twice what the better choice in hindsight would have; it then
keeps the compiled path only if its products are faster than the eager ones
were. A compile that fails (no C compiler, an unsupported model) warns once
and leaves the operator eager.
"""

from __future__ import annotations

import os
import time
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

PRODUCTS = ("auto", "eager", "compiled")

#: ``product="auto"`` compiles once the eager products have taken this long (seconds).
#: The first call of a compiled product (tracing, inductor, the C++ compiler) took
#: 14-20 s for the MNIST-1D CNN on the 2-core CPU, 7-9 s for a 100-parameter MLP.
COMPILE_AFTER_S = 30.0


def check_product(product: Any) -> str:
    if product not in PRODUCTS:
        raise ValueError(
            f"Invalid product value: {product!r} (expected 'auto', 'eager' or 'compiled')"
        )
    return product


def check_budget(memory_budget: Any) -> int | str | None:
    if memory_budget is None or memory_budget == "auto":
        return memory_budget
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 1:
        raise ValueError(
            f"Invalid memory_budget value: {memory_budget!r} (bytes as an int >= 1, 'auto' or None)"
        )
    return memory_budget


def available_bytes(device: torch.device) -> int:
    """Half the memory free now on ``device`` (CPU: ``MemAvailable``), the ``"auto"`` budget."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0]) // 2
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else 0
    return int(pages * os.sysconf("SC_PAGE_SIZE")) // 2 if pages else 2**31


class SavedBytes:
    """Bytes of the tensors an autograd graph saves, each storage counted once.

    Used as ``with SavedBytes(exclude) as m: <build the graph>``, ``m.hold(...)``
    for the tensors kept with it (its outputs); ``m.bytes`` after. The storages
    of ``exclude`` (the weights, the inputs: held anyway) are not counted.
    """

    def __init__(self, exclude: list[Tensor]) -> None:
        self.skip = {t.untyped_storage().data_ptr() for t in exclude}
        self.seen: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _count(self, t: Tensor) -> None:
        s = t.untyped_storage()
        if s.data_ptr() not in self.skip:
            self.seen[s.data_ptr()] = s.nbytes()

    def _pack(self, t: Tensor) -> Tensor:
        self._count(t)
        # detached: a saved *output* returned as is holds its own grad_fn, whose node
        # holds it (a cycle through C++ that Python's collector cannot see), and every
        # graph built under the hooks outlived its product (450 MB a product on the
        # 10.7M-parameter transformer); autograd gives the unpacked tensor its edge back
        return t.detach()

    def hold(self, *tensors: Tensor) -> None:
        """Count tensors the graph is kept with (its outputs: the gradient, ...), once each."""
        for t in tensors:
            self._count(t)

    @property
    def bytes(self) -> int:
        return sum(self.seen.values())

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


def _fresh(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with its own copy of its code object.

    Dynamo keeps its compiled code, and counts recompiles against a limit of
    8, per code object; a nested function's code object is shared by every
    closure made from it, so without a copy the ninth operator would
    silently run eager.
    """
    return types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )


def _shape_key(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return (tuple(obj.shape), obj.dtype)
    if isinstance(obj, dict):
        return tuple((k, _shape_key(v)) for k, v in obj.items())
    if isinstance(obj, (tuple, list)):
        return tuple(_shape_key(v) for v in obj)
    return type(obj).__name__


class ProductPath:
    """The eager / compiled choice of one operator, with its timings.

    ``single(w, v, x, y, c)`` and ``batched(w, vs, x, y, c)`` are the per-chunk
    products (``c`` a 0-dim tensor, the chunk's weight); they are compiled on
    first use. ``path`` is what the products run now, ``compile_seconds`` the
    wall time of the compiled products' first calls (compiling included, one
    per function and chunk shape), ``None`` before any.
    """

    def __init__(
        self, product: str, single: Callable[..., Tensor], batched: Callable[..., Tensor]
    ) -> None:
        self.product = check_product(product)
        self.path = "compiled" if product == "compiled" else "eager"
        self._fns = {"single": single, "batched": batched}
        self._compiled: dict[str, Callable[..., Tensor]] = {}
        self._seen: set[Any] = set()
        self.compile_seconds: float | None = None
        self.eager_seconds = 0.0  # spent by eager products (what "auto" weighs a compile against)
        self.eager_products = 0
        self.compiled_seconds = 0.0  # spent by compiled products after their first call
        self.compiled_products = 0
        # "auto": waiting (eager, under the break-even) -> trial (compiled, being timed)
        # -> decided; any product: failed once a compile has failed
        self._state = "waiting" if product == "auto" else "decided"
        self.reason = {
            "auto": "eager until the eager products have taken COMPILE_AFTER_S seconds",
            "eager": "asked for",
            "compiled": "asked for",
        }[product]

    # ------------------------------------------------------------ choice
    def want_compiled(self) -> bool:
        if self._state == "waiting" and self.eager_seconds >= COMPILE_AFTER_S:
            self._state, self.path = "trial", "compiled"
            self.reason = (
                f"compiled after {self.eager_seconds:.1f} s of eager products "
                f"({self.eager_products})"
            )
        return self.path == "compiled"

    def stay_eager(self, reason: str) -> None:
        """``"auto"`` decided for eager before any product (an asked-for path is kept)."""
        if self.product == "auto":
            self._state, self.path, self.reason = "decided", "eager", reason

    def eager_done(self, seconds: float, k: int) -> None:
        self.eager_seconds += seconds
        self.eager_products += k

    def _fallback(self, exc: BaseException) -> None:
        self._state, self.path = "failed", "eager"
        self.reason = f"compile failed ({type(exc).__name__}): eager"
        warnings.warn(
            f"samkit.sharpness: compiling the Hessian-vector product failed "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "using the eager product",
            RuntimeWarning,
            stacklevel=4,
        )

    # -------------------------------------------------------------- run
    def run(
        self, kind: str, chunks: list[tuple[float, Any, Any]], w: Tensor, v: Tensor
    ) -> Tensor | None:
        """Sum of ``c * product`` over the chunks, compiled; ``None`` when compiling failed."""
        fn = self._compiled.get(kind)
        if fn is None:
            fn = torch.compile(_fresh(self._fns[kind]), dynamic=False)
            self._compiled[kind] = fn
        out = None
        try:
            t0 = time.perf_counter()
            first = False
            for c, x, y in chunks:
                key = (kind, _shape_key(x), _shape_key(y))
                first = first or key not in self._seen
                t1 = time.perf_counter()
                hv = fn(w, v, x, y, torch.tensor(c, dtype=w.dtype, device=w.device))
                if key not in self._seen:
                    self._seen.add(key)
                    self.compile_seconds = (self.compile_seconds or 0.0) + (
                        time.perf_counter() - t1
                    )
                out = hv if out is None else out + hv
        except Exception as exc:  # noqa: BLE001 - any compiler failure: fall back, warn once
            self._fallback(exc)
            return None
        if not first:
            k = v.shape[0] if kind == "batched" else 1
            self.compiled_seconds += time.perf_counter() - t0
            self.compiled_products += k
            self._judge()
        return out

    def _judge(self) -> None:
        """With ``"auto"``: keep the compiled path only if its products are the faster."""
        if self._state != "trial" or self.compiled_products < 2 or not self.eager_products:
            return
        self._state = "decided"
        eager = self.eager_seconds / self.eager_products
        compiled = self.compiled_seconds / self.compiled_products
        if compiled >= eager:
            self.path = "eager"
            self.reason = (
                f"compiled {1e3 * compiled:.3g} ms per product against eager "
                f"{1e3 * eager:.3g} ms: eager"
            )
        else:
            self.reason = (
                f"compiled: {1e3 * compiled:.3g} ms per product against eager {1e3 * eager:.3g} ms"
            )

    def info(self) -> dict[str, Any]:
        return {
            "product": self.product,
            "path": self.path,
            "compile_seconds": self.compile_seconds,
            "reason": self.reason,
        }
