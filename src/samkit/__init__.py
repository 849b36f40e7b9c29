"""samkit: Sharpness-Aware Minimization for PyTorch, done right."""

from .optim import SAM, Adaptive, Always, L2, Perturbation, Policy, freeze_bn_stats
from .optim.schedule import LambdaRho, ProportionalRho

__all__ = [
    "SAM",
    "Perturbation",
    "L2",
    "Adaptive",
    "Policy",
    "Always",
    "freeze_bn_stats",
    "ProportionalRho",
    "LambdaRho",
]

__version__ = "0.1.0"
