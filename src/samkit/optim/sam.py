r"""Sharpness-Aware Minimization around any torch optimizer.

SAM (Foret et al., ICLR 2021, arXiv 2010.01412) minimises the worst loss in a
rho-ball around the weights. Each step:

.. math::

    e_t = \rho \, \frac{g_t}{\lVert g_t \rVert_2}, \qquad g_t = \nabla L(w_t)
    \qquad\text{(ascent; ASAM: } e_t = \rho\, T^2 g_t / \lVert T g_t \rVert)

    w_{t+1} = \mathrm{BaseStep}\big(w_t,\ \nabla L(w_t + e_t)\big)

The weights are copied into a buffer (allocated once) before the ascent and
copied back, bit for bit, before the base step.

A perturbation that needs no gradient (Momentum-SAM, arXiv 2401.12033:
``e_t = -rho v_t / ||v_t||`` from the base optimizer's momentum) moves the
weights *before* the forward pass, and the step costs one pass, at ``w + e``.

This file holds the protocol; the kernels are in :mod:`samkit.functional`,
the DDP duties in :mod:`._ddp`, FSDP2's in :mod:`._fsdp`, the GradScaler's
in :mod:`._amp`, and the
three axes of a variant in :mod:`.perturbation` (how ``e`` is made),
:mod:`.policy` (which steps ascend) and :mod:`.mix` (what the base step
receives).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .. import functional
from .._checks import MAX_RHO, check_flag, check_nonneg, check_pos, check_rho
from . import _amp, _compile, _ddp, _fsdp, autorho
from .batchnorm import freeze_bn_stats
from .mix import Mix
from .perturbation import L2, Adaptive, Perturbation
from .policy import Always, Policy
from .rho import RhoController
from .view import StepView

__all__ = ["SAM"]

_GROUP_KEYS = ("rho", "eta", "ascent_weight_decay")

#: Above this radius (rho times the policy's factor) a step checks that the pass
#: at ``w + e`` is finite, even with ``skip_nonfinite=None``. Below it ``e`` is
#: at most ``rho`` per coordinate (``rho (|w| + eta)`` for ASAM) and the scale
#: ``rho / (||u|| + eps)`` at most ``1e14``: the perturbation itself cannot
#: overflow float32, and the hot path stays free of host reads.
CHECKED_RHO = 100.0


class _Default(float):
    """A float default that remembers it was not given (to route class-form keywords)."""

    def __repr__(self) -> str:
        return float.__repr__(self)


_RHO, _ETA, _ZERO = _Default(0.05), _Default(0.01), _Default(0.0)


def _protocol(method: Callable[..., Any]) -> Callable[..., Any]:
    """A step method: under ``no_grad``, and opaque to ``torch.compile``.

    Under compilation it runs as ``torch.compiler.disable`` (dynamo would drop
    SAM's attribute writes), made on first use (:mod:`._compile`: no
    ``torch._dynamo`` import at load); in eager mode it skips that wrapper and
    the ``no_grad`` decorator, which together cost more per step than SAM's own
    bookkeeping on a small model, and sets the grad mode directly.
    """
    compiled = _compile.disable(torch.no_grad()(method))

    @functools.wraps(method)
    def run(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return compiled(*args, **kwargs)
        enabled = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        try:
            return method(*args, **kwargs)
        finally:
            torch.set_grad_enabled(enabled)

    return run


class SAM(torch.optim.Optimizer):
    r"""Wrap a torch optimizer so each step is a sharpness-aware step.

    Args:
        params_or_optimizer: an optimizer *instance* (``torch.optim.SGD(...)``,
            Adam, AdamW, any ``torch.optim.Optimizer``), or parameters / param
            groups, in which case ``base_optimizer`` is the optimizer class and
            ``**base_kwargs`` its arguments (the davda54/sam form: every
            keyword the class accepts reaches it; ``foreach`` reaches both).
        base_optimizer: the optimizer class, only with the second form.
        rho: radius of the ascent (default 0.05; ASAM: 0.5 to 2.0; at most
            the largest float32, 3.4e38), per group
            via a ``"rho"`` key (``"sam_rho"`` when the base optimizer uses
            ``"rho"`` itself, as Adadelta does: see :attr:`rho_key`); or a
            :class:`~samkit.optim.rho.RhoController`
            that sets it every step (e.g. ``FollowLR(0.05)``); or ``"auto"``
            (no radius to choose: :mod:`samkit.optim.autorho`, which also
            takes ``"auto:<controller>"``). A group with
            ``rho=0`` is not perturbed and does not count in the normaliser;
            ``rho=0`` everywhere is exactly the base optimizer.
        adaptive: ASAM (arXiv 2102.11600): scale the ascent element-wise by
            ``|w| + eta``.
        eta: ASAM's offset (default 0.01), per group via ``"eta"``.
        ascent_weight_decay: add ``ascent_weight_decay * w`` to the gradient
            used for the ascent direction (default 0), per group.
        model: the model being trained. When given, BatchNorm running
            statistics are updated on the first pass only, and if it is a
            ``DistributedDataParallel`` module with ``ddp_ascent="local"``, the
            first pass runs under ``no_sync`` (m-sharpness).
        ddp_ascent: ``"local"`` (default; each replica ascends along its own
            gradient, as in the original SAM) or ``"global"`` (the ascent uses
            the all-reduced gradient; needed with DDP's ``static_graph=True``).
        max_grad_norm: clip the final (second-pass) gradient to this global
            L2 norm before the base step.
        skip_nonfinite: skip a step whose gradient (either pass) is not
            finite, leaving weights and state untouched. Costs one host read
            per pass; on by default only when a ``GradScaler`` is in use, and
            for a step whose radius exceeds :data:`CHECKED_RHO` (100), whose
            pass at ``w + e`` may overflow: such a step is skipped with a
            ``RuntimeWarning``. ``False`` never checks.
        perturbation: how the ascent is made: a
            :class:`~samkit.optim.perturbation.Perturbation` (default
            :class:`L2`, or :class:`Adaptive` with ``adaptive=True``).
        policy: which steps pay for the ascent: a
            :class:`~samkit.optim.policy.Policy` (default: all of them).
        mix: what the base step receives: a :class:`~samkit.optim.mix.Mix`
            (default: the gradient at ``w + e``).
        foreach: use ``torch._foreach_*`` kernels (default True) or the
            per-tensor reference loop.
        ascent_eps: added to the norm (default 1e-12): a zero gradient gives
            a zero perturbation.

    ``param_groups``, ``state`` and ``defaults`` are the base optimizer's, so LR
    schedulers, ``add_param_group`` and ``GradScaler`` work on this object.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 2)
        >>> def closure():
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = opt.step(closure)
        >>> opt.zero_grad()
        >>> opt.steps
        1
    """

    #: whether a parameter is a DTensor (set in __init__ and add_param_group); an
    #: instance unpickled without it takes the checked path
    _sharded = True

    # GradScaler.step() calls our step() even on overflow, with grad_scale and
    # found_inf set, so the weights are always restored (see _amp).
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params_or_optimizer: Any,
        base_optimizer: type[torch.optim.Optimizer] | None = None,
        *,
        rho: float | str | RhoController = _RHO,
        adaptive: bool = False,
        eta: float = _ETA,
        ascent_weight_decay: float = _ZERO,
        model: nn.Module | None = None,
        ddp_ascent: str = "local",
        max_grad_norm: float | None = None,
        skip_nonfinite: bool | None = None,
        perturbation: Perturbation | None = None,
        policy: Policy | None = None,
        mix: Mix | None = None,
        foreach: bool | None = None,
        ascent_eps: float = 1e-12,
        **base_kwargs: Any,
    ) -> None:
        given = {
            "rho": not isinstance(rho, _Default),
            "adaptive": adaptive is not False,
            "eta": not isinstance(eta, _Default),
            "ascent_weight_decay": not isinstance(ascent_weight_decay, _Default),
            "model": model is not None,
            "ddp_ascent": ddp_ascent != "local",
            "max_grad_norm": max_grad_norm is not None,
            "skip_nonfinite": skip_nonfinite is not None,
            "perturbation": perturbation is not None,
            "policy": policy is not None,
            "mix": mix is not None,
            "foreach": foreach is not None,
            "ascent_eps": ascent_eps != 1e-12,
        }
        check_flag("foreach", foreach, none=True)
        check_flag("skip_nonfinite", skip_nonfinite, none=True)
        if isinstance(rho, str):  # "auto" / "auto:<name>": a self-tuning controller
            rho = autorho.controller_from_name(rho)
            rho.adapt_to(adaptive=bool(adaptive) or isinstance(perturbation, Adaptive))
        base = _base_optimizer(params_or_optimizer, base_optimizer, base_kwargs, given, foreach)
        controller = rho if isinstance(rho, RhoController) else None
        rho = controller.initial_rho if controller is not None else rho
        _check_arguments(
            rho, eta, ascent_weight_decay, ascent_eps, max_grad_norm, ddp_ascent, model, adaptive,
            perturbation, policy, mix,
        )  # fmt: skip
        if getattr(base, "is_second_order", False):
            raise ValueError(
                f"Invalid base_optimizer value: {type(base).__name__} is second-order (is_second_order=True, "
                "backward(create_graph=True)); SAM restores the weights in place after the pass at w + e, "
                "which invalidates that graph. Use a first-order base optimizer."
            )
        _refuse_closure_stepping(base)

        # Optimizer.__init__ is not called: the param groups, state and defaults
        # are the base optimizer's (properties below). Only the hook registries
        # that torch's step/state_dict machinery expects are set up here.
        self.base_optimizer = base
        self._optimizer_step_pre_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict[int, Callable[..., Any]] = (
            OrderedDict()
        )
        self._optimizer_load_state_dict_post_hooks: OrderedDict[int, Callable[..., Any]] = (
            OrderedDict()
        )
        self._patch_step_function()

        self._sam_defaults = {
            "rho": float(rho),
            "eta": float(eta),
            "ascent_weight_decay": float(ascent_weight_decay),
        }
        # A base optimizer may use one of SAM's group keys for itself (Adadelta's
        # "rho" is its decay): SAM's own then lives under "sam_<key>".
        self.group_keys = {k: f"sam_{k}" if k in base.defaults else k for k in _GROUP_KEYS}
        self.rho_key = self.group_keys["rho"]
        for i, group in enumerate(base.param_groups):  # all checked before any is changed
            self._check_group(group, i)
        for key, value in self._sam_defaults.items():
            base.defaults.setdefault(self.group_keys[key], value)
        for group in base.param_groups:
            self._init_group(group)
        everything = [p for group in base.param_groups for p in group["params"]]
        _fsdp.refuse_fsdp1(everything)
        self._sharded = _fsdp.holds_dtensors(everything)  # FSDP2: the ascent runs on local shards

        self.perturbation = perturbation or (Adaptive() if adaptive else L2())
        self.policy = policy
        self.mix = mix
        self.rho_controller = controller
        self.model = model
        self.ddp_ascent = ddp_ascent
        self.max_grad_norm = max_grad_norm
        self.skip_nonfinite = skip_nonfinite
        self.foreach = True if foreach is None else bool(foreach)
        self.ascent_eps = float(ascent_eps)

        self.steps = 0  # completed SAM steps (ascending or not)
        self.ascents = 0  # steps that paid for the ascent
        self._backups: dict[Tensor, Tensor] = {}  # weight copies, allocated once
        self._scratch: dict[Tensor, Tensor] = {}  # copies of state vectors (Momentum-SAM), likewise
        self._group_copies: list[tuple[dict[str, Any], dict[str, Any]]] = []  # see _sam_group
        self._perturbed: list[tuple[list[Tensor], list[Tensor]]] | None = None
        self._pending = False  # first_step done, second_step not yet
        self._skip = False  # the pending step must not update the weights
        self._bn_ctx: contextlib.ExitStack | None = None
        self._local_first_pass = False
        self._unscaled = False  # the pending step's gradients are unscaled already
        self._first_pass_scaled = False  # first_step was given an enabled GradScaler
        self._cleared: Any = None  # the gradients first_step cleared (see second_step)
        self._large_radius = 0.0  # the pending step's radius, when above CHECKED_RHO
        if controller is not None:
            controller.bind(self)

    # ------------------------------------------------------------ forwarding
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.base_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.base_optimizer.param_groups = value

    @property
    def state(self):  # type: ignore[override]
        return self.base_optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.base_optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.base_optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.base_optimizer.defaults = value

    @property
    def perturbed(self) -> bool:
        """True while the weights are at ``w + e``: between a :meth:`first_step`
        that ascended and :meth:`second_step`. A closure can read it to tell its
        second call from its first (e.g. to log the loss at ``w`` only)."""
        return self._perturbed is not None

    # Optimizer.__getstate__ keeps only defaults / state / param_groups, which
    # here live in the base optimizer: copy and pickle would lose it. Keep
    # everything except the step wrapper an LR scheduler installs on the
    # instance (a closure, not picklable; torch's optimizers drop it too).
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("step", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def _check_group(self, group: dict[str, Any], index: int | str) -> None:
        for key, name in self.group_keys.items():
            check = check_rho if key == "rho" else check_nonneg
            check(f"{name} (param group {index})", group.get(name, self._sam_defaults[key]))

    def _init_group(self, group: dict[str, Any]) -> None:
        for key, name in self.group_keys.items():
            group.setdefault(name, self._sam_defaults[key])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._check_group(param_group, len(self.param_groups))
        self._init_group(param_group)
        self.base_optimizer.add_param_group(param_group)
        try:
            _fsdp.refuse_fsdp1(self.param_groups[-1]["params"])
        except ValueError:
            self.param_groups.pop()
            raise
        self._sharded = self._sharded or _fsdp.holds_dtensors(self.param_groups[-1]["params"])

    def _sam_group(self, group: dict[str, Any]) -> dict[str, Any]:
        """The group as the ascent reads it: SAM's settings under their plain names."""
        rho = group[self.rho_key]
        if not 0.0 <= rho <= MAX_RHO:  # (set after construction: NaN would silently mean no ascent)
            raise ValueError(
                f"Invalid {self.rho_key} value: {rho!r} in a param group (must be a finite number "
                f">= 0 and at most {MAX_RHO:.4g}, the largest float32)"
            )
        if (
            self.rho_key == "rho"
            and self.group_keys["eta"] == "eta"
            and self.group_keys["ascent_weight_decay"] == "ascent_weight_decay"
        ):
            return group
        copy = {**group, **{key: group[name] for key, name in self.group_keys.items()}}
        self._group_copies.append((copy, group))
        return copy

    def _reread_groups(self) -> None:
        """Refresh the copies :meth:`_sam_group` made (a controller has just written rho)."""
        for copy, group in self._group_copies:
            copy.update({key: group[name] for key, name in self.group_keys.items()})

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def observe_validation(self, loss: float) -> None:
        """Report a validation loss (the study's trainer and the integrations do).

        Only a rho controller that learns from validation uses it; otherwise
        it does nothing.
        """
        if self.rho_controller is not None:
            self.rho_controller.observe_validation(float(loss))

    def __repr__(self) -> str:
        parts = [
            f"rho={self.rho_controller or self._sam_defaults['rho']}",
            f"perturbation={self.perturbation!r}",
        ]
        parts += [f"policy={self.policy!r}"] + (
            [f"mix={self.mix!r}"] if self.mix is not None else []
        )
        return f"{type(self).__name__}({', '.join(parts)}, base={self.base_optimizer!r})"

    # --------------------------------------------------------------- helpers
    def _gather(
        self, vector: Callable[[Tensor], Tensor | None] | None = None
    ) -> list[tuple[dict[str, Any], list[Tensor], list[Tensor]]]:
        """``(group, params, grads)`` per group; ``vector(p)`` in place of ``p.grad`` if given."""
        out = []
        self._group_copies = []
        for group in self.param_groups:
            params, grads = [], []
            for p in group["params"]:
                grad = p.grad if vector is None else vector(p)
                if grad is None or not p.requires_grad:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("SAM does not support sparse gradients")
                params.append(p)
                grads.append(grad)
            if params:
                out.append((self._sam_group(group), params, grads))
        return out

    def _backups_for(self, params: list[Tensor], keys: list[Tensor] | None = None) -> list[Tensor]:
        """One weight buffer per parameter, keyed by ``keys`` (default: the parameters;
        under FSDP the DTensor parameters, while ``params`` are their local shards)."""
        return functional.buffers_like(self._backups, params if keys is None else keys, params)

    def _view(self, gathered: Any, local: bool = False, sharding: Any = None) -> StepView:
        return StepView(
            steps=self.steps,
            ascents=self.ascents,
            gradients=gathered,
            state=self.base_optimizer.state,
            foreach=self.foreach,
            eps=self.ascent_eps,
            local=local,
            process_group=_ddp.process_group(self.model),
            sharding=sharding,
        )

    def _all_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @contextlib.contextmanager
    def first_pass(self) -> Iterator[None]:
        """Context for the first forward *and* backward pass.

        Under DDP with ``ddp_ascent="local"`` it is ``model.no_sync()``, so each
        replica keeps its own gradient for its ascent; otherwise it does
        nothing. ``step(closure)`` uses it for you. The forward must run inside
        it too: DDP decides at forward time whether the backward all-reduces.
        A perturbation that needs no gradient has no first pass: nothing either.
        """
        self._local_first_pass = self.perturbation.needs_gradient and _ddp.uses_local_ascent(
            self.model, self.ddp_ascent
        )
        if self._local_first_pass:
            with _ddp.local_first_pass(self.model):  # type: ignore[arg-type]
                yield
        else:
            yield

    # ------------------------------------------------------------- protocol
    @_protocol
    def first_step(
        self, zero_grad: bool = True, *, scaler: torch.amp.GradScaler | None = None
    ) -> bool:
        """Move the weights to ``w + e(w)`` using the gradients now in ``.grad``.

        Returns True when the caller must now run the second forward/backward
        pass (at the perturbed weights) before :meth:`second_step`. Returns
        False when this step does not ascend (all rho are zero, the policy
        declined, or the gradient was not finite): the gradients are then left
        as they are, and :meth:`second_step` uses them directly (or skips the
        update if they are not finite).

        With ``zero_grad=True`` the first-pass gradients serve as scratch
        space and are cleared; with False they are kept intact (at the cost of
        a temporary copy).

        With ``scaler``, the first-pass gradients are unscaled here. On a step
        that returns False they stay unscaled for the base step and the scaler
        records that, so call ``scaler.unscale_(opt)`` (e.g. to clip) only
        after a second pass.

        With a perturbation that needs no gradient (``perturbation.needs_gradient``
        is False: :class:`~samkit.MomentumSAM`) there is no first pass: call
        ``first_step()`` *before* the forward, then run the one forward and
        backward (at ``w + e`` if it returned True, at ``w`` otherwise), then
        :meth:`second_step`::

            opt.first_step()                  # w + e, from the optimizer's momentum
            loss_fn(model(x), y).backward()   # the only pass
            opt.second_step(zero_grad=True)   # back to w, base step

        Gradients in ``.grad`` at that point would be added to the pass, so
        ``zero_grad=True`` clears them. With a ``model=``, BatchNorm statistics
        are then updated by that pass (the only one), as in the paper's code.
        """
        if self._pending:
            raise RuntimeError("first_step() was called twice; call second_step() in between")
        try:
            return self._first_step(zero_grad, scaler)
        except BaseException:
            # A policy, a perturbation or a collective may raise: never leave
            # perturbed weights, frozen BatchNorm or a half-open step behind.
            self.abort_step()
            raise

    def _first_step(self, zero_grad: bool, scaler: torch.amp.GradScaler | None) -> bool:
        by_gradient = self.perturbation.needs_gradient
        if zero_grad and not by_gradient:
            self.zero_grad()  # the only pass follows: what is in .grad would be added to it
        self._open_step()
        sharded, sources, sharding = self._sources(by_gradient, scaler)
        if by_gradient and not sharded:
            raise RuntimeError(
                f"{type(self).__name__}.first_step(): no parameter has a gradient (every .grad is "
                "None): nothing was back-propagated, so the step would silently do nothing. Call "
                "loss.backward() (or scaler.scale(loss).backward()) before first_step()"
            )
        if not by_gradient and not sharded and self.steps:  # (the base has stepped: it keeps state)
            perturbed = [p for g in self.param_groups if g[self.rho_key] > 0 for p in g["params"]]
            self.perturbation.check_state(perturbed, self.base_optimizer.state)
        gathered = sources if by_gradient else []
        found_inf = self._unscale_first_pass(gathered, scaler)
        local, self._local_first_pass = self._local_first_pass, False
        view = self._view(gathered, local, sharding)
        if self.rho_controller is not None:
            self.rho_controller.begin_step(view)
            self._reread_groups()  # under a renamed rho key the ascent reads copies of the groups
        factor = self.policy.rho_factor(view) if self.policy is not None else 1.0
        active = [entry for entry in sources if entry[0]["rho"] * factor > 0]
        if not self._agree_to_ascend(view, bool(active)):
            return self._decline(found_inf, scaler, local)
        if self.mix is not None:
            self.mix.before_ascent(view)
        # The ascent: u and its global norm, then w <- w + rho * d / ||u||, w kept exactly.
        foreach = self.foreach
        ascent = self._prepare_ascent(active, sharding, zero_grad, by_gradient)
        reduce = None if sharding is None else sharding.reduce_
        norm = functional.measure_(ascent, self.perturbation, foreach=foreach, reduce=reduce)
        if self._nonfinite(norm, found_inf, scaler, local):
            return self._skip_ascent(ascent, zero_grad and by_gradient)
        self._perturbed = functional.perturb_(
            ascent, norm, self.perturbation, rho_factor=factor, eps=self.ascent_eps, foreach=foreach
        )
        radius = max(entry[0]["rho"] for entry in active) * factor
        if radius > CHECKED_RHO and self.skip_nonfinite is None and not _amp.is_enabled(scaler):
            self._large_radius = radius  # second_step checks the pass at w + e (see CHECKED_RHO)
        self.ascents += 1
        self._unscaled = False  # the pass at w + e brings scaled gradients: second_step unscales
        if zero_grad and by_gradient:
            self._clear_grads(sharded)
        return True

    def _sources(self, by_gradient: bool, scaler: Any) -> tuple[Any, Any, _fsdp.Sharding | None]:
        """What the ascent starts from, per group: the gradients, or the base optimizer's
        state vectors (Momentum-SAM); under FSDP2 also as local shards, with their sharding."""
        sharded = self._gather() if by_gradient else self._gather(self._state_vector)
        if not self._sharded:
            return sharded, sharded, None
        sources, sharding = _fsdp.localize(sharded)
        if sharding is not None:
            _fsdp.check_supported(self, scaler)
        return sharded, sources, sharding

    def _prepare_ascent(
        self, active: Any, sharding: _fsdp.Sharding | None, zero_grad: bool, by_gradient: bool
    ) -> list[functional.AscentGroup]:
        """The ascent's groups: directions (in ``.grad`` itself when it may be overwritten,
        copies otherwise) and the weight backups, keyed by the DTensors under FSDP2."""
        backups_for = self._backups_for
        if sharding is not None:
            backups_for = sharding.backups_for(backups_for)
        directions = active if by_gradient else self._scratch_copies(active)
        in_place = zero_grad or not by_gradient
        return functional.prepare_ascent(
            directions, backups_for, in_place=in_place, foreach=self.foreach
        )

    def _state_vector(self, param: Tensor) -> Tensor | None:
        """The base optimizer's vector the ascent of ``param`` starts from (Momentum-SAM)."""
        return self.perturbation.ascent_vector(param, self.base_optimizer.state)

    def _scratch_copies(
        self, sources: Any
    ) -> list[tuple[dict[str, Any], list[Tensor], list[Tensor]]]:
        """``sources`` with each vector copied into scratch space: the ascent never writes the optimizer's state."""
        out = []
        for group, params, vectors in sources:
            copies = functional.buffers_like(self._scratch, params)
            for (_, _), (dst, src) in functional.group_by_device(copies, vectors).items():
                functional.copy_(dst, src, foreach=self.foreach)
            out.append((group, params, copies))
        return out

    @_protocol
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore the weights to ``w`` exactly and take the base optimizer's step.

        The gradients in ``.grad`` (from the pass at ``w + e``) drive the step.
        """
        if not self._pending:
            raise RuntimeError("second_step() called without first_step()")
        radius, self._large_radius = self._large_radius, 0.0
        ascended, skip, unscaled = self._close_step()
        if self._cleared is not None:
            self._fill_unreached_grads()
        grad_scale, found_inf = _amp.scaler_step_inputs(self)
        skip = skip or (isinstance(found_inf, Tensor) and bool(found_inf > 0))
        unscale, check = (
            grad_scale is not None and not unscaled,
            self._checks_finite(found_inf is not None),
        )
        guarded = bool(radius) and ascended and not check  # only this radius asks for the check
        check = check or guarded
        clip = check or self.max_grad_norm is not None
        if not skip and (unscale or clip or self.mix is not None):
            gathered = self._gather()
            if unscale:
                self._check_mix_units(ascended)
                _amp.unscale_by_(
                    [g for _, _, grads in gathered for g in grads], grad_scale, foreach=self.foreach
                )
            if self.mix is not None and check and ascended and found_inf is None:
                # A mix keeps state from this step's gradients (LookSAM's g_v): it must
                # not see a non-finite one, which would poison the steps that reuse it
                # (a GradScaler's found_inf has checked them already).
                skip = self._nonfinite_grads(gathered)
            if self.mix is not None and not skip:
                (self.mix.after_ascent if ascended else self.mix.after_plain)(self._view(gathered))
            skip = skip or (clip and self._clip_or_check(gathered, check))
            if skip and guarded:
                warnings.warn(
                    f"{type(self).__name__}: with rho = {radius:g} the gradient at w + e overflows "
                    "(its norm is not finite): the step was skipped, weights and state untouched. "
                    "Use a smaller rho",
                    RuntimeWarning,
                    stacklevel=3,
                )
        if not skip:
            self.base_optimizer.step()
        self.steps += 1
        self._opt_called = True  # tells LR schedulers a step happened
        if zero_grad:
            self.zero_grad()

    @_protocol
    def abort_step(self) -> None:
        """Undo a :meth:`first_step` whose second pass failed (two-step form).

        Restores the weights bit for bit, releases BatchNorm and closes the
        step without updating anything, so training can go on. ``step(closure)``
        does this by itself when the closure raises. A no-op when no step is
        open.
        """
        self._close_step()

    @_compile.disable_frame
    def step(  # type: ignore[override]
        self,
        closure: Callable[[], Tensor] | None = None,
        *,
        scaler: torch.amp.GradScaler | None = None,
        existing_grads: str = "error",
    ) -> Tensor | None:
        """One SAM step.

        With a ``closure`` (zeroes nothing itself; does forward + backward and
        returns the loss) both passes run here and the loss at ``w`` is
        returned. With ``scaler``, the closure must call
        ``scaler.scale(loss).backward()``; call ``scaler.update()`` afterwards.

        With a perturbation that needs no gradient (:class:`~samkit.MomentumSAM`)
        the weights move first and the closure runs once, at ``w + e``; the
        loss returned is the loss there (at ``w`` on a step that does not
        ascend, such as the first, before any momentum exists).

        Gradients already in ``.grad`` before the closure runs (micro-batches
        accumulated outside it) cannot be recomputed at ``w + e``, so by
        default (``existing_grads="error"``) the step refuses them: accumulate
        inside the closure instead. ``existing_grads="keep"`` treats them as a
        fixed part of the gradient of both passes (costs a copy of them).

        Without a closure, completes a step begun with :meth:`first_step`: this
        is what ``scaler.step(opt)`` calls.
        """
        if closure is None:
            if self._pending:
                self.second_step()
                return None
            raise RuntimeError(
                "SAM.step() needs a closure that does forward + backward and returns the loss, "
                "or a preceding first_step() (see SAM.first_step). A framework that calls step() "
                "without one needs glue: for Stable-Baselines3 use samkit.integrations.sb3.SAMPPO / SAMA2C; "
                "for torch.distributed.checkpoint's get/set_state_dict use samkit.integrations.fsdp's"
            )
        kept = self._existing_grads(existing_grads)
        closure = torch.enable_grad()(closure)
        by_gradient = self.perturbation.needs_gradient
        if by_gradient:
            with self.first_pass():
                loss = closure()
            self._check_closure_backward()
        try:
            if not by_gradient:  # the weights move first; the only pass adds to any kept gradients
                self.first_step(zero_grad=False, scaler=scaler)
                loss = closure()
                self._check_closure_backward()
            elif self.first_step(zero_grad=True, scaler=scaler):
                for p, g in kept.items():
                    p.grad = g
                closure()
        except BaseException:
            self.abort_step()  # never leave perturbed weights behind
            raise
        if _amp.is_enabled(scaler):
            scaler.step(self)  # type: ignore[union-attr]
        else:
            self.second_step()
        return loss

    def _check_closure_backward(self) -> None:
        """Refuse a closure after which no parameter has a gradient (it never called backward)."""
        if all(p.grad is None for group in self.param_groups for p in group["params"]):
            raise ValueError(
                f"Invalid closure value: no gradient reached any parameter after it ran (every "
                f".grad is None), so the {type(self).__name__} step would silently do nothing. The "
                "closure must call loss.backward() (or scaler.scale(loss).backward()) and return "
                "the loss"
            )

    # ------------------------------------------------- the protocol's pieces
    def _open_step(self) -> None:
        self._pending, self._skip, self._perturbed = True, False, None
        self._cleared = None
        self._large_radius = 0.0
        # BatchNorm statistics come from the pass at w; a perturbation without a
        # gradient has none, and its only pass (at w + e) must update them.
        if self.model is not None and self.perturbation.needs_gradient:
            self._bn_ctx = contextlib.ExitStack()
            self._bn_ctx.enter_context(freeze_bn_stats(self.model))

    def _close_step(self) -> tuple[bool, bool, bool]:
        """Restore ``w``, release BatchNorm, close the step; return (ascended, skip, unscaled)."""
        ascended = self._perturbed is not None
        if ascended:
            functional.restore_(self._perturbed, foreach=self.foreach)  # type: ignore[arg-type]
            self._perturbed = None
        if self._bn_ctx is not None:
            self._bn_ctx.close()
            self._bn_ctx = None
        out = (ascended, self._skip, self._unscaled)
        self._pending = self._skip = self._unscaled = False
        return out

    def _unscale_first_pass(
        self, gathered: Any, scaler: torch.amp.GradScaler | None
    ) -> Tensor | None:
        for _, _, grads in gathered:
            if any(g.requires_grad for g in grads):
                raise ValueError(
                    "Invalid gradient: it was made with backward(create_graph=True) (a second-order base "
                    "optimizer such as AdaHessian?); SAM restores the weights in place after the pass at "
                    "w + e, which invalidates that graph. Use a first-order base optimizer."
                )
        self._first_pass_scaled = _amp.is_enabled(scaler)
        if not (self._first_pass_scaled and gathered):
            return None
        found_inf, self._found_per_device = _amp.unscale_(
            [g for _, _, gs in gathered for g in gs], scaler
        )  # type: ignore[arg-type]
        self._unscaled = True  # second_step must not unscale these again
        return found_inf

    def _agree_to_ascend(self, view: StepView, active: bool) -> bool:
        if view.local:
            # DDP broadcasts rank 0's buffers at the forward after a synchronised
            # one; the local first pass was not, so ask for it explicitly.
            _ddp.request_buffer_broadcast(self.model)  # type: ignore[arg-type]
        ascend = active and (self.policy is None or self.policy.should_ascend(view))
        if view.local and active and self.policy is not None and not self.policy.replica_consistent:
            # A policy reading the local gradient may answer differently on each
            # replica: any replica asking for the ascent makes all ascend.
            device = view.gradients[0][1][0].device
            ascend = _ddp.any_replica(
                torch.tensor(ascend, device=device), view.process_group, local=True
            )
        return ascend

    def _decline(self, found_inf: Tensor | None, scaler: Any, local: bool) -> bool:
        """A step without ascent: the first-pass gradients go to the base step."""
        if local:
            _ddp.average_gradients(self._all_params(), self.model, foreach=self.foreach)
        if self._checks_finite(found_inf is not None) and found_inf is not None:
            self._skip = _ddp.any_replica(
                found_inf > 0, _ddp.process_group(self.model), local=local
            )
        if found_inf is not None:
            _amp.mark_unscaled(scaler, self, self._found_per_device, force_overflow=self._skip)
        return False

    def _checks_finite(self, scaled: bool) -> bool:
        return self.skip_nonfinite if self.skip_nonfinite is not None else scaled

    def _nonfinite(self, norm: Tensor, found_inf: Tensor | None, scaler: Any, local: bool) -> bool:
        if not self._checks_finite(scaler is not None):
            return False
        bad = (
            ~torch.isfinite(norm) if found_inf is None else (found_inf > 0) | ~torch.isfinite(norm)
        )
        return _ddp.any_replica(bad, _ddp.process_group(self.model), local=local)

    def _skip_ascent(self, ascent: list[functional.AscentGroup], zero_grad: bool) -> bool:
        self._skip = True
        if zero_grad:  # the scratch gradients were modified: make them plainly non-finite
            for ag in ascent:
                for _, directions, _ in ag.buckets:
                    functional.mul_(directions, float("nan"), foreach=self.foreach)
        return False

    def _clear_grads(self, gathered: Any) -> None:
        self._cleared = gathered
        if type(self.base_optimizer).zero_grad is torch.optim.Optimizer.zero_grad:
            # What the default zero_grad(set_to_none=True) does, without walking
            # every group again: only these params have gradients.
            for _, params, _ in gathered:
                for p in params:
                    p.grad = None
        else:
            self.zero_grad()

    def _fill_unreached_grads(self) -> None:
        """Zero gradients for the parameters whose first-pass gradients were cleared and
        that the pass at ``w + e`` did not reach (an unused head or branch): they had a
        gradient, so the base step must still see one (momentum, weight decay, Adam's
        step count), as with ``zero_grad(set_to_none=False)`` and no SAM."""
        for _, params, _ in self._cleared:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        self._cleared = None

    def _check_mix_units(self, ascended: bool) -> None:
        if self.mix is not None and ascended and not self._first_pass_scaled:
            raise ValueError(
                "Invalid scaler value: scaler.step(opt) after first_step() without the scaler: "
                f"{type(self).__name__} mixes first- and second-pass gradients, which would be in "
                "different units. Call first_step(scaler=scaler) (or step(closure, scaler=scaler))."
            )

    def _clip_or_check(self, gathered: Any, check: bool) -> bool:
        """Clip the final gradient (``max_grad_norm``) and/or check it is finite; True = skip."""
        if not gathered:
            return False
        if self.max_grad_norm is None:
            return check and self._nonfinite_grads(gathered)
        params = [p for _, group_params, _ in gathered for p in group_params]
        # torch's clipping sums DTensor (FSDP2) norms over the shards itself
        total = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm, foreach=self.foreach)
        return check and not bool(torch.isfinite(_fsdp.full(total)))

    def _nonfinite_grads(self, gathered: Any) -> bool:
        """Whether the global norm of the gradients in ``gathered`` is not finite (a host read)."""
        if not gathered:
            return False
        gathered, sharding = _fsdp.localize(gathered)
        total = functional.global_norm(
            [
                functional.sq_norm(bucket, foreach=self.foreach)
                for _, _, grads in gathered
                for (_, _), (bucket,) in functional.group_by_device(grads).items()
            ],
            reduce=None if sharding is None else sharding.reduce_,
        )
        return not bool(torch.isfinite(total))

    def _existing_grads(self, mode: str) -> dict[Tensor, Tensor]:
        """Gradients present before ``step(closure)``: refused, or kept for both passes."""
        if mode not in ("error", "keep"):
            raise ValueError(f"Invalid existing_grads value: {mode!r} (expected 'error' or 'keep')")
        present = [p for p in self._all_params() if p.grad is not None]
        if not present:
            return {}
        if mode == "keep":
            return {p: p.grad.clone() for p in present}  # type: ignore[union-attr]
        # zero_grad(set_to_none=False) leaves zeros, which are no accumulation
        if all(g.count_nonzero() == 0 for g in (p.grad for p in present)):  # type: ignore[union-attr]
            return {}
        raise RuntimeError(
            "SAM.step(closure): gradients were already accumulated before the step (backward outside the "
            "closure, e.g. gradient accumulation over micro-batches); the pass at w + e cannot recompute "
            "them, so the step would be wrong. Accumulate inside the closure (loop over the micro-batches "
            "there, (loss / n).backward() each), call zero_grad() before the step, or pass "
            "existing_grads='keep' to add them, as a fixed term, to both passes. (Lightning's "
            "accumulate_grad_batches and HF's gradient_accumulation_steps: samkit.integrations does it.)"
        )

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The base optimizer's state dict plus a ``"samkit"`` entry.

        A plain torch optimizer can load it too (the extra key is ignored).
        The weight backup is scratch space and is not saved.
        """
        if self._pending:
            raise RuntimeError(
                "state_dict() between first_step() and second_step(): the weights are perturbed"
            )
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        sd = self.base_optimizer.state_dict()
        sd["samkit"] = {
            "version": 2,
            "method": self.method,
            "rho_key": self.rho_key,
            "steps": self.steps,
            "ascents": self.ascents,
            "perturbation": self.perturbation.state_dict(),
            "policy": self.policy.state_dict() if self.policy is not None else {},
            "mix": self.mix.state_dict(self._all_params()) if self.mix is not None else {},
            "rho": self.rho_controller.state_dict() if self.rho_controller is not None else {},
        }
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, sd)
            if result is not None:
                sd = result
        return sd

    @property
    def method(self) -> dict[str, str | None]:
        """What this optimizer is, as its state dicts record it: the class and its
        perturbation, policy, mix and rho controller (None: the default; plain SAM
        is ``{"class": "SAM", "perturbation": "L2", "policy": None, "mix": None,
        "rho": None}``). Their settings (rho, k, alpha, ...) are not part of it."""
        policy = None if type(self.policy) is Always else self.policy
        return {
            "class": type(self).__name__,
            "perturbation": _piece_name(self.perturbation),
            "policy": _piece_name(policy),
            "mix": _piece_name(self.mix),
            "rho": _piece_name(self.rho_controller),
        }

    def load_state_dict(  # type: ignore[override]
        self, state_dict: dict[str, Any], *, base_only: bool = False
    ) -> None:
        """Load a state dict from :meth:`state_dict` (or a plain torch optimizer's).

        Everything is checked before anything changes: on a bad state dict
        this raises ``ValueError`` and the optimizer is as it was. Groups of a
        plain torch state dict keep this optimizer's rho / eta /
        ascent_weight_decay.

        A state dict records the method that wrote it (:attr:`method`); one of
        another method (GSAM's into SAM, ``rho="auto"``'s into a fixed rho, ...)
        is refused, since its radius and samkit state would silently become
        this optimizer's (a fixed-rho one into an optimizer with a rho
        controller loads, and the controller starts afresh). ``base_only=True``
        loads only the base optimizer's part (its state and param groups:
        momentum, Adam moments, lr), keeping this optimizer's rho / eta /
        ascent_weight_decay and samkit state: the way to start one method from
        another's run. State dicts of samkit 0.2, which do not record their
        method, load as before.
        """
        base_only = check_flag("base_only", base_only)
        if self._pending:
            raise RuntimeError(
                "load_state_dict() between first_step() and second_step(): the weights are perturbed"
            )
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        base_sd, own = _validate_state_dict(
            state_dict, self.param_groups, self.group_keys.values(), self.rho_key
        )
        written = own.get("method") if own is not None else None
        saved_key = own.get("rho_key", self.rho_key) if own is not None else self.rho_key
        if saved_key != self.rho_key:
            raise ValueError(
                f"Invalid state_dict value: it keeps SAM's radius under {saved_key!r}, this optimizer "
                f"under {self.rho_key!r}: it was saved by SAM over another base optimizer "
                f"(not {type(self.base_optimizer).__name__}); load it into the same kind"
            )
        if base_only:
            own = None  # this optimizer's samkit state, and its groups' SAM settings, stay
            keys = set(self.group_keys.values())
            base_sd = {
                **base_sd,
                "param_groups": [
                    {k: v for k, v in g.items() if k not in keys} for g in base_sd["param_groups"]
                ],
            }
        elif written is not None and not _same_method(written, self.method):
            raise ValueError(
                f"Invalid state_dict value: it was written by {_describe_method(written)}, and this "
                f"optimizer is {_describe_method(self.method)}: loading it would give this one the "
                "other's radius and samkit state. To start from that run's base optimizer state "
                "(momentum, Adam moments, lr) and keep this optimizer's rho and settings, call "
                "load_state_dict(state_dict, base_only=True)"
            )
        saved = self.base_optimizer.state_dict()
        keys = list(self.group_keys.values())
        previous = [{k: g[k] for k in keys} for g in self.param_groups]
        pieces = (self.perturbation, self.policy, self.rho_controller)
        snapshots = [p.state_dict() if p is not None else None for p in pieces]
        mix_snapshot = self.mix.state_dict(self._all_params()) if self.mix is not None else None
        counters = (self.steps, self.ascents)
        try:
            try:
                self.base_optimizer.load_state_dict(base_sd)
            except (KeyError, TypeError, IndexError, RuntimeError) as error:
                raise ValueError(
                    f"Invalid state_dict value: {type(self.base_optimizer).__name__} cannot load it "
                    f"({type(error).__name__}: {error}); was it saved by another base optimizer?"
                ) from error
            for group, before in zip(self.param_groups, previous):
                for key in keys:
                    group.setdefault(key, before[key])
            if own is not None:
                self._load_own(own)
        except BaseException:
            self.base_optimizer.load_state_dict(saved)
            for group, before in zip(self.param_groups, previous):
                group.update(before)
            for piece, snapshot in zip(pieces, snapshots):
                if piece is not None:
                    piece.load_state_dict(snapshot)
            if self.mix is not None:
                self.mix.load_state_dict(mix_snapshot, self._all_params())  # type: ignore[arg-type]
            self.steps, self.ascents = counters
            raise
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _load_own(self, own: dict[str, Any]) -> None:
        self.steps = int(own["steps"])
        self.ascents = int(own.get("ascents", 0))
        self.perturbation.load_state_dict(own.get("perturbation", {}))
        if self.policy is not None:
            self.policy.load_state_dict(own.get("policy", {}))
        # samkit 0.1 kept GSAM's rho schedule and LookSAM's g_v under their own keys
        legacy_gsam = own.get("gsam") or {}
        rho_state = own.get("rho", legacy_gsam.get("rho_schedule") or {})
        if self.rho_controller is not None:
            self.rho_controller.load_state_dict(rho_state)
        if self.mix is not None:
            self.mix.load_state_dict(own.get("mix") or own.get("looksam") or {}, self._all_params())


# ------------------------------------------------------------------ checks


def _base_optimizer(
    params_or_optimizer: Any,
    base_class: Any,
    base_kwargs: dict[str, Any],
    given: dict[str, bool],
    foreach: bool | None,
) -> torch.optim.Optimizer:
    """The wrapped optimizer: the instance given, or one built from the class form."""
    if isinstance(params_or_optimizer, torch.optim.Optimizer):
        if "eps" in base_kwargs:
            raise ValueError(
                "Invalid eps value: eps= belongs to the base optimizer (build it with its eps); "
                "SAM's own epsilon is ascent_eps="
            )
        if base_class is not None or base_kwargs:
            raise ValueError(
                "Invalid base_optimizer value: pass either an optimizer instance, "
                f"or params with an optimizer class and its arguments (got extra {sorted(base_kwargs)})"
            )
        if isinstance(params_or_optimizer, SAM):
            raise ValueError("Invalid params_or_optimizer value: cannot wrap a SAM in a SAM")
        return params_or_optimizer
    if inspect.isclass(params_or_optimizer) and issubclass(
        params_or_optimizer, torch.optim.Optimizer
    ):
        name = params_or_optimizer.__name__
        raise ValueError(
            f"Invalid params_or_optimizer value: the class {name}, not an optimizer; pass an "
            f"instance, SAM({name}(model.parameters(), ...), rho=...), or the parameters and the "
            f"class, SAM(model.parameters(), {name}, rho=..., ...)"
        )
    if isinstance(params_or_optimizer, nn.Module):
        raise ValueError(
            f"Invalid params_or_optimizer value: a model ({type(params_or_optimizer).__name__}); "
            "pass model.parameters() (or an optimizer instance)"
        )
    if not (inspect.isclass(base_class) and issubclass(base_class, torch.optim.Optimizer)):
        raise ValueError(
            f"Invalid base_optimizer value: {base_class!r}; expected a torch.optim.Optimizer "
            "class when params are given (or pass an optimizer instance). In Stable-Baselines3's "
            "policy_kwargs use samkit.integrations.sb3.SAMPPO / SAMA2C instead of optimizer_class=SAM"
        )
    accepted = _keywords_of(base_class)
    for name, was_given in given.items():
        if name in accepted and was_given and name != "foreach":
            raise ValueError(
                f"Invalid {name} value: both SAM and {base_class.__name__} take {name}=, so the class form "
                f"is ambiguous; build the optimizer yourself: SAM({base_class.__name__}(params, ...), {name}=...)"
            )
    if foreach is not None and "foreach" in accepted:
        base_kwargs = {**base_kwargs, "foreach": foreach}  # the flag is for both
    return base_class(params_or_optimizer, **base_kwargs)


def _refuse_closure_stepping(base: torch.optim.Optimizer) -> None:
    """Refuse a base optimizer whose ``step`` must evaluate the loss itself (L-BFGS).

    SAM calls ``base.step()`` once, without a closure, on the gradient at
    ``w + e``. An optimizer whose ``step(closure)`` requires the closure (a
    line search, several loss evaluations per step) cannot take that step: it
    would fail at the first step, or re-evaluate the loss at weights SAM did
    not choose.
    """
    name = type(base).__name__
    why = None
    if isinstance(base, torch.optim.LBFGS):
        why = "its step(closure) re-evaluates the loss and gradient several times per step"
    else:
        try:
            closure = inspect.signature(type(base).step).parameters.get("closure")
        except (TypeError, ValueError):  # pragma: no cover - a step without a signature
            closure = None
        if closure is not None and closure.default is inspect.Parameter.empty:
            why = "its step(closure) requires a closure, so it evaluates the loss itself"
    if why is not None:
        raise ValueError(
            f"Invalid base_optimizer value: {name}: {why}. SAM takes the base step once, with "
            "the gradient at w + e already in .grad and no closure; use an optimizer that steps "
            "from .grad (SGD, Adam, AdamW, ...)"
        )


def _keywords_of(cls: type) -> set[str]:
    try:
        parameters = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return set()
    return {
        name
        for name, p in parameters.items()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def _check_arguments(
    rho: Any,
    eta: Any,
    ascent_weight_decay: Any,
    ascent_eps: Any,
    max_grad_norm: Any,
    ddp_ascent: Any,
    model: Any,
    adaptive: Any,
    perturbation: Any,
    policy: Any,
    mix: Any,
) -> None:
    check_rho("rho", rho)
    check_nonneg("eta", eta)
    check_nonneg("ascent_weight_decay", ascent_weight_decay)
    check_pos("ascent_eps", ascent_eps)
    if max_grad_norm is not None:
        check_pos("max_grad_norm", max_grad_norm)
    if ddp_ascent not in ("local", "global"):
        raise ValueError(f"Invalid ddp_ascent value: {ddp_ascent!r} (expected 'local' or 'global')")
    if model is not None and not isinstance(model, nn.Module):
        raise ValueError(f"Invalid model value: expected an nn.Module, got {type(model).__name__}")
    _ddp.check_static_graph(model, ddp_ascent)
    if not isinstance(adaptive, bool):
        raise ValueError(f"Invalid adaptive value: {adaptive!r} (must be True or False)")
    if perturbation is not None and adaptive:
        raise ValueError("Invalid adaptive value: give adaptive=True or a perturbation, not both")
    for name, value, kind in (
        ("perturbation", perturbation, Perturbation),
        ("policy", policy, Policy),
        ("mix", mix, Mix),
    ):
        if value is not None and not isinstance(value, kind):
            raise ValueError(f"Invalid {name} value: {value!r} is not a samkit {kind.__name__}")
    if perturbation is not None and not perturbation.needs_gradient:
        # no first pass: nothing to mix, no gradient for a policy to read
        if mix is not None:
            raise ValueError(
                f"Invalid mix value: {mix!r} mixes first- and second-pass gradients; "
                f"{perturbation!r} perturbs before the only pass"
            )
        if policy is not None and policy.reads_gradients:
            raise ValueError(
                f"Invalid policy value: {policy!r} decides from the first-pass gradient; "
                f"{perturbation!r} perturbs before any gradient exists"
            )


def _validate_state_dict(
    state_dict: Any, groups: list[dict[str, Any]], keys: Any, rho_key: str
) -> tuple[dict[str, Any], Any]:
    """Split and check a state dict before anything is loaded; raise ValueError naming what is wrong."""
    if (
        not isinstance(state_dict, dict)
        or "param_groups" not in state_dict
        or "state" not in state_dict
    ):
        raise ValueError(
            "Invalid state_dict value: expected an optimizer state dict (with 'state' and 'param_groups')"
        )
    base_sd = {k: v for k, v in state_dict.items() if k != "samkit"}
    saved_groups = state_dict["param_groups"]
    if not isinstance(saved_groups, list) or len(saved_groups) != len(groups):
        raise ValueError(
            f"Invalid state_dict value: {len(saved_groups) if isinstance(saved_groups, list) else '?'} param "
            f"groups, this optimizer has {len(groups)}"
        )
    for i, (saved, group) in enumerate(zip(saved_groups, groups)):
        if not isinstance(saved, dict) or len(saved.get("params", ())) != len(group["params"]):
            raise ValueError(
                f"Invalid state_dict value: param group {i} does not match this optimizer's"
            )
        for key in keys:
            if key in saved:
                check = check_rho if key == rho_key else check_nonneg
                check(f"{key} (param group {i} of the state dict)", saved[key])
        if "lr" in saved and not (isinstance(saved["lr"], Tensor) or _finite_nonneg(saved["lr"])):
            raise ValueError(
                f"Invalid lr (param group {i} of the state dict) value: {saved['lr']!r}"
            )
    own = state_dict.get("samkit")
    if own is not None:
        if not isinstance(own, dict):
            raise ValueError("Invalid state_dict value: its 'samkit' entry is not a dict")
        for key in ("steps", "ascents"):
            value = own.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"Invalid state_dict value: samkit {key} = {value!r} (must be an int >= 0)"
                )
        for key in ("perturbation", "policy", "mix", "rho"):
            if key in own and not isinstance(own[key], dict):
                raise ValueError(f"Invalid state_dict value: samkit {key} entry is not a dict")
        method = own.get("method")
        if method is not None and not (
            isinstance(method, dict) and all(isinstance(k, str) for k in method)
        ):
            raise ValueError(
                f"Invalid state_dict value: samkit method entry {method!r} is not a dict"
            )
    return base_sd, own


def _piece_name(piece: Any) -> str | None:
    """A perturbation / policy / mix / rho controller as a state dict records it: its class
    (and its inner perturbation's, if it wraps one); None for the default."""
    if piece is None:
        return None
    inner = getattr(piece, "inner", None)
    name = type(piece).__name__
    return name if inner is None else f"{name}({_piece_name(inner)})"


def _same_method(written: dict[str, Any], mine: dict[str, Any]) -> bool:
    """Whether a state dict written by ``written`` may load into ``mine``: the same
    class, perturbation, policy and mix, and the same rho controller -- or none in
    the writer (a fixed-rho checkpoint starts a controller afresh; the controller,
    not the loaded groups, sets the radius)."""
    others = [k for k in {*written, *mine} if k != "rho"]
    if any(written.get(k) != mine.get(k) for k in others):
        return False
    return written.get("rho") in (None, mine.get("rho"))


#: what a piece is when not given: omitted from descriptions
_DEFAULT_PIECES = {"perturbation": "L2", "policy": None, "mix": None, "rho": None}


def _describe_method(method: dict[str, Any]) -> str:
    """``GSAM (mix=SurrogateGap, rho=FollowLR)`` for an error message."""
    pieces = [
        f"{key}={method.get(key)}"
        for key, default in _DEFAULT_PIECES.items()
        if method.get(key, default) != default
    ]
    name = str(method.get("class", "?"))
    return f"{name} ({', '.join(pieces)})" if pieces else name


def _finite_nonneg(value: Any) -> bool:
    try:
        check_nonneg("lr", value)
    except ValueError:
        return False
    return True
