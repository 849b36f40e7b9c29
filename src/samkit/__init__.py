"""samkit: Sharpness-Aware Minimization for PyTorch, done right.

The optimizers depend on torch alone; ``samkit.sharpness`` (instruments),
``samkit.experiments`` (the study) and ``samkit.cli`` are imported on demand.
"""

from .losses import MESA, SAF
from .optim import (
    ESAM,
    GSAM,
    KSAM,
    L2,
    MSAM,
    SAM,
    VSAM,
    Adaptive,
    AdaptivePolicy,
    Always,
    EveryK,
    Fisher,
    FollowLR,
    GradNormTrigger,
    LambdaRho,
    Late,
    LookSAM,
    LossEquated,
    Masked,
    Mix,
    Momentum,
    MomentumSAM,
    NormOnly,
    NoValidationWarning,
    Perturbation,
    Policy,
    ProportionalRho,
    PSFVariation,
    RandomPolicy,
    RandomSubset,
    ReuseOrthogonal,
    ReusePSF,
    RhoController,
    StepView,
    SurrogateGap,
    ValidationPlateau,
    ValidationSearch,
    freeze_bn_stats,
)

__all__ = [
    "SAM",
    "GSAM",
    "LookSAM",
    "ESAM",
    "MSAM",
    "MomentumSAM",
    "KSAM",
    "VSAM",
    "SAF",
    "MESA",
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
    "LossEquated",
    "ValidationPlateau",
    "ValidationSearch",
    "NoValidationWarning",
    "ProportionalRho",
    "LambdaRho",
    "StepView",
    "freeze_bn_stats",
]

__version__ = "0.2.0.dev0"

# The studies (``samkit.compare`` / ``tune`` / ``rl_study`` / ``gan_study``) need the experiments'
# dependencies; each is imported on first use so ``import samkit`` stays torch-only.
_LAZY = {
    "compare": "samkit.experiments.api",
    "tune": "samkit.experiments.tuning",
    "rl_study": "samkit.experiments.rl",
    "gan_study": "samkit.experiments.gan",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'samkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
