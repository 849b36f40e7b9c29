r"""Spectrum of the loss Hessian from Hessian-vector products.

- :func:`top_eigenvalues`: the largest (algebraic) eigenvalues by Lanczos with
  full re-orthogonalisation (default) or by power iteration with deflation
  (as PyHessian, arXiv 1912.07145). Lanczos converges in far fewer products:
  its error after :math:`m` steps falls like
  :math:`\big(1/T_{m}(1 + 2\gamma)\big)^2` with :math:`\gamma` the relative gap
  (Chebyshev polynomial), power iteration's like :math:`(\lambda_2/\lambda_1)^{2m}`.
- :func:`hessian_trace`: Hutchinson's estimator
  :math:`\operatorname{tr} H = \mathbb{E}[z^\top H z]`, :math:`z` Rademacher,
  with the variance cut by deflation: for an orthonormal basis :math:`Q` of a
  Krylov space (built from its own random start, so independent of the probes)

  .. math::

      \operatorname{tr} H = \operatorname{tr}(Q^\top H Q)
      + \mathbb{E}\big[z^\top (I - QQ^\top) H (I - QQ^\top) z\big],

  the first term exact (it is the trace of the Lanczos tridiagonal matrix),
  the second an unbiased Hutchinson estimate of what the few large outlier
  eigenvalues of a network Hessian leave behind (Hutch++, Meyer et al.,
  arXiv 2010.09649; with a Krylov basis as in Chen & Hallman, arXiv
  2205.01736). ``deflation_steps=0`` is plain Hutchinson.
- :func:`spectral_density`: stochastic Lanczos quadrature (Lin, Saad & Yang
  2016; Ghorbani et al., arXiv 1901.10159): Ritz values :math:`\theta_i` and
  weights :math:`\tau_i = s_{1i}^2` of several Lanczos runs, smoothed with a
  Gaussian kernel into a density that integrates to 1.

The functions take a :class:`~samkit.sharpness.hvp.HessianOperator` or any
object with ``dim``, ``dtype``, ``device`` and ``matvec(v)``.

Memory: the Krylov and deflation bases keep one vector of length ``dim`` per
product. Under a row limit (``max_rows=``, or the operator's
``memory_budget``: :func:`rows_allowed`) that cannot hold them,
:func:`top_eigenvalues` and :func:`hessian_trace` run a lean path instead
(``result.path == "lean"``; their docstrings say how, and what it costs);
without a limit, or with one that holds the full path, nothing changes.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import torch
from torch import Tensor

from .._checks import check_int as _check_int
from .._checks import check_pos as _check_pos
from ._progress import Ticker

__all__ = [
    "EigenResult",
    "TraceResult",
    "DensityResult",
    "lanczos",
    "block_lanczos",
    "top_eigenvalues",
    "hessian_trace",
    "spectral_density",
    "DenseOperator",
    "rows_allowed",
]


class Operator(Protocol):
    dim: int
    dtype: torch.dtype
    device: torch.device

    def matvec(self, v: Tensor) -> Tensor: ...


class DenseOperator:
    """A symmetric matrix as an operator (tests, quadratics, small problems)."""

    def __init__(self, matrix: Tensor) -> None:
        if (
            not isinstance(matrix, Tensor)
            or matrix.dim() != 2
            or matrix.shape[0] != matrix.shape[1]
        ):
            raise ValueError("Invalid matrix value: expected a square 2-D tensor")
        self.matrix = matrix
        self.dim = matrix.shape[0]
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.n_matvecs = 0

    def matvec(self, v: Tensor) -> Tensor:
        self.n_matvecs += 1
        return self.matrix @ v

    __matmul__ = matvec


class _Deflated:
    """(I - QQ^T) H (I - QQ^T) for orthonormal rows Q."""

    def __init__(self, op: Operator, q: Tensor | None) -> None:
        self.op, self.q = op, q
        self.dim, self.dtype, self.device = op.dim, op.dtype, op.device

    def project(self, v: Tensor) -> Tensor:
        if self.q is None or self.q.shape[0] == 0:
            return v
        # twice: one Gram-Schmidt pass loses orthogonality in float32
        v = v - self.q.T @ (self.q @ v)
        return v - self.q.T @ (self.q @ v)

    def matvec(self, v: Tensor) -> Tensor:
        return self.project(self.op.matvec(self.project(v)))


@dataclass
class EigenResult:
    """Top eigenvalues (descending), their unit eigenvectors (rows), cost."""

    eigenvalues: list[float]
    eigenvectors: Tensor
    n_matvecs: int
    converged: bool
    residuals: list[float] = field(default_factory=list)
    basis: Tensor | None = None  # the Krylov basis of the first run (rows), reusable for deflation
    tridiagonal: Tensor | None = None  # its Lanczos matrix T = basis H basis^T
    product: dict | None = None  # the operator's product path (``op.product_info``) at the end
    path: str = "full"  # "full": Lanczos kept its basis; "lean": no basis (memory budget)
    rows: int = 0  # most vectors of length dim kept at once (basis, eigenvectors)


@dataclass
class TraceResult:
    """Hutchinson estimate of tr H with its standard error."""

    trace: float
    stderr: float
    n_matvecs: int
    n_probes: int
    exact_part: float  # tr(Q^T H Q) of the deflation basis
    samples: list[float] = field(default_factory=list)
    product: dict | None = None  # the operator's product path (``op.product_info``) at the end
    path: str = "full"  # "lean": the deflation basis (or XTrace's vectors) cut to a memory budget
    rows: int = 0  # most vectors of length dim kept at once (deflation basis, XTrace's sketches)


_R = TypeVar("_R", EigenResult, TraceResult)


@dataclass
class DensityResult:
    """Eigenvalue density: Ritz nodes/weights per run and the smoothed curve."""

    nodes: list[list[float]]
    weights: list[list[float]]
    grid: Tensor
    density: Tensor
    n_matvecs: int


def _generator(seed: int | torch.Generator | None) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise ValueError(f"Invalid seed value: {seed!r} (must be an int or None)")
    g = torch.Generator()
    if seed is None:
        g.seed()  # a fresh seed for this generator only (torch.seed() reseeded the global RNG)
    else:
        g.manual_seed(int(seed))
    return g


def _randn(op: Operator, gen: torch.Generator) -> Tensor:
    return torch.randn(op.dim, generator=gen, dtype=op.dtype).to(op.device)


def _rademacher(op: Operator, gen: torch.Generator, k: int | None = None) -> Tensor:
    shape = (op.dim,) if k is None else (k, op.dim)
    # drawn in the operator's dtype: the same signs as int64 draws (one 32-bit draw per
    # entry either way), without an int64 copy eight bytes an entry wide
    return (torch.randint(0, 2, shape, generator=gen, dtype=op.dtype) * 2 - 1).to(op.device)


class _Rows:
    """Basis rows in one buffer that grows by half when full: taking the stacked
    basis each step costs nothing (a fresh ``torch.stack`` would copy k rows of
    the model's size per step). By half, not double: a 10.7M-parameter model's
    row is 43 MB, and a doubled buffer held up to twice the basis."""

    def __init__(self, first: Tensor, capacity: int | None = None) -> None:
        # a capacity (rows under a memory budget) allocates it once and never grows
        self.buf = first.new_empty(capacity or 4, first.numel())
        self.buf[0] = first
        self.n = 1

    def append(self, row: Tensor) -> None:
        if self.n == self.buf.shape[0]:
            grown = self.buf.new_empty(self.n + max(4, self.n // 2), self.buf.shape[1])
            grown[: self.n] = self.buf
            self.buf = grown
        self.buf[self.n] = row
        self.n += 1

    @property
    def rows(self) -> Tensor:
        return self.buf[: self.n]

    @property
    def last(self) -> Tensor:
        return self.buf[self.n - 1]


#: No Lanczos run stops on ``tol`` with a Krylov basis smaller than this. A
#: Ritz pair can look converged on a lower eigenvalue while the start vector's
#: component along the top eigenvector is still small: on random 60 x 60
#: matrices with eigenvalues 10, 7 and 58 in [0, 5], a bare residual test at
#: tol 1e-2 reported about 7 for 0.9 % of start vectors; with this floor none
#: of 3000 did (tests/test_hessian.py). ``m == dim`` or an invariant subspace
#: still stops earlier.
MIN_KRYLOV = 8


def ritz_error_bounds(theta: Tensor, res: Tensor) -> Tensor:
    r"""A-posteriori error bounds of Ritz values from their residuals.

    Each Ritz value :math:`\theta_i` with residual bound :math:`r_i` is within
    :math:`r_i` of an eigenvalue (Kahan-Parlett); when the other eigenvalues are
    at least :math:`\delta_i > r_i` away, within :math:`r_i^2/\delta_i`
    (Kato-Temple; Parlett, *The Symmetric Eigenvalue Problem*, section 11).
    :math:`\delta_i` is estimated conservatively from the other Ritz values,
    each widened by its own residual: :math:`\min_{j\ne i} |\theta_i-\theta_j| - r_j`.
    The quadratic bound is what lets Lanczos stop as soon as the value is
    accurate, rather than when its vector is.
    """
    n = theta.numel()
    if n < 2:
        return res
    dist = (theta[:, None] - theta[None, :]).abs() - res[None, :]
    dist.fill_diagonal_(float("inf"))
    delta = dist.min(dim=1).values
    quad = torch.where(delta > res, res.square() / delta.clamp_min(1e-300), res)
    return torch.minimum(res, quad)


def _dot64(a: Tensor, b: Tensor) -> float:
    """``a . b`` accumulated in float64.

    A float32 dot product over a million entries carries a rounding error of
    about sqrt(n) eps |a||b| ~ 1e-4 relative, and how much depends on the CPU's
    kernels (AVX2, AVX-512) and thread count. In Lanczos's alphas and betas (the
    entries of T) it moved a 1M-parameter ResNet's top Ritz value by 2e-4,
    *above* the top eigenvalue; in the re-orthogonalisation it left the basis
    non-orthogonal at that level and a million-dimensional float32 case 5.6e-5
    *below* (tests/test_hessian.py). So every sum over the parameters that
    decides a Ritz value is accumulated in float64: the entries of T here, the
    second re-orthogonalisation pass in :func:`lanczos` (the first, in the
    operator's dtype, removes the bulk; the second removes what its rounding
    left, to float64 accuracy) and block Lanczos's coefficients
    (:func:`_coefficients64`). What is left is the float32 rounding of the
    vectors themselves: Ritz values within ~1e-7 relative of the operator's, on
    any CPU.
    """
    return float(a.double() @ b.double())


def _coefficients64(rows: Tensor, w: Tensor) -> Tensor:
    """``rows @ w`` accumulated in float64 (see :func:`_dot64`), in ``w``'s dtype."""
    if rows.dtype == torch.float64:
        return rows @ w
    w64 = w.double()
    # 16 rows at a time (fewer above 2M entries, at most 256 MB): a float64 copy of
    # the whole basis could be gigabytes, and 16 rows of a 10.7M-parameter model 1.4 GB
    per_block = max(1, min(16, 2**28 // (8 * max(1, rows.shape[1]))))
    return torch.cat([block.double() @ w64 for block in rows.split(per_block)]).to(w.dtype)


def _tridiagonal(alphas: list[float], betas: list[float]) -> Tensor:
    """Lanczos's :math:`T` (float64) from its diagonal and the first ``len(alphas) - 1``
    off-diagonal entries of ``betas`` (any beyond couple a vector not yet in the basis)."""
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if len(alphas) > 1:
        off = torch.tensor(betas[: len(alphas) - 1], dtype=torch.float64)
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    return t


def lanczos(
    op: Operator,
    v0: Tensor,
    max_steps: int,
    *,
    k: int = 1,
    tol: float | None = None,
    project: Callable[[Tensor], Tensor] | None = None,
    on_step: Callable[[], None] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    r"""Lanczos with full re-orthogonalisation, stopping once converged.

    Builds an orthonormal Krylov basis :math:`V` (rows) of
    :math:`\{v_0, Hv_0, H^2v_0, \dots\}` and the tridiagonal
    :math:`T = V H V^\top`. With ``tol``, stops when the error bound of each
    of the top ``k`` Ritz values (:func:`ritz_error_bounds` from the residuals
    :math:`\beta_m |s_{m,i}|`) is at most ``tol`` times :math:`|\theta_i|`.

    Returns ``(theta, s, basis, T, residuals)``: Ritz values (descending),
    their coordinates in the basis, the basis (rows), ``T``, and the residual
    bounds.
    """
    project = project or (lambda v: v)
    v = project(v0)
    v = v / v.norm()
    basis = _Rows(v)
    alphas: list[float] = []
    betas: list[float] = []
    theta = s = res = None
    t = torch.zeros(0, 0, dtype=torch.float64)
    for m in range(1, max_steps + 1):
        w = op.matvec(basis.last)
        if on_step is not None:
            on_step()
        alpha = _dot64(w, basis.last)
        alphas.append(alpha)
        vs = basis.rows
        # full re-orthogonalisation, twice ("twice is enough", Parlett); the
        # second pass's coefficients summed in float64 (see _dot64)
        w = w - vs.T @ (vs @ w)
        w = w - vs.T @ _coefficients64(vs, w)
        w = project(w)
        beta = float(w.double().norm())
        t = _tridiagonal(alphas, betas)
        evals, evecs = torch.linalg.eigh(t)
        theta, s = evals.flip(0), evecs.flip(1)
        res = beta * s[-1].abs()
        kk = min(k, m)
        scale = theta[:kk].abs().clamp_min(1e-30)
        invariant = beta <= 1e-10 * max(1.0, float(theta.abs().max()))
        bound = ritz_error_bounds(theta, res)
        if (
            invariant
            or m == op.dim
            or (
                tol is not None
                and m >= max(k, MIN_KRYLOV)
                and bool((bound[:kk] <= tol * scale).all())
            )
        ):
            break
        if m < max_steps:
            betas.append(beta)
            basis.append(w / beta)
    return theta, s, basis.rows.clone(), t, res


# ------------------------------------------------------------ memory-bounded path
#: Entries per float64 block of the lean path's sums: 8 MiB of float64 at a time,
#: where a whole float64 copy of a 10.7M-parameter vector is 85 MB.
_LEAN_CHUNK = 2**20


def _dot64_lean(a: Tensor, b: Tensor) -> float:
    """``a . b`` accumulated in float64 (see :func:`_dot64`), ``_LEAN_CHUNK`` entries at a time."""
    acc = torch.zeros((), dtype=torch.float64, device=a.device)
    for i in range(0, a.numel(), _LEAN_CHUNK):
        acc += a[i : i + _LEAN_CHUNK].double() @ b[i : i + _LEAN_CHUNK].double()
    return float(acc)


def _norm64_lean(a: Tensor) -> float:
    return math.sqrt(max(_dot64_lean(a, a), 0.0))


def rows_allowed(op: Operator, max_rows: int | None = None) -> int | None:
    """Vectors of length ``op.dim`` an instrument may keep: ``max_rows``, else what the
    operator's ``memory_budget`` holds (bytes over one vector's), else ``None`` (no limit)."""
    if max_rows is not None:
        return _check_int("max_rows", max_rows, 0)
    budget = getattr(op, "memory_budget", None)
    if budget is None or isinstance(budget, bool) or not isinstance(budget, int):
        return None
    row = op.dim * torch.empty(0, dtype=op.dtype).element_size()
    return budget // max(row, 1)


class _Recurrence:
    r"""Lanczos's three-term recurrence holding two vectors, :math:`q_{j-1}` and :math:`q_j`.

    :math:`\beta_j q_{j+1} = Hq_j - \alpha_j q_j - \beta_{j-1} q_{j-1}`, then once more
    against :math:`q_j` and :math:`q_{j-1}` (local re-orthogonalisation: what float32
    rounding of the subtraction left). ``step(alpha, beta)`` with given coefficients
    replays a recorded run (the eigenvector pass)."""

    def __init__(self, v0: Tensor, op: Operator, project: Callable[[Tensor], Tensor]) -> None:
        self.op, self.project = op, project
        v = project(v0)
        self.q = v / _norm64_lean(v)
        self.q_prev: Tensor | None = None
        self.beta_prev = 0.0
        self.w: Tensor | None = None

    def step(self, alpha: float | None = None, beta: float | None = None) -> tuple[float, float]:
        """One product: the next (unnormalised) vector in ``self.w``; returns alpha, beta."""
        hq = self.op.matvec(self.q)
        if alpha is None:
            alpha = _dot64_lean(hq, self.q)
        w = torch.sub(hq, self.q, alpha=alpha)  # a new tensor: the operator's output is its own
        del hq
        if self.q_prev is not None:
            w.sub_(self.q_prev, alpha=self.beta_prev)
        w.sub_(self.q, alpha=_dot64_lean(w, self.q))
        if self.q_prev is not None:
            w.sub_(self.q_prev, alpha=_dot64_lean(w, self.q_prev))
        w = self.project(w)
        self.w = w
        return alpha, (_norm64_lean(w) if beta is None else beta)

    def advance(self, beta: float) -> None:
        assert self.w is not None
        self.q_prev, self.q = self.q, self.w.div_(beta)
        self.beta_prev, self.w = beta, None


def _lean_lanczos(
    op: Operator,
    v0: Tensor,
    max_steps: int,
    *,
    tol: float,
    vector_tol: bool,
    project: Callable[[Tensor], Tensor],
    on_step: Callable[[], None] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, list[float], list[float]]:
    """:func:`lanczos` for the top value without the basis: stops on the same rule.

    ``vector_tol``: stop on the residual bound itself instead of
    :func:`ritz_error_bounds` (the eigenvector deflates later runs).
    Returns ``(theta, s, T, residuals, alphas, betas)``."""
    rec = _Recurrence(v0, op, project)
    del v0  # the recurrence holds its own copy: one vector less for the whole run
    alphas: list[float] = []
    betas: list[float] = []
    theta = s = res = None
    t = torch.zeros(0, 0, dtype=torch.float64)
    for m in range(1, max_steps + 1):
        alpha, beta = rec.step()
        if on_step is not None:
            on_step()
        alphas.append(alpha)
        t = _tridiagonal(alphas, betas)
        evals, evecs = torch.linalg.eigh(t)
        theta, s = evals.flip(0), evecs.flip(1)
        res = beta * s[-1].abs()
        invariant = beta <= 1e-10 * max(1.0, float(theta.abs().max()))
        bound = res if vector_tol else ritz_error_bounds(theta, res)
        if (
            invariant
            or m == op.dim
            or (m >= MIN_KRYLOV and float(bound[0]) <= tol * max(abs(float(theta[0])), 1e-30))
        ):
            break
        if m < max_steps:
            betas.append(beta)
            rec.advance(beta)
    return theta, s, t, res, alphas, betas


def _lean_vector(
    op: Operator,
    v0: Tensor,
    project: Callable[[Tensor], Tensor],
    coords: Tensor,
    alphas: list[float],
    betas: list[float],
    out: Tensor,
    on_step: Callable[[], None] | None = None,
) -> Tensor:
    r""":math:`y = \sum_j s_j q_j` into ``out``, replaying the recurrence (``len(alphas) - 1`` products)."""
    rec = _Recurrence(v0, op, project)
    del v0
    y = out.zero_()
    m = len(alphas)
    for j in range(m):
        y.add_(rec.q, alpha=float(coords[j]))
        if j < m - 1:
            rec.step(alphas[j], betas[j])
            if on_step is not None:
                on_step()
            rec.advance(betas[j])
    return y


def _matmat(op: Operator, vs: Tensor) -> Tensor:
    """Rows ``H v_i``: one vectorised call when the operator has ``matmat``."""
    mm = getattr(op, "matmat", None)
    if mm is not None and vs.shape[0] > 1:
        return mm(vs)
    return torch.stack([op.matvec(v) for v in vs])


def _orthonormal_rows(w: Tensor, basis: Tensor | None, rel: float = 1e-10) -> tuple[Tensor, Tensor]:
    """Rows of ``w`` made orthogonal to ``basis`` (twice) and orthonormal (QR).

    Returns ``(q, r)`` with ``w' = r^T q`` for the orthogonalised ``w'``;
    directions whose norm falls below ``rel`` times the largest input norm
    (linearly dependent ones) are dropped from ``q`` (``r`` keeps their rows
    at zero) so the basis stays orthonormal.
    """
    scale = float(w.double().norm(dim=1).max()) if w.numel() else 0.0
    if basis is not None and basis.shape[0]:
        for _ in range(2):
            coeff = torch.stack([_coefficients64(basis, row) for row in w])
            w = w - coeff @ basis
    # QR in float64 (see _dot64), the rows back in the operator's dtype
    q, r = torch.linalg.qr(w.double().T)  # w.T = q r: columns
    keep = r.diagonal().abs() > rel * max(scale, 1e-300)
    return q.T[keep].to(w.dtype), r[keep].to(w.dtype)


def block_lanczos(
    op: Operator,
    v0: Tensor,
    max_steps: int,
    *,
    k: int = 1,
    tol: float | None = None,
    project: Callable[[Tensor], Tensor] | None = None,
    on_step: Callable[[], None] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    r"""Block Lanczos with full re-orthogonalisation, stopping once converged.

        From a block of ``b`` start vectors (the rows of ``v0``) it builds an
        orthonormal basis :math:`V` (rows) of the block Krylov space
        :math:`\{V_0, HV_0, H^2V_0, \dots\}` and the block-tridiagonal
        :math:`T = V H V^	op`: each step multiplies a whole block at once
        (``op.matmat``: one vectorised pass), and a block of ``b`` vectors sees
        an eigenvalue of multiplicity up to ``b`` (Golub & Underwood 1977; Saad,
        *Numerical Methods for Large Eigenvalue Problems*, section 6.7). With
        ``b = 1`` this is :func:`lanczos`.

        The residual of the Ritz pair :math:`(	heta_i, Vs_i)` is
        :math:`\lVert B_m\, s_{i,	ext{last}}
    Vert` (:math:`B_m` the last QR
        factor, :math:`s_{i,	ext{last}}` the last block's coordinates); the stop
        rule is that of :func:`lanczos`. ``max_steps`` counts blocks. Returns
        ``(theta, s, basis, T, residuals)`` like :func:`lanczos`.
    """
    project = project or (lambda v: v)
    if v0.dim() != 2 or v0.shape[1] != op.dim:
        raise ValueError(f"Invalid v0 value: expected a block of shape (b, {op.dim})")
    block, _ = _orthonormal_rows(project(v0.T).T, None)
    blocks = [block]
    size = block.shape[0]
    t = torch.zeros(0, 0, dtype=torch.float64)
    theta = s = res = None
    for m in range(1, max_steps + 1):
        w = _matmat(op, block)
        if on_step is not None:
            on_step()
        basis = torch.cat(blocks)
        # (b, n): rows of T for this block, summed in float64 (see _dot64)
        coeff = torch.stack([_coefficients64(basis, row).double() for row in w])
        n = basis.shape[0]
        t_new = torch.zeros(n, n, dtype=torch.float64)
        t_new[: t.shape[0], : t.shape[0]] = t
        b = block.shape[0]
        t_new[n - b :, :] = coeff
        t_new[:, n - b :] = coeff.T
        t_new = (t_new + t_new.T) / 2
        t = t_new
        w = w - coeff.to(w.dtype) @ basis
        nxt, r = _orthonormal_rows(project(w.T).T, basis)
        evals, evecs = torch.linalg.eigh(t)
        theta, s = evals.flip(0), evecs.flip(1)
        last = s[n - b :, :]  # (b, n) coordinates of each Ritz vector in the last block
        res = (r.double() @ last).norm(dim=0) if r.numel() else torch.zeros(n, dtype=torch.float64)
        kk = min(k, n)
        scale = theta[:kk].abs().clamp_min(1e-30)
        bound = ritz_error_bounds(theta, res)
        invariant = nxt.shape[0] == 0
        if (
            invariant
            or n >= op.dim
            or (
                tol is not None
                and n >= max(k, MIN_KRYLOV)
                and bool((bound[:kk] <= tol * scale).all())
            )
            or m == max_steps
        ):
            break
        # coupling B between this block and the next goes into T when the next block's rows do
        block = nxt
        blocks.append(block)
        size += block.shape[0]
    return theta, s, torch.cat(blocks), t, res


def top_eigenvalues(
    op: Operator,
    k: int = 1,
    *,
    method: str = "lanczos",
    tol: float = 1e-3,
    max_iter: int = 100,
    block_size: int = 1,
    seed: int | torch.Generator | None = 0,
    progress: bool = False,
    eigenvectors: bool = True,
    max_rows: int | None = None,
) -> EigenResult:
    r"""The ``k`` largest eigenvalues of the Hessian and their eigenvectors.

    Args:
        op: a :class:`~samkit.sharpness.hvp.HessianOperator` (or any operator).
        k: how many.
        method: ``"lanczos"`` (default) or ``"power"`` (power iteration, one
            eigenvalue at a time, deflating those found, as PyHessian).
        tol: relative tolerance. Lanczos: the Ritz value's error bound
            (:func:`ritz_error_bounds`: the residual
            :math:`\lVert H y - \theta y\rVert`, or its square over the gap to
            the other Ritz values when smaller) is at most ``tol`` :math:`|\theta|`.
            Power: relative change of the Rayleigh quotient between two
            iterations (PyHessian's rule).
        max_iter: products per eigenvalue (power) or Lanczos steps per run.
        block_size: vectors per Lanczos step (block Lanczos, :func:`block_lanczos`:
            one vectorised product per step, and eigenvalues of multiplicity up
            to ``block_size`` found in one run). On a CPU a batched product
            costs as much per vector as single ones and single-vector Lanczos
            needs fewer products in all, so 1 (default) is fastest there;
            larger blocks pay off on accelerators.
        seed: start vectors.
        progress: show a progress bar (products done).
        eigenvectors: return the eigenvectors. Only the lean path (below)
            pays for them, with a second pass; without them its
            ``eigenvectors`` is empty (shape ``(0, dim)``).
        max_rows: vectors of length ``dim`` the computation may keep (the
            Krylov basis and the eigenvectors), default: what the operator's
            ``memory_budget`` holds (:func:`rows_allowed`), else no limit.

    **Memory.** Lanczos keeps its Krylov basis: one vector per product (43 MB
    for a 10.7M-parameter float32 model). When the rows allowed (``max_rows``,
    or the operator's ``memory_budget`` over one vector's bytes) cannot hold a
    full run (``max_iter * block_size + k`` rows), the *lean* path runs
    instead (``result.path == "lean"``, ``result.rows`` the rows it kept), as
    little memory as power iteration: the three-term recurrence keeps
    :math:`q_{j-1}, q_j` and the next vector, nothing else (its sums in float64
    a block at a time), and :math:`T` (a few numbers a step). Without the
    basis the recurrence loses orthogonality as Ritz values converge, which
    only duplicates converged values ("ghosts", Paige 1976): a Ritz value's
    residual bound :math:`\beta_m |s_{m,i}|` still bounds its distance to an
    eigenvalue to rounding, and the top Ritz value cannot pass the top
    eigenvalue, so it stops on the same rule at the same point as the full
    path (to rounding). It finds the values one at a time: a run for the top
    of the operator deflated by the eigenvectors found, for ``k > 1`` with
    each vector that deflates a later run converged to its residual (not its
    quadratic bound: a ghost could look like a second eigenvalue, and a
    deflating vector's error enters the next values). An eigenvector is
    :math:`\sum_j s_j q_j`, assembled by replaying the recurrence from the
    same start (``m - 1`` more products for an ``m``-step run). So the cost is
    the full path's for ``k = 1`` without eigenvectors, twice it with them,
    and about two runs per eigenvalue for ``k > 1``; ``block_size`` is not
    used, and ``result.basis`` is ``None`` (a trace then builds its own
    deflation basis, within the same budget).

    Lanczos finds all of the top ``k`` in one run; because one Krylov space
    sees a repeated eigenvalue only once, for ``k > 1`` it then runs again on
    the operator deflated by what was found, and merges anything larger,
    until a run finds nothing above the ``k``-th value.

    Power iteration converges to the eigenvalue of largest *magnitude*
    (PyHessian's answer); Lanczos returns the largest *algebraic* ones. They
    agree when the top of the spectrum dominates, as near a minimum.
    """
    k = _check_int("k", k, 1)
    if k > op.dim:
        raise ValueError(f"Invalid k value: {k} (the Hessian has only {op.dim} eigenvalues)")
    tol = _check_pos("tol", tol)
    max_iter = _check_int("max_iter", max_iter, 1)
    block_size = _check_int("block_size", block_size, 1)
    if method not in ("lanczos", "power"):
        raise ValueError(f"Invalid method value: {method!r} (expected 'lanczos' or 'power')")
    eigenvectors = bool(eigenvectors)
    rows = rows_allowed(op, max_rows)
    gen = _generator(seed)
    counted = _Counting(op)
    ticker = Ticker(counted, progress, "top eigenvalues")
    try:
        if method == "power":
            return _stamp(_power(counted, k, tol, max_iter, gen, ticker), op)
        if rows is not None and rows < min(max_iter, op.dim) * block_size + k:
            return _stamp(_lean_top(counted, k, tol, max_iter, eigenvectors, gen, ticker), op)
        return _stamp(_lanczos_top(counted, k, tol, max_iter, block_size, gen, ticker), op)
    finally:
        ticker.close()


def _stamp(result: _R, op: Operator) -> _R:
    """Record the operator's product path (eager / compiled, compile time) in the result."""
    result.product = getattr(op, "product_info", None)
    return result


class _Counting:
    """Counts the products an algorithm asks of an operator."""

    def __init__(self, op: Operator) -> None:
        self.op = op
        self.dim, self.dtype, self.device = op.dim, op.dtype, op.device
        self.n_matvecs = 0

    def matvec(self, v: Tensor) -> Tensor:
        self.n_matvecs += 1
        return self.op.matvec(v)

    def matmat(self, vs: Tensor) -> Tensor:
        self.n_matvecs += vs.shape[0]
        mm = getattr(self.op, "matmat", None)
        if mm is not None:
            return mm(vs)
        return torch.stack([self.op.matvec(v) for v in vs])


def _lanczos_top(
    counted: _Counting,
    k: int,
    tol: float,
    max_iter: int,
    block_size: int,
    gen: torch.Generator,
    ticker: Ticker,
) -> EigenResult:
    op = counted

    vals: list[float] = []
    vecs: list[Tensor] = []
    ress: list[float] = []
    converged = True
    first_basis = first_t = None
    most = 0  # rows kept at once: this run's basis, the first run's, the vectors found
    for _ in range(k + 1):  # each extra run adds at least one value, or ends the loop
        q = torch.stack(vecs) if vecs else None
        defl = _Deflated(counted, q)
        want = k if not vecs else 1
        steps = min(max_iter, op.dim - len(vecs))
        if block_size == 1:
            theta, s, basis, t, res = lanczos(
                counted,
                _randn(op, gen),
                steps,
                k=want,
                tol=tol,
                project=defl.project,
                on_step=ticker.update,
            )
        else:
            b = min(block_size, op.dim - len(vecs))
            v0 = torch.randn(b, op.dim, generator=gen, dtype=op.dtype).to(op.device)
            theta, s, basis, t, res = block_lanczos(
                counted, v0, steps, k=want, tol=tol, project=defl.project, on_step=ticker.update
            )
        held = basis.shape[0] + len(vecs)
        if first_basis is None:
            first_basis, first_t = basis, t
        else:
            held += first_basis.shape[0]
        most = max(most, held)
        got = min(want, theta.numel())
        ok = bool(
            (ritz_error_bounds(theta, res)[:got] <= tol * theta[:got].abs().clamp_min(1e-30)).all()
        )
        converged = converged and ok
        new_vals = [float(x) for x in theta[:got]]
        if not new_vals:
            break  # the deflated space gave nothing more
        if (
            vecs
            and len(vals) >= k
            and new_vals[0] <= sorted(vals, reverse=True)[k - 1] + tol * abs(new_vals[0])
        ):
            break  # nothing missed above the k-th value (a run that closed early found < k)
        y = s[:, :got].T.to(basis.dtype) @ basis
        y = defl.project(y.T).T
        for i in range(got):
            yi = y[i] - (torch.stack(vecs).T @ (torch.stack(vecs) @ y[i]) if vecs else 0)
            vecs.append(yi / yi.norm())
            vals.append(new_vals[i])
            ress.append(float(res[i]))
        if k == 1 or len(vecs) >= op.dim or block_size >= k:
            break  # a block of >= k vectors sees multiplicities up to its size: no re-run
    order = sorted(range(len(vals)), key=lambda i: -vals[i])[:k]
    return EigenResult(
        eigenvalues=[vals[i] for i in order],
        eigenvectors=torch.stack([vecs[i] for i in order]),
        n_matvecs=counted.n_matvecs,
        converged=converged,
        residuals=[ress[i] for i in order],
        basis=first_basis,
        tridiagonal=first_t,
        rows=max(most, len(vecs)),
    )


def _lean_top(
    counted: _Counting,
    k: int,
    tol: float,
    max_iter: int,
    eigenvectors: bool,
    gen: torch.Generator,
    ticker: Ticker,
) -> EigenResult:
    """The top ``k`` without a Krylov basis (:func:`top_eigenvalues`, Memory)."""
    op = counted
    vals: list[float] = []
    ress: list[float] = []
    keep = k if eigenvectors else k - 1  # the vectors that deflate, and those returned
    found = torch.zeros(keep, op.dim, dtype=op.dtype, device=op.device)
    n_found = 0
    converged = True
    first_t = None
    for i in range(k):
        defl = _Deflated(counted, found[:n_found])
        steps = min(max_iter, op.dim - n_found)
        state = gen.get_state()  # the start vector is drawn again for its eigenvector
        deflates = i < k - 1
        theta, s, t, res, alphas, betas = _lean_lanczos(
            counted,
            _randn(op, gen),
            steps,
            tol=tol,
            vector_tol=deflates,
            project=defl.project,
            on_step=ticker.update,
        )
        if first_t is None:
            first_t = t
        bound = res[:1] if deflates else ritz_error_bounds(theta, res)[:1]
        converged = converged and float(bound[0]) <= tol * max(abs(float(theta[0])), 1e-30)
        vals.append(float(theta[0]))
        ress.append(float(res[0]))
        if deflates or eigenvectors:
            again = torch.Generator()
            again.set_state(state)
            y = _lean_vector(
                counted,
                _randn(op, again),
                defl.project,
                s[:, 0],
                alphas,
                betas,
                found[n_found],
                ticker.update,
            )
            y = defl.project(y)  # twice against the vectors found, as the full path
            y = y - found[:n_found].T @ (found[:n_found] @ y)
            found[n_found] = y / y.norm()
            n_found += 1
        if n_found >= op.dim:
            break
    order = sorted(range(len(vals)), key=lambda j: -vals[j])
    return EigenResult(
        eigenvalues=[vals[j] for j in order],
        eigenvectors=found[order] if eigenvectors else found[:0].clone(),
        n_matvecs=counted.n_matvecs,
        converged=converged,
        residuals=[ress[j] for j in order],
        basis=None,
        tridiagonal=first_t,
        path="lean",
        rows=keep,
    )


def _power(
    op: _Counting, k: int, tol: float, max_iter: int, gen: torch.Generator, ticker: Ticker
) -> EigenResult:
    vals: list[float] = []
    vecs: list[Tensor] = []
    converged = True
    for _ in range(k):
        defl = _Deflated(op, torch.stack(vecs) if vecs else None)
        v = defl.project(_randn(op, gen))
        v = v / v.norm()
        val = None
        done = False
        for _ in range(max_iter):
            hv = defl.matvec(v)
            ticker.update()
            new = float(hv @ v)
            norm = hv.norm()
            if val is not None and abs(new - val) / (abs(val) + 1e-12) < tol:
                val, done = new, True
                v = hv / norm if norm > 0 else v
                break
            val = new
            if norm == 0:
                done = True
                break
            v = hv / norm
        converged = converged and done
        vals.append(float(val))
        vecs.append(v)
    return EigenResult(vals, torch.stack(vecs), op.n_matvecs, converged)


def hessian_trace(
    op: Operator,
    *,
    method: str = "deflated",
    n_probes: int = 32,
    tol: float | None = None,
    max_probes: int = 1000,
    deflation_steps: int | str = "auto",
    basis: Tensor | None = None,
    tridiagonal: Tensor | None = None,
    block_size: int = 1,
    seed: int | torch.Generator | None = 0,
    progress: bool = False,
    max_rows: int | None = None,
) -> TraceResult:
    r"""Estimate of :math:`\operatorname{tr} H` from products, unbiased, with its standard error.

    Args:
        method: ``"deflated"`` (default): Hutchinson on what a Lanczos basis
            leaves (module docstring); ``"xtrace"``: XTrace (Epperly, Tropp &
            Webber, arXiv 2301.07825), every random vector both sketches the
            top of the spectrum and probes the rest; ``"hutchinson"``: plain
            Hutchinson (PyHessian's estimator).
        n_probes: random vectors when ``tol`` is None. ``"deflated"`` and
            ``"hutchinson"``: one product each (after the ``deflation_steps``);
            ``"xtrace"``: two products each.
        tol: stop instead when the standard error is at most ``tol`` times
            the estimate (at least ``MIN_PROBES`` vectors, at most ``max_probes``).
            ``"xtrace"`` doubles its vectors until then, reusing every
            product made.
        deflation_steps: Lanczos steps building the deflation basis of
            ``"deflated"`` (0: plain Hutchinson). Costs that many products;
            pays off when a few eigenvalues dominate, the rule for networks.
        basis, tridiagonal: a ready orthonormal basis (rows) and
            :math:`Q H Q^\top` (e.g. ``EigenResult.basis`` and
            ``.tridiagonal``) for ``"deflated"``, used instead of building
            one. It must not depend on this call's probes.
        block_size: vectors per call of ``op.matmat`` (vectorised products).
        seed: random vectors and deflation start vector.
        progress: show a progress bar (products done).
        max_rows: vectors of length ``dim`` the estimator may keep, default:
            what the operator's ``memory_budget`` holds (:func:`rows_allowed`),
            else no limit.

    **Memory.** The deflation basis keeps one vector per Lanczos step (the
    growing one also a probe's signs, a byte an entry, per two steps), XTrace
    four per random vector. Under a row limit (``max_rows`` or the operator's
    ``memory_budget``) the basis is cut to what fits (``result.path ==
    "lean"``, ``result.rows`` the rows kept): the growing basis stops growing
    there, a fixed ``deflation_steps`` takes fewer steps, and with room for no
    step it is plain Hutchinson (a probe and its product at a time, as
    PyHessian). The estimate stays unbiased (the basis never depends on the
    probes) and its standard error honest; a smaller basis removes less
    variance, so with ``tol`` more probes are drawn to reach it. XTrace keeps
    at most the vectors that fit (six rows each: its four and a float64 copy
    for the QR), and refuses a limit below two vectors.
    """
    if method not in ("deflated", "xtrace", "hutchinson"):
        raise ValueError(
            f"Invalid method value: {method!r} (expected 'deflated', 'xtrace' or 'hutchinson')"
        )
    n_probes = _check_int("n_probes", n_probes, 1)
    max_probes = _check_int("max_probes", max_probes, 1)
    if deflation_steps != "auto":
        deflation_steps = _check_int("deflation_steps", deflation_steps, 0)
    block_size = _check_int("block_size", block_size, 1)
    if tol is not None:
        tol = _check_pos("tol", tol)
    if method == "hutchinson":
        deflation_steps, basis, tridiagonal = 0, None, None
    rows = rows_allowed(op, max_rows)
    if method == "xtrace" and rows is not None:
        cap = rows // XTRACE_ROWS
        if cap < 2:
            name = "max_rows" if max_rows is not None else "memory_budget"
            raise ValueError(
                f"Invalid {name} value: XTrace keeps {XTRACE_ROWS} vectors of length {op.dim} "
                f"per random vector, at least 2 of them; {rows} fit"
            )
    gen = _generator(seed)
    counted = _Counting(op)
    ticker = Ticker(counted, progress, f"trace ({method})")
    try:
        if method == "xtrace":
            lean = rows is not None and rows // XTRACE_ROWS < (
                n_probes if tol is None else max_probes
            )
            if lean:
                assert rows is not None
                n_probes = min(n_probes, rows // XTRACE_ROWS)
                max_probes = min(max_probes, rows // XTRACE_ROWS)
            res = _xtrace(counted, n_probes, tol, max_probes, block_size, gen, ticker)
            res.path = "lean" if lean else "full"
            return _stamp(res, op)
        return _stamp(
            _deflated_hutchinson(
                counted,
                n_probes,
                tol,
                max_probes,
                deflation_steps,
                basis,
                tridiagonal,
                block_size,
                gen,
                ticker,
                rows,
            ),
            op,
        )
    finally:
        ticker.close()


#: Rows XTrace holds per random vector under a row limit: its W, Y, Q and HQ, and
#: the float64 copy of Y (two float32 rows) its QR makes.
XTRACE_ROWS = 6


def _blocks(op: _Counting, vs: Tensor, block_size: int, ticker: Ticker | None = None) -> Tensor:
    """Rows ``H v_i``, ``block_size`` rows per vectorised call."""
    out = []
    for chunk in vs.split(block_size):
        if chunk.shape[0] == 0:  # (an empty basis: H's range already spanned, or H = 0)
            continue
        out.append(_matmat(op, chunk) if chunk.shape[0] > 1 else op.matvec(chunk[0])[None])
        if ticker is not None:
            ticker.update()
    return torch.cat(out) if out else vs.new_zeros(0, op.dim)


def _deflated_hutchinson(
    op: _Counting,
    n_probes: int,
    tol: float | None,
    max_probes: int,
    deflation_steps: int | str,
    basis: Tensor | None,
    tridiagonal: Tensor | None,
    block_size: int,
    gen: torch.Generator,
    ticker: Ticker,
    rows: int | None = None,
) -> TraceResult:
    lean = False
    if basis is None and deflation_steps == "auto":
        item = torch.empty(0, dtype=op.dtype).element_size()
        max_rows = max(MIN_KRYLOV, GROWING_BASIS_BYTES // (op.dim * item))
        # a Krylov basis never holds more than the start vector and op.dim steps: a budget
        # that holds those cuts nothing (a 195-parameter model under 1 GiB was called lean,
        # and its basis buffer of 0.8 GiB reserved up front)
        max_rows = min(max_rows, op.dim + 1)
        if rows is not None:
            # each basis row, and the signs of a probe per KRYLOV_PER_PROBE rows (a byte
            # an entry, twice while torch.cat copies them) in rows of the operator's dtype
            fit = int(rows / (1 + 2 / (item * KRYLOV_PER_PROBE)))
            if fit < max_rows:
                lean, max_rows = True, fit
        if max_rows >= 2:  # the start vector and one step
            return _growing_deflation(
                op, n_probes, tol, max_probes, block_size, gen, ticker, max_rows, lean
            )
        deflation_steps = 0  # no room for a basis: plain Hutchinson
    if basis is None and deflation_steps > 0:
        steps = min(deflation_steps, op.dim)
        if rows is not None and steps > rows - 1:
            # the basis rows and the next vector, in one buffer that never grows
            lean, steps = True, max(rows - 1, 0)
            if steps > 0:
                krylov = _Krylov(op, _randn(op, gen), capacity=steps + 1)
                while krylov.k < steps and not krylov.exhausted:
                    krylov.step()
                    ticker.update()
                basis, tridiagonal = krylov.rows[: krylov.k], krylov.tridiagonal()
        else:
            _, _, basis, tridiagonal, _ = lanczos(op, _randn(op, gen), steps, on_step=ticker.update)
    elif basis is not None:
        if basis.dim() != 2 or basis.shape[1] != op.dim:
            raise ValueError(f"Invalid basis value: expected rows of length {op.dim}")
        if tridiagonal is None:
            tridiagonal = (basis @ _blocks(op, basis, block_size, ticker).T).double()
    exact = float(torch.diagonal(tridiagonal).sum()) if basis is not None else 0.0
    kept = basis.shape[0] if basis is not None else 0
    path = "lean" if lean else "full"
    if basis is not None and basis.shape[0] >= op.dim:
        return TraceResult(exact, 0.0, op.n_matvecs, 0, exact, [], path=path, rows=kept)
    defl = _Deflated(op, basis)
    samples: list[float] = []
    limit = n_probes if tol is None else max_probes
    while len(samples) < limit:
        b = min(block_size, limit - len(samples))
        z = _rademacher(op, gen, b)
        z = defl.project(z.T).T
        hz = _blocks(op, z, block_size, ticker)
        # z is projected, so z^T H z is the deflated term
        samples.extend((hz * z).sum(1).double().tolist())
        if tol is not None and len(samples) >= MIN_PROBES:
            est = exact + sum(samples) / len(samples)
            if _stderr(samples) <= tol * abs(est):
                break
    est = exact + sum(samples) / len(samples)
    return TraceResult(
        est, _stderr(samples), op.n_matvecs, len(samples), exact, samples, path=path, rows=kept
    )


#: Fewest probes before a standard error is trusted to stop on: from fewer, its
#: own spread is so large that stopping when it happens to be small would
#: stop early too often (a sequential test's bias).
MIN_PROBES = 10

#: Lanczos steps per probe when the deflation basis grows with the probes: the
#: top of a network's spectrum carries most of Hutchinson's variance, so
#: products spent on the basis pay more than probes until it is captured
#: (measured on the MNIST-1D CNN's exact Hessian: 2 per probe beat 1, and a
#: fixed 20 steps, at every budget from 24 to 96 products).
KRYLOV_PER_PROBE = 2

#: The growing basis stops growing at this many bytes (at least ``MIN_KRYLOV``
#: rows); the probes then go on against the basis reached, still unbiased (the
#: basis never depends on them). 1 GiB: never reached by the 1.07M-parameter
#: ResNet's measurements (about 250 rows), 25 rows for a 10.7M-parameter model,
#: whose basis would otherwise grow by 85 MB per probe (and its stored probe
#: signs by 10 MB) until memory ran out.
GROWING_BASIS_BYTES = 2**30


class _Krylov:
    """Lanczos grown one step at a time: basis rows, the tridiagonal, the next vector."""

    def __init__(self, op: Operator, v0: Tensor, capacity: int | None = None) -> None:
        self.op = op
        # q_1 .. q_{k+1}: the last is the next vector
        self.basis = _Rows(v0 / v0.norm(), capacity)
        self.alphas: list[float] = []
        self.betas: list[float] = []  # beta_j couples q_j and q_{j+1}
        self.exhausted = False  # invariant subspace reached or the basis spans everything

    @property
    def k(self) -> int:
        return len(self.alphas)

    @property
    def rows(self) -> Tensor:
        return self.basis.rows

    def step(self) -> Tensor:
        """One product; returns the new next vector (the last row)."""
        q = self.basis.last
        w = self.op.matvec(q)
        self.alphas.append(_dot64(w, q))
        basis = self.basis.rows
        w = w - basis.T @ (basis @ w)
        w = w - basis.T @ (basis @ w)  # twice is enough (Parlett)
        beta = float(w.double().norm())
        scale = max(abs(a) for a in self.alphas)
        self.betas.append(beta)
        if beta <= 1e-10 * max(scale, 1e-30) or self.basis.n >= self.op.dim:
            self.exhausted = True
            w = torch.zeros_like(w)
        else:
            w = w / beta
        self.basis.append(w)
        return w

    def tridiagonal(self) -> Tensor:
        return _tridiagonal(self.alphas, self.betas)


def _growing_deflation(
    op: _Counting,
    n_probes: int,
    tol: float | None,
    max_probes: int,
    block_size: int,
    gen: torch.Generator,
    ticker: Ticker,
    max_rows: int,
    lean: bool = False,
) -> TraceResult:
    r"""Deflated Hutchinson whose Lanczos basis grows with the probes, reusing every product.

    With :math:`k` Lanczos steps (basis :math:`Q`, tridiagonal :math:`T`,
    next vector :math:`q_{k+1}`, coupling :math:`\beta_k`) the relation
    :math:`Q^\top H = TQ^\top + \beta_k e_k q_{k+1}^\top` gives each probe's
    deflated term from numbers already at hand:

    .. math::

        z^\top (I-QQ^\top) H (I-QQ^\top) z
        = z^\top H z - c^\top T c - 2\beta_k\, c_k\, c_{k+1},
        \qquad c = Q^\top z,\ c_{k+1} = q_{k+1}^\top z ,

    so a probe's product :math:`Hz` is made once and re-deflated for free
    each time the basis grows (only :math:`z^\top Hz` and the projections
    are kept; the probes are stored as signs). The basis comes from its own
    random start, independent of the probes, so the estimate is unbiased for
    every :math:`k`; ``KRYLOV_PER_PROBE`` Lanczos steps are taken per probe,
    until the basis holds ``max_rows`` rows (``GROWING_BASIS_BYTES``, or what a
    memory budget allows: ``lean``; then the probes go on alone, and their signs
    are no longer stored).
    """
    krylov = _Krylov(op, _randn(op, gen), capacity=max_rows if lean else None)
    signs = torch.zeros(0, op.dim, dtype=torch.int8, device=op.device)
    quad: list[float] = []  # z^T H z per probe
    proj = torch.zeros(0, 1, dtype=torch.float64)  # z_i . q_j, one column per basis row
    limit = n_probes if tol is None else max_probes

    def deflated() -> tuple[float, Tensor]:
        k = krylov.k
        if k == 0:
            return 0.0, torch.tensor(quad, dtype=torch.float64)
        t = krylov.tridiagonal()
        c = proj[:, :k]
        d = torch.tensor(quad, dtype=torch.float64) - ((c @ t) * c).sum(1)
        d = d - 2 * krylov.betas[k - 1] * proj[:, k - 1] * proj[:, k]
        return float(t.trace()), d

    while True:
        p = len(quad)
        frozen = krylov.basis.n >= max_rows  # the basis is as large as it may grow
        want_probe = frozen or krylov.exhausted or krylov.k >= KRYLOV_PER_PROBE * max(p, 1)
        if want_probe:
            if p >= limit:
                break
            b = min(block_size, limit - p)
            z = _rademacher(op, gen, b)
            hz = _blocks(op, z, block_size, ticker)
            quad.extend((hz * z).sum(1).double().tolist())
            if not frozen:  # kept only to project on basis rows still to come
                signs = torch.cat([signs, z.to(torch.int8)])
            proj = torch.cat([proj, (z @ krylov.rows.T).double().cpu()])
            if tol is not None and len(quad) >= MIN_PROBES:
                exact, d = deflated()
                est = exact + float(d.mean())
                if _stderr(d.tolist()) <= tol * abs(est):
                    break
        else:
            q = krylov.step()
            ticker.update()
            col = [(chunk.to(op.dtype) @ q).double() for chunk in signs.split(64)]
            col_t = torch.cat(col) if col else torch.zeros(0, dtype=torch.float64)
            proj = torch.cat([proj, col_t.cpu()[:, None]], 1)
            if krylov.k >= op.dim:
                break
    exact, d = deflated()
    kept = krylov.basis.n
    # lean only where the budget cut the basis: below its cap the run is the full path's
    path = "lean" if lean and kept >= max_rows else "full"
    if krylov.k >= op.dim or (krylov.exhausted and not quad):
        return TraceResult(exact, 0.0, op.n_matvecs, 0, exact, [], path=path, rows=kept)
    samples = d.tolist()
    est = exact + float(d.mean())
    return TraceResult(
        est, _stderr(samples), op.n_matvecs, len(samples), exact, samples, path=path, rows=kept
    )


def _xtrace(
    op: _Counting,
    n_vectors: int,
    tol: float | None,
    max_vectors: int,
    block_size: int,
    gen: torch.Generator,
    ticker: Ticker,
) -> TraceResult:
    r"""XTrace: the exchangeable Hutch++ of Epperly, Tropp & Webber (arXiv 2301.07825).

    With test vectors :math:`W = [w_1..w_k]` (Rademacher), :math:`Y = HW = QR`
    and :math:`Z = HQ`, each :math:`i` gives the unbiased estimate

    .. math::

        t_i = \operatorname{tr}(Q_i^\top H Q_i)
        + w_i^\top (I - Q_iQ_i^\top) H (I - Q_iQ_i^\top) w_i ,

    :math:`Q_i` a basis of :math:`Y` without its column :math:`i`, so
    :math:`w_i` is independent of it. :math:`Q_iQ_i^\top = Q(I - s_is_i^\top)Q^\top`
    with :math:`s_i` the normalised column :math:`i` of :math:`R^{-\top}`, so
    every :math:`t_i` comes from :math:`Q, R, Z` in :math:`O(k^2 d)` work. The
    estimate is :math:`\bar t`, its standard error the spread of the
    :math:`t_i` over :math:`\sqrt k` (the paper's error estimate). Growing
    :math:`k` (``tol``) appends vectors: the new basis directions are
    orthogonalised against the old ones, so :math:`Q`'s first columns, and
    their products :math:`Z`, are kept.
    """
    k_target = n_vectors if tol is None else min(MIN_PROBES, max_vectors)
    w_rows = torch.zeros(0, op.dim, dtype=op.dtype, device=op.device)
    y_rows = torch.zeros_like(w_rows)
    q_rows = torch.zeros_like(w_rows)  # orthonormal basis of span(Y), rows
    z_rows = torch.zeros_like(w_rows)  # H q
    while True:
        add = k_target - w_rows.shape[0]
        w_new = _rademacher(op, gen, add)
        y_new = _blocks(op, w_new, block_size, ticker)
        q_new, _ = _orthonormal_rows(y_new, q_rows if q_rows.shape[0] else None, rel=1e-12)
        z_new = _blocks(op, q_new, block_size, ticker)
        w_rows = torch.cat([w_rows, w_new])
        y_rows = torch.cat([y_rows, y_new])
        q_rows = torch.cat([q_rows, q_new])
        z_rows = torch.cat([z_rows, z_new])
        k = w_rows.shape[0]
        t = (q_rows @ z_rows.T).double()
        t = (t + t.T) / 2
        if q_rows.shape[0] < k:
            # Y is rank-deficient: H's range lies in span(Q), whose trace is exact
            est = float(t.trace())
            return TraceResult(est, 0.0, op.n_matvecs, k, est, [est], rows=2 * k + 2 * len(q_rows))
        r = (q_rows @ y_rows.T).double()  # Y^T = Q^T R in row form: R = Q Y^T
        samples = _xtrace_samples(
            t,
            r,
            (q_rows @ w_rows.T).double(),
            (w_rows @ z_rows.T).double(),
            (w_rows * y_rows).sum(1).double(),
        )
        est = float(samples.mean())
        se = float(samples.std() / math.sqrt(k)) if k > 1 else math.inf
        done = tol is None or se <= tol * abs(est) or k >= max_vectors
        if done:
            return TraceResult(
                est,
                se,
                op.n_matvecs,
                k,
                float(t.trace()),
                samples.tolist(),
                rows=2 * k + 2 * len(q_rows),
            )
        k_target = min(2 * k, max_vectors)


def _xtrace_samples(t: Tensor, r: Tensor, qw: Tensor, wz: Tensor, wy: Tensor) -> Tensor:
    r"""The exchangeable estimates :math:`t_i` from the small matrices.

    ``t`` = :math:`Q^\top H Q`, ``r`` = :math:`R` (:math:`Y = QR`),
    ``qw`` = :math:`Q^\top W`, ``wz`` = :math:`W^\top H Q`, ``wy`` =
    :math:`w_i^\top H w_i`. With :math:`p_i = (I - s_is_i^\top) Q^\top w_i`,
    :math:`(I - Q_iQ_i^\top) w_i = w_i - Qp_i` and, :math:`H w_i` being
    :math:`y_i = Q r_i`,

    .. math::

        t_i = \operatorname{tr} T - s_i^\top T s_i + w_i^\top y_i
        - 2\, (W^\top Z)_{i,:}\, p_i + p_i^\top T p_i ,

    using :math:`p_i^\top r_i = (W^\top Z)_{i,:} p_i`, both being :math:`w_i^\top H Q p_i`.
    """
    s = torch.linalg.solve_triangular(r.T, torch.eye(r.shape[0], dtype=r.dtype), upper=False)
    s = s / s.norm(dim=0, keepdim=True)  # columns s_i of R^{-T}, normalised
    p = qw - s * (s * qw).sum(0, keepdim=True)  # column i: (I - s_i s_i^T) Q^T w_i
    low = t.trace() - (s * (t @ s)).sum(0)
    quad = wy - 2 * (wz * p.T).sum(1) + (p * (t @ p)).sum(0)
    return low + quad


def _stderr(samples: list[float]) -> float:
    n = len(samples)
    if n < 2:
        return float("inf")
    mean = sum(samples) / n
    var = sum((s - mean) ** 2 for s in samples) / (n - 1)
    return math.sqrt(var / n)


def spectral_density(
    op: Operator,
    *,
    n_steps: int = 80,
    n_runs: int = 1,
    sigma: float | None = None,
    grid_size: int = 1000,
    seed: int | torch.Generator | None = 0,
    progress: bool = False,
) -> DensityResult:
    r"""Eigenvalue density by stochastic Lanczos quadrature.

    Each run starts Lanczos from a normalised Rademacher vector; the Ritz
    values :math:`\theta_i` with weights :math:`\tau_i = s_{1i}^2` (summing
    to 1) form a quadrature of the spectral measure. The density on the grid
    is :math:`\frac{1}{R}\sum_r\sum_i \tau_i\,\mathcal N(t;\theta_i,\sigma^2)`,
    normalised to integrate to 1 over the grid. ``sigma`` defaults to 1 % of
    the spectral range. ``progress`` shows a bar of the products done.
    """
    n_steps = _check_int("n_steps", n_steps, 1)
    n_runs = _check_int("n_runs", n_runs, 1)
    grid_size = _check_int("grid_size", grid_size, 2)
    if sigma is not None:
        sigma = _check_pos("sigma", sigma)
    gen = _generator(seed)
    nodes, weights = [], []
    used = 0
    counted = _Counting(op)
    ticker = Ticker(counted, progress, "spectral density", total=n_runs * min(n_steps, op.dim))
    for _ in range(n_runs):
        theta, s, basis, _, _ = lanczos(
            counted, _rademacher(op, gen), min(n_steps, op.dim), on_step=ticker.update
        )
        used += basis.shape[0]
        nodes.append(theta.tolist())
        weights.append((s[0] ** 2).tolist())
    allnodes = torch.tensor([x for run in nodes for x in run], dtype=torch.float64)
    lo, hi = float(allnodes.min()), float(allnodes.max())
    span = max(hi - lo, 1e-12 * max(1.0, abs(hi)))
    sig = sigma if sigma is not None else 0.01 * span
    grid = torch.linspace(
        lo - 3 * sig - 0.05 * span, hi + 3 * sig + 0.05 * span, grid_size, dtype=torch.float64
    )
    dens = torch.zeros_like(grid)
    for th, w in zip(nodes, weights):
        th_t = torch.tensor(th, dtype=torch.float64)
        w_t = torch.tensor(w, dtype=torch.float64)
        dens += (w_t[None, :] * torch.exp(-0.5 * ((grid[:, None] - th_t[None, :]) / sig) ** 2)).sum(
            1
        )
    dens /= n_runs * sig * math.sqrt(2 * math.pi)
    area = torch.trapezoid(dens, grid)
    if area > 0:
        dens /= area
    ticker.close()
    return DensityResult(nodes, weights, grid, dens, used)
