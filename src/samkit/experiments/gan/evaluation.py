"""The metrics of ``samkit gan`` (see the package docstring): modes covered, high-quality
share, MMD and mode KL of generated points against their mixture."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .data import Mixture

__all__ = ["KERNEL_BANDWIDTHS", "mmd2", "mode_kl", "nearest_modes", "mixture_metrics"]

KERNEL_BANDWIDTHS = (0.1, 0.5, 2.0)


def _sq_distances(x: Tensor, y: Tensor) -> Tensor:
    return ((x * x).sum(1, keepdim=True) + (y * y).sum(1)[None, :] - 2.0 * x @ y.T).clamp_min_(0.0)


def mmd2(x: Tensor, y: Tensor, bandwidths: tuple[float, ...] = KERNEL_BANDWIDTHS) -> float:
    r"""Unbiased :math:`\mathrm{MMD}^2` between samples ``x`` (n, d) and ``y`` (m, d).

    .. math:: \frac{1}{n(n-1)} \sum_{i \ne j} k(x_i, x_j) + \frac{1}{m(m-1)} \sum_{i \ne j} k(y_i, y_j)
              - \frac{2}{nm} \sum_{i, j} k(x_i, y_j)

    with :math:`k = \sum_\sigma \exp(-\lVert a - b \rVert^2 / 2 \sigma^2)`
    (Gretton et al., JMLR 2012), computed in float64.
    """
    x, y = x.double(), y.double()
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"Invalid samples value: {n} and {m} points (at least 2 each)")
    dxx, dyy, dxy = _sq_distances(x, x), _sq_distances(y, y), _sq_distances(x, y)
    total = 0.0
    for sigma in bandwidths:
        g = -1.0 / (2.0 * sigma * sigma)
        kxx, kyy, kxy = (dxx * g).exp_(), (dyy * g).exp_(), (dxy * g).exp_()
        total += float((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1)))
        total += float((kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1)))
        total -= 2.0 * float(kxy.mean())
    return total


def mode_kl(nearest: Tensor, k: int) -> float:
    r""":math:`\sum_j q_j \log(k\, q_j)`: the KL divergence from the share :math:`q_j` of
    samples whose nearest mode is ``j`` (``nearest``: mode indices) to uniform weights."""
    q = torch.bincount(nearest, minlength=k).double() / max(1, nearest.numel())
    nz = q > 0
    return float((q[nz] * (q[nz] * k).log()).sum())


def nearest_modes(samples: Tensor, mixture: Mixture) -> tuple[Tensor, Tensor]:
    """For each sample: the index of its nearest mode centre, and whether it is
    of high quality (within 3 standard deviations of that centre)."""
    centers = mixture.centers_tensor().double()
    distance = _sq_distances(samples.double(), centers).sqrt()
    nearest_distance, nearest = distance.min(1)
    return nearest, nearest_distance <= 3.0 * mixture.std


def mixture_metrics(samples: Tensor, mixture: Mixture, reference: Tensor) -> dict[str, float]:
    """Modes covered, high-quality share, MMD and mode KL of ``samples`` (see the module docstring).

    ``reference``: true samples for the MMD (as many as ``samples``, or any number >= 2).
    """
    samples = samples.detach().float()
    if not bool(torch.isfinite(samples).all()):
        return {"modes": 0.0, "hq": 0.0, "mmd": math.nan, "mode_kl": math.nan}
    k = len(mixture.centers)
    nearest, hq = nearest_modes(samples, mixture)
    counts = torch.bincount(nearest[hq], minlength=k)
    need = 20.0 * samples.shape[0] / 2500.0
    return {
        "modes": float((counts >= need).sum()),
        "hq": float(hq.double().mean()),
        "mmd": mmd2(samples, reference),
        "mode_kl": mode_kl(nearest, k),
    }
