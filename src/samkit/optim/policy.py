"""When the ascent (the second forward/backward pass) is paid for.

A policy is asked once per step, after the first backward pass, whether this
step does the SAM ascent. Steps it declines are plain base-optimizer steps
with the gradient already computed, so they cost one pass instead of two.

Policies keep their own state (counters, running statistics, random
generators) in :meth:`Policy.state_dict`, which SAM saves with its own, so a
resumed run makes the same choices as one that never stopped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .sam import SAM

__all__ = ["Policy", "Always"]


class Policy:
    """Base class. Subclasses override :meth:`should_ascend`."""

    name = "policy"

    def should_ascend(self, sam: SAM) -> bool:  # noqa: D401
        """Return True to pay for the ascent on this step (``sam.steps`` steps done so far)."""
        raise NotImplementedError

    def rho_factor(self, sam: SAM) -> float:
        """Multiplier applied to every group's rho on the steps that ascend."""
        return 1.0

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Always(Policy):
    """Every step ascends: plain SAM."""

    name = "always"

    def should_ascend(self, sam: SAM) -> bool:
        return True
