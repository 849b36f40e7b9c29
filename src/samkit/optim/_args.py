"""SAM's argument checks: the constructor's keywords, the base optimizer, param
groups, and what a step is handed (existing gradients, a closure's backward).

Each check raises ``ValueError("Invalid <name> value: ...")`` naming the
argument, before anything is changed.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .._checks import MAX_RHO, check_flag, check_nonneg, check_pos, check_rho
from . import _ddp, _fsdp, autorho
from .mix import Mix
from .perturbation import Adaptive, Perturbation
from .policy import Policy
from .rho import RhoController

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Callable

    from .view import Gathered

__all__ = [
    "Default",
    "RHO",
    "ETA",
    "ZERO",
    "Checked",
    "check",
    "init_groups",
    "check_group_rho",
    "existing_grads",
    "call_closure",
    "check_closure_backward",
    "check_second_pass",
    "grad_marks",
    "same_marks",
    "check_first_pass_grads",
    "reported_loss",
]


class Default(float):
    """A float default that remembers it was not given (to route class-form keywords)."""

    def __repr__(self) -> str:
        return float.__repr__(self)


RHO, ETA, ZERO = Default(0.05), Default(0.01), Default(0.0)

#: a validation loss given to ``observe_validation``, checked (also for controllers used alone)
reported_loss = autorho.reported_loss


def _was_given(name: str, value: object) -> bool:
    """Whether SAM's keyword ``name`` was given (the class form refuses one the optimizer class takes too)."""
    if name in ("rho", "eta", "ascent_weight_decay"):
        return not isinstance(value, Default)
    if name == "adaptive":
        return value is not False
    if name == "ddp_ascent":
        return value != "local"
    if name == "ascent_eps":
        return value != 1e-12
    return value is not None


@dataclass
class Checked:
    """SAM's keywords once checked: the base optimizer built or taken, rho a float."""

    base: torch.optim.Optimizer
    controller: RhoController | None
    rho: float


def check(
    params_or_optimizer: Any, base_class: Any, base_kwargs: dict[str, Any], kw: dict[str, Any]
) -> Checked:
    """Check SAM's keywords ``kw`` and build (or take) the base optimizer, in the order
    the errors are documented: flags, a named controller, the base optimizer, the values."""
    given = {name: _was_given(name, value) for name, value in kw.items()}
    check_flag("foreach", kw["foreach"], none=True)
    check_flag("skip_nonfinite", kw["skip_nonfinite"], none=True)
    rho = kw["rho"]
    if isinstance(rho, RhoController) and getattr(rho, "groups", None) is not None:
        raise ValueError(
            f"Invalid rho value: {rho!r} already sets another optimizer's radius (a controller "
            "keeps one optimizer's state); give each optimizer its own instance"
        )
    if isinstance(rho, str):  # "auto" / "auto:<name>": a self-tuning controller
        rho = autorho.controller_from_name(rho)
    if isinstance(rho, autorho.AutoRho):  # named or an instance: ASAM's scale unless given
        rho.adapt_to(adaptive=bool(kw["adaptive"]) or is_adaptive(kw["perturbation"]))
    base = _base_optimizer(params_or_optimizer, base_class, base_kwargs, given, kw["foreach"])
    controller = rho if isinstance(rho, RhoController) else None
    rho = controller.initial_rho if controller is not None else rho
    _check_values({**kw, "rho": rho})
    if getattr(base, "is_second_order", False):
        raise ValueError(
            f"Invalid base_optimizer value: {type(base).__name__} is second-order (is_second_order=True, "
            "backward(create_graph=True)); SAM restores the weights in place after the pass at w + e, "
            "which invalidates that graph. Use a first-order base optimizer."
        )
    _refuse_closure_stepping(base)
    _warn_params_outside(kw["model"], base, kw["perturbation"])
    return Checked(base, controller, rho)


def _warn_params_outside(
    model: nn.Module | None, base: torch.optim.Optimizer, perturbation: Perturbation | None
) -> None:
    """Warn where ``model`` trains parameters this optimizer does not hold: the step runs the
    closure twice, so their ``.grad`` sums the gradients at ``w`` and at ``w + e`` (another
    optimizer stepping them would take about twice its step)."""
    if model is None or not getattr(perturbation, "needs_gradient", True):
        return  # (Momentum-SAM: one pass)
    held = {id(p) for group in base.param_groups for p in group["params"]}
    outside = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
    if outside:
        warnings.warn(
            f"{len(outside)} trainable parameter(s) of model= are not in this optimizer's param "
            f"groups ({outside[0]}{', ...' if len(outside) > 1 else ''}): SAM runs the closure "
            "twice a step, so their .grad holds the gradients at w and at w + e summed, and "
            "another optimizer stepping them takes about twice its step. Give them to SAM "
            "(in a param group with rho=0 if they should not be perturbed), or set "
            "requires_grad=False on those that are not trained.",
            RuntimeWarning,
            stacklevel=autorho._caller_level(),
        )


def is_adaptive(perturbation: Perturbation | None) -> bool:
    """Whether the ascent is ASAM's (:class:`Adaptive`), also inside a wrapper's ``inner``."""
    seen = 0
    while perturbation is not None and seen < 16:
        if isinstance(perturbation, Adaptive):
            return True
        perturbation, seen = getattr(perturbation, "inner", None), seen + 1
    return False


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
        if base_kwargs:  # with an instance every keyword is SAM's: a misspelt one, most likely
            raise ValueError(_unknown_keywords(base_kwargs, set(given)))
        if base_class is not None:
            raise ValueError(
                "Invalid base_optimizer value: pass either an optimizer instance, "
                "or params with an optimizer class and its arguments"
            )
        from .sam import SAM  # (sam imports this module)

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
    has_var_kw = any(
        p.kind is p.VAR_KEYWORD for p in inspect.signature(base_class.__init__).parameters.values()
    )
    unknown = {k: v for k, v in base_kwargs.items() if k not in accepted}
    if unknown and accepted and not has_var_kw:
        raise ValueError(_unknown_keywords(unknown, set(given) | accepted, base_class.__name__))
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


def _unknown_keywords(unknown: dict[str, Any], known: set[str], base: str | None = None) -> str:
    """``Invalid <name> value: ... is not a keyword of SAM (did you mean ...?)``."""
    import difflib

    name = sorted(unknown)[0]
    close = difflib.get_close_matches(name, sorted(known - {"self", "params"}), n=1)
    whose = f"SAM or {base}" if base else "SAM (the base optimizer is an instance)"
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"Invalid {name} value: {unknown[name]!r} ({name}= is not a keyword of {whose}{hint})"


def _keywords_of(cls: type) -> set[str]:
    try:
        parameters = inspect.signature(cls.__init__).parameters  # type: ignore[misc]
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return set()
    return {
        name
        for name, p in parameters.items()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def _check_values(kw: dict[str, Any]) -> None:
    check_rho("rho", kw["rho"])
    check_nonneg("eta", kw["eta"])
    check_nonneg("ascent_weight_decay", kw["ascent_weight_decay"])
    check_pos("ascent_eps", kw["ascent_eps"])
    if kw["max_grad_norm"] is not None:
        check_pos("max_grad_norm", kw["max_grad_norm"])
    ddp_ascent, model, adaptive = kw["ddp_ascent"], kw["model"], kw["adaptive"]
    if ddp_ascent not in ("local", "global"):
        raise ValueError(f"Invalid ddp_ascent value: {ddp_ascent!r} (expected 'local' or 'global')")
    if model is not None and not isinstance(model, nn.Module):
        raise ValueError(f"Invalid model value: expected an nn.Module, got {type(model).__name__}")
    _ddp.check_static_graph(model, ddp_ascent)
    if not isinstance(adaptive, bool):
        raise ValueError(f"Invalid adaptive value: {adaptive!r} (must be True or False)")
    perturbation, policy, mix = kw["perturbation"], kw["policy"], kw["mix"]
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


def init_groups(
    groups: list[dict[str, Any]], names: dict[str, str], defaults: dict[str, float], start: int = 0
) -> None:
    """Check every group's SAM settings (``names``: setting -> group key), then give each
    group the defaults it lacks; nothing changes unless every group passes."""
    for index, group in enumerate(groups, start):
        for key, name in names.items():
            check = check_rho if key == "rho" else check_nonneg
            check(f"{name} (param group {index})", group.get(name, defaults[key]))
    for group in groups:
        for key, name in names.items():
            group.setdefault(name, defaults[key])


def check_group_rho(group: dict[str, Any], rho_key: str) -> None:
    """The radius a step is about to read (set after construction: NaN would silently mean no ascent)."""
    rho = group[rho_key]
    if not 0.0 <= rho <= MAX_RHO:
        raise ValueError(
            f"Invalid {rho_key} value: {rho!r} in a param group (must be a finite number "
            f">= 0 and at most {MAX_RHO:.4g}, the largest float32)"
        )


def existing_grads(params: list[Tensor], mode: str) -> dict[Tensor, Tensor]:
    """Gradients present before ``step(closure)``: refused, or kept for both passes."""
    if mode not in ("error", "keep"):
        raise ValueError(f"Invalid existing_grads value: {mode!r} (expected 'error' or 'keep')")
    present = [p for p in params if p.grad is not None]
    if not present:
        return {}
    if any(p.grad.is_sparse for p in present):  # type: ignore[union-attr]
        raise RuntimeError("SAM does not support sparse gradients")
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


def grad_marks(params: list[Tensor]) -> list[tuple[Tensor | None, int]]:
    """Each parameter's gradient and its version now, to tell afterwards whether a
    backward reached it (see :func:`check_closure_backward`)."""
    return [(p.grad, _version(p.grad)) for p in params]


def _version(grad: Tensor | None) -> int:
    # a DTensor's (FSDP2's) gradient is added to in its local tensor, whose version moves
    # while the wrapper's does not
    if grad is None:
        return -1
    local = getattr(grad, "_local_tensor", None)
    return int(local._version if isinstance(local, Tensor) else grad._version)


def same_marks(a: list[tuple[Tensor | None, int]], b: list[tuple[Tensor | None, int]]) -> bool:
    """Whether two :func:`grad_marks` show the same gradients, untouched in between."""
    return len(a) == len(b) and all(g is h and u == v for (g, u), (h, v) in zip(a, b))


def check_closure_backward(
    params: list[Tensor], name: str, before: list[tuple[Tensor | None, int]] | None = None
) -> None:
    """Refuse a closure after which no parameter got a gradient (it never called backward).

    ``before`` (:func:`grad_marks` taken before the closure ran): a gradient left in place
    (``zero_grad(set_to_none=False)``'s zeros) counts only if the closure added to it.
    """
    if before is None:
        reached = any(p.grad is not None for p in params)
    else:
        reached = any(
            p.grad is not None and (p.grad is not grad or _version(p.grad) != version)
            for p, (grad, version) in zip(params, before)
        )
    if not reached:
        raise ValueError(
            f"Invalid closure value: no gradient reached any parameter after it ran (no "
            f"backward added to any .grad), so the {name} step would silently do nothing. The "
            "closure must call loss.backward() (or scaler.scale(loss).backward()) and return "
            "the loss"
        )


def call_closure(closure: Callable[[], Tensor], params: list[Tensor], name: str) -> Tensor:
    """``closure()``, refused (:func:`check_closure_backward`) if no backward ran in it."""
    # (marks only where a gradient is there already: the common case reads nothing more)
    before = grad_marks(params) if any(p.grad is not None for p in params) else None
    loss = closure()
    check_closure_backward(params, name, before)
    return loss


def check_second_pass(reached: bool) -> None:
    """Refuse a pass at ``w + e`` that reached no parameter (``reached`` False)."""
    if not reached:
        raise ValueError(
            "Invalid closure value: no gradient reached any parameter in the pass at w + e "
            "(every .grad is None after first_step()), so the step would take zero "
            "gradients. Call loss.backward() at w + e too (the closure runs twice, the "
            "second time perturbed); the weights are back at w, nothing stepped"
        )


def check_first_pass_grads(gathered: Gathered) -> None:
    """Refuse gradients made with ``create_graph=True`` (a second-order base optimizer)."""
    for _, _, grads in gathered:
        if any(g.requires_grad for g in grads):
            raise ValueError(
                "Invalid gradient: it was made with backward(create_graph=True) (a second-order base "
                "optimizer such as AdaHessian?); SAM restores the weights in place after the pass at "
                "w + e, which invalidates that graph. Use a first-order base optimizer."
            )


def objective_sign(groups: list[dict[str, Any]], method: str) -> float:
    """-1.0 where the base optimizer maximises (torch's ``maximize=True``), else 1.0.

    A sample selection by loss (ESAM's, K-SAM's) picks the samples worst for the objective:
    the highest loss, or the lowest value of an objective climbed. Groups that disagree leave
    no "worst" sample to pick: refused.
    """
    flags = {bool(group.get("maximize", False)) for group in groups}
    if len(flags) > 1:
        raise ValueError(
            f"Invalid maximize value: {method} selects samples by the loss the closure returns, "
            "and some param groups maximise it while others minimise it; use one direction "
            "for every group"
        )
    return -1.0 if flags == {True} else 1.0


def check_params(groups: list[dict[str, Any]], start: int = 0) -> None:
    """Refuse parameters SAM cannot perturb right: FSDP1's flat shards, and a parameter
    listed twice in a group (torch only warns; the ascent would add its perturbation twice,
    a radius sqrt(2) too large, and the base step would step it twice)."""
    _fsdp.refuse_fsdp1([p for group in groups for p in group["params"]])
    for index, group in enumerate(groups, start):
        if len({id(p) for p in group["params"]}) != len(group["params"]):
            raise ValueError(
                f"Invalid params value: param group {index} lists a parameter more than once; "
                "SAM would perturb it twice (a radius sqrt(2) too large) and the base optimizer "
                "would step it twice. List each parameter once."
            )
