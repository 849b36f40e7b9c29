"""The SAM optimizer family: the wrapper, its pieces (perturbations, policies,
schedules) and the variants with an update of their own.

SAF and MESA are loss terms, not optimizers: see :mod:`samkit.losses`."""

from .batchnorm import freeze_bn_stats
from .esam import ESAM
from .gsam import GSAM
from .looksam import LookSAM
from .msam import MSAM
from .perturbation import L2, Adaptive, Fisher, Masked, NormOnly, Perturbation, RandomSubset
from .policy import AdaptivePolicy, Always, EveryK, Late, Policy, RandomPolicy
from .sam import SAM
from .schedule import LambdaRho, ProportionalRho

__all__ = [
    "SAM",
    "GSAM",
    "LookSAM",
    "ESAM",
    "MSAM",
    "Perturbation",
    "L2",
    "Adaptive",
    "Fisher",
    "Masked",
    "NormOnly",
    "RandomSubset",
    "Policy",
    "Always",
    "EveryK",
    "RandomPolicy",
    "AdaptivePolicy",
    "Late",
    "ProportionalRho",
    "LambdaRho",
    "freeze_bn_stats",
]
