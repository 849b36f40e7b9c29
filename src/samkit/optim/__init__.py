"""The SAM optimizer family."""

from .batchnorm import freeze_bn_stats
from .perturbation import L2, Adaptive, Perturbation
from .policy import Always, Policy
from .sam import SAM

__all__ = ["SAM", "Perturbation", "L2", "Adaptive", "Policy", "Always", "freeze_bn_stats"]
