r"""The generalised Gauss-Newton matrix: a cheaper, positive semi-definite proxy.

For a loss :math:`L(w) = \sum_b c_b\, \ell(f(w; x_b), y_b)` of the model's
outputs :math:`z = f(w; x)`, the Hessian splits as

.. math::

    \nabla^2 L = \underbrace{\sum_b c_b\, J_b^\top \,\nabla_z^2\ell_b\, J_b}_{G\ \text{(GGN)}}
    \;+\; \sum_b c_b \sum_k \frac{\partial \ell_b}{\partial z_k}\,\nabla_w^2 z_k ,

with :math:`J_b = \partial z / \partial w` (Schraudolph 2002; Martens, arXiv
1412.1193). :math:`G` drops the second term, which vanishes where the model
fits its targets and is small near a minimum; for a convex loss of the
outputs (cross-entropy, MSE) :math:`G` is positive semi-definite, and for
cross-entropy and MSE it equals the Fisher information of the model's
predictive distribution. It is **not** the Hessian: its top eigenvalue and
trace are a sharpness *proxy* (Papyan, arXiv 1811.07062; Sagun et al., arXiv
1706.04454, show the two share their outliers near a minimum), labelled
``ggn_*`` everywhere in samkit.

A product :math:`Gv = J^\top (\nabla_z^2\ell)(Jv)` needs no second derivative
of the network: :math:`Jv` by one backward pass through the backward graph
(the double-backward trick: :math:`J v = \partial_u (J^\top u)^\top v`),
:math:`\nabla_z^2\ell` in output space (cheap), then :math:`J^\top(\cdot)` by
one backward pass. With the graphs cached it costs less than a Hessian-vector
product.

:func:`ggn_trace` computes :math:`\operatorname{tr} G` from per-sample
products, far cheaper than any Hutchinson estimate of the Hessian trace:

.. math::

    \operatorname{tr} G = \sum_b c_b \sum_{i \in b} \big\lVert J_i^\top A_i \big\rVert_F^2,
    \qquad A_i A_i^\top = \nabla_{z_i}^2 \ell_b ,

exactly (``exact=True``: one per-sample backward pass per output) or
unbiased with one Rademacher vector :math:`u_i` per sample,
:math:`\lVert J_i^\top A_i u_i \rVert^2` (one per-sample backward pass).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from ._products import ProductPath, SavedBytes
from ._progress import progress_bar
from .hessian import _generator
from .hvp import CurvatureOperator, LossFn, _leaves, batch_size, eval_mode

__all__ = ["GGNOperator", "GGNTraceResult", "ggn_trace"]


class GGNOperator(CurvatureOperator):
    r"""The generalised Gauss-Newton matrix :math:`G = J^\top (\nabla_z^2 \ell) J` as an operator.

    Same arguments as :class:`~samkit.sharpness.hvp.HessianOperator` (no
    ``backend``). The model must return one tensor (the outputs the loss
    takes). ``cache_graph`` keeps each chunk's forward graph and its backward
    graph between products (default: when the data form a single chunk).
    ``memory_budget`` (bytes, or ``"auto"``: half the memory free now; instead of
    ``cache_graph``) keeps those graphs only while they fit, as the Hessian's
    does: each chunk's graphs are measured as they are built (the bytes of the
    tensors they save and of those kept with them), kept while they and one more chunk's fit, the others
    rebuilt for every product, and the chunks cut so that one takes at most half
    the budget when the whole data's do not fit (``op.graphs_kept``,
    ``op.graph_bytes``, ``op.peak_graph_bytes``). ``product="compiled"`` compiles
    :math:`J^\top (\nabla_z^2\ell)(Jv)` per chunk (``jvp`` of the model, the
    loss's output-space Hessian by reverse over reverse, fused with the rest
    by the compiler, ``vjp`` back), ``"auto"`` as for the Hessian.

    Use it wherever a Hessian operator goes (``top_eigenvalues``,
    ``hessian_trace``, ``spectral_density``): the results are those of the
    GGN, a proxy, not of the Hessian.
    """

    kind = "ggn"

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
        cache_graph: bool | None = None,
        product: str = "auto",
        memory_budget: int | str | None = None,
    ) -> None:
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
        if cache_graph is None:
            cache_graph = len(self.batches) == 1
        self.cache_graph = bool(cache_graph) and memory_budget is None
        self._graphs: list[tuple[Tensor, ...]] | None = None
        self._path = ProductPath(product, *self._chunk_products())
        self._init_budget(memory_budget)

    def _validate(self) -> None:
        x, _ = self.batches[0]
        with torch.no_grad(), eval_mode(self.model):
            z = self._output(self.w, x)
        if not isinstance(z, Tensor):
            raise ValueError(
                f"Invalid model value: the GGN needs one output tensor, got {type(z).__name__}"
            )
        super()._validate()

    def _chunk_products(self) -> tuple[Any, Any]:
        """The per-chunk products the compiled path compiles: ``c`` times the chunk's Gv."""

        def single(w: Tensor, v: Tensor, x: Any, y: Any, c: Tensor) -> Tensor:
            def out(u: Tensor) -> Tensor:
                return self._output(u, x)

            def loss(t: Tensor) -> Tensor:
                return self._apply_loss(t, y) * c

            z, jv = jvp(out, (w,), (v,))
            # the loss's Hessian in output space by reverse over reverse: forward over
            # reverse of F.mse_loss compiled (torch 2.13, CPU) into a kernel reading an
            # efficient zero tensor, which crashed the process
            hjv = grad(lambda t: torch.vdot(grad(loss)(t).reshape(-1), jv.reshape(-1)))(z)
            return vjp(out, w)[1](hjv)[0]

        def batched(w: Tensor, vs: Tensor, x: Any, y: Any, c: Tensor) -> Tensor:
            return vmap(single, in_dims=(None, 0, None, None, None))(w, vs, x, y, c)

        return single, batched

    def _build_graph(self, c: float, x: Any, y: Any, w: Tensor | None = None) -> tuple[Tensor, ...]:
        """(w, z, u, J^T u, z_leaf, grad_z loss) for one chunk, all with graphs."""
        if w is None:
            w = self.w.detach().clone().requires_grad_(True)
        with eval_mode(self.model), torch.enable_grad():
            z = self._output(w, x)
            if not isinstance(z, Tensor):
                raise ValueError(
                    f"Invalid model value: the GGN needs one output tensor, got {type(z).__name__}"
                )
            u = torch.zeros_like(z, requires_grad=True)
            jtu = torch.autograd.grad(z, w, u, create_graph=True)[0]
            zl = z.detach().requires_grad_(True)
            loss = self._apply_loss(zl, y) * c
            self._check_finite(loss)
            gz = torch.autograd.grad(loss, zl, create_graph=True)[0]
        return w, z, u, jtu, zl, gz

    def _all_graphs(self) -> list[tuple[Tensor, ...]]:
        if self._graphs is None:
            graphs = [self._build_graph(c, x, y) for c, (x, y) in zip(self._weights, self.batches)]
            if self.cache_graph:
                self._graphs = graphs
            return graphs
        return self._graphs

    def _chunk_graph(self, c: float, x: Any, y: Any) -> tuple[tuple[Tensor, ...], int]:
        """One chunk's graphs (:meth:`_build_graph`) and the bytes they hold (memory budget)."""
        # a leaf on the weights' own storage, as the Hessian's: no weight-sized copy per graph
        w = self.w.detach().requires_grad_(True)
        with SavedBytes([w, *_leaves(x), *_leaves(y)]) as saved:  # as the Hessian's
            graph = self._build_graph(c, x, y, w)
            saved.hold(*graph)  # what is kept with them; Jᵀu is weight-sized
        return graph, saved.bytes

    def release(self) -> None:
        """Drop the cached graphs (frees their memory)."""
        self._graphs = None
        self._kept = None
        self.graphs_kept = 0

    @staticmethod
    def _product(graph: tuple[Tensor, ...], vs: Tensor, batched: bool) -> Tensor:
        w, z, u, jtu, zl, gz = graph
        kw = {"retain_graph": True, "is_grads_batched": batched}
        jv = torch.autograd.grad(jtu, u, vs, **kw)[0]
        hjv = torch.autograd.grad(gz, zl, jv, allow_unused=True, materialize_grads=True, **kw)[0]
        return torch.autograd.grad(z, w, hjv, **kw)[0]

    _graph_product = _product  # what the memory budget's products run through

    def matvec(self, v: Tensor) -> Tensor:
        """:math:`Gv` for a flat vector ``v``."""
        v = self._check_vec("v", v)
        self.n_matvecs += 1
        out = self._compiled("single", v)
        if out is not None:
            return out
        return self._timed_eager(lambda: self._eager_matvec(v), 1)

    def _eager_matvec(self, v: Tensor) -> Tensor:
        if self.memory_budget is not None:
            return self._budget_product(v, batched=False)
        if self.cache_graph:
            return sum(self._product(g, v, False) for g in self._all_graphs())
        out = torch.zeros_like(v)
        for c, (x, y) in zip(self._weights, self.batches):
            out += self._product(self._build_graph(c, x, y), v, False)
        return out

    def matmat(self, vs: Tensor) -> Tensor:
        """Products :math:`Gv_i` for the rows of ``vs``; one batched pass when cached."""
        vs = self._check_mat(vs)
        k = vs.shape[0]
        if k > 1:
            out = self._compiled("batched", vs)
            if out is not None:
                self.n_matvecs += k
                return out
        if k > 1 and self.memory_budget is not None:
            self.n_matvecs += k
            return self._timed_eager(lambda: self._budget_product(vs, batched=True), k)
        if self.cache_graph and k > 1:
            self.n_matvecs += k
            return self._timed_eager(
                lambda: sum(self._product(g, vs, True) for g in self._all_graphs()), k
            )
        return torch.stack([self.matvec(v) for v in vs])


@dataclass
class GGNTraceResult:
    r""":math:`\operatorname{tr} G` with its standard error (0 when exact)."""

    trace: float
    stderr: float
    exact: bool
    n_samples: int


def _output_hessian_sqrt(
    loss_fn: Any, z: Tensor, y: Any, check: Callable[[Tensor], None]
) -> Tensor:
    r"""Per-sample :math:`A_i` with :math:`A_i A_i^\top = \nabla^2_{z_i}` of the batch loss.

    The batch loss is a sum (or mean) over samples, so its Hessian in the
    outputs is block-diagonal; each block comes from one batched backward
    pass per output coordinate, its square root from ``eigh`` (negative
    eigenvalues, from a loss that is not convex in the outputs, are clipped).
    """
    n = z.shape[0]
    flat = z.detach().reshape(n, -1)
    k = flat.shape[1]
    zl = flat.clone().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(zl.view_as(z), y)
        check(loss)  # a non-finite loss is refused before any work on it
        gz = torch.autograd.grad(loss, zl, create_graph=True)[0]
        eye = torch.eye(k, dtype=z.dtype, device=z.device).unsqueeze(1).expand(k, n, k)
        cols = torch.autograd.grad(
            gz, zl, eye, is_grads_batched=True, allow_unused=True, materialize_grads=True
        )[0]  # (k, n, k): column j of each sample's Hessian block
    h = cols.permute(1, 2, 0)  # (n, k, k)
    h = (h + h.transpose(1, 2)) / 2
    evals, evecs = torch.linalg.eigh(h)
    return evecs * evals.clamp_min(0).sqrt().unsqueeze(1)  # (n, k, k): A_i = V sqrt(Lambda)


def ggn_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[tuple[Any, Any]],
    *,
    exact: bool = False,
    seed: int | torch.Generator | None = 0,
    params: Sequence[str] | None = None,
    max_batch_size: int | None = 256,
    max_samples: int | None = None,
    reduction: str | None = None,
    progress: bool = False,
) -> GGNTraceResult:
    r"""Trace of the generalised Gauss-Newton matrix from per-sample products.

    ``exact=True``: :math:`\sum_i c_i \lVert J_i^\top A_i\rVert_F^2`, one
    per-sample backward pass per model output (10 for ten classes).
    Default: the unbiased estimate :math:`\sum_i c_i \lVert J_i^\top A_i
    u_i\rVert^2` with a Rademacher :math:`u_i` per sample, one per-sample
    backward pass; its standard error comes from the per-sample terms.

    Per-sample gradients are vectorised with :func:`torch.func.vmap`, which
    needs a model without data-dependent control flow or in-place updates of
    buffers (true in eval mode for standard layers). ``max_batch_size``
    bounds the samples vectorised at once (memory: that many gradients).
    Not the Hessian trace (module docstring), except for networks that are
    piecewise linear in each parameter tensor (ReLU, max-pooling, linear and
    convolution layers, BatchNorm in eval mode, residual sums): there the
    network's own second derivatives have a zero diagonal, so the two traces
    coincide.
    """
    op = CurvatureOperator(
        model,
        loss_fn,
        batches,
        params=params,
        max_batch_size=max_batch_size,
        max_samples=max_samples,
        reduction=reduction,
    )
    gen = _generator(seed)
    params_now = op.unflatten(op.w)
    buffers = dict(model.named_buffers())
    terms: list[Tensor] = []
    weights: list[float] = []
    bar = progress_bar(len(op.batches), progress, "GGN trace")
    with eval_mode(model):
        for c, (x, y) in zip(op._weights, op.batches):
            if not isinstance(x, Tensor):
                raise ValueError("Invalid batches value: ggn_trace needs tensor inputs")
            with torch.no_grad():
                z = functional_call(model, {**buffers, **params_now}, (x,))
            if not isinstance(z, Tensor):
                raise ValueError(
                    f"Invalid model value: the GGN needs one output tensor, got {type(z).__name__}"
                )
            n = batch_size((x, y))
            a = _output_hessian_sqrt(op.loss_fn, z, y, op._check_finite)  # of the chunk loss
            k = a.shape[1]
            if exact:
                dirs = a  # (n, k, k): every column
            else:
                u = torch.randint(0, 2, (n, k, 1), generator=gen).to(a) * 2 - 1
                dirs = a @ u  # (n, k, 1)

            def sample_out(p: dict[str, Tensor], xi: Tensor) -> Tensor:
                return functional_call(model, {**buffers, **p}, (xi.unsqueeze(0),)).reshape(-1)

            def sq_norm(xi: Tensor, di: Tensor) -> Tensor:
                # sum over directions d of |J_i^T d|^2, J_i^T d = grad of <d, z_i(w)>
                def one(d: Tensor) -> Tensor:
                    g = grad(lambda p: sample_out(p, xi) @ d)(params_now)
                    return sum(t.pow(2).sum() for t in g.values())

                return vmap(one, in_dims=1)(di).sum()

            per = vmap(sq_norm)(x, dirs)  # (n,)
            terms.append(per.double())
            weights.append(c)
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    total = sum(w * t.sum() for w, t in zip(weights, terms))
    if exact:
        return GGNTraceResult(float(total), 0.0, True, op.n_samples)
    # the terms are independent given the weights: Var(sum c t_i) = sum c^2 Var(t_i); Var(t_i)
    # is not observable per sample, so estimate it as the spread of the per-sample terms (an
    # upper bound: it also counts the spread of their means across samples)
    var = 0.0
    for w, t in zip(weights, terms):
        if t.numel() > 1:
            var += float(w**2 * t.numel() * t.var())
    return GGNTraceResult(float(total), math.sqrt(var), False, op.n_samples)
