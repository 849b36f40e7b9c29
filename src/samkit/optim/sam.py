r"""Sharpness-Aware Minimization around any torch optimizer.

SAM (Foret et al., ICLR 2021, arXiv 2010.01412) minimises the worst loss in a
rho-ball around the weights. Each step:

.. math::

    e_t = \rho \, \frac{g_t}{\lVert g_t \rVert_2}, \qquad g_t = \nabla L(w_t)
    \qquad\text{(ascent; ASAM: } e_t = \rho\, T^2 g_t / \lVert T g_t \rVert)

    w_{t+1} = \mathrm{BaseStep}\big(w_t,\ \nabla L(w_t + e_t)\big)

The weights are copied into a buffer (allocated once) before the ascent and
copied back, bit for bit, before the base step.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .. import functional as F
from .._checks import check_nonneg as _check_nonneg
from .batchnorm import freeze_bn_stats
from .perturbation import L2, Adaptive, Perturbation
from .policy import Policy

__all__ = ["SAM"]

_SAM_KEYS = ("rho", "eta", "ascent_weight_decay")


class SAM(torch.optim.Optimizer):
    r"""Wrap a torch optimizer so each step is a sharpness-aware step.

    Args:
        params_or_optimizer: an optimizer *instance* (``torch.optim.SGD(...)``,
            Adam, AdamW, any ``torch.optim.Optimizer``), or parameters / param
            groups, in which case ``base_optimizer`` is the optimizer class and
            ``**base_kwargs`` its arguments (the davda54/sam form).
        base_optimizer: the optimizer class, only with the second form.
        rho: radius of the ascent (default 0.05; ASAM: 0.5 to 2.0). Per group
            via a ``"rho"`` key. A group with ``rho=0`` is not perturbed and
            does not count in the normaliser; ``rho=0`` everywhere is exactly
            the base optimizer.
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
            per pass; on by default only when a ``GradScaler`` is in use.
        perturbation: a :class:`~samkit.optim.perturbation.Perturbation`
            (default :class:`L2`, or :class:`Adaptive` with ``adaptive=True``).
        policy: a :class:`~samkit.optim.policy.Policy` choosing the steps that
            pay for the ascent (default: all of them).
        foreach: use ``torch._foreach_*`` kernels (default True) or the
            per-tensor reference loop.
        eps: added to the norm (default 1e-12): a zero gradient gives a zero
            perturbation.

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

    # GradScaler.step() calls our step() even on overflow, with grad_scale and
    # found_inf set, so the weights are always restored.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params_or_optimizer: Any,
        base_optimizer: type[torch.optim.Optimizer] | None = None,
        *,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.01,
        ascent_weight_decay: float = 0.0,
        model: nn.Module | None = None,
        ddp_ascent: str = "local",
        max_grad_norm: float | None = None,
        skip_nonfinite: bool | None = None,
        perturbation: Perturbation | None = None,
        policy: Policy | None = None,
        foreach: bool | None = None,
        eps: float = 1e-12,
        **base_kwargs: Any,
    ) -> None:
        _check_nonneg("rho", rho)
        _check_nonneg("eta", eta)
        _check_nonneg("ascent_weight_decay", ascent_weight_decay)
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ValueError(f"Invalid eps value: {eps!r} (must be > 0)")
        if max_grad_norm is not None:
            if not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
                raise ValueError(f"Invalid max_grad_norm value: {max_grad_norm!r} (must be > 0)")
        if ddp_ascent not in ("local", "global"):
            raise ValueError(
                f"Invalid ddp_ascent value: {ddp_ascent!r} (expected 'local' or 'global')"
            )
        if model is not None and not isinstance(model, nn.Module):
            raise ValueError(
                f"Invalid model value: expected an nn.Module, got {type(model).__name__}"
            )
        if (
            ddp_ascent == "local"
            and hasattr(model, "no_sync")
            and getattr(model, "static_graph", False)
        ):
            # torch's DDP crashes (or silently stops all-reducing) when a
            # static-graph model runs a pass under no_sync: pytorch#143580.
            raise ValueError(
                "Invalid ddp_ascent value: 'local' runs the first pass under no_sync, which DDP with "
                "static_graph=True does not support; use ddp_ascent='global' or static_graph=False"
            )
        if perturbation is not None and adaptive:
            raise ValueError(
                "Invalid adaptive value: give adaptive=True or a perturbation, not both"
            )
        if perturbation is not None and not isinstance(perturbation, Perturbation):
            raise ValueError(
                f"Invalid perturbation value: {perturbation!r} is not a samkit Perturbation"
            )
        if policy is not None and not isinstance(policy, Policy):
            raise ValueError(f"Invalid policy value: {policy!r} is not a samkit Policy")

        if isinstance(params_or_optimizer, torch.optim.Optimizer):
            if base_optimizer is not None or base_kwargs:
                raise ValueError(
                    "Invalid base_optimizer value: pass either an optimizer instance, "
                    "or params with an optimizer class and its arguments"
                )
            if isinstance(params_or_optimizer, SAM):
                raise ValueError("Invalid params_or_optimizer value: cannot wrap a SAM in a SAM")
            base = params_or_optimizer
        else:
            if not (
                inspect.isclass(base_optimizer)
                and issubclass(base_optimizer, torch.optim.Optimizer)
            ):
                raise ValueError(
                    f"Invalid base_optimizer value: {base_optimizer!r}; expected a torch.optim.Optimizer "
                    "class when params are given (or pass an optimizer instance)"
                )
            base = base_optimizer(params_or_optimizer, **base_kwargs)

        # Optimizer.__init__ is not called: the param groups, state and defaults
        # are the base optimizer's (properties below). Only the hook registries
        # that torch's step/state_dict machinery expects are set up here.
        self.base_optimizer = base
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}
        self._optimizer_state_dict_pre_hooks = {}
        self._optimizer_state_dict_post_hooks = {}
        self._optimizer_load_state_dict_pre_hooks = {}
        self._optimizer_load_state_dict_post_hooks = {}
        self._patch_step_function()

        self._sam_defaults = {
            "rho": float(rho),
            "eta": float(eta),
            "ascent_weight_decay": float(ascent_weight_decay),
        }
        for key, value in self._sam_defaults.items():
            base.defaults.setdefault(key, value)
        for i, group in enumerate(base.param_groups):
            self._init_group(group, i)

        self.perturbation = perturbation or (Adaptive() if adaptive else L2())
        self.policy = policy
        self.model = model
        self.ddp_ascent = ddp_ascent
        self.max_grad_norm = max_grad_norm
        self.skip_nonfinite = skip_nonfinite
        self.foreach = True if foreach is None else bool(foreach)
        self.eps = float(eps)

        self.steps = 0  # completed SAM steps (ascending or not)
        self.ascents = 0  # steps that paid for the ascent
        self._backup: dict[Tensor, Tensor] = {}  # weight copies, allocated once
        self._perturbed: list[tuple[list[Tensor], list[Tensor]]] | None = None
        self._pending = False  # first_step done, second_step not yet
        self._skip = False  # the pending step must not update the weights
        self._bn_ctx: contextlib.ExitStack | None = None
        self._local_first_pass = False
        self._unscaled = False

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

    def _init_group(self, group: dict[str, Any], index: int | str) -> None:
        for key in _SAM_KEYS:
            group.setdefault(key, self._sam_defaults[key])
            _check_nonneg(f"{key} (param group {index})", group[key])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key in _SAM_KEYS:
            param_group.setdefault(key, self._sam_defaults[key])
        self._init_group(param_group, len(self.param_groups))
        self.base_optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        return (
            f"SAM(rho={self._sam_defaults['rho']}, perturbation={self.perturbation!r}, "
            f"policy={self.policy!r}, base={self.base_optimizer!r})"
        )

    # --------------------------------------------------------------- helpers
    def _gather(self) -> list[tuple[dict[str, Any], list[Tensor], list[Tensor]]]:
        out = []
        for group in self.param_groups:
            params, grads = [], []
            for p in group["params"]:
                if p.grad is None or not p.requires_grad:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("SAM does not support sparse gradients")
                params.append(p)
                grads.append(p.grad)
            if params:
                out.append((group, params, grads))
        return out

    def _buffers(self, params: list[Tensor]) -> list[Tensor]:
        buf = self._backup
        out = []
        for p in params:
            b = buf.get(p)
            # Reallocated only if the parameter itself changed (model.half(),
            # .to(device), a resized tensor), so the restore stays exact.
            if b is None or b.dtype is not p.dtype or b.device != p.device or b.shape != p.shape:
                b = buf[p] = torch.empty_like(p, memory_format=torch.preserve_format)
            out.append(b)
        return out

    def _ddp_local(self) -> bool:
        m = self.model
        return (
            self.ddp_ascent == "local"
            and m is not None
            and hasattr(m, "no_sync")
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
        )

    @contextlib.contextmanager
    def first_pass(self) -> Iterator[None]:
        """Context for the first forward *and* backward pass.

        Under DDP with ``ddp_ascent="local"`` it is ``model.no_sync()``, so each
        replica keeps its own gradient for its ascent; otherwise it does
        nothing. ``step(closure)`` uses it for you. The forward must run inside
        it too: DDP decides at forward time whether the backward all-reduces.
        """
        if self._ddp_local():
            self._local_first_pass = True
            m = self.model
            with m.no_sync():  # type: ignore[union-attr, operator]
                yield
            # DDP clears this flag after a forward run under no_sync; still set,
            # no forward ran inside and the backward was all-reduced anyway.
            if (
                getattr(m, "require_forward_param_sync", False)
                and not getattr(m, "_use_python_reducer", False)
                and not getattr(m, "_delay_all_reduce_all_params", False)
            ):
                warnings.warn(
                    "SAM.first_pass(): no DDP forward ran inside it, so the first-pass gradients were "
                    "all-reduced (global, not local, ascent); run the forward inside first_pass() too",
                    RuntimeWarning,
                    stacklevel=3,
                )
        else:
            self._local_first_pass = False
            yield

    def _process_group(self) -> Any:
        return getattr(self.model, "process_group", None)  # DDP's group; None = the default group

    def _allreduce_grads(self) -> None:
        """Average first-pass gradients across replicas (local ascent, step not ascending).

        This is what DDP would have done had the pass not run under
        ``no_sync``: one flat buffer per device and dtype, so a few collectives
        rather than one per tensor.
        """
        dist = torch.distributed
        group = self._process_group()
        params = [p for gr in self.param_groups for p in gr["params"] if p.requires_grad]
        if not params:
            return
        if getattr(self.model, "find_unused_parameters", False):
            # A parameter unused on this replica has no gradient here but may
            # have one elsewhere: agree on the set so every replica reduces the
            # same tensors (a mismatch would hang or abort the collective).
            has = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
            dist.all_reduce(has, op=dist.ReduceOp.MAX, group=group)
            for p, h in zip(params, has.tolist()):
                if h and p.grad is None:
                    p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params if p.grad is not None]
        world = dist.get_world_size(group)
        for (_, _), (gs,) in F.group_by_device(grads).items():
            flat = torch._utils._flatten_dense_tensors(gs)
            dist.all_reduce(flat, group=group)
            flat.div_(world)
            F.copy_(gs, list(torch._utils._unflatten_dense_tensors(flat, gs)), foreach=self.foreach)

    def _any_replica(self, flag: Tensor, local: bool) -> bool:
        """Host read of a 0-d bool flag; under local DDP ascent, True if it is set on any replica.

        Replicas must take the same branch (ascend / skip) or their
        collectives stop matching and DDP hangs.
        """
        if local:
            f = flag.float().reshape(1)
            torch.distributed.all_reduce(
                f, op=torch.distributed.ReduceOp.MAX, group=self._process_group()
            )
            return bool(f.item() > 0)
        return bool(flag)

    def _unscale(self, gathered, scaler: torch.amp.GradScaler) -> Tensor:
        """Unscale first-pass gradients in place; return a 0-d found-inf flag."""
        inv = 1.0 / scaler.get_scale()
        found = []
        by_dev: dict[torch.device, list[Tensor]] = {}
        for _, _, grads in gathered:
            for g in grads:
                by_dev.setdefault(g.device, []).append(g)
        for dev, grads in by_dev.items():
            flag = torch.zeros((), device=dev)
            for (_, _), (gs,) in F.group_by_device(grads).items():
                torch._amp_foreach_non_finite_check_and_unscale_(
                    gs, flag, torch.full((), inv, device=dev)
                )
            found.append(flag)
        self._found_per_device = dict(zip(by_dev, found))
        return F.global_norm([f.square() for f in found])  # > 0 iff any non-finite

    def _tell_scaler_unscaled(self, scaler: torch.amp.GradScaler) -> None:
        """Record with the scaler that this step's gradients are unscaled, as its unscale_() would.

        On a step that does not ascend, the unscaled first-pass gradients go
        to the base step. Without this, a ``scaler.unscale_(opt)`` before
        ``scaler.step(opt)`` would divide them by the scale a second time;
        with it, torch raises its usual "unscale_() has already been called"
        and ``scaler.step`` uses the recorded overflow flags.
        """
        flags = self._found_per_device
        if self._skip:  # under local DDP another replica may have overflowed: back off everywhere
            flags = {d: torch.ones_like(f) for d, f in flags.items()}
        state = scaler._per_optimizer_states[id(self)]
        state["stage"] = torch.amp.grad_scaler.OptState.UNSCALED
        state["found_inf_per_device"] = flags

    # ------------------------------------------------------------- protocol
    @torch.no_grad()
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
        self._pending, self._skip, self._perturbed = True, False, None
        if self.model is not None:
            self._bn_ctx = contextlib.ExitStack()
            self._bn_ctx.enter_context(freeze_bn_stats(self.model))

        gathered = self._gather()
        check = self.skip_nonfinite if self.skip_nonfinite is not None else scaler is not None
        found_inf = None
        if scaler is not None and scaler.is_enabled() and gathered:
            found_inf = self._unscale(gathered, scaler)
            self._unscaled = True  # second_step must not unscale these again
        local, self._local_first_pass = self._local_first_pass, False
        if local and hasattr(self.model, "require_forward_param_sync"):
            # DDP broadcasts rank 0's buffers (BatchNorm statistics) at the
            # forward after a synchronised one; the first pass was not, so ask
            # for it explicitly, or replicas' statistics drift apart on steps
            # with no synchronised pass.
            self.model.require_forward_param_sync = True  # type: ignore[union-attr]

        factor = self.policy.rho_factor(self) if self.policy is not None else 1.0
        active = [(gr, p, g) for gr, p, g in gathered if gr["rho"] * factor > 0]
        ascend = bool(active) and (self.policy is None or self.policy.should_ascend(self))
        if (
            local
            and active
            and self.policy is not None
            and not getattr(self.policy, "replica_consistent", False)
        ):
            # A policy reading the local gradient may answer differently on
            # each replica: any replica asking for the ascent makes all ascend.
            # (Policies that answer the same everywhere by construction set
            # replica_consistent = True and save this all-reduce + host read.)
            ascend = self._any_replica(torch.tensor(ascend, device=active[0][1][0].device), local)
        if not ascend:
            if local:
                self._allreduce_grads()
            if check and found_inf is not None and self._any_replica(found_inf > 0, local):
                self._skip = True
            if found_inf is not None:
                self._tell_scaler_unscaled(scaler)
            return False
        fe = self.foreach
        work = []
        sq = []
        for group, params, grads in active:
            scratch = self._buffers(params)
            dirs = grads if zero_grad else [g.clone() for g in grads]
            wd = group["ascent_weight_decay"]
            if wd:
                for (_, _), (ps, ds) in F.group_by_device(params, dirs).items():
                    F.add_(ds, ps, alpha=wd, foreach=fe)
            buckets = list(F.group_by_device(params, dirs, scratch).values())
            for ps, ds, ss in buckets:
                sq.append(self.perturbation.measure_(ps, ds, ss, group, foreach=fe))
            work.append((group, buckets))
        norm = F.global_norm(sq)
        if check:
            bad = (
                ~torch.isfinite(norm)
                if found_inf is None
                else (found_inf > 0) | ~torch.isfinite(norm)
            )
            if self._any_replica(bad, local):
                self._skip = True
                if zero_grad:  # the scratch gradients were modified: make them plainly non-finite
                    for _, buckets in work:
                        for _, ds, _ in buckets:
                            F.mul_(ds, float("nan"), foreach=fe)
                return False

        perturbed = []
        for group, buckets in work:
            scale = F.scale_for(group["rho"] * factor, norm, self.eps)
            for ps, ds, ss in buckets:
                self.perturbation.direction_(ps, ds, ss, group, foreach=fe)
                F.copy_(ss, ps, foreach=fe)  # backup w (exact)
                # a 0-d tensor on another accelerator cannot scale this bucket (CPU-offloaded params)
                s = scale.to(ps[0].device) if isinstance(scale, Tensor) else scale
                F.add_scaled_(ps, ds, s, foreach=fe)  # w <- w + e
                perturbed.append((ps, ss))
        self._perturbed = perturbed
        self.ascents += 1
        # The second pass makes fresh gradients, scaled again by the GradScaler:
        # second_step must unscale those (only non-ascending steps reuse the
        # first-pass gradients that were unscaled above).
        self._unscaled = False
        if zero_grad:
            if type(self.base_optimizer).zero_grad is torch.optim.Optimizer.zero_grad:
                # What the default zero_grad(set_to_none=True) does, without
                # walking every group again: only these params have gradients.
                for _, params, _ in gathered:
                    for p in params:
                        p.grad = None
            else:
                self.zero_grad()
        return True

    @torch.no_grad()
    def _restore(self) -> None:
        if self._perturbed is not None:
            for ps, ss in self._perturbed:  # already grouped by device and dtype
                F.copy_(ps, ss, foreach=self.foreach)
            self._perturbed = None
        if self._bn_ctx is not None:
            self._bn_ctx.close()
            self._bn_ctx = None

    @torch.no_grad()
    def abort_step(self) -> None:
        """Undo a :meth:`first_step` whose second pass failed (two-step form).

        Restores the weights bit for bit, releases BatchNorm and closes the
        step without updating anything, so training can go on. ``step(closure)``
        does this by itself when the closure raises. A no-op when no step is
        open.
        """
        self._restore()
        self._pending, self._skip, self._unscaled = False, False, False

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore the weights to ``w`` exactly and take the base optimizer's step.

        The gradients in ``.grad`` (from the pass at ``w + e``) drive the step.
        """
        if not self._pending:
            raise RuntimeError("second_step() called without first_step()")
        self._restore()
        self._pending = False
        skip, self._skip = self._skip, False
        unscaled, self._unscaled = self._unscaled, False
        # Set by GradScaler.step() (see _step_supports_amp_scaling).
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if isinstance(found_inf, Tensor) and bool(found_inf > 0):
            skip = True
        gathered = None
        if grad_scale is not None and not skip and not unscaled:
            inv = grad_scale.double().reciprocal().float()
            gathered = self._gather()
            for _, _, grads in gathered:
                for (_, _), (gs,) in F.group_by_device(grads).items():
                    F.mul_(gs, inv.to(gs[0].device), foreach=self.foreach)
        check = self.skip_nonfinite if self.skip_nonfinite is not None else found_inf is not None
        if not skip and (self.max_grad_norm is not None or check):
            if gathered is None:
                gathered = self._gather()
            if gathered:
                if self.max_grad_norm is not None:
                    params = [p for _, ps, _ in gathered for p in ps]
                    total = torch.nn.utils.clip_grad_norm_(
                        params, self.max_grad_norm, foreach=self.foreach
                    )
                else:
                    total = F.global_norm(
                        [
                            F.sq_norm(gs, foreach=self.foreach)
                            for _, _, g in gathered
                            for (_, _), (gs,) in F.group_by_device(g).items()
                        ]
                    )
                if check and not bool(torch.isfinite(total)):
                    skip = True
        if not skip:
            self.base_optimizer.step()
        self.steps += 1
        self._opt_called = True  # tells LR schedulers a step happened
        if zero_grad:
            self.zero_grad()

    def step(  # type: ignore[override]
        self,
        closure: Callable[[], Tensor] | None = None,
        *,
        scaler: torch.amp.GradScaler | None = None,
    ) -> Tensor | None:
        """One SAM step.

        With a ``closure`` (zeroes nothing itself; does forward + backward and
        returns the loss) both passes run here and the loss at ``w`` is
        returned. With ``scaler``, the closure must call
        ``scaler.scale(loss).backward()``; call ``scaler.update()`` afterwards.

        Without a closure, completes a step begun with :meth:`first_step`: this
        is what ``scaler.step(opt)`` calls.
        """
        if closure is None:
            if self._pending:
                self.second_step()
                return None
            raise RuntimeError(
                "SAM.step() needs a closure that does forward + backward and returns the loss, "
                "or a preceding first_step() (see SAM.first_step)"
            )
        closure = torch.enable_grad()(closure)
        with self.first_pass():
            loss = closure()
        try:
            if self.first_step(zero_grad=True, scaler=scaler):
                closure()
        except BaseException:
            self.abort_step()  # never leave perturbed weights behind
            raise
        if scaler is not None and scaler.is_enabled():
            scaler.step(self)
        else:
            self.second_step()
        return loss

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
        sd = self.base_optimizer.state_dict()
        sd["samkit"] = {
            "version": 1,
            "steps": self.steps,
            "ascents": self.ascents,
            "perturbation": self.perturbation.state_dict(),
            "policy": self.policy.state_dict() if self.policy is not None else {},
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        sd = dict(state_dict)
        own = sd.pop("samkit", None)
        self.base_optimizer.load_state_dict(sd)
        for i, group in enumerate(self.param_groups):
            self._init_group(group, i)
        if own is not None:
            self.steps = int(own["steps"])
            self.ascents = int(own.get("ascents", 0))
            self.perturbation.load_state_dict(own.get("perturbation", {}))
            if self.policy is not None:
                self.policy.load_state_dict(own.get("policy", {}))
