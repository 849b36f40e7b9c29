"""The SAM optimizer family: the wrapper and the three axes of a variant.

A variant is SAM with a *perturbation* (how the ascent vector is made), a
*policy* (which steps pay for the ascent) and a *mix* (what the base step
receives from the two gradients), plus optionally a rho *controller*. GSAM and
LookSAM are such combinations with constructors of their own, and so is
MomentumSAM (the Momentum perturbation, made before the only pass); ESAM,
K-SAM and mSAM (:class:`MicroBatchSAM`) change the step itself and use SAM's public protocol.

SAF and MESA are loss terms, not optimizers: see :mod:`samkit.losses`.
"""

from .autorho import (
    GradientAgreement,
    LossEquated,
    NoValidationWarning,
    ValidationPlateau,
    ValidationSearch,
)
from .batchnorm import freeze_bn_stats
from .esam import ESAM
from .gsam import GSAM
from .ksam import KSAM
from .looksam import LookSAM
from .mix import Mix, ReuseOrthogonal, SurrogateGap
from .momentum_sam import MomentumSAM
from .msam import MSAM as MSAM  # deprecated alias of MicroBatchSAM, not in __all__
from .msam import MicroBatchSAM
from .perturbation import (
    L2,
    Adaptive,
    Fisher,
    Masked,
    Momentum,
    NormOnly,
    Perturbation,
    RandomSubset,
)
from .policy import AdaptivePolicy, Always, EveryK, GradNormTrigger, Late, Policy, RandomPolicy
from .rho import FollowLR, LambdaRho, ProportionalRho, RhoController
from .sam import SAM
from .view import StepView
from .vsam import VSAM, PSFVariation, ReusePSF

__all__ = [
    "SAM",
    "GSAM",
    "LookSAM",
    "ESAM",
    "MicroBatchSAM",
    "MomentumSAM",
    "KSAM",
    "VSAM",
    "Perturbation",
    "L2",
    "Adaptive",
    "Momentum",
    "Fisher",
    "Masked",
    "NormOnly",
    "RandomSubset",
    "Policy",
    "Always",
    "EveryK",
    "RandomPolicy",
    "GradNormTrigger",
    "AdaptivePolicy",
    "Late",
    "PSFVariation",
    "Mix",
    "SurrogateGap",
    "ReuseOrthogonal",
    "ReusePSF",
    "RhoController",
    "FollowLR",
    "GradientAgreement",
    "LossEquated",
    "ValidationPlateau",
    "ValidationSearch",
    "NoValidationWarning",
    "ProportionalRho",
    "LambdaRho",
    "StepView",
    "freeze_bn_stats",
]
