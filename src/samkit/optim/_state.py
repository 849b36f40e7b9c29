"""SAM's state dict: the base optimizer's plus a ``"samkit"`` entry, and a load
that checks everything before anything changes (and rolls back if a piece
refuses its state).

The ``"samkit"`` entry holds the counters, the state of the perturbation,
policy, mix and rho controller, the key under which the radius lives, and the
method that wrote it (:func:`method_of`), so that one method's checkpoint is
not silently loaded into another.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from .._checks import check_flag, check_nonneg, check_rho
from .policy import Always

if TYPE_CHECKING:  # pragma: no cover
    from .sam import SAM

    # The mixin is only ever a base of SAM, a torch optimizer: typed as one
    # (torch's hook registries, param_groups, ...); a plain class at run time.
    _Optimizer = torch.optim.Optimizer
else:
    _Optimizer = object

__all__ = ["VERSION", "StateDict", "samkit_entry", "method_of", "load"]

VERSION = 2

#: what a piece is when not given: omitted from descriptions
_DEFAULT_PIECES = {"perturbation": "L2", "policy": None, "mix": None, "rho": None}


class StateDict(_Optimizer):
    """:meth:`state_dict`, :meth:`load_state_dict` and :attr:`method` of :class:`~samkit.SAM`
    (a mixin: the protocol stays in ``sam.py``, the checkpoint format here)."""

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus a ``"samkit"`` entry.

        A plain torch optimizer can load it too (the extra key is ignored).
        The weight backup is scratch space and is not saved.
        """
        opt = cast("SAM", self)
        if opt._pending:
            raise RuntimeError(
                "state_dict() between first_step() and second_step(): the weights are perturbed"
            )
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        sd = opt.base_optimizer.state_dict()
        sd["samkit"] = samkit_entry(opt)
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
        return method_of(cast("SAM", self))

    def load_state_dict(self, state_dict: dict[str, Any], *, base_only: bool = False) -> None:
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
        opt = cast("SAM", self)
        base_only = bool(check_flag("base_only", base_only))
        if opt._pending:
            raise RuntimeError(
                "load_state_dict() between first_step() and second_step(): the weights are perturbed"
            )
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        load(opt, state_dict, base_only=base_only)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


def samkit_entry(opt: SAM) -> dict[str, Any]:
    """The ``"samkit"`` entry of ``opt.state_dict()``."""
    params = opt._all_params()
    return {
        "version": VERSION,
        "method": opt.method,
        "rho_key": opt.rho_key,
        "steps": opt.steps,
        "ascents": opt.ascents,
        "perturbation": opt.perturbation.state_dict(),
        "policy": opt.policy.state_dict() if opt.policy is not None else {},
        "mix": opt.mix.state_dict(params) if opt.mix is not None else {},
        "rho": opt.rho_controller.state_dict() if opt.rho_controller is not None else {},
    }


def method_of(opt: SAM) -> dict[str, str | None]:
    """``opt``'s class and pieces as a state dict records them (see ``SAM.method``)."""
    policy = None if type(opt.policy) is Always else opt.policy
    return {
        "class": type(opt).__name__,
        "perturbation": _piece_name(opt.perturbation),
        "policy": _piece_name(policy),
        "mix": _piece_name(opt.mix),
        "rho": _piece_name(opt.rho_controller),
    }


def load(opt: SAM, state_dict: object, *, base_only: bool) -> None:
    """Check ``state_dict`` against ``opt``, then load it; on any error ``opt`` is as it was."""
    base_sd, own = _validate(state_dict, opt.param_groups, opt.group_keys.values(), opt.rho_key)
    base_sd, own = _select(opt, base_sd, own, base_only=base_only)
    keys = list(opt.group_keys.values())
    snapshot = _snapshot(opt)
    try:
        try:
            opt.base_optimizer.load_state_dict(base_sd)
        except (KeyError, TypeError, IndexError, RuntimeError) as error:
            raise ValueError(
                f"Invalid state_dict value: {type(opt.base_optimizer).__name__} cannot load it "
                f"({type(error).__name__}: {error}); was it saved by another base optimizer?"
            ) from error
        for group, before in zip(opt.param_groups, snapshot["groups"]):
            for key in keys:
                group.setdefault(key, before[key])
        _check_base_state(opt)
        if own is not None:
            try:
                _load_own(opt, own)
            except (IndexError, KeyError, AttributeError, TypeError, RuntimeError) as error:
                raise ValueError(
                    f"Invalid state_dict value: its samkit state cannot be loaded "
                    f"({type(error).__name__}: {error})"
                ) from error
    except BaseException:
        _roll_back(opt, snapshot)
        raise


#: per-parameter buffers of torch's optimizers that have their parameter's shape
_PARAM_SHAPED = (
    "momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "square_avg", "acc_delta",
    "sum", "ax", "prev", "grad_avg",
)  # fmt: skip


def _check_base_state(opt: SAM) -> None:
    """What torch's loader takes without a word and fails on at the next step, mid-step:
    groups without the base optimizer's settings (a state dict of another optimizer:
    Adam's into SGD), and buffers of another shape than their parameter."""
    base = opt.base_optimizer
    for i, group in enumerate(base.param_groups):
        missing = sorted(k for k in base.defaults if k not in group)
        if missing:
            raise ValueError(
                f"Invalid state_dict value: param group {i} has no {missing}, which "
                f"{type(base).__name__} needs: was it saved by another base optimizer?"
            )
        for p in group["params"]:
            for key, value in base.state.get(p, {}).items():
                if key in _PARAM_SHAPED and isinstance(value, Tensor) and value.shape != p.shape:
                    raise ValueError(
                        f"Invalid state_dict value: {key} of a parameter of param group {i} "
                        f"has shape {tuple(value.shape)}, the parameter {tuple(p.shape)}"
                    )


def _select(
    opt: SAM, base_sd: dict[str, Any], own: dict[str, Any] | None, *, base_only: bool
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """What of a checked state dict loads: refuse another method's, keep only the base's part."""
    written = own.get("method") if own is not None else None
    saved_key = own.get("rho_key", opt.rho_key) if own is not None else opt.rho_key
    if saved_key != opt.rho_key:
        raise ValueError(
            f"Invalid state_dict value: it keeps SAM's radius under {saved_key!r}, this optimizer "
            f"under {opt.rho_key!r}: it was saved by SAM over another base optimizer "
            f"(not {type(opt.base_optimizer).__name__}); load it into the same kind"
        )
    if base_only:  # this optimizer's samkit state, and its groups' SAM settings, stay
        keys = set(opt.group_keys.values())
        groups = [{k: v for k, v in g.items() if k not in keys} for g in base_sd["param_groups"]]
        return {**base_sd, "param_groups": groups}, None
    if written is not None and not _same_method(written, opt.method):
        raise ValueError(
            f"Invalid state_dict value: it was written by {_describe_method(written)}, and this "
            f"optimizer is {_describe_method(opt.method)}: loading it would give this one the "
            "other's radius and samkit state. To start from that run's base optimizer state "
            "(momentum, Adam moments, lr) and keep this optimizer's rho and settings, call "
            "load_state_dict(state_dict, base_only=True)"
        )
    return base_sd, own


def _snapshot(opt: SAM) -> dict[str, Any]:
    keys = list(opt.group_keys.values())
    pieces = (opt.perturbation, opt.policy, opt.rho_controller)
    return {
        "base": opt.base_optimizer.state_dict(),
        "groups": [{k: g[k] for k in keys} for g in opt.param_groups],
        "pieces": [p.state_dict() if p is not None else None for p in pieces],
        "mix": opt.mix.state_dict(opt._all_params()) if opt.mix is not None else None,
        "counters": (opt.steps, opt.ascents),
    }


def _roll_back(opt: SAM, snapshot: dict[str, Any]) -> None:
    opt.base_optimizer.load_state_dict(snapshot["base"])
    for group, before in zip(opt.param_groups, snapshot["groups"]):
        group.update(before)
    pieces = (opt.perturbation, opt.policy, opt.rho_controller)
    for piece, state in zip(pieces, snapshot["pieces"]):
        if piece is not None:
            piece.load_state_dict(state)
    if opt.mix is not None:
        opt.mix.load_state_dict(snapshot["mix"], opt._all_params())
    opt.steps, opt.ascents = snapshot["counters"]


def _load_own(opt: SAM, own: dict[str, Any]) -> None:
    opt.steps = int(own["steps"])
    opt.ascents = int(own.get("ascents", 0))
    opt.perturbation.load_state_dict(own.get("perturbation", {}))
    if opt.policy is not None:
        opt.policy.load_state_dict(own.get("policy", {}))
    # samkit 0.1 kept GSAM's rho schedule and LookSAM's g_v under their own keys
    legacy_gsam = own.get("gsam") or {}
    rho_state = own.get("rho", legacy_gsam.get("rho_schedule") or {})
    if opt.rho_controller is not None:
        opt.rho_controller.load_state_dict(rho_state)
    if opt.mix is not None:
        opt.mix.load_state_dict(own.get("mix") or own.get("looksam") or {}, opt._all_params())


def _validate(
    state_dict: object, groups: list[dict[str, Any]], keys: Iterable[str], rho_key: str
) -> tuple[dict[str, Any], dict[str, Any] | None]:
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
        _validate_group(i, saved, group, keys, rho_key)
    own = state_dict.get("samkit")
    if own is not None:
        _validate_own(own)
    return base_sd, own


def _validate_group(
    i: int, saved: object, group: dict[str, Any], keys: Iterable[str], rho_key: str
) -> None:
    if not isinstance(saved, dict) or len(saved.get("params", ())) != len(group["params"]):
        raise ValueError(
            f"Invalid state_dict value: param group {i} does not match this optimizer's"
        )
    for key in keys:
        if key in saved:
            check = check_rho if key == rho_key else check_nonneg
            check(f"{key} (param group {i} of the state dict)", saved[key])
    if "lr" in saved and not (isinstance(saved["lr"], Tensor) or _finite_nonneg(saved["lr"])):
        raise ValueError(f"Invalid lr (param group {i} of the state dict) value: {saved['lr']!r}")


def _validate_own(own: object) -> None:
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
        raise ValueError(f"Invalid state_dict value: samkit method entry {method!r} is not a dict")


def _piece_name(piece: object) -> str | None:
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
