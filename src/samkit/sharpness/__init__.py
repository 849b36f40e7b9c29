r"""Sharpness instruments: Hessian spectrum, worst-case sharpness, landscapes.

All measures are of the mean loss over a fixed set of batches, with the model
in eval mode, and never modify the model:

- :mod:`.hvp`: Hessian-vector products (double backward or torch.func).
- :mod:`.hessian`: top eigenvalues (Lanczos, block Lanczos, power
  iteration), trace (Hutchinson deflated by a growing Lanczos basis, XTrace,
  plain Hutchinson), spectral density (stochastic Lanczos quadrature).
- :mod:`.ggn`: the generalised Gauss-Newton matrix, a cheaper positive
  semi-definite *proxy* of the Hessian (its operator and a per-sample trace),
  labelled ``ggn`` wherever it appears.
- :mod:`.worst_case`: worst-case loss in an L2 or adaptive rho-ball
  (multi-step projected ascent), average-case (Gaussian) sharpness.
- :mod:`.landscape`: filter-normalised 1-D / 2-D landscapes and the linear
  path between two models; :mod:`.plots` draws them (matplotlib, lazily).

:func:`summary` gives the three numbers ``samkit compare`` reports.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor, nn

from ._products import check_budget, check_product
from .ggn import GGNOperator, GGNTraceResult, ggn_trace
from .hessian import (
    DenseOperator,
    DensityResult,
    EigenResult,
    TraceResult,
    _check_int,
    _check_pos,
    _generator,
    block_lanczos,
    hessian_trace,
    lanczos,
    spectral_density,
    top_eigenvalues,
)
from .hvp import CurvatureOperator, HessianOperator, eval_mode, hvp, param_vector
from .landscape import filter_normalized_direction, interpolate, loss_curve, loss_surface
from .worst_case import (
    AverageCaseResult,
    WorstCaseResult,
    average_case_sharpness,
    worst_case_sharpness,
)

__all__ = [
    "summary",
    "HessianOperator",
    "GGNOperator",
    "CurvatureOperator",
    "DenseOperator",
    "hvp",
    "eval_mode",
    "param_vector",
    "lanczos",
    "block_lanczos",
    "top_eigenvalues",
    "hessian_trace",
    "ggn_trace",
    "GGNTraceResult",
    "spectral_density",
    "EigenResult",
    "TraceResult",
    "DensityResult",
    "worst_case_sharpness",
    "average_case_sharpness",
    "WorstCaseResult",
    "AverageCaseResult",
    "filter_normalized_direction",
    "loss_curve",
    "loss_surface",
    "interpolate",
]


def summary(
    model: nn.Module,
    loss_fn: Any,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    seed: int = 0,
    top_k: int = 1,
    trace_samples: int = 16,
    rho: float = 0.05,
    eig_tol: float = 1e-3,
    max_iter: int = 100,
    ascent_steps: int = 10,
    adaptive: bool = False,
    params: Sequence[str] | None = None,
    max_batch_size: int | None = 2048,
    progress: bool = False,
    product: str = "auto",
    memory_budget: int | str | None = None,
) -> dict[str, float]:
    r"""Top Hessian eigenvalue, Hessian trace and worst-case sharpness.

    Returns ``{"hessian_top_eig", "hessian_trace", "worst_case_sharpness"}``
    (plus ``"hessian_eig_2"`` ... ``"hessian_eig_<top_k>"`` when ``top_k > 1``):

    - the largest eigenvalue by Lanczos, to a Ritz-value error bound of ``eig_tol``
      (relative);
    - the trace by Hutchinson with ``trace_samples`` Rademacher probes,
      deflated by the Lanczos basis of the eigenvalue run (free: its
      :math:`Q^\top H Q` is the Lanczos matrix), unbiased;
    - :math:`\max_{\lVert\delta\rVert\le\rho} L(w+\delta) - L(w)` by
      ``ascent_steps`` steps of projected ascent (``adaptive``: the ball
      scaled by :math:`|w|`).

    Cost: about ``n_lanczos + trace_samples`` Hessian-vector products and
    ``ascent_steps`` gradients over the batches; a few seconds for a
    5k-parameter network on 1000 samples on one CPU core. ``progress`` shows a
    bar per stage (products, then ascent steps).

    ``product`` (``"auto"``, ``"eager"``, ``"compiled"``) and ``memory_budget``
    (bytes, ``"auto"`` or ``None``) go to the :class:`HessianOperator`: whether its
    products are ``torch.compile``'d, and how many bytes of gradient graphs it may
    keep (the rest rebuilt per product). They change the cost, not the results
    (beyond rounding). Build the operator yourself to read ``op.product_info``.
    """
    top_k = _check_int("top_k", top_k, 1)
    trace_samples = _check_int("trace_samples", trace_samples, 1)
    # the worst case's arguments too: they were checked after the eigenvalues and the trace
    rho = _check_pos("rho", rho)
    ascent_steps = _check_int("ascent_steps", ascent_steps, 1)
    check_product(product)  # before the batches are read
    check_budget(memory_budget)
    gen = _generator(seed)
    op = HessianOperator(
        model,
        loss_fn,
        batches,
        params=params,
        max_batch_size=max_batch_size,
        product=product,
        memory_budget=memory_budget,
    )
    eig = top_eigenvalues(op, top_k, tol=eig_tol, max_iter=max_iter, seed=gen, progress=progress)
    tr = hessian_trace(
        op,
        n_probes=trace_samples,
        basis=eig.basis,
        tridiagonal=eig.tridiagonal,
        seed=gen,
        progress=progress,
    )
    op.release()  # the ascent below needs no second-order graph
    wc = worst_case_sharpness(
        model,
        loss_fn,
        None,
        rho=rho,
        adaptive=adaptive,
        steps=ascent_steps,
        seed=seed,
        op=op,
        progress=progress,
    )
    out = {
        "hessian_top_eig": float(eig.eigenvalues[0]),
        "hessian_trace": float(tr.trace),
        "worst_case_sharpness": float(wc.sharpness),
    }
    for i, v in enumerate(eig.eigenvalues[1:], start=2):
        out[f"hessian_eig_{i}"] = float(v)
    return out
