r"""Stable-Baselines3: SAM for PPO and A2C without copying their ``train()``.

SB3's ``train()`` does, per minibatch: ``optimizer.zero_grad()``,
``loss.backward()``, ``clip_grad_norm_(policy.parameters(), max_grad_norm)``,
``optimizer.step()``. :class:`SAMPPO` and :class:`SAMA2C` keep that loop as it
is and give the policy a :class:`PolicySAM` optimizer, whose closure-less
``step()`` finishes the SAM step (Foret et al., arXiv 2010.01412):

.. math::

    g = \operatorname{clip}(\nabla L_B(w)) \ \text{(SB3's pass)}, \qquad
    e = \rho\, \frac{g}{\lVert g \rVert}, \qquad
    w \leftarrow \mathrm{Base}\big(w,\ \operatorname{clip}(\nabla L_B(w + e))\big)

where :math:`L_B` is the algorithm's full loss (PPO: clipped surrogate +
``vf_coef`` * value loss + ``ent_coef`` * entropy loss) on the *same*
minibatch :math:`B`. The minibatch is the one SB3's ``rollout_buffer.get()``
just yielded (recorded while ``train()`` runs); the loss at ``w + e`` is
recomputed from it with the algorithm's coefficients and schedules.

Clipping (``max_grad_norm``) applies to both passes, as in SB3: the ascent
direction comes from SB3's clipped gradient (for SAM and ASAM the direction is
normalised, so clipping does not change it), and the gradient at ``w + e`` is
clipped again before the base step. A step that does not ascend (``rho=0``, a
policy that declines) hands the base optimizer SB3's own clipped gradient
untouched, so ``rho=0`` is SB3's PPO bit for bit.

Saving and loading go through SB3's ``save``/``load``: SAM's settings are
pickled with the model and the optimizer's state dict carries samkit's
counters and the state of its policy and rho controller.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from ..optim.perturbation import Masked, Perturbation
from ..optim.rho import RhoController
from ..optim.sam import SAM

try:
    from gymnasium import spaces
    from stable_baselines3 import A2C, PPO
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "samkit.integrations.sb3 needs stable-baselines3 and gymnasium: "
        "pip install -c constraints.txt 'samkit[sb3]'"
    ) from error

__all__ = ["PolicySAM", "SAMPPO", "SAMA2C"]

# SAM keywords that SAMPPO sets itself or that have a SAMPPO argument of their own.
_MANAGED = {
    "rho": "give rho= to {cls} itself",
    "adaptive": "give adaptive= to {cls} itself",
    "model": "{cls} passes its policy as SAM's model",
    "max_grad_norm": "{cls} clips with SB3's own max_grad_norm (give max_grad_norm= to {cls})",
    "ddp_ascent": "SB3 trains in one process",
}


class PolicySAM(SAM):
    """A :class:`~samkit.SAM` whose ``step()`` without a closure is a whole SAM step.

    SB3 calls ``step()`` after its own forward, backward and gradient
    clipping. This optimizer takes those gradients as the first pass, moves
    the weights to ``w + e``, calls :attr:`second_pass` (set by
    :class:`SAMPPO` / :class:`SAMA2C`: the same minibatch's loss, backward),
    clips the new gradient to :attr:`clip_norm` and takes the base step at
    ``w``. Everything else (state dict, ``param_groups``, counters) is SAM's.
    """

    second_pass: Callable[[], None] | None = None
    clip_norm: float | None = None

    def step(self, closure: Callable[[], Tensor] | None = None, **kwargs: Any) -> Tensor | None:  # type: ignore[override]
        if closure is not None or self._pending:
            return super().step(closure, **kwargs)
        if self.second_pass is None:
            raise RuntimeError(
                "PolicySAM.step() without a closure runs inside SAMPPO/SAMA2C's train() only "
                "(no minibatch is being trained on now)"
            )
        ascended = self.first_step(zero_grad=True)
        try:
            if ascended:
                with torch.enable_grad():
                    self.second_pass()
        except BaseException:
            self.abort_step()  # never leave perturbed weights behind
            raise
        # The gradient at w + e is clipped as SB3 clips its own; a step without
        # ascent keeps SB3's clipped gradient as it is (clipping it twice would
        # change its last bits), unless a mix edited it.
        saved, self.max_grad_norm = (
            self.max_grad_norm,
            self.clip_norm if ascended or self.mix is not None else None,
        )
        try:
            self.second_step()
        finally:
            self.max_grad_norm = saved
        return None


class _SAMOnPolicy:
    """What SAMPPO and SAMA2C share: the optimizer swap and the minibatch recorder."""

    rho: float | RhoController
    adaptive: bool
    sam_kwargs: dict[str, Any]

    def _init_sam(
        self, rho: float | RhoController, adaptive: bool, sam_kwargs: dict[str, Any] | None
    ) -> None:
        name = type(self).__name__
        if sam_kwargs is not None and not isinstance(sam_kwargs, dict):
            raise ValueError(f"Invalid sam_kwargs value: {sam_kwargs!r} (a dict of SAM keywords)")
        sam_kwargs = dict(sam_kwargs or {})
        for key, why in _MANAGED.items():
            if key in sam_kwargs:
                raise ValueError(f"Invalid sam_kwargs value: {key!r} ({why.format(cls=name)})")
        perturbation = sam_kwargs.get("perturbation")
        if isinstance(perturbation, Masked) or (
            isinstance(perturbation, Perturbation)
            and isinstance(getattr(perturbation, "inner", None), Masked)
        ):
            raise ValueError(
                f"Invalid sam_kwargs value: perturbation={perturbation!r} selects parameters, but {name} "
                "creates the policy's parameters itself (and again on load); not supported"
            )
        # Checked now, not at the first update: the checks SAM makes, on copies
        # (a rho controller binds to the optimizer it is given).
        probe = torch.nn.Parameter(torch.zeros(1))
        SAM(
            torch.optim.SGD([probe], lr=1.0),
            rho=copy.deepcopy(rho),
            adaptive=adaptive,
            **copy.deepcopy(sam_kwargs),
        )
        self.rho = rho
        self.adaptive = adaptive
        self.sam_kwargs = sam_kwargs
        self._minibatch: Any = None

    def _check_policy_kwargs(self, policy_kwargs: dict[str, Any] | None) -> None:
        optimizer_class = (policy_kwargs or {}).get("optimizer_class")
        if isinstance(optimizer_class, type) and issubclass(optimizer_class, SAM):
            name = type(self).__name__
            raise ValueError(
                f"Invalid policy_kwargs value: optimizer_class={optimizer_class.__name__}: {name} wraps the "
                "policy's optimizer in SAM itself. Give the base optimizer there "
                "(optimizer_class=torch.optim.Adam, optimizer_kwargs=dict(eps=1e-5)) and SAM's settings to "
                f"{name} (rho=..., adaptive=..., sam_kwargs=dict(...))"
            )

    def _setup_model(self) -> None:
        super()._setup_model()  # type: ignore[misc]
        policy = self.policy  # type: ignore[attr-defined]
        # SAM gets copies: the settings kept here stay unbound and picklable
        # (SB3 saves them with the model); the live objects are model.sam's.
        opt = PolicySAM(
            policy.optimizer,
            rho=copy.deepcopy(self.rho),
            adaptive=self.adaptive,
            model=policy,
            **copy.deepcopy(self.sam_kwargs),
        )
        opt.clip_norm = self.max_grad_norm  # type: ignore[attr-defined]
        policy.optimizer = opt

    @classmethod
    def load(cls, path: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """SB3's ``load``; a ``rho`` given here is the radius from now on. (SB3 puts the
        saved optimizer state back after building the model, and with it the saved rho:
        ``load(path, rho=0.2)`` reported 0.2 and trained with the saved 0.05.)"""
        model = super().load(path, *args, **kwargs)  # type: ignore[misc]
        opt = model.sam
        if "rho" in kwargs and opt.rho_controller is None:  # (a controller writes it each step)
            for group in opt.param_groups:
                group[opt.rho_key] = float(kwargs["rho"])
        return model

    def _excluded_save_params(self) -> list[str]:
        return super()._excluded_save_params() + ["_minibatch"]  # type: ignore[misc]

    @property
    def sam(self) -> PolicySAM:
        """The policy's :class:`PolicySAM` (``model.policy.optimizer``)."""
        return self.policy.optimizer  # type: ignore[attr-defined]

    def train(self) -> None:
        buffer = self.rollout_buffer  # type: ignore[attr-defined]
        own_get = buffer.__dict__.get("get")
        original = buffer.get

        def recording_get(*args: Any, **kwargs: Any):
            for data in original(*args, **kwargs):
                self._minibatch = data
                yield data

        buffer.get = recording_get
        opt = self.sam
        opt.second_pass = self._second_pass
        opt.clip_norm = self.max_grad_norm  # type: ignore[attr-defined]
        try:
            super().train()  # type: ignore[misc]
        finally:
            if own_get is None:
                del buffer.get
            else:
                buffer.get = own_get
            opt.second_pass = None
            self._minibatch = None

    def _second_pass(self) -> None:
        if self._minibatch is None:  # pragma: no cover - guarded by PolicySAM.step
            raise RuntimeError("no minibatch recorded")
        self._loss(self._minibatch).backward()

    def _evaluate(self, data: Any) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        actions = data.actions
        if isinstance(self.action_space, spaces.Discrete):  # type: ignore[attr-defined]
            actions = actions.long().flatten()
        values, log_prob, entropy = self.policy.evaluate_actions(data.observations, actions)  # type: ignore[attr-defined]
        return values.flatten(), log_prob, entropy, data.advantages

    def _entropy_loss(self, log_prob: Tensor, entropy: Tensor | None) -> Tensor:
        return -torch.mean(-log_prob) if entropy is None else -torch.mean(entropy)

    def _loss(self, data: Any) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class SAMPPO(_SAMOnPolicy, PPO):
    r"""PPO (Schulman et al., 2017, arXiv 1707.06347) with sharpness-aware updates.

    Every PPO gradient step (each minibatch of each epoch) is a SAM step on
    PPO's full loss on that minibatch,

    .. math:: L = -\min(r A,\ \operatorname{clip}(r, 1 \pm \epsilon) A)
              + c_{vf} (R - V)^2 + c_{ent} L_{ent},

    recomputed at ``w + e``; see the module docstring for clipping.

    Args:
        policy, env: as :class:`stable_baselines3.PPO`.
        rho: SAM's radius, or a :class:`~samkit.optim.rho.RhoController`
            (e.g. ``FollowLR(0.05)``). ``rho=0`` is PPO bit for bit.
        adaptive: ASAM (arXiv 2102.11600); a typical rho is then 10x larger.
        sam_kwargs: any other :class:`~samkit.SAM` keyword: ``eta``,
            ``perturbation`` (e.g. ``Fisher()``), ``policy`` (which updates
            ascend, e.g. ``EveryK(5)``), ``mix`` (GSAM's ``SurrogateGap``),
            ``ascent_weight_decay``, ``skip_nonfinite``, ``foreach``,
            ``ascent_eps``. ``rho``, ``adaptive``, ``model``,
            ``max_grad_norm`` and ``ddp_ascent`` are set by SAMPPO and refused here.
        **kwargs: every :class:`stable_baselines3.PPO` argument. The base
            optimizer is PPO's (``policy_kwargs=dict(optimizer_class=...,
            optimizer_kwargs=...)``, Adam with ``eps=1e-5`` by default); an
            ``optimizer_class`` that is a SAM is refused.

    Example::

        model = SAMPPO("MlpPolicy", "CartPole-v1", rho=0.05, seed=0)
        model.learn(10_000)
        model.sam.steps  # SAM steps taken (one per minibatch)
    """

    def __init__(
        self,
        policy: Any,
        env: Any,
        *,
        rho: float | RhoController = 0.05,
        adaptive: bool = False,
        sam_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._init_sam(rho, adaptive, sam_kwargs)
        self._check_policy_kwargs(kwargs.get("policy_kwargs"))
        super().__init__(policy, env, **kwargs)

    def _loss(self, data: Any) -> Tensor:
        """PPO's loss on ``data``, term for term as ``PPO.train`` computes it."""
        clip_range = self.clip_range(self._current_progress_remaining)  # type: ignore[operator]
        values, log_prob, entropy, advantages = self._evaluate(data)
        if self.normalize_advantage and len(advantages) > 1:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        ratio = torch.exp(log_prob - data.old_log_prob)
        policy_loss_1 = advantages * ratio
        policy_loss_2 = advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
        policy_loss = -torch.min(policy_loss_1, policy_loss_2).mean()
        if self.clip_range_vf is None:
            values_pred = values
        else:
            clip_range_vf = self.clip_range_vf(self._current_progress_remaining)  # type: ignore[operator]
            values_pred = data.old_values + torch.clamp(
                values - data.old_values, -clip_range_vf, clip_range_vf
            )
        value_loss = F.mse_loss(data.returns, values_pred)
        entropy_loss = self._entropy_loss(log_prob, entropy)
        return policy_loss + self.ent_coef * entropy_loss + self.vf_coef * value_loss


class SAMA2C(_SAMOnPolicy, A2C):
    r"""A2C (Mnih et al., 2016, arXiv 1602.01783) with sharpness-aware updates.

    A2C takes one gradient step per rollout, on the whole rollout: that step
    is a SAM step on A2C's loss
    :math:`-\overline{A \log\pi} + c_{vf} (R - V)^2 + c_{ent} L_{ent}`
    recomputed at ``w + e``. Arguments as :class:`SAMPPO` (the base optimizer
    is A2C's RMSprop by default).
    """

    def __init__(
        self,
        policy: Any,
        env: Any,
        *,
        rho: float | RhoController = 0.05,
        adaptive: bool = False,
        sam_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._init_sam(rho, adaptive, sam_kwargs)
        self._check_policy_kwargs(kwargs.get("policy_kwargs"))
        super().__init__(policy, env, **kwargs)

    def _loss(self, data: Any) -> Tensor:
        """A2C's loss on ``data``, term for term as ``A2C.train`` computes it."""
        values, log_prob, entropy, advantages = self._evaluate(data)
        if self.normalize_advantage:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        policy_loss = -(advantages * log_prob).mean()
        value_loss = F.mse_loss(data.returns, values)
        entropy_loss = self._entropy_loss(log_prob, entropy)
        return policy_loss + self.ent_coef * entropy_loss + self.vf_coef * value_loss
