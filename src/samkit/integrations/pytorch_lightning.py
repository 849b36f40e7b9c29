"""SAM in the standalone ``pytorch_lightning`` package: the same as :mod:`samkit.integrations.lightning`.

``pytorch_lightning`` is Lightning's code under its older name (the
``lightning`` package installs it too). Its ``Trainer`` loads the callbacks of
the ``pytorch_lightning.callbacks_factory`` entry point, where samkit
registers this module's :class:`SAMCallback`; everything else is as in
:mod:`samkit.integrations.lightning`.
"""

from __future__ import annotations

from .._extras import reraise_missing

try:
    from pytorch_lightning.callbacks import Callback
except ImportError as error:  # the framework is an extra: say which
    reraise_missing(
        error,
        "samkit.integrations.pytorch_lightning",
        "pytorch_lightning",
        "pip install pytorch-lightning (or use samkit.integrations.lightning: "
        "pip install 'samkit[lightning]')",
    )

from ._lightning_common import SAMCallbackMixin, perturbed

__all__ = ["SAMCallback", "perturbed"]


class SAMCallback(SAMCallbackMixin, Callback):
    """:class:`samkit.integrations.lightning.SAMCallback` for ``pytorch_lightning.Trainer``."""


def _callbacks_factory() -> list[Callback]:
    """The ``pytorch_lightning.callbacks_factory`` entry point."""
    return [SAMCallback()]
