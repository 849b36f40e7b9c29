"""How SAM is a torch optimizer without owning its param groups.

:class:`Wrapper` subclasses ``torch.optim.Optimizer`` but does not call its
``__init__``: ``param_groups``, ``state`` and ``defaults`` are the wrapped
(base) optimizer's, read and written through, so LR schedulers,
``add_param_group``, ``zero_grad`` and ``GradScaler`` see one optimizer. Only
the hook registries that torch's step and state-dict machinery expects are
set up here.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

__all__ = ["Wrapper"]

_HOOKS = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


def _forwarded(name: str) -> Any:
    """The base optimizer's attribute ``name``, read and written through the wrapper."""
    return property(
        lambda self: getattr(self.base_optimizer, name),
        lambda self, value: setattr(self.base_optimizer, name, value),
        doc=f"The base optimizer's ``{name}``.",
    )


class Wrapper(torch.optim.Optimizer):
    """A torch optimizer whose ``param_groups``, ``state`` and ``defaults`` are ``base``'s."""

    def __init__(self, base: torch.optim.Optimizer) -> None:  # (not Optimizer.__init__)
        self.base_optimizer = base
        for hooks in _HOOKS:
            setattr(self, hooks, OrderedDict())
        self._patch_step_function()

    param_groups = _forwarded("param_groups")
    state = _forwarded("state")
    defaults = _forwarded("defaults")

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

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)
