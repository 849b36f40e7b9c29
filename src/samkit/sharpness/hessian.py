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
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from .._checks import check_int as _check_int
from .._checks import check_pos as _check_pos

__all__ = [
    "EigenResult",
    "TraceResult",
    "DensityResult",
    "lanczos",
    "top_eigenvalues",
    "hessian_trace",
    "spectral_density",
    "DenseOperator",
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


@dataclass
class TraceResult:
    """Hutchinson estimate of tr H with its standard error."""

    trace: float
    stderr: float
    n_matvecs: int
    n_probes: int
    exact_part: float  # tr(Q^T H Q) of the deflation basis
    samples: list[float] = field(default_factory=list)


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
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"Invalid seed value: {seed!r} (must be an int or None)")
    g = torch.Generator()
    g.manual_seed(torch.seed() if seed is None else seed)
    return g


def _randn(op: Operator, gen: torch.Generator) -> Tensor:
    return torch.randn(op.dim, generator=gen, dtype=op.dtype).to(op.device)


def _rademacher(op: Operator, gen: torch.Generator, k: int | None = None) -> Tensor:
    shape = (op.dim,) if k is None else (k, op.dim)
    return (torch.randint(0, 2, shape, generator=gen).to(op.dtype) * 2 - 1).to(op.device)


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


def lanczos(
    op: Operator,
    v0: Tensor,
    max_steps: int,
    *,
    k: int = 1,
    tol: float | None = None,
    project: Callable[[Tensor], Tensor] | None = None,
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
    basis = [v]
    alphas: list[float] = []
    betas: list[float] = []
    theta = s = res = None
    t = torch.zeros(0, 0, dtype=torch.float64)
    for m in range(1, max_steps + 1):
        w = op.matvec(basis[-1])
        alpha = float(w @ basis[-1])
        alphas.append(alpha)
        vs = torch.stack(basis)
        # full re-orthogonalisation, twice ("twice is enough", Parlett)
        w = w - vs.T @ (vs @ w)
        w = w - vs.T @ (vs @ w)
        w = project(w)
        beta = float(w.norm())
        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            t = t + torch.diag(off, 1) + torch.diag(off, -1)
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
            or (tol is not None and m >= k and bool((bound[:kk] <= tol * scale).all()))
        ):
            break
        if m < max_steps:
            betas.append(beta)
            basis.append(w / beta)
    return theta, s, torch.stack(basis), t, res


def top_eigenvalues(
    op: Operator,
    k: int = 1,
    *,
    method: str = "lanczos",
    tol: float = 1e-3,
    max_iter: int = 100,
    seed: int | torch.Generator | None = 0,
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
        seed: start vectors.

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
    if method not in ("lanczos", "power"):
        raise ValueError(f"Invalid method value: {method!r} (expected 'lanczos' or 'power')")
    gen = _generator(seed)
    count = [0]

    class _Counting:
        dim, dtype, device = op.dim, op.dtype, op.device

        @staticmethod
        def matvec(v: Tensor) -> Tensor:
            count[0] += 1
            return op.matvec(v)

    counted = _Counting()
    if method == "power":
        return _power(counted, k, tol, max_iter, gen, count)

    vals: list[float] = []
    vecs: list[Tensor] = []
    ress: list[float] = []
    converged = True
    first_basis = first_t = None
    for _ in range(k + 1):  # each extra run adds at least one value, or ends the loop
        q = torch.stack(vecs) if vecs else None
        defl = _Deflated(counted, q)
        want = k if not vecs else 1
        theta, s, basis, t, res = lanczos(
            counted,
            _randn(op, gen),
            min(max_iter, op.dim - len(vecs)),
            k=want,
            tol=tol,
            project=defl.project,
        )
        if first_basis is None:
            first_basis, first_t = basis, t
        got = min(want, theta.numel())
        ok = bool(
            (ritz_error_bounds(theta, res)[:got] <= tol * theta[:got].abs().clamp_min(1e-30)).all()
        )
        converged = converged and ok
        new_vals = [float(x) for x in theta[:got]]
        if vecs and new_vals[0] <= sorted(vals, reverse=True)[k - 1] + tol * abs(new_vals[0]):
            break  # nothing missed above the k-th value
        y = s[:, :got].T.to(basis.dtype) @ basis
        y = defl.project(y.T).T
        for i in range(got):
            yi = y[i] - (torch.stack(vecs).T @ (torch.stack(vecs) @ y[i]) if vecs else 0)
            vecs.append(yi / yi.norm())
            vals.append(new_vals[i])
            ress.append(float(res[i]))
        if k == 1 or len(vecs) >= op.dim:
            break
    order = sorted(range(len(vals)), key=lambda i: -vals[i])[:k]
    return EigenResult(
        eigenvalues=[vals[i] for i in order],
        eigenvectors=torch.stack([vecs[i] for i in order]),
        n_matvecs=count[0],
        converged=converged,
        residuals=[ress[i] for i in order],
        basis=first_basis,
        tridiagonal=first_t,
    )


def _power(
    op: Operator, k: int, tol: float, max_iter: int, gen: torch.Generator, count: list[int]
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
    return EigenResult(vals, torch.stack(vecs), count[0], converged)


def hessian_trace(
    op: Operator,
    *,
    n_probes: int = 32,
    tol: float | None = None,
    max_probes: int = 1000,
    deflation_steps: int = 20,
    basis: Tensor | None = None,
    tridiagonal: Tensor | None = None,
    block_size: int = 1,
    seed: int | torch.Generator | None = 0,
) -> TraceResult:
    r"""Hutchinson estimate of :math:`\operatorname{tr} H`, variance-reduced.

    Args:
        n_probes: Rademacher probes when ``tol`` is None.
        tol: stop instead when the standard error is at most ``tol`` times
            the estimate (at least 4 probes, at most ``max_probes``).
        deflation_steps: Lanczos steps building the deflation basis
            (0: plain Hutchinson). Costs that many products; pays off when a
            few eigenvalues dominate, which is the rule for networks.
        basis, tridiagonal: a ready orthonormal basis (rows) and
            :math:`Q H Q^\top` (e.g. ``EigenResult.basis`` and
            ``.tridiagonal``), used instead of building one. It must not
            depend on this call's probes.
        block_size: probes per call of ``op.matmat`` when the operator has
            one (vectorised products).
        seed: probes and deflation start vector.

    The estimate is unbiased for any basis; see the module docstring.
    """
    n_probes = _check_int("n_probes", n_probes, 1)
    max_probes = _check_int("max_probes", max_probes, 1)
    deflation_steps = _check_int("deflation_steps", deflation_steps, 0)
    block_size = _check_int("block_size", block_size, 1)
    if tol is not None:
        tol = _check_pos("tol", tol)
    gen = _generator(seed)
    start = getattr(op, "n_matvecs", None)
    used = 0
    if basis is None and deflation_steps > 0:
        _, _, basis, tridiagonal, _ = lanczos(op, _randn(op, gen), min(deflation_steps, op.dim))
        used += basis.shape[0]
    elif basis is not None:
        if basis.dim() != 2 or basis.shape[1] != op.dim:
            raise ValueError(f"Invalid basis value: expected rows of length {op.dim}")
        if tridiagonal is None:
            tridiagonal = torch.stack([basis @ op.matvec(b) for b in basis]).double()
            used += basis.shape[0]
    exact = float(torch.diagonal(tridiagonal).sum()) if basis is not None else 0.0
    if basis is not None and basis.shape[0] >= op.dim:
        return TraceResult(exact, 0.0, used, 0, exact, [])
    defl = _Deflated(op, basis)
    samples: list[float] = []
    limit = n_probes if tol is None else max_probes
    matmat = getattr(op, "matmat", None) if block_size > 1 else None
    while len(samples) < limit:
        b = min(block_size, limit - len(samples))
        z = _rademacher(op, gen, b)
        z = defl.project(z.T).T
        hz = matmat(z) if matmat is not None else torch.stack([op.matvec(zi) for zi in z])
        used += b
        samples.extend(
            (hz * z).sum(1).double().tolist()
        )  # z projected, so z^T H z is the deflated term
        if tol is not None and len(samples) >= 4:
            est = exact + sum(samples) / len(samples)
            se = _stderr(samples)
            if se <= tol * abs(est):
                break
    est = exact + sum(samples) / len(samples)
    if start is not None and hasattr(op, "n_matvecs"):
        used = op.n_matvecs - start
    return TraceResult(est, _stderr(samples), used, len(samples), exact, samples)


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
) -> DensityResult:
    r"""Eigenvalue density by stochastic Lanczos quadrature.

    Each run starts Lanczos from a normalised Rademacher vector; the Ritz
    values :math:`\theta_i` with weights :math:`\tau_i = s_{1i}^2` (summing
    to 1) form a quadrature of the spectral measure. The density on the grid
    is :math:`\frac{1}{R}\sum_r\sum_i \tau_i\,\mathcal N(t;\theta_i,\sigma^2)`,
    normalised to integrate to 1 over the grid. ``sigma`` defaults to 1 % of
    the spectral range.
    """
    n_steps = _check_int("n_steps", n_steps, 1)
    n_runs = _check_int("n_runs", n_runs, 1)
    grid_size = _check_int("grid_size", grid_size, 2)
    if sigma is not None:
        sigma = _check_pos("sigma", sigma)
    gen = _generator(seed)
    nodes, weights = [], []
    used = 0
    for _ in range(n_runs):
        theta, s, basis, _, _ = lanczos(op, _rademacher(op, gen), min(n_steps, op.dim))
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
    return DensityResult(nodes, weights, grid, dens, used)
