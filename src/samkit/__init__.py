"""samkit: Sharpness-Aware Minimization for PyTorch, done right.

The optimizers depend on torch alone; ``samkit.sharpness`` (instruments),
``samkit.experiments`` (the study) and ``samkit.cli`` are imported on demand.

Every public name is imported on first use (PEP 562): ``import samkit`` alone
loads neither torch nor the optimizers, so ``samkit --version`` and
``samkit --help`` answer at once; ``samkit.SAM`` (or ``from samkit import
SAM``) imports :mod:`samkit.optim`, which does not import ``torch._dynamo``
either (its ``torch.compile`` guards are made on the first compiled call).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .losses import MESA, SAF
    from .optim import (
        ESAM,
        GSAM,
        KSAM,
        L2,
        SAM,
        VSAM,
        Adaptive,
        AdaptivePolicy,
        Always,
        EveryK,
        Fisher,
        FollowLR,
        GradientAgreement,
        GradNormTrigger,
        LambdaRho,
        Late,
        LookSAM,
        LossEquated,
        Masked,
        MicroBatchSAM,
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
    "MicroBatchSAM",
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

__version__ = "0.2.0.dev0"

# public name -> the module that defines it, imported on first use
_LAZY = {
    **{name: "samkit.optim" for name in __all__ if name not in ("SAF", "MESA")},
    "SAF": "samkit.losses",
    "MESA": "samkit.losses",
    "MSAM": "samkit.optim",  # deprecated alias of MicroBatchSAM (not in __all__)
    # the studies need the experiments' dependencies
    "compare": "samkit.experiments.api",
    "tune": "samkit.experiments.tuning",
    "rl_study": "samkit.experiments.rl",
    "gan_study": "samkit.experiments.gan",
}
#: subpackages an eager ``import samkit`` used to load, reachable as attributes
_SUBMODULES = ("optim", "functional", "losses")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        if name != "MSAM":  # the alias stays behind __getattr__ (not cached)
            globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"samkit.{name}")
    raise AttributeError(f"module 'samkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBMODULES} - {"MSAM"})
