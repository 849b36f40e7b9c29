r"""SAF and MESA: sharpness-aware training for free (Du et al., NeurIPS 2022, arXiv 2205.14083).

Neither runs a second pass. Both add a *trajectory loss* to the training loss
that penalises how fast the model's outputs move along the training
trajectory, which the paper shows acts like SAM's sharpness term:

.. math::

    L = L_{CE}(w) + \lambda\, \frac{1}{|B|} \sum_{i \in B}
        \mathrm{KL}\Big(\operatorname{softmax}(\hat z_i / \tau)\ \Big\Vert\
        \operatorname{softmax}(z_i(w) / \tau)\Big)

* :class:`SAF`: :math:`\hat z_i` are the logits the model gave sample ``i``
  ``delay`` epochs ago (a per-sample memory, ``delay x N x C`` floats). Cost:
  ~1x SGD.
* :class:`MESA` (memory-efficient SAF): :math:`\hat z_i` are the logits of an
  exponential moving average of the weights (one extra forward pass without
  gradients, and one model copy). Cost: ~1.2-1.3x SGD.

They are *loss* terms: use them with any optimizer (plain SGD/Adam is the
point; wrapping in SAM is allowed but pays the second pass again)::

    saf = SAF(num_samples=len(train_set), num_classes=10)
    for epoch in range(epochs):
        for x, y, index in loader:           # the loader yields sample indices
            logits = model(x)
            loss = F.cross_entropy(logits, y) + saf(logits, index, epoch)
            opt.zero_grad(); loss.backward(); opt.step()
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from ._checks import check_nonneg as _check_nonneg
from ._checks import check_pos as _check_pos

__all__ = ["SAF", "MESA", "trajectory_kl"]


def trajectory_kl(
    logits: Tensor, targets: Tensor, tau: float, mask: Tensor | None = None
) -> Tensor:
    r"""Mean over the batch of ``KL(softmax(targets/tau) || softmax(logits/tau))``.

    ``targets`` are treated as constants. With ``mask`` (bool, shape [n]),
    masked-out samples contribute 0 but still count in the mean, so the term's
    scale does not depend on how many samples have a target.
    """
    logp = TF.log_softmax(logits.float() / tau, dim=-1)
    logq = TF.log_softmax(targets.detach().float() / tau, dim=-1)
    kl = (logq.exp() * (logq - logp)).sum(dim=-1)
    if mask is not None:
        kl = kl * mask.to(kl.dtype)
    return kl.mean()


class SAF:
    r"""SAF's trajectory loss against each sample's logits from ``delay`` epochs ago.

    Args:
        num_samples: size of the training set (sample indices are 0 .. N-1).
        num_classes: number of logits per sample.
        lam: :math:`\lambda`, the weight of the trajectory loss (default 0.3).
        tau: :math:`\tau`, the softmax temperature (default 5.0).
        delay: ``E``, how many epochs back the targets come from (default 3).
            Before a sample has been seen ``delay`` epochs ago, its term is 0.
        device: where the memory lives (default CPU; put it with the model).

    Call it as ``saf(logits, index, epoch)``: it returns ``lam * L_tra`` for
    the batch and records ``logits`` (detached) for epoch ``epoch``. Every
    sample must be seen once per epoch for its target to be there ``delay``
    epochs later. The memory is in :meth:`state_dict`.
    """

    def __init__(
        self,
        num_samples: int,
        num_classes: int,
        *,
        lam: float = 0.3,
        tau: float = 5.0,
        delay: int = 3,
        device: torch.device | str | None = None,
    ) -> None:
        for name, v in (
            ("num_samples", num_samples),
            ("num_classes", num_classes),
            ("delay", delay),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Invalid {name} value: {v!r} (must be an int >= 1)")
        self.lam = _check_nonneg("lam", lam)
        self.tau = _check_pos("tau", tau)
        self.delay = delay
        self.num_samples, self.num_classes = num_samples, num_classes
        self.memory = torch.zeros(delay, num_samples, num_classes, device=device)
        # the epoch each slot entry was recorded in (-1: never)
        self.stamp = torch.full((delay, num_samples), -1, dtype=torch.long, device=device)

    def __call__(self, logits: Tensor, index: Tensor, epoch: int) -> Tensor:
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"Invalid logits value: expected shape [n, {self.num_classes}], got {tuple(logits.shape)}"
            )
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"Invalid epoch value: {epoch!r} (must be an int >= 0)")
        index = index.to(self.memory.device, torch.long)
        slot = epoch % self.delay
        old = self.memory[slot, index].to(logits.device)
        if epoch >= self.delay:
            valid = (self.stamp[slot, index] == epoch - self.delay).to(logits.device)
        else:  # nothing can be that old yet
            valid = torch.zeros(index.shape, dtype=torch.bool, device=logits.device)
        loss = (
            self.lam * trajectory_kl(logits, old, self.tau, valid)
            if self.lam
            else logits.sum() * 0.0
        )
        self.memory[slot, index] = logits.detach().to(self.memory.device, self.memory.dtype)
        self.stamp[slot, index] = epoch
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"memory": self.memory.clone(), "stamp": self.stamp.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if tuple(state["memory"].shape) != tuple(self.memory.shape):
            raise ValueError(
                f"Invalid state value: memory shape {tuple(state['memory'].shape)} != {tuple(self.memory.shape)}"
            )
        self.memory.copy_(state["memory"])
        self.stamp.copy_(state["stamp"])

    def __repr__(self) -> str:
        return f"SAF(lam={self.lam}, tau={self.tau}, delay={self.delay}, num_samples={self.num_samples})"


class MESA:
    r"""MESA's trajectory loss against an exponential moving average of the model.

    Args:
        model: the model being trained. A copy is kept as the EMA teacher.
        lam: :math:`\lambda` (default 0.8).
        tau: temperature (default 5.0).
        decay: EMA decay per :meth:`update` (default 0.999; the paper's
            ImageNet runs use values closer to 1, tied to the run length).
        start_step: before this many updates the teacher simply copies the
            model and the loss is 0 (default 0).

    Call ``mesa(logits, x)`` for ``lam * L_tra`` (runs the teacher on ``x``
    in eval mode, without gradients) and ``mesa.update()`` after each
    optimizer step. Floating-point buffers (BatchNorm statistics) are
    averaged too; integer buffers are copied.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        lam: float = 0.8,
        tau: float = 5.0,
        decay: float = 0.999,
        start_step: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"Invalid model value: expected an nn.Module, got {type(model).__name__}"
            )
        self.lam = _check_nonneg("lam", lam)
        self.tau = _check_pos("tau", tau)
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise ValueError(f"Invalid decay value: {decay!r} (must be in [0, 1))")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"Invalid start_step value: {start_step!r} (must be an int >= 0)")
        self.decay = float(decay)
        self.start_step = start_step
        self.model = model
        self.teacher = copy.deepcopy(model)
        self.teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.steps = 0

    @torch.no_grad()
    def update(self) -> None:
        """Move the teacher towards the model (call after each optimizer step)."""
        d = self.decay if self.steps >= self.start_step else 0.0
        src = list(self.model.state_dict().values())
        dst = list(self.teacher.state_dict().values())
        for t, s in zip(dst, src):
            if t.is_floating_point():
                t.lerp_(s.to(t.dtype), 1.0 - d)
            else:
                t.copy_(s)
        self.steps += 1

    def __call__(self, logits: Tensor, x: Any) -> Tensor:
        if self.lam == 0.0 or self.steps < self.start_step:
            return logits.sum() * 0.0
        self.teacher.eval()
        with torch.no_grad():
            target = self.teacher(x)
        return self.lam * trajectory_kl(logits, target, self.tau)

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": copy.deepcopy(self.teacher.state_dict()), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.steps = int(state["steps"])

    def __repr__(self) -> str:
        return f"MESA(lam={self.lam}, tau={self.tau}, decay={self.decay}, start_step={self.start_step})"
