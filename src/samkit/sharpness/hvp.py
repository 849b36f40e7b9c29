r"""Hessian-vector products of a model's loss over a fixed set of batches.

The loss is the sample-weighted mean over all the batches given,

.. math::

    L(w) = \frac{1}{N} \sum_b n_b \, \ell_b(w), \qquad
    Hv = \nabla_w \big( \nabla_w L(w)^\top v \big),

with ``loss_fn`` returning the *mean* loss of a batch (as
``F.cross_entropy`` does), so the result does not depend on how the samples
are split into batches. The model is evaluated in eval mode (BatchNorm with
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
  on CPU (about 0.7x the time of re-running forward and backward, and 0.55x
  forward-over-reverse, for the MNIST-1D CNN on 1000 samples).
- ``"func"``: forward-over-reverse, ``jvp(grad(L))`` from :mod:`torch.func`;
  :meth:`HessianOperator.matmat` vectorises it over many vectors with
  ``vmap``, which pays off on accelerators.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

__all__ = ["HessianOperator", "hvp", "eval_mode", "prepare_batches", "param_vector"]

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


def _check_batch(i: int, batch: Any) -> tuple[Tensor, Tensor]:
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ValueError(
            f"Invalid batches value: item {i} is {type(batch).__name__}, expected an (x, y) pair"
        )
    x, y = batch
    if not (isinstance(x, Tensor) and isinstance(y, Tensor)):
        raise ValueError(f"Invalid batches value: item {i} is not a pair of tensors")
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(
            f"Invalid batches value: item {i} has {x.shape[0]} inputs and {y.shape[0]} targets"
        )
    return x, y


def prepare_batches(
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    max_batch_size: int | None = 2048,
    device: torch.device | str | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """Materialise ``batches`` and regroup them into as few chunks as allowed.

    Samples are concatenated and re-split into chunks of ``max_batch_size``
    (``None``: one chunk), which removes per-batch overhead; batches whose
    shapes cannot be concatenated are kept as they are. The loss of the
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
    if (
        isinstance(batches, tuple)
        and len(batches) == 2
        and all(isinstance(t, Tensor) for t in batches)
    ):
        batches = [batches]  # a single (x, y) pair
    items = [_check_batch(i, b) for i, b in enumerate(batches)]
    if not items:
        raise ValueError("Invalid batches value: no batches given")
    if device is not None:
        items = [(x.to(device), y.to(device)) for x, y in items]
    same = all(
        x.shape[1:] == items[0][0].shape[1:]
        and y.shape[1:] == items[0][1].shape[1:]
        and x.dtype == items[0][0].dtype
        and y.dtype == items[0][1].dtype
        for x, y in items
    )
    if not same:
        return items
    n = sum(x.shape[0] for x, _ in items)
    size = n if max_batch_size is None else max_batch_size
    if len(items) == 1 and n <= size:
        return items
    xs = torch.cat([x for x, _ in items])
    ys = torch.cat([y for _, y in items])
    return list(zip(xs.split(size), ys.split(size)))


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


class HessianOperator:
    r"""The Hessian of a model's mean loss over fixed batches, as an operator.

    Args:
        model: the network. Put in eval mode while measuring; its flags are
            restored after each call, its weights are never written.
        loss_fn: ``loss_fn(model(x), y)`` -> scalar *mean* over the batch.
        batches: (x, y) pairs, e.g. a list, a DataLoader, or one pair. Read
            once and kept (moved to the parameters' device).
        params: names of the parameters the Hessian is taken over (default:
            all with ``requires_grad``); the others stay fixed.
        max_batch_size: samples per forward pass after regrouping (``None``:
            everything at once). Lower it if memory runs out.
        backend: ``"autograd"`` (double backward) or ``"func"``
            (forward-over-reverse with :mod:`torch.func`).
        cache_graph: keep the gradient graph between products (autograd
            back-end only). Default: when the data form a single chunk.

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

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Iterable[tuple[Tensor, Tensor]],
        *,
        params: Sequence[str] | None = None,
        max_batch_size: int | None = 2048,
        backend: str = "autograd",
        cache_graph: bool | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"Invalid model value: expected an nn.Module, got {type(model).__name__}"
            )
        if not callable(loss_fn):
            raise ValueError(f"Invalid loss_fn value: {loss_fn!r} is not callable")
        if backend not in ("autograd", "func"):
            raise ValueError(f"Invalid backend value: {backend!r} (expected 'autograd' or 'func')")
        named = _trainable(model, params)
        self.model = model
        self.loss_fn = loss_fn
        self.backend = backend
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.w = torch.cat([p.detach().reshape(-1) for _, p in named]).clone()
        self.dim = self.w.numel()
        self.dtype = self.w.dtype
        self.device = self.w.device
        self.batches = prepare_batches(batches, max_batch_size=max_batch_size, device=self.device)
        self.n_samples = sum(x.shape[0] for x, _ in self.batches)
        self._weights = [x.shape[0] / self.n_samples for x, _ in self.batches]
        if cache_graph is None:
            cache_graph = len(self.batches) == 1
        self.cache_graph = bool(cache_graph) and backend == "autograd"
        self._graph: tuple[Tensor, Tensor] | None = None
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

    def _chunk_loss(
        self, w: Tensor, x: Tensor, y: Tensor, buffers: dict[str, Tensor] | None = None
    ) -> Tensor:
        tensors = self.unflatten(w)
        if buffers:
            tensors = {**buffers, **tensors}
        return self.loss_fn(functional_call(self.model, tensors, (x,)), y)

    # ------------------------------------------------------------ values
    @torch.no_grad()
    def loss(self, w: Tensor | None = None, *, buffers: dict[str, Tensor] | None = None) -> float:
        """Mean loss at the flat weights ``w`` (default: the model's)."""
        w = self.w if w is None else self._check_vec("w", w)
        with eval_mode(self.model):
            total = sum(
                c * self._chunk_loss(w, x, y, buffers).double()
                for c, (x, y) in zip(self._weights, self.batches)
            )
        return float(total)

    def loss_and_grad(self, w: Tensor | None = None) -> tuple[float, Tensor]:
        """Mean loss and its gradient (flat) at ``w`` (default: the model's)."""
        w = (self.w if w is None else self._check_vec("w", w)).detach().requires_grad_(True)
        total = 0.0
        g = torch.zeros_like(w)
        with eval_mode(self.model), torch.enable_grad():
            for c, (x, y) in zip(self._weights, self.batches):
                loss = self._chunk_loss(w, x, y) * c
                g += torch.autograd.grad(loss, w)[0]
                total += float(loss.detach())
        return total, g

    def gradient(self) -> Tensor:
        return self.loss_and_grad()[1]

    # ---------------------------------------------------------- products
    def _cached_grad(self) -> tuple[Tensor, Tensor]:
        if self._graph is None:
            w = self.w.detach().clone().requires_grad_(True)
            with eval_mode(self.model), torch.enable_grad():
                g = None
                for c, (x, y) in zip(self._weights, self.batches):
                    gc = torch.autograd.grad(self._chunk_loss(w, x, y) * c, w, create_graph=True)[0]
                    g = gc if g is None else g + gc
            self._graph = (w, g)
        return self._graph

    def release(self) -> None:
        """Drop the cached gradient graph (frees its memory)."""
        self._graph = None

    def matvec(self, v: Tensor) -> Tensor:
        """:math:`Hv` for a flat vector ``v``."""
        v = self._check_vec("v", v)
        self.n_matvecs += 1
        if self.backend == "func":
            return self._func_hvp(v)
        if self.cache_graph:
            w, g = self._cached_grad()
            return torch.autograd.grad(g, w, v, retain_graph=True)[0]
        w = self.w.detach().clone().requires_grad_(True)
        out = torch.zeros_like(w)
        with eval_mode(self.model), torch.enable_grad():
            for c, (x, y) in zip(self._weights, self.batches):
                gc = torch.autograd.grad(self._chunk_loss(w, x, y) * c, w, create_graph=True)[0]
                out += torch.autograd.grad(gc, w, v)[0]
        return out

    __matmul__ = matvec

    def _func_hvp(self, v: Tensor) -> Tensor:
        with eval_mode(self.model):
            out = None
            for c, (x, y) in zip(self._weights, self.batches):
                g = grad(lambda w, x=x, y=y, c=c: self._chunk_loss(w, x, y) * c)
                hv = jvp(g, (self.w,), (v,))[1]
                out = hv if out is None else out + hv
        return out

    def matmat(self, vs: Tensor) -> Tensor:
        """Products :math:`Hv_i` for the rows ``v_i`` of ``vs`` (shape ``(k, dim)``)."""
        if not isinstance(vs, Tensor) or vs.dim() != 2 or vs.shape[1] != self.dim:
            shape = tuple(vs.shape) if isinstance(vs, Tensor) else type(vs).__name__
            raise ValueError(f"Invalid vs value: expected shape (k, {self.dim}), got {shape}")
        vs = vs.to(device=self.device, dtype=self.dtype)
        if self.backend == "func":
            self.n_matvecs += vs.shape[0]
            return vmap(self._func_hvp)(vs)
        if self.cache_graph and vs.shape[0] > 1:
            self.n_matvecs += vs.shape[0]
            w, g = self._cached_grad()
            return torch.autograd.grad(g, w, vs, retain_graph=True, is_grads_batched=True)[0]
        return torch.stack([self.matvec(v) for v in vs])

    def dense(self) -> Tensor:
        """The full ``dim x dim`` Hessian, column by column (small models only)."""
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        return torch.stack([self.matvec(e) for e in eye], dim=1)


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
