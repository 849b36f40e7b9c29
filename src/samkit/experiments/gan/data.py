"""The data sets of ``samkit gan``: equal-weight mixtures of 2-D Gaussians (Ring-8, Grid-25)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Mixture", "MIXTURES"]


@dataclass(frozen=True)
class Mixture:
    """An equal-weight mixture of isotropic 2-D Gaussians."""

    name: str
    centers: tuple[tuple[float, float], ...]
    std: float
    source: str
    #: the training size a study uses when it sets none: iterations, batch size, hidden width
    sizes: tuple[int, int, int] = (5000, 128, 64)

    def centers_tensor(self) -> Tensor:
        return torch.tensor(self.centers, dtype=torch.float32)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` points: a uniformly drawn mode each, plus Gaussian noise."""
        c = self.centers_tensor()
        idx = torch.randint(len(c), (n,), generator=generator)
        return c[idx] + self.std * torch.randn(n, 2, generator=generator)


def _ring(k: int, radius: float) -> tuple[tuple[float, float], ...]:
    return tuple(
        (radius * math.cos(2 * math.pi * i / k), radius * math.sin(2 * math.pi * i / k))
        for i in range(k)
    )


MIXTURES: dict[str, Mixture] = {
    "ring8": Mixture("ring8", _ring(8, 2.0), 0.02, "Metz et al., arXiv 1611.02163"),
    "grid25": Mixture(
        "grid25",
        tuple((float(x), float(y)) for x in range(-4, 5, 2) for y in range(-4, 5, 2)),
        0.05,
        "Srivastava et al., arXiv 1705.07761; Lin et al., arXiv 1712.04086",
        # 25 modes need wider networks and longer training than 8 (Adam covers
        # about 1 of them after 5000 iterations of the Ring-8 size)
        (8000, 256, 128),
    ),
}
