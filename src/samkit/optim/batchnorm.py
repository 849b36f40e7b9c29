"""Keep BatchNorm running statistics to SAM's first pass.

SAM runs two forward passes per step. The second one, at the perturbed
weights w + e, must not move the running mean and variance (nor
``num_batches_tracked``): the statistics should describe the model at w.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["freeze_bn_stats", "batchnorm_modules"]


def batchnorm_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """All BatchNorm-like modules (incl. SyncBatchNorm) that track running stats."""
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


@contextlib.contextmanager
def freeze_bn_stats(model: nn.Module) -> Iterator[None]:
    """Context manager: BatchNorm layers use batch statistics but update nothing.

    Inside it, every BatchNorm module in training mode normalises with the
    current batch's statistics, exactly as in the first pass, while its
    ``running_mean``, ``running_var`` and ``num_batches_tracked`` stay
    untouched (``track_running_stats`` is switched off and restored on exit).

    >>> import torch
    >>> bn = torch.nn.BatchNorm1d(3)
    >>> before = bn.running_mean.clone()
    >>> with freeze_bn_stats(bn):
    ...     _ = bn(torch.randn(8, 3))
    >>> torch.equal(bn.running_mean, before), int(bn.num_batches_tracked)
    (True, 0)
    """
    mods = batchnorm_modules(model)
    for m in mods:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in mods:
            m.track_running_stats = True
