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
:class:`Momentum` v                      -v           (Momentum-SAM)
==============  =======================  ===========================

Other variants (Fisher, masks, random subsets) subclass :class:`Perturbation`.

A perturbation with ``needs_gradient = False`` starts from a vector of the
base optimizer's state instead of the gradient (:class:`Momentum`: the
momentum buffer ``v``). SAM then perturbs *before* the forward pass, and a
step costs one forward/backward pass, at ``w + e`` (see
:meth:`samkit.SAM.first_step`). SAM copies that vector first: the
perturbation works on the copy and never on the optimizer's state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .. import functional
from .._checks import check_pos as _check_pos

if TYPE_CHECKING:  # pragma: no cover
    from .view import OptimizerState

__all__ = [
    "Perturbation",
    "L2",
    "Adaptive",
    "Momentum",
    "Fisher",
    "Masked",
    "NormOnly",
    "RandomSubset",
]


class Perturbation:
    """Base class: the plain L2 (SAM) ascent, e = rho * g / ||g||."""

    name = "l2"
    #: False: the ascent starts from :meth:`ascent_vector` (the base optimizer's
    #: state), not from a gradient; SAM perturbs before the only forward pass.
    needs_gradient = True

    def ascent_vector(self, param: Tensor, state: OptimizerState) -> Tensor | None:
        """Where the ascent of ``param`` starts when ``needs_gradient`` is False.

        ``state`` is the base optimizer's per-parameter state. SAM copies the
        returned tensor and hands the copy to :meth:`measure_` in place of the
        gradient; ``None`` leaves ``param`` unperturbed. Not called otherwise.
        """
        return None

    def check_state(self, params: list[Tensor], state: OptimizerState) -> None:
        """Called when :meth:`ascent_vector` gave no vector for any of ``params``
        (the parameters of the groups with rho > 0) after the base optimizer
        has stepped: raise ``ValueError`` when that is a mistake. Not called
        otherwise."""
        return None

    def measure_(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        scratch: list[Tensor],
        group: Mapping[str, Any],
        *,
        foreach: bool,
    ) -> Tensor:
        return functional.sq_norm(grads, foreach=foreach)

    def direction_(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        scratch: list[Tensor],
        group: Mapping[str, Any],
        *,
        foreach: bool,
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

    def measure_(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        scratch: list[Tensor],
        group: Mapping[str, Any],
        *,
        foreach: bool,
    ) -> Tensor:
        functional.abs_plus_(scratch, params, group["eta"], foreach=foreach)  # scratch = T_w
        functional.mul_(grads, scratch, foreach=foreach)  # u = T g
        return functional.sq_norm(grads, foreach=foreach)

    def direction_(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        scratch: list[Tensor],
        group: Mapping[str, Any],
        *,
        foreach: bool,
    ) -> None:
        functional.mul_(grads, scratch, foreach=foreach)  # d = T^2 g


class Momentum(Perturbation):
    r"""Momentum-SAM (Becker, Altrock and Risse, 2024, arXiv 2401.12033).

    The ascent follows the base optimizer's momentum ``v`` instead of a fresh
    gradient, so no extra gradient is needed:

    .. math:: e = -\rho \frac{v}{\lVert v \rVert}

    (one norm over every perturbed group). SGD's update is ``-lr v``: ``-v``
    is where the optimizer is heading, so ``w + e`` is a large, normalised
    Nesterov look-ahead; the paper's sign. For Adam ``v`` is the first moment
    ``m`` (``exp_avg``); normalised, its bias correction drops out.

    A parameter without the buffer yet (before the base optimizer's first
    step) is not perturbed; when no parameter has one, the step does not
    ascend. Use it through :class:`samkit.MomentumSAM`, which picks the
    buffer for the base optimizer and checks it has one.

    Args:
        buffer: the key of ``v`` in the base optimizer's per-parameter state
            (``"momentum_buffer"`` for SGD and RMSprop, ``"exp_avg"`` for the
            Adam family).
    """

    name = "momentum"
    needs_gradient = False

    def __init__(self, buffer: str = "momentum_buffer") -> None:
        if not isinstance(buffer, str) or not buffer:
            raise ValueError(
                f"Invalid buffer value: {buffer!r} (must be a state key, e.g. 'exp_avg')"
            )
        self.buffer = buffer

    def ascent_vector(self, param: Tensor, state: OptimizerState) -> Tensor | None:
        entry = state.get(param)
        vector: Tensor | None = None if entry is None else entry.get(self.buffer)
        return vector

    def check_state(self, params: list[Tensor], state: OptimizerState) -> None:
        # The base optimizer has stepped (it keeps state) but not under this key:
        # a wrong key would otherwise make every step a plain base step, silently.
        for param in params:
            entry = state.get(param)
            if entry:
                raise ValueError(
                    f"Invalid buffer value: {self.buffer!r} is not in the base optimizer's state, "
                    f"which has stepped and keeps {sorted(str(k) for k in entry)}; Momentum-SAM "
                    "would never perturb. Pass the key of its momentum (Momentum('exp_avg') for "
                    "the Adam family), or use samkit.MomentumSAM(base, rho=...), which picks it"
                )

    def direction_(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        scratch: list[Tensor],
        group: Mapping[str, Any],
        *,
        foreach: bool,
    ) -> None:
        functional.neg_(grads, foreach=foreach)  # d = -v

    def __repr__(self) -> str:
        return f"Momentum(buffer={self.buffer!r})"


# --------------------------------------------------------------------------
# Variants (issue 4): Fisher SAM, masked / normalisation-layers-only (SAM-ON),
# and ESAM's stochastic weight perturbation.
# --------------------------------------------------------------------------


class Fisher(Perturbation):
    r"""Fisher SAM (Kim et al., ICML 2022, arXiv 2206.04920).

    The rho-ball becomes an ellipsoid in the Fisher metric, with the diagonal
    empirical Fisher of the batch gradient, ``f = 1 + eta * g^2``:

    .. math:: e = \rho \frac{f^{-1} g}{\sqrt{g^\top f^{-1} g}}

    so ``u = g / sqrt(f)`` and ``d = g / f``. Coordinates with large gradient
    (high Fisher information) are perturbed less than SAM would.

    Args:
        eta: weight of the Fisher term (default 1.0; ``eta -> 0`` is SAM).
    """

    name = "fisher"

    def __init__(self, eta: float = 1.0) -> None:
        self.eta = _check_pos("eta", eta)

    def measure_(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        scratch: list[Tensor],
        group: Mapping[str, Any],
        *,
        foreach: bool,
    ) -> Tensor:
        # scratch = sqrt(1 + eta g^2), then u = g / scratch
        functional.copy_(scratch, grads, foreach=foreach)
        if foreach:
            torch._foreach_mul_(scratch, scratch)
            torch._foreach_mul_(scratch, self.eta)
            torch._foreach_add_(scratch, 1.0)
            torch._foreach_sqrt_(scratch)
            torch._foreach_div_(grads, scratch)
        else:
            for s, g in zip(scratch, grads):
                s.mul_(s).mul_(self.eta).add_(1.0).sqrt_()
                g.div_(s)
        return functional.sq_norm(grads, foreach=foreach)

    def direction_(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        scratch: list[Tensor],
        group: Mapping[str, Any],
        *,
        foreach: bool,
    ) -> None:
        if foreach:
            torch._foreach_div_(grads, scratch)  # d = g / f
        else:
            for g, s in zip(grads, scratch):
                g.div_(s)

    def __repr__(self) -> str:
        return f"Fisher(eta={self.eta})"


class Masked(Perturbation):
    """Perturb only the given parameters; every other weight stays at ``w``.

    The wrapped perturbation (default :class:`L2`) sees only the selected
    parameters, so both the normaliser and the direction come from them alone.
    A non-finite gradient in an unselected parameter still makes the norm
    non-finite (it is multiplied by zero, which keeps NaN), so SAM's
    non-finite skip keeps working.

    Args:
        params: the parameters to perturb (an iterable of tensors).
        inner: how the selected parameters are perturbed (default :class:`L2`;
            :class:`Adaptive` gives ASAM-style masks).
    """

    name = "masked"

    def __init__(
        self, params: Tensor | Iterable[Tensor], inner: Perturbation | None = None
    ) -> None:
        if isinstance(params, Tensor):
            params = [params]
        try:
            selected = [p for p in params]
        except TypeError:
            raise ValueError(
                f"Invalid params value: {params!r} is not an iterable of tensors"
            ) from None
        if not all(isinstance(p, Tensor) for p in selected):
            raise ValueError(
                "Invalid params value: every entry must be a tensor (a model parameter)"
            )
        if not selected:
            raise ValueError(
                "Invalid params value: no parameters selected, nothing would be perturbed"
            )
        if inner is not None and not isinstance(inner, Perturbation):
            raise ValueError(f"Invalid inner value: {inner!r} is not a samkit Perturbation")
        if isinstance(inner, Masked):
            raise ValueError(
                "Invalid inner value: a Masked perturbation cannot wrap another Masked"
            )
        self._keep = selected  # keeps the tensors alive, so their ids stay unique
        self._ids = {id(p) for p in selected}
        self.inner = inner or L2()
        # index lists cached per (group, device/dtype) bucket: the lists SAM
        # passes are rebuilt every step, but their membership is stable
        self._split_cache: dict[tuple[int, ...], tuple[list[int], list[int]]] = {}

    def _split(self, params: list[Tensor]) -> tuple[list[int], list[int]]:
        key = tuple(id(p) for p in params)
        hit = self._split_cache.get(key)
        if hit is None:
            on = [i for i, p in enumerate(params) if id(p) in self._ids]
            off = [i for i, p in enumerate(params) if id(p) not in self._ids]
            hit = self._split_cache[key] = (on, off)
        return hit

    def measure_(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        scratch: list[Tensor],
        group: Mapping[str, Any],
        *,
        foreach: bool,
    ) -> Tensor:
        on, off = self._split(params)
        total: Tensor | None = None
        if off:
            g_off = [grads[i] for i in off]
            # 0 * ||g_off||^2 is 0 when finite and NaN otherwise
            total = functional.sq_norm(g_off, foreach=foreach) * 0.0
            if foreach:
                torch._foreach_zero_(g_off)
            else:
                for g in g_off:
                    g.zero_()
        if on:
            sq = self.inner.measure_(
                [params[i] for i in on],
                [grads[i] for i in on],
                [scratch[i] for i in on],
                group,
                foreach=foreach,
            )
            total = sq if total is None else total + sq
        assert total is not None  # (a bucket is never empty: on or off is not)
        return total

    def direction_(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        scratch: list[Tensor],
        group: Mapping[str, Any],
        *,
        foreach: bool,
    ) -> None:
        on, _ = self._split(params)
        if on:
            self.inner.direction_(
                [params[i] for i in on],
                [grads[i] for i in on],
                [scratch[i] for i in on],
                group,
                foreach=foreach,
            )

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state.get("inner", {}))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self._keep)} tensors, inner={self.inner!r})"


#: module types whose affine parameters SAM-ON perturbs
NORM_LAYERS: tuple[type[nn.Module], ...] = tuple(
    t
    for t in (
        nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
        nn.LayerNorm,
        nn.GroupNorm,
        getattr(nn, "RMSNorm", None),
        getattr(nn, "LocalResponseNorm", None),
    )
    if t is not None
)


class NormOnly(Masked):
    r"""SAM-ON (Mueller et al., NeurIPS 2023, arXiv 2306.04226): perturb only
    the normalisation layers' affine parameters.

    .. math:: e_i = \rho\, \frac{d_i}{\lVert u_{\mathrm{norm}} \rVert}
              \text{ for } w_i \text{ in a norm layer, } e_i = 0 \text{ otherwise}

    The paper finds this matches or beats full SAM on CIFAR with a much larger
    radius (rho of order 1 to 10, since the norm parameters are few); with
    ``inner=Adaptive()`` it is their ASAM-ON.

    Args:
        model: the model; the parameters of every BatchNorm, LayerNorm,
            GroupNorm, InstanceNorm (and RMSNorm) module are selected.
        inner: see :class:`Masked`.
    """

    name = "norm_only"

    def __init__(self, model: nn.Module, inner: Perturbation | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"Invalid model value: expected an nn.Module, got {type(model).__name__}"
            )
        params = [
            p
            for m in model.modules()
            if isinstance(m, NORM_LAYERS)
            for p in m.parameters(recurse=False)
        ]
        if not params:
            raise ValueError(
                "Invalid model value: it has no normalisation layer with affine parameters "
                "(BatchNorm/LayerNorm/GroupNorm/InstanceNorm), so SAM-ON would perturb nothing"
            )
        super().__init__(params, inner)


class RandomSubset(Perturbation):
    r"""ESAM's stochastic weight perturbation (Du et al., ICLR 2022, arXiv 2110.03141).

    Each step draws an element-wise Bernoulli mask ``m`` with keep probability
    ``beta`` and perturbs only the kept coordinates, rescaled so the
    perturbation is unbiased:

    .. math:: e = \frac{\rho}{\beta}\, m \odot \frac{d}{\lVert u \rVert},
              \qquad m_i \sim \mathrm{Bernoulli}(\beta)

    where ``u, d`` come from ``inner`` (default :class:`L2`, so ``u = d = g``):
    the normaliser is the full gradient's norm, as in the paper.

    The masks come from this object's own generators (one per device, seeded
    from ``seed``), whose states are saved in :meth:`state_dict`, so a resumed
    run draws the same masks. Under DDP every replica draws the same mask.

    Args:
        beta: fraction of the weights perturbed, in (0, 1] (default 0.5;
            the paper uses 0.5 to 0.6).
        seed: seed of the mask generator.
        inner: the perturbation the mask is applied to (default :class:`L2`).
    """

    name = "random_subset"

    def __init__(
        self, beta: float = 0.5, *, seed: int = 0, inner: Perturbation | None = None
    ) -> None:
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 < beta <= 1.0:
            raise ValueError(f"Invalid beta value: {beta!r} (must be in (0, 1])")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"Invalid seed value: {seed!r} (must be an int)")
        if inner is not None and not isinstance(inner, Perturbation):
            raise ValueError(f"Invalid inner value: {inner!r} is not a samkit Perturbation")
        self.beta = float(beta)
        self.seed = seed
        self.inner = inner or L2()
        self._gens: dict[str, torch.Generator] = {}
        self._pending_states: dict[str, Tensor] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        g = self._gens.get(key)
        if g is None:
            g = self._gens[key] = torch.Generator(device=device)
            g.manual_seed(self.seed)
            state = self._pending_states.pop(key, None)
            if state is not None:
                g.set_state(state)
        return g

    def measure_(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        scratch: list[Tensor],
        group: Mapping[str, Any],
        *,
        foreach: bool,
    ) -> Tensor:
        return self.inner.measure_(params, grads, scratch, group, foreach=foreach)

    def direction_(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        scratch: list[Tensor],
        group: Mapping[str, Any],
        *,
        foreach: bool,
    ) -> None:
        self.inner.direction_(params, grads, scratch, group, foreach=foreach)
        if self.beta == 1.0:
            return
        gen = self._generator(grads[0].device)
        # scratch is free again (SAM copies the weights into it right after);
        # the mask is drawn into it so no memory is allocated per step
        for s in scratch:
            s.uniform_(0.0, 1.0, generator=gen)
        inv = 1.0 / self.beta
        for s in scratch:
            s.lt_(self.beta)  # m = [u < beta], as 1.0 / 0.0 in the weights' dtype
        functional.mul_(grads, scratch, foreach=foreach)
        functional.mul_(grads, inv, foreach=foreach)

    def state_dict(self) -> dict[str, Any]:
        states = {k: g.get_state() for k, g in self._gens.items()}
        states.update({k: v for k, v in self._pending_states.items() if k not in states})
        return {"generators": states, "inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        gens = state.get("generators", {})
        self._pending_states = {}
        for key, st in gens.items():
            st = st.cpu() if isinstance(st, Tensor) else torch.as_tensor(st, dtype=torch.uint8)
            if key in self._gens:
                self._gens[key].set_state(st)
            else:
                self._pending_states[key] = st
        self.inner.load_state_dict(state.get("inner", {}))

    def __repr__(self) -> str:
        return f"RandomSubset(beta={self.beta}, seed={self.seed}, inner={self.inner!r})"
