r"""Hessian-vector products of a model's loss over a fixed set of batches.

The loss is the sample-weighted mean over all the batches given,

.. math::

    L(w) = \frac{1}{N} \sum_b n_b \, \ell_b(w), \qquad
    Hv = \nabla_w \big( \nabla_w L(w)^\top v \big),

with ``loss_fn`` returning the *mean* loss of a batch (as
``F.cross_entropy`` and ``F.mse_loss`` do), so the result does not depend on
how the samples are split into batches, even into batches of unequal size
(:math:`L = \sum_b \ell_b` for a loss that sums, ``reduction="sum"``). A batch
is an ``(x, y)`` pair: ``x`` whatever the model takes (a tensor, or a tuple /
dict of tensors), ``y`` whatever the loss takes; a DataLoader, a list of
pairs or one pair. The model is evaluated in eval mode (BatchNorm with
its running statistics, dropout off), as PyHessian does (arXiv 1912.07145),
so the Hessian is that of one deterministic function.

Everything works on one flat parameter vector ``w`` (length ``dim``) through
:func:`torch.func.functional_call`, so the model's own weights are never
written: instruments can evaluate the loss at ``w + delta`` without touching
the model, and a measurement leaves the model bit-for-bit as it was.

Two back-ends compute :math:`Hv`:

- ``"autograd"`` (default): double backward. When the data fit in one chunk
  (``max_batch_size``) the gradient graph is built once and each product is a
  single backward pass through it (``cache_graph``), which measured fastest
  on CPU (``benchmarks/sharpness.py --products``: about 0.8x the time of
  re-running forward and backward, and 0.75x forward-over-reverse, for the
  MNIST-1D CNN on 1000 samples). :meth:`HessianOperator.matmat` runs one
  batched backward pass for many vectors (``is_grads_batched``).
- ``"func"``: forward-over-reverse, ``jvp(grad(L))`` from :mod:`torch.func`;
  :meth:`HessianOperator.matmat` vectorises it over many vectors with
  ``vmap``.

Several vectors per pass (either back-end) cost as much per vector as one at
a time on a CPU, or more on a large model; they are there for accelerators.

``product="compiled"`` runs the per-chunk product through ``torch.compile``
instead (reverse over reverse, and its ``vmap`` for ``matmat``; no graph kept),
``"auto"`` (default) only once eager products have cost about what a compile
does (:mod:`._products`). ``memory_budget=`` bounds the bytes of the gradient
graphs kept, rebuilding the chunks that do not fit for every product (the same
code, in :class:`CurvatureOperator`, for the Gauss-Newton operator's graphs).
:class:`CurvatureOperator` holds what every operator shares (batches,
weights, loss, gradient); :mod:`.ggn` builds the Gauss-Newton operator on it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

from ._products import ProductPath, SavedBytes, available_bytes, check_budget

__all__ = [
    "CurvatureOperator",
    "HessianOperator",
    "hvp",
    "eval_mode",
    "prepare_batches",
    "param_vector",
    "batch_size",
]

LossFn = Callable[[Tensor, Tensor], Tensor]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode; restore each one's own flag after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def _leaves(obj: Any) -> list[Tensor]:
    """The tensors in a (nested) tuple / list / dict, in order."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _leaves(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _leaves(v)]
    return []


def _to_device(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def batch_size(batch: tuple[Any, Any]) -> int:
    """Samples in an ``(x, y)`` batch: the leading size of its first tensor."""
    x, y = batch
    return int(next(iter(_leaves(x) or _leaves(y))).shape[0])


def _check_batch(i: int, batch: Any) -> tuple[Any, Any]:
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ValueError(
            f"Invalid batches value: item {i} is {type(batch).__name__}, expected an (x, y) pair"
        )
    x, y = batch
    xs, ys = _leaves(x), _leaves(y)
    if not xs:
        raise ValueError(f"Invalid batches value: item {i} has no input tensor")
    sizes = {t.shape[0] if t.dim() > 0 else None for t in xs + ys}
    if len(sizes) != 1 or None in sizes or 0 in sizes:
        raise ValueError(
            f"Invalid batches value: item {i} has inputs and targets of different or zero "
            f"batch sizes ({sorted(str(s) for s in sizes)})"
        )
    return x, y


def prepare_batches(
    batches: Iterable[tuple[Any, Any]],
    *,
    max_batch_size: int | None = 2048,
    max_samples: int | None = None,
    device: torch.device | str | None = None,
) -> list[tuple[Any, Any]]:
    """Materialise ``batches`` and regroup them into as few chunks as allowed.

    ``batches`` is a DataLoader, a list of ``(x, y)`` pairs or one pair. ``x``
    is what the model takes (a tensor, or a tuple / dict of tensors with the
    samples along the first axis), ``y`` what the loss takes. Reading stops
    after ``max_samples`` samples (the last batch is cut). Tensor batches are
    concatenated and re-split into chunks of ``max_batch_size`` (``None``:
    one chunk), which removes per-batch overhead; other batches, or batches
    whose shapes cannot be concatenated, are kept as they are. The loss of the
    result, weighted by chunk size, equals that of the input.
    """
    if max_batch_size is not None and (
        isinstance(max_batch_size, bool)
        or not isinstance(max_batch_size, int)
        or max_batch_size < 1
    ):
        raise ValueError(
            f"Invalid max_batch_size value: {max_batch_size!r} (must be an int >= 1 or None)"
        )
    if max_samples is not None and (
        isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1
    ):
        raise ValueError(
            f"Invalid max_samples value: {max_samples!r} (must be an int >= 1 or None)"
        )
    if (
        isinstance(batches, (tuple, list))
        and len(batches) == 2
        and (isinstance(batches[0], Tensor) or isinstance(batches[1], Tensor))
    ):
        batches = [tuple(batches)]  # a single (x, y) pair
    if batches is None or not isinstance(batches, Iterable):
        raise ValueError(
            f"Invalid batches value: expected (x, y) pairs or a DataLoader, got {type(batches).__name__}"
        )
    items: list[tuple[Any, Any]] = []
    taken = 0
    for i, b in enumerate(batches):
        x, y = _check_batch(i, b)
        if max_samples is not None:
            n_b = batch_size((x, y))
            if taken + n_b > max_samples:
                keep = max_samples - taken
                x, y = _slice(x, keep), _slice(y, keep)
                n_b = keep
            taken += n_b
        items.append((x, y))
        if max_samples is not None and taken >= max_samples:
            break
    if not items:
        raise ValueError("Invalid batches value: no batches given")
    if device is not None:
        items = [(_to_device(x, device), _to_device(y, device)) for x, y in items]
    x0, y0 = items[0]
    same = all(
        isinstance(x, Tensor)
        and isinstance(y, Tensor)
        and x.shape[1:] == x0.shape[1:]
        and y.shape[1:] == y0.shape[1:]
        and x.dtype == x0.dtype
        and y.dtype == y0.dtype
        for x, y in items
    )
    if not same:
        return items
    n = sum(x.shape[0] for x, _ in items)
    size = n if max_batch_size is None else max_batch_size
    if all(x.shape[0] <= size for x, _ in items) and len(items) == 1:
        return items
    xs = torch.cat([x for x, _ in items])
    ys = torch.cat([y for _, y in items])
    return list(zip(xs.split(size), ys.split(size)))


def _slice(obj: Any, n: int) -> Any:
    if isinstance(obj, Tensor):
        return obj[:n] if obj.dim() > 0 else obj
    if isinstance(obj, dict):
        return {k: _slice(v, n) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_slice(v, n) for v in obj)
    return obj


def _trainable(model: nn.Module, params: Sequence[str] | None) -> list[tuple[str, Tensor]]:
    named = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
    else:
        lookup = dict(named)
        missing = [n for n in params if n not in lookup]
        if missing:
            raise ValueError(f"Invalid params value: {missing!r} are not parameters of the model")
        chosen = [(n, lookup[n]) for n in params]
    if not chosen:
        raise ValueError("Invalid model value: it has no trainable parameters")
    dtypes = {p.dtype for _, p in chosen}
    devices = {p.device for _, p in chosen}
    if len(dtypes) > 1 or len(devices) > 1:
        raise ValueError(
            f"Invalid model value: parameters must share one dtype and device (got {sorted(map(str, dtypes))}, {sorted(map(str, devices))})"
        )
    return chosen


def param_vector(model: nn.Module, params: Sequence[str] | None = None) -> Tensor:
    """The (trainable) parameters of ``model`` as one detached flat vector."""
    return torch.cat([p.detach().reshape(-1) for _, p in _trainable(model, params)])


def _declared_reduction(loss_fn: Any) -> str | None:
    """The reduction a loss declares: an ``nn.Module`` loss's attribute, or the keyword of a
    ``functools.partial(F.cross_entropy, reduction=...)``; None if it declares none."""
    fn = loss_fn
    while isinstance(fn, functools.partial):
        if "reduction" in fn.keywords:
            value = fn.keywords["reduction"]
            return value if isinstance(value, str) else None
        fn = fn.func
    value = getattr(loss_fn, "reduction", None)
    return value if isinstance(value, str) else None


def _probed_reduction(model: nn.Module, loss_fn: Any, batch: Any) -> str | None:
    """How a loss reduces over the batch, read from its value on two samples against its
    values on each: "sum", "mean", or None where it cannot tell (a weighted loss, an output
    that cannot be split). Treated as a mean, a sum would make the result depend on how the
    samples are split into chunks."""
    x, y = batch
    if not (isinstance(x, Tensor) and isinstance(y, Tensor)) or len(x) < 2 or len(y) < 2:
        return None
    try:
        with torch.no_grad(), eval_mode(model):
            out = model(x[:2])
            both = float(loss_fn(out, y[:2]))
            each = float(loss_fn(out[:1], y[:1])) + float(loss_fn(out[1:2], y[1:2]))
    except Exception:  # noqa: BLE001 - a loss or output that cannot be split: cannot tell
        return None
    if not (math.isfinite(both) and math.isfinite(each)) or abs(each) < 1e-12:
        return None
    sums, means = (math.isclose(both, v, rel_tol=1e-4) for v in (each, each / 2))
    return "sum" if sums and not means else "mean" if means and not sums else None


def _reduction(loss_fn: Any, reduction: str | None) -> str:
    if reduction is None:
        reduction = _declared_reduction(loss_fn) or "mean"
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"Invalid reduction value: {reduction!r} (the loss must return a scalar: 'mean' or 'sum')"
        )
    return reduction


class CurvatureOperator:
    r"""What every curvature operator of a model's loss over fixed batches shares.

    The loss is :math:`L(w) = \frac{1}{N}\sum_b n_b\,\ell_b(w)` for a loss
    that returns the batch mean (``reduction="mean"``, as ``F.cross_entropy``
    and ``F.mse_loss`` do), or :math:`\sum_b \ell_b(w)` for a summed one
    (``reduction="sum"``, taken from an ``nn.Module`` loss's own
    ``reduction`` attribute when not given), so it does not depend on how the
    samples are split into batches, even when the batches differ in size.

    Subclasses define ``matvec``; ``matmat``, ``dense`` and ``@`` follow.
    """

    kind = "curvature"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Iterable[tuple[Any, Any]],
        *,
        params: Sequence[str] | None = None,
        max_batch_size: int | None = 2048,
        max_samples: int | None = None,
        reduction: str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"Invalid model value: expected an nn.Module, got {type(model).__name__}"
            )
        if not callable(loss_fn):
            raise ValueError(f"Invalid loss_fn value: {loss_fn!r} is not callable")
        self.reduction = _reduction(loss_fn, reduction)
        stated = reduction is not None or _declared_reduction(loss_fn) is not None
        named = _trainable(model, params)
        self.model = model
        self.loss_fn = loss_fn
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.w = torch.cat([p.detach().reshape(-1) for _, p in named]).clone()
        self.dim = self.w.numel()
        self.dtype = self.w.dtype
        self.device = self.w.device
        self.batches = prepare_batches(
            batches, max_batch_size=max_batch_size, max_samples=max_samples, device=self.device
        )
        self.n_samples = sum(batch_size(b) for b in self.batches)
        probed = _probed_reduction(model, loss_fn, self.batches[0]) if self.batches else None
        if not stated:
            self.reduction = probed or "mean"  # a lambda or function: what it does
        elif probed is not None and probed != self.reduction:
            raise ValueError(
                f"Invalid reduction value: {self.reduction!r}, but loss_fn returns the batch "
                f"{probed} (its value on two samples against each); pass reduction={probed!r}"
            )
        if self.reduction == "mean":
            self._weights = [batch_size(b) / self.n_samples for b in self.batches]
        else:
            self._weights = [1.0] * len(self.batches)
        self.n_matvecs = 0

    # ----------------------------------------------------------- plumbing
    def unflatten(self, w: Tensor) -> dict[str, Tensor]:
        """Views of a flat vector shaped like the parameters, by name."""
        return {n: t.view(s) for n, t, s in zip(self.names, w.split(self.sizes), self.shapes)}

    def flatten(self, tensors: Sequence[Tensor] | dict[str, Tensor]) -> Tensor:
        if isinstance(tensors, dict):
            tensors = [tensors[n] for n in self.names]
        return torch.cat([t.reshape(-1) for t in tensors])

    def _check_vec(self, name: str, v: Tensor) -> Tensor:
        if not isinstance(v, Tensor) or v.shape != (self.dim,):
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(
                f"Invalid {name} value: expected a flat tensor of length {self.dim}, got {shape}"
            )
        return v.to(device=self.device, dtype=self.dtype)

    def _check_mat(self, vs: Tensor) -> Tensor:
        if not isinstance(vs, Tensor) or vs.dim() != 2 or vs.shape[1] != self.dim:
            shape = tuple(vs.shape) if isinstance(vs, Tensor) else type(vs).__name__
            raise ValueError(f"Invalid vs value: expected shape (k, {self.dim}), got {shape}")
        return vs.to(device=self.device, dtype=self.dtype)

    def _output(self, w: Tensor, x: Any, buffers: dict[str, Tensor] | None = None) -> Any:
        tensors = self.unflatten(w)
        if buffers:
            tensors = {**buffers, **tensors}
        return functional_call(self.model, tensors, (x,))

    def _apply_loss(self, out: Any, y: Any) -> Tensor:
        loss = self.loss_fn(out, y)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(
                f"Invalid loss_fn value: it returned {shape}, expected a scalar "
                "(use reduction='mean' or 'sum')"
            )
        return loss

    def _chunk_loss(
        self, w: Tensor, x: Any, y: Any, buffers: dict[str, Tensor] | None = None
    ) -> Tensor:
        return self._apply_loss(self._output(w, x, buffers), y)

    def _check_finite(self, value: Tensor | float) -> None:
        if isinstance(value, Tensor):
            value = value.detach()
        if not math.isfinite(float(value)):
            raise ValueError(
                f"Invalid model value: its loss on the batches is {float(value)} "
                "(diverged weights or bad data): nothing to measure"
            )

    # ------------------------------------------------------------ values
    @torch.no_grad()
    def loss(self, w: Tensor | None = None, *, buffers: dict[str, Tensor] | None = None) -> float:
        """Loss at the flat weights ``w`` (default: the model's)."""
        w = self.w if w is None else self._check_vec("w", w)
        with eval_mode(self.model):
            total = sum(
                c * self._chunk_loss(w, x, y, buffers).double()
                for c, (x, y) in zip(self._weights, self.batches)
            )
        return float(total)

    def loss_and_grad(self, w: Tensor | None = None) -> tuple[float, Tensor]:
        """Loss and its gradient (flat) at ``w`` (default: the model's)."""
        at_model = w is None
        w = (self.w if w is None else self._check_vec("w", w)).detach().requires_grad_(True)
        total = 0.0
        g = torch.zeros_like(w)
        with eval_mode(self.model), torch.enable_grad():
            for c, (x, y) in zip(self._weights, self.batches):
                loss = self._chunk_loss(w, x, y) * c
                g += torch.autograd.grad(loss, w)[0]
                total += float(loss.detach())
        if at_model:
            self._check_finite(total)  # elsewhere a non-finite loss is the caller's finding
        return total, g

    def gradient(self) -> Tensor:
        return self.loss_and_grad()[1]

    # ---------------------------------------------------------- products
    def matvec(self, v: Tensor) -> Tensor:  # pragma: no cover - defined by subclasses
        raise NotImplementedError

    def __matmul__(self, v: Tensor) -> Tensor:
        return self.matmat(v) if isinstance(v, Tensor) and v.dim() == 2 else self.matvec(v)

    def matmat(self, vs: Tensor) -> Tensor:
        """Products for the rows ``v_i`` of ``vs`` (shape ``(k, dim)``)."""
        vs = self._check_mat(vs)
        return torch.stack([self.matvec(v) for v in vs])

    def release(self) -> None:
        """Drop any cached graph (frees its memory)."""

    # ------------------------------------------------- compiled products
    _path: ProductPath | None = None
    _validated = False

    @property
    def product_info(self) -> dict[str, Any] | None:
        """The product path: ``{"product", "path", "compile_seconds", "reason"}``."""
        return None if self._path is None else self._path.info()

    def _compiled(self, kind: str, v: Tensor) -> Tensor | None:
        """The products by the compiled path, or ``None`` when the eager path is to run."""
        if self._path is None or not self._path.want_compiled():
            return None
        self.release()  # the compiled path keeps no graph: free the eager path's
        if not self._validated:
            # checked eagerly, once: a compiler must never turn a wrong loss or
            # model into a warning and a fallback
            self._validate()
            self._validated = True
        with eval_mode(self.model):
            chunks = [(c, x, y) for c, (x, y) in zip(self._weights, self.batches)]
            return self._path.run(kind, chunks, self.w, v)

    def _validate(self) -> None:
        self._check_finite(self.loss())  # also refuses a loss that is not a scalar

    # ------------------------------------------------------- memory budget
    # A subclass with a budget defines _chunk_graph(c, x, y) -> (graph, bytes it holds) and
    # _graph_product(graph, vs, batched) -> c * the chunk's product(s), and calls
    # _init_budget from its constructor.
    memory_budget: int | None = None
    _kept: list[Any] | None = None

    @staticmethod
    def _check_budget_args(memory_budget: Any, cache_graph: bool | None) -> int | str | None:
        memory_budget = check_budget(memory_budget)
        if memory_budget is not None and cache_graph is not None:
            raise ValueError(
                "Invalid memory_budget value: give either cache_graph or memory_budget, not both"
            )
        return memory_budget

    def _init_budget(self, memory_budget: int | str | None) -> None:
        if memory_budget == "auto":
            memory_budget = available_bytes(self.device)
        self.memory_budget = memory_budget
        if memory_budget is not None and self._path is not None:
            # a compile's trial holds its own buffers, outside the budget (the ResNet's
            # budget trace: 149 MiB with the trial against 86 eager, PyHessian 81-88)
            self._path.stay_eager("eager: a memory budget (a compile's memory is outside it)")
        self._kept = None
        self.graph_bytes: list[int] = []
        self.graphs_kept = 0
        self.peak_graph_bytes = 0

    def _chunk_graph(self, c: float, x: Any, y: Any) -> tuple[Any, int]:  # pragma: no cover
        raise NotImplementedError

    def _graph_product(self, graph: Any, vs: Tensor, batched: bool) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def _plan_chunks(self) -> None:
        """Cut the chunks so that one chunk's graph takes at most half the budget (or,
        where even one sample's does not, the whole budget: then nothing is kept).

        A graph's bytes (what it saves and the gradient kept with it) are
        ``fixed + per_sample * n``; both are read from the graphs
        of two slices of the first chunk (2 and 4 samples), not from the whole chunk,
        whose graph (the loader's batches regrouped, up to 2048 samples in one chunk)
        would be the largest thing the operator ever held, far over the budget.
        """
        assert self.memory_budget is not None
        (c, (x, y)) = (self._weights[0], self.batches[0])
        n = batch_size((x, y))
        if n < 4:  # too few samples to fit a line: this chunk's own graph
            per_sample, fixed = self._chunk_graph(c, x, y)[1] / n, 0.0
        else:
            b2 = self._chunk_graph(c, _slice(x, 2), _slice(y, 2))[1]
            b4 = self._chunk_graph(c, _slice(x, 4), _slice(y, 4))[1]
            per_sample = max(b4 - b2, 0) / 2
            fixed = max(b2 - 2 * per_sample, 0.0)
        if per_sample == 0 or fixed * len(self.batches) + per_sample * self.n_samples <= (
            self.memory_budget
        ):
            return  # every graph fits, or smaller chunks save nothing: keep them as they are

        def samples_in(room: float) -> int:
            """The samples whose graph fits in ``room`` bytes (a hair over the quotient:
            a room of exactly k samples' graphs allows k)."""
            return int((room - fixed) / per_sample * (1 + 1e-9))

        size = samples_in(self.memory_budget / 2)
        if size < 1:
            # not even one sample's graph in half the budget (the fixed part, the gradient
            # kept with each graph, takes it): chunks that fill the budget, built one at a
            # time and none kept, as a peer that rebuilds one batch's graph per product
            size = max(1, samples_in(self.memory_budget))
        if size >= max(batch_size(b) for b in self.batches):
            return
        self.batches = prepare_batches(self.batches, max_batch_size=size)
        if self.reduction == "mean":
            self._weights = [batch_size(b) / self.n_samples for b in self.batches]
        else:
            self._weights = [1.0] * len(self.batches)

    def _budget_product(self, vs: Tensor, batched: bool) -> Tensor:
        """Products through the kept graphs, rebuilding the others chunk by chunk."""
        assert self.memory_budget is not None
        first = self._kept is None
        if first:
            self._plan_chunks()
            self._kept = [None] * len(self.batches)
            self.graph_bytes = [0] * len(self.batches)
            self.graphs_kept = 0
        assert self._kept is not None
        held = sum(b for b, g in zip(self.graph_bytes, self._kept) if g is not None)
        last = len(self.batches) - 1
        rebuilt = 0  # the largest graph not kept: room it needs beside the kept ones
        out = None
        own = False  # whether ``out`` is a sum of our own, to add to in place
        for i, (c, (x, y)) in enumerate(zip(self._weights, self.batches)):
            graph = self._kept[i]
            if graph is None:
                graph, nbytes = self._chunk_graph(c, x, y)
                self.graph_bytes[i] = nbytes
                self.peak_graph_bytes = max(self.peak_graph_bytes, held + nbytes)
                if first:
                    # keep it if it fits beside the kept ones and room for one rebuilt
                    # chunk's graph (a later chunk's assumed as large as this one)
                    room = max(rebuilt, nbytes if i < last else 0)
                    if held + nbytes + room <= self.memory_budget:
                        self._kept[i] = graph
                        self.graphs_kept += 1
                        held += nbytes
                    else:
                        rebuilt = max(rebuilt, nbytes)
            hv = self._graph_product(graph, vs, batched)
            if out is None:
                out = hv
                # added to in place (one product-sized vector less) unless it is the input
                own = out.untyped_storage().data_ptr() != vs.untyped_storage().data_ptr()
            elif own:
                out += hv
            else:
                out, own = out + hv, True
            del graph, hv
        assert out is not None
        return out

    def _timed_eager(self, fn: Callable[[], Tensor], k: int) -> Tensor:
        t0 = time.perf_counter()
        out = fn()
        if self._path is not None:
            self._path.eager_done(time.perf_counter() - t0, k)
        return out

    def dense(self, block_size: int = 1) -> Tensor:
        """The full ``dim x dim`` matrix, ``block_size`` columns per call (small models only)."""
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        return torch.cat([self.matmat(e) for e in eye.split(block_size)]).T.contiguous()


class HessianOperator(CurvatureOperator):
    r"""The Hessian of a model's loss over fixed batches, as an operator.

    Args:
        model: the network. Put in eval mode while measuring; its flags are
            restored after each call, its weights are never written.
        loss_fn: ``loss_fn(model(x), y)`` -> scalar, the batch *mean* (or the
            sum, see ``reduction``). Any loss: ``F.cross_entropy``,
            ``F.mse_loss``, an ``nn.Module`` loss, your own function.
        batches: ``(x, y)`` pairs: a DataLoader, a list, or one pair. ``x`` is
            what the model takes (a tensor, or a tuple / dict of tensors), ``y``
            what the loss takes. Read once and kept (moved to the parameters'
            device); batches of unequal sizes are weighted by their size.
        params: names of the parameters the Hessian is taken over (default:
            all with ``requires_grad``); the others stay fixed.
        max_batch_size: samples per forward pass after regrouping (``None``:
            everything at once). Lower it if memory runs out.
        max_samples: read at most this many samples from ``batches``.
        reduction: ``"mean"`` or ``"sum"``: what ``loss_fn`` does over a
            batch (default: the loss module's ``reduction``, else ``"mean"``).
        backend: ``"autograd"`` (double backward) or ``"func"``
            (forward-over-reverse with :mod:`torch.func`), for the eager path; the
            compiled path is reverse-over-reverse with either.
        cache_graph: keep the gradient graph between products (autograd
            back-end only), trading memory for one forward and backward pass
            per product. Default: when the data form a single chunk.
        product: ``"auto"`` (default), ``"eager"`` or ``"compiled"``: whether
            the products run eagerly or ``torch.compile``'d (recomputing the
            forward and backward passes, no graph kept); ``"auto"`` compiles
            once the eager products have taken about what a compile costs, and
            keeps it only if faster (:mod:`._products`). A failed compile warns
            once and runs eager. ``op.product_info`` says which path runs, why,
            and what the compiled path's first calls took.
        memory_budget: bytes the kept gradient graphs may hold (autograd
            back-end, eager path), or ``"auto"`` (half the memory free now),
            instead of ``cache_graph``. Each chunk's graph is measured (the
            bytes of the tensors it saves) as it is built; graphs are kept while
            they and one more chunk's fit, the others rebuilt for every
            product; when the whole data's graph does not fit, the chunks are
            cut so that one takes at most half the budget.
            ``op.graphs_kept``, ``op.graph_bytes`` and ``op.peak_graph_bytes``
            report it.

    ``op.matvec(v)`` / ``op @ v`` gives :math:`Hv` for a flat ``v`` of length
    ``op.dim``; ``op.matmat(V)`` the products for the rows of ``V``.
    ``op.loss(w)`` and ``op.loss_and_grad(w)`` evaluate at any flat weight
    vector ``w`` (default: the model's). ``op.n_matvecs`` counts products.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(16, 3), torch.randn(16, 1)
        >>> op = HessianOperator(model, torch.nn.functional.mse_loss, [(x, y)])
        >>> hv = op @ torch.ones(op.dim)
        >>> hv.shape
        torch.Size([4])
    """

    kind = "hessian"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Iterable[tuple[Any, Any]],
        *,
        params: Sequence[str] | None = None,
        max_batch_size: int | None = 2048,
        max_samples: int | None = None,
        reduction: str | None = None,
        backend: str = "autograd",
        cache_graph: bool | None = None,
        product: str = "auto",
        memory_budget: int | str | None = None,
    ) -> None:
        if backend not in ("autograd", "func"):
            raise ValueError(f"Invalid backend value: {backend!r} (expected 'autograd' or 'func')")
        memory_budget = self._check_budget_args(memory_budget, cache_graph)
        super().__init__(
            model,
            loss_fn,
            batches,
            params=params,
            max_batch_size=max_batch_size,
            max_samples=max_samples,
            reduction=reduction,
        )
        self.backend = backend
        single, batched = self._chunk_products()
        self._path = ProductPath(product, single, batched)
        if cache_graph is None:
            cache_graph = len(self.batches) == 1
        self.cache_graph = bool(cache_graph) and backend == "autograd" and memory_budget is None
        self._graph: tuple[Tensor, Tensor] | None = None
        self._init_budget(memory_budget if backend == "autograd" else None)

    def _chunk_products(self) -> tuple[Callable[..., Tensor], Callable[..., Tensor]]:
        """The per-chunk products the compiled path compiles: ``c`` times the chunk's Hv."""

        def loss(w: Tensor, x: Any, y: Any, c: Tensor) -> Tensor:
            return self._chunk_loss(w, x, y) * c

        def single(w: Tensor, v: Tensor, x: Any, y: Any, c: Tensor) -> Tensor:
            # reverse over reverse, the gradient of g(w).v, whatever the back-end: compiled,
            # it took 18 ms per product on the MNIST-1D CNN against 30 ms forward over
            # reverse, and forward over reverse of F.mse_loss compiled (torch 2.13, CPU)
            # into a kernel reading an efficient zero tensor, which crashed the process
            return grad(lambda u: torch.dot(grad(lambda t: loss(t, x, y, c))(u), v))(w)

        def batched(w: Tensor, vs: Tensor, x: Any, y: Any, c: Tensor) -> Tensor:
            return vmap(single, in_dims=(None, 0, None, None, None))(w, vs, x, y, c)

        return single, batched

    def _cached_grad(self) -> tuple[Tensor, Tensor]:
        if self._graph is None:
            w = self.w.detach().clone().requires_grad_(True)
            total = 0.0
            with eval_mode(self.model), torch.enable_grad():
                g = None
                for c, (x, y) in zip(self._weights, self.batches):
                    loss = self._chunk_loss(w, x, y) * c
                    total += float(loss.detach())
                    gc = torch.autograd.grad(loss, w, create_graph=True)[0]
                    g = gc if g is None else g + gc
            self._check_finite(total)
            self._graph = (w, g)
        return self._graph

    def release(self) -> None:
        """Drop the cached gradient graph(s) (frees their memory)."""
        self._graph = None
        self._kept = None
        self.graphs_kept = 0

    def matvec(self, v: Tensor) -> Tensor:
        """:math:`Hv` for a flat vector ``v``."""
        v = self._check_vec("v", v)
        self.n_matvecs += 1
        out = self._compiled("single", v)
        if out is not None:
            return out
        return self._timed_eager(lambda: self._eager_matvec(v), 1)

    def _eager_matvec(self, v: Tensor) -> Tensor:
        if self.backend == "func":
            return self._func_hvp(v)
        if self.memory_budget is not None:
            return self._budget_product(v, batched=False)
        if self.cache_graph:
            w, g = self._cached_grad()
            return torch.autograd.grad(g, w, v, retain_graph=True)[0]
        w = self.w.detach().clone().requires_grad_(True)
        out = torch.zeros_like(w)
        total = 0.0
        with eval_mode(self.model), torch.enable_grad():
            for c, (x, y) in zip(self._weights, self.batches):
                loss = self._chunk_loss(w, x, y) * c
                total += float(loss.detach())
                gc = torch.autograd.grad(loss, w, create_graph=True)[0]
                out += torch.autograd.grad(gc, w, v)[0]
        self._check_finite(total)
        return out

    def _func_hvp(self, v: Tensor) -> Tensor:
        with eval_mode(self.model):
            out = None
            for c, (x, y) in zip(self._weights, self.batches):
                g = grad(lambda w, x=x, y=y, c=c: self._chunk_loss(w, x, y) * c)
                hv = jvp(g, (self.w,), (v,))[1]
                out = hv if out is None else out + hv
        return out

    def matmat(self, vs: Tensor) -> Tensor:
        """Products :math:`Hv_i` for the rows ``v_i`` of ``vs`` (shape ``(k, dim)``).

        Vectorised: one batched backward pass through the cached graph
        (``is_grads_batched``), or ``vmap`` over forward-over-reverse (compiled:
        ``vmap`` over the compiled path's product).
        """
        vs = self._check_mat(vs)
        k = vs.shape[0]
        if k > 1:
            out = self._compiled("batched", vs)
            if out is not None:
                self.n_matvecs += k
                return out
        if self.backend == "func":
            self.n_matvecs += k
            return self._timed_eager(lambda: vmap(self._func_hvp)(vs), k)
        if k > 1 and (self.cache_graph or self.memory_budget is not None):
            self.n_matvecs += k
            if self.memory_budget is not None:
                return self._timed_eager(lambda: self._budget_product(vs, batched=True), k)
            w, g = self._cached_grad()
            return self._timed_eager(
                lambda: torch.autograd.grad(g, w, vs, retain_graph=True, is_grads_batched=True)[0],
                k,
            )
        return torch.stack([self.matvec(v) for v in vs])

    # ------------------------------------------------------- memory budget
    def _chunk_graph(self, c: float, x: Any, y: Any) -> tuple[tuple[Tensor, Tensor], int]:
        """One chunk's gradient graph ``(w, c * grad)`` and the bytes it holds (the tensors
        it saves and the gradient)."""
        # a leaf on the weights' own storage, not a copy: one weight-sized vector less per
        # graph (nothing writes to ``self.w``; the shared version counter would catch it)
        w = self.w.detach().requires_grad_(True)
        with eval_mode(self.model), torch.enable_grad():
            with SavedBytes([w, *_leaves(x), *_leaves(y)]) as saved:
                loss = self._chunk_loss(w, x, y) * c
                g = torch.autograd.grad(loss, w, create_graph=True)[0]
            saved.hold(g)  # kept with the graph: one weight-sized vector per graph
        self._check_finite(loss)
        return (w, g), saved.bytes

    @staticmethod
    def _graph_product(graph: Any, vs: Tensor, batched: bool) -> Tensor:
        w, g = graph
        return torch.autograd.grad(g, w, vs, retain_graph=True, is_grads_batched=batched)[0]


def hvp(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[tuple[Tensor, Tensor]],
    v: Tensor | Sequence[Tensor],
    **kwargs: Any,
) -> Tensor | list[Tensor]:
    """One Hessian-vector product. ``v`` is flat, or a list shaped like the
    trainable parameters (then the result is a list too)."""
    op = HessianOperator(model, loss_fn, batches, **kwargs)
    if isinstance(v, Tensor):
        return op.matvec(v)
    if len(v) != len(op.shapes) or any(t.shape != s for t, s in zip(v, op.shapes)):
        raise ValueError(
            "Invalid v value: its shapes do not match the model's trainable parameters"
        )
    hv = op.matvec(op.flatten(list(v)))
    return [t.view(s) for t, s in zip(hv.split(op.sizes), op.shapes)]
