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

This file holds the protocol; one step's state is a :class:`._step.Step`,
whose docstring is the protocol's state machine. :func:`samkit.functional.sam_ascent`
is the whole ascent on one screen; docs/architecture.md maps the other modules.
The pieces of a variant (perturbation, policy, mix, rho controller) see a step
through a :class:`.view.StepView`, never this object.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .. import functional
from . import _amp, _args, _compile, _ddp, _feedback, _fsdp, _state
from ._step import Step
from ._wrapper import Wrapper
from .batchnorm import freeze_bn_stats
from .mix import Mix
from .perturbation import L2, Adaptive, Perturbation
from .policy import Policy
from .rho import RhoController
from .view import Gathered, RhoGroups, StepView, sam_settings

__all__ = ["SAM"]

#: Above this radius (rho times the policy's factor) a step checks that the pass
#: at ``w + e`` is finite, even with ``skip_nonfinite=None``. Below it ``e`` is
#: at most ``rho`` per coordinate (``rho (|w| + eta)`` for ASAM) and the scale
#: ``rho / (||u|| + eps)`` at most ``1e14``: the perturbation itself cannot
#: overflow float32, and the hot path stays free of host reads.
CHECKED_RHO = 100.0


class SAM(_state.StateDict, _feedback.Feedback, Wrapper):
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

    #: the step in flight (see :mod:`._step`); None between steps
    _step: Step | None = None

    def __init__(
        self,
        params_or_optimizer: torch.optim.optimizer.ParamsT | torch.optim.Optimizer,
        base_optimizer: type[torch.optim.Optimizer] | None = None,
        *,
        rho: float | str | RhoController = _args.RHO,
        adaptive: bool = False,
        eta: float = _args.ETA,
        ascent_weight_decay: float = _args.ZERO,
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
        keywords = dict(
            rho=rho, adaptive=adaptive, eta=eta, ascent_weight_decay=ascent_weight_decay,
            model=model, ddp_ascent=ddp_ascent, max_grad_norm=max_grad_norm,
            skip_nonfinite=skip_nonfinite, perturbation=perturbation, policy=policy, mix=mix,
            foreach=foreach, ascent_eps=ascent_eps,
        )  # fmt: skip
        checked = _args.check(params_or_optimizer, base_optimizer, base_kwargs, keywords)
        super().__init__(checked.base)  # param_groups, state, defaults: the base's (._wrapper)
        base = checked.base
        self._sam_defaults = {"rho": float(checked.rho), "eta": float(eta)}
        self._sam_defaults["ascent_weight_decay"] = float(ascent_weight_decay)
        self._init_groups(base)
        self.perturbation = perturbation or (Adaptive() if adaptive else L2())
        self.policy, self.mix, self.rho_controller = policy, mix, checked.controller
        self.model, self.ddp_ascent = model, ddp_ascent
        self.max_grad_norm, self.skip_nonfinite = max_grad_norm, skip_nonfinite
        self.foreach = True if foreach is None else bool(foreach)
        self.ascent_eps = float(ascent_eps)
        self.steps = 0  # completed SAM steps (ascending or not)
        self.ascents = 0  # steps that paid for the ascent
        self._backups: dict[Tensor, Tensor] = {}  # weight copies, allocated once
        self._scratch: dict[Tensor, Tensor] = {}  # copies of state vectors (Momentum-SAM), likewise
        # what a rho controller reads and writes of the param groups (never this object)
        self._rho_groups = RhoGroups(base, self.rho_key)
        if self.rho_controller is not None:
            self.rho_controller.bind(self._rho_groups)

    def _init_groups(self, base: torch.optim.Optimizer) -> None:
        # A base optimizer may use one of SAM's group keys for itself (Adadelta's
        # "rho" is its decay): SAM's own then lives under "sam_<key>".
        self.group_keys = {
            k: f"sam_{k}" if k in base.defaults else k
            for k in ("rho", "eta", "ascent_weight_decay")
        }
        self.rho_key = self.group_keys["rho"]
        _args.init_groups(base.param_groups, self.group_keys, self._sam_defaults)
        for key, value in self._sam_defaults.items():
            base.defaults.setdefault(self.group_keys[key], value)
        everything = [p for group in base.param_groups for p in group["params"]]
        _args.check_params(base.param_groups)  # FSDP1's shards; a parameter listed twice
        self._sharded = _fsdp.holds_dtensors(everything)  # FSDP2: the ascent runs on local shards

    @property
    def perturbed(self) -> bool:
        """True while the weights are at ``w + e``: between a :meth:`first_step`
        that ascended and :meth:`second_step`. A closure can read it to tell its
        second call from its first (e.g. to log the loss at ``w`` only)."""
        return self._step is not None and self._step.perturbed

    @property
    def _pending(self) -> bool:
        """A step is open: :meth:`first_step` done, :meth:`second_step` not yet."""
        return self._step is not None and self._step.opened

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        index = len(self.param_groups)
        _args.init_groups([param_group], self.group_keys, self._sam_defaults, start=index)
        self.base_optimizer.add_param_group(param_group)
        try:
            _args.check_params(self.param_groups[-1:], start=index)
        except ValueError:
            self.param_groups.pop()
            raise
        self._sharded = self._sharded or _fsdp.holds_dtensors(self.param_groups[-1]["params"])

    def __repr__(self) -> str:
        rho = self.rho_controller or self._sam_defaults["rho"]
        parts = [f"rho={rho}", f"perturbation={self.perturbation!r}", f"policy={self.policy!r}"]
        parts += [f"mix={self.mix!r}"] if self.mix is not None else []
        return f"{type(self).__name__}({', '.join(parts)}, base={self.base_optimizer!r})"

    # --------------------------------------------------------------- helpers
    def _gather(self, vector: Callable[[Tensor], Tensor | None] | None = None) -> Gathered:
        """``(group, params, grads)`` per group; ``vector(p)`` in place of ``p.grad`` if given.
        ``group`` reads SAM's settings under their plain names (:func:`.view.sam_settings`)."""
        out = []
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
                _args.check_group_rho(group, self.rho_key)
                out.append((sam_settings(group, self.group_keys), params, grads))
        return out

    def _backups_for(self, params: list[Tensor], keys: list[Tensor] | None = None) -> list[Tensor]:
        """One weight buffer per parameter, keyed by ``keys`` (default: the parameters;
        under FSDP the DTensor parameters, while ``params`` are their local shards)."""
        return functional.buffers_like(self._backups, params if keys is None else keys, params)

    def _view(self, gathered: Gathered, local: bool, sharding: _fsdp.Sharding | None) -> StepView:
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
            groups=self._rho_groups,
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
        if self._pending:
            raise RuntimeError("first_pass() while a step is open; call second_step() first")
        local = self.perturbation.needs_gradient and _ddp.uses_local_ascent(
            self.model, self.ddp_ascent
        )
        self._step = Step(local=local)  # AT_W: the next first_step() reads how the pass ran
        if local:
            with _ddp.local_first_pass(self.model):  # type: ignore[arg-type]  # (local: a DDP model)
                yield
        else:
            yield

    # ------------------------------------------------------------- protocol
    @_compile.protocol
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
        step = self._open_step()
        sharded, sources, sharding = self._sources(by_gradient, scaler)
        gathered = sources if by_gradient else []
        _args.check_first_pass_grads(gathered)
        _amp.unscale_first_pass(step, [g for _, _, grads in gathered for g in grads], scaler)
        view = self._view(gathered, step.local, sharding)
        _ddp.check_replicas_agree(self, view)  # (once: before any other collective)
        view.skips_nonfinite = self._checks_finite(scaler is not None)
        if self.rho_controller is not None:
            self.rho_controller.begin_step(view)  # writes each group's rho, read just below
        factor = self.policy.rho_factor(view) if self.policy is not None else 1.0
        active = [entry for entry in sources if entry[0]["rho"] * factor > 0]
        if not _ddp.agree_to_ascend(view, bool(active), self.policy, self.model):
            return self._decline(step, scaler)
        if self.mix is not None:
            self.mix.before_ascent(view)
        if not self._ascend(active, factor, view, zero_grad, scaler):
            return False
        if zero_grad and by_gradient:
            self._clear_grads(step, sharded)
        return True

    def _sources(
        self, by_gradient: bool, scaler: _amp.Scaler
    ) -> tuple[Gathered, Gathered, _fsdp.Sharding | None]:
        """What the ascent starts from, per group: the gradients, or the base optimizer's
        state vectors (Momentum-SAM); under FSDP2 also as local shards, with their sharding."""
        sharded = self._gather() if by_gradient else self._gather(self._state_vector)
        if by_gradient and not sharded:
            raise RuntimeError(
                f"{type(self).__name__}.first_step(): no parameter has a gradient (every .grad is "
                "None): nothing was back-propagated, so the step would silently do nothing. Call "
                "loss.backward() (or scaler.scale(loss).backward()) before first_step()"
            )
        if not by_gradient and not sharded and self.steps:  # (the base has stepped: it keeps state)
            perturbed = [p for g in self.param_groups if g[self.rho_key] > 0 for p in g["params"]]
            self.perturbation.check_state(perturbed, self.base_optimizer.state)
        if not self._sharded:
            return sharded, sharded, None
        sources, sharding = _fsdp.localize(sharded)
        if sharding is not None:
            _fsdp.check_supported(self.mix, self.perturbation, scaler, type(self).__name__)
        return sharded, sources, sharding

    def _ascend(
        self, active: Gathered, factor: float, view: StepView, zero_grad: bool, scaler: _amp.Scaler
    ) -> bool:
        """The ascent: u and its global norm, then w <- w + rho * d / ||u||, w kept exactly."""
        step, by_gradient = self._step, self.perturbation.needs_gradient
        assert step is not None
        ascent = self._prepare_ascent(active, view.sharding, zero_grad, by_gradient)
        reduce = None if view.sharding is None else view.sharding.reduce_
        norm = functional.measure_(ascent, self.perturbation, foreach=self.foreach, reduce=reduce)
        if self._nonfinite(norm, scaler, view.local):
            step.skip = True
            return self._skip_ascent(ascent, zero_grad and by_gradient)
        step.restore = functional.perturb_(
            ascent, norm, self.perturbation, rho_factor=factor, eps=self.ascent_eps,
            foreach=self.foreach,
        )  # fmt: skip
        step.ascended = True
        radius = max(entry[0]["rho"] for entry in active) * factor
        if radius > CHECKED_RHO and self.skip_nonfinite is None and not _amp.is_enabled(scaler):
            step.large_radius = radius  # second_step checks the pass at w + e (see CHECKED_RHO)
        self.ascents += 1
        step.unscaled = False  # the pass at w + e brings scaled gradients: second_step unscales
        return True

    def _prepare_ascent(
        self, active: Gathered, sharding: _fsdp.Sharding | None, zero_grad: bool, by_gradient: bool
    ) -> list[functional.AscentGroup]:
        """The ascent's groups: directions (in ``.grad`` itself when it may be overwritten,
        copies otherwise) and the weight backups, keyed by the DTensors under FSDP2."""
        backups_for: Callable[[list[Tensor]], list[Tensor]] = self._backups_for
        if sharding is not None:
            backups_for = sharding.backups_for(self._backups_for)
        directions = active if by_gradient else self._scratch_copies(active)
        in_place = zero_grad or not by_gradient
        return functional.prepare_ascent(
            directions, backups_for, in_place=in_place, foreach=self.foreach, gradients=by_gradient
        )

    def _state_vector(self, param: Tensor) -> Tensor | None:
        """The base optimizer's vector the ascent of ``param`` starts from (Momentum-SAM)."""
        return self.perturbation.ascent_vector(param, self.base_optimizer.state)

    def _scratch_copies(self, sources: Gathered) -> Gathered:
        """``sources`` with each vector copied into scratch space: the ascent never writes the optimizer's state."""
        out = []
        for group, params, vectors in sources:
            copies = functional.buffers_like(self._scratch, params)
            for (_, _), (dst, src) in functional.group_by_device(copies, vectors).items():
                functional.copy_(dst, src, foreach=self.foreach)
            out.append((group, params, copies))
        return out

    @_compile.protocol
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore the weights to ``w`` exactly and take the base optimizer's step.

        The gradients in ``.grad`` (from the pass at ``w + e``) drive the step.
        """
        if not self._pending:
            raise RuntimeError("second_step() called without first_step()")
        step = self._close_step()
        _args.check_second_pass(step.fill_unreached_grads())
        if not self._final_gradient(step):
            self.base_optimizer.step()
        self.steps += 1
        self._opt_called = True  # tells LR schedulers a step happened
        if zero_grad:
            self.zero_grad()

    def _final_gradient(self, step: Step) -> bool:
        """Unscale, mix, clip and check the gradient the base step takes; True: skip the step."""
        grad_scale, found_inf = _amp.scaler_step_inputs(self)
        skip = step.skip or (isinstance(found_inf, Tensor) and bool(found_inf > 0))
        unscale = grad_scale is not None and not step.unscaled
        check = self._checks_finite(found_inf is not None)
        guarded = bool(step.large_radius) and step.ascended and not check  # only this radius asks
        check = check or guarded
        clip = check or self.max_grad_norm is not None
        if skip or not (unscale or clip or self.mix is not None):
            return skip
        gathered = self._gather()
        if unscale and grad_scale is not None:
            _amp.check_mix_units(step, self.mix, type(self).__name__)
            _amp.unscale_by_(
                [g for _, _, grads in gathered for g in grads], grad_scale, foreach=self.foreach
            )
        if self.mix is not None and check and step.ascended and found_inf is None:
            # A mix keeps state from this step's gradients (LookSAM's g_v): it must
            # not see a non-finite one, which would poison the steps that reuse it
            # (a GradScaler's found_inf has checked them already).
            skip = self._nonfinite_grads(gathered)
        if self.mix is not None and not skip:
            mix = self.mix.after_ascent if step.ascended else self.mix.after_plain
            mix(self._view(gathered, False, None))
        skip = skip or (clip and self._clip_or_check(gathered, check))
        if skip and guarded:
            warnings.warn(
                f"{type(self).__name__}: with rho = {step.large_radius:g} the gradient at w + e "
                "overflows (its norm is not finite): the step was skipped, weights and state "
                "untouched. Use a smaller rho",
                RuntimeWarning,
                stacklevel=4,
            )
        return skip

    @_compile.protocol
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
        params, name = self._all_params(), type(self).__name__
        kept = _args.existing_grads(params, existing_grads)
        closure = torch.enable_grad()(closure)
        by_gradient = self.perturbation.needs_gradient
        if by_gradient:
            with self.first_pass():
                loss = _args.call_closure(closure, params, name)
        try:
            if not by_gradient:  # the weights move first; the only pass adds to any kept gradients
                self.first_step(zero_grad=False, scaler=scaler)
                loss = _args.call_closure(closure, params, name)
            elif self.first_step(zero_grad=True, scaler=scaler):
                for p, g in kept.items():
                    p.grad = g
                _args.call_closure(closure, params, name)  # (at w + e: no `if not perturbed`)
        except BaseException:
            self.abort_step()  # never leave perturbed weights behind
            raise
        if _amp.is_enabled(scaler):
            scaler.step(self)
        else:
            self.second_step()
        return loss

    # ------------------------------------------------- the protocol's pieces
    def _open_step(self) -> Step:
        """``AT_W`` (or no step) -> ``PLAIN``: the step is open, the weights still at ``w``."""
        local = self._step is not None and self._step.local  # recorded by first_pass()
        _ddp.warn_without_first_pass(self, self._step is not None)
        self._step = step = Step(opened=True, local=local)
        # BatchNorm statistics come from the pass at w; a perturbation without a
        # gradient has none, and its only pass (at w + e) must update them.
        if self.model is not None and self.perturbation.needs_gradient:
            step.frozen_bn = contextlib.ExitStack()
            step.frozen_bn.enter_context(freeze_bn_stats(self.model))
        return step

    def _close_step(self) -> Step:
        """Any state -> no step: restore ``w``, release BatchNorm; return the closed step."""
        step = self._step if self._step is not None else Step()
        step.close(foreach=self.foreach)
        self._step = None
        return step

    def _decline(self, step: Step, scaler: _amp.Scaler) -> bool:
        """A step without ascent: the first-pass gradients go to the base step."""
        if step.local:
            _ddp.average_gradients(self._all_params(), self.model, foreach=self.foreach)
        found_inf = step.found_inf
        if self._checks_finite(found_inf is not None) and found_inf is not None:
            group = _ddp.process_group(self.model)
            step.skip = _ddp.any_replica(found_inf > 0, group, local=step.local)
        if found_inf is not None:
            _amp.mark_unscaled(scaler, self, step.found_per_device, force_overflow=step.skip)
        return False

    def _checks_finite(self, scaled: bool) -> bool:
        return self.skip_nonfinite if self.skip_nonfinite is not None else scaled

    def _nonfinite(self, norm: Tensor, scaler: _amp.Scaler, local: bool) -> bool:
        if not self._checks_finite(scaler is not None):
            return False
        found_inf = self._step.found_inf if self._step is not None else None
        bad = ~torch.isfinite(norm)
        bad = bad if found_inf is None else (found_inf > 0) | bad
        return _ddp.any_replica(bad, _ddp.process_group(self.model), local=local)

    def _skip_ascent(self, ascent: list[functional.AscentGroup], zero_grad: bool) -> bool:
        if zero_grad:  # the scratch gradients were modified: make them plainly non-finite
            for ag in ascent:
                for _, directions, _ in ag.buckets:
                    functional.mul_(directions, float("nan"), foreach=self.foreach)
        return False

    def _clear_grads(self, step: Step, gathered: Gathered) -> None:
        step.cleared = gathered
        if type(self.base_optimizer).zero_grad is torch.optim.Optimizer.zero_grad:
            # What the default zero_grad(set_to_none=True) does, without walking
            # every group again: only these params have gradients.
            for _, params, _ in gathered:
                for p in params:
                    p.grad = None
        else:
            self.zero_grad()

    def _clip_or_check(self, gathered: Gathered, check: bool) -> bool:
        """Clip the final gradient (``max_grad_norm``) and/or check it is finite; True = skip."""
        if not gathered:
            return False
        if self.max_grad_norm is None:
            return check and self._nonfinite_grads(gathered)
        params = [p for _, group_params, _ in gathered for p in group_params]
        # torch's clipping sums DTensor (FSDP2) norms over the shards itself
        total = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm, foreach=self.foreach)
        return check and not bool(torch.isfinite(_fsdp.full(total)))

    def _nonfinite_grads(self, gathered: Gathered) -> bool:
        """Whether the global norm of the gradients in ``gathered`` is not finite (a host read)."""
        return bool(gathered) and not bool(torch.isfinite(_fsdp.grad_norm(gathered, self.foreach)))
