r"""How the ascent vector e(w) is made from the gradient and the weights.

A perturbation works on scratch copies of the gradients, in two calls:

* :meth:`Perturbation.measure_` turns the gradient ``g`` of one parameter
  group in place into the vector ``u`` whose L2 norm is the normaliser, and
  returns ``||u||^2`` for that group;
* after the norm over all groups is known, :meth:`Perturbation.direction_`
  turns ``u`` in place into the direction ``d``; SAM then sets
  ``e = rho * d / ||u||``.

``scratch`` is a list of buffers shaped like the parameters, free to use
until SAM copies the weights into it; it makes the perturbations cost no
memory beyond the one weight backup.

==============  =======================  ===========================
perturbation    u                        d
==============  =======================  ===========================
:class:`L2`     g                        g            (SAM)
:class:`Adaptive` T g,  T = |w| + eta    T^2 g        (ASAM)
==============  =======================  ===========================

Other variants (Fisher, masks, random subsets) subclass :class:`Perturbation`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .. import functional as F

__all__ = ["Perturbation", "L2", "Adaptive"]


class Perturbation:
    """Base class: the plain L2 (SAM) ascent, e = rho * g / ||g||."""

    name = "l2"

    def measure_(
        self, params: list[Tensor], grads: list[Tensor], scratch: list[Tensor], group: dict[str, Any], *, foreach: bool
    ) -> Tensor:
        return F.sq_norm(grads, foreach=foreach)

    def direction_(
        self, params: list[Tensor], grads: list[Tensor], scratch: list[Tensor], group: dict[str, Any], *, foreach: bool
    ) -> None:
        return None

    # Stateless by default; random perturbations keep their generator state here.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class L2(Perturbation):
    """SAM's ascent (Foret et al., 2021, arXiv 2010.01412): ``e = rho g / ||g||``."""


class Adaptive(Perturbation):
    r"""ASAM's scale-invariant ascent (Kwon et al., 2021, arXiv 2102.11600).

    With the element-wise operator ``T_w = |w| + eta``:

    .. math:: e = \rho \frac{T_w^2 g}{\lVert T_w g \rVert}

    ``eta`` (group key ``"eta"``, default 0.01) keeps zero weights perturbable.
    Typical rho is 10x SAM's: 0.5 on CIFAR-10, up to 2.0.
    """

    name = "adaptive"

    def measure_(self, params, grads, scratch, group, *, foreach):
        F.abs_plus_(scratch, params, group["eta"], foreach=foreach)  # scratch = T_w
        F.mul_(grads, scratch, foreach=foreach)  # u = T g
        return F.sq_norm(grads, foreach=foreach)

    def direction_(self, params, grads, scratch, group, *, foreach):
        F.mul_(grads, scratch, foreach=foreach)  # d = T^2 g
