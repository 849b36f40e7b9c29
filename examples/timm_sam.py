"""SAM with timm's optimizer factory, LR scheduler and model EMA, in a plain closure loop.

    pip install timm      # needs torchvision, which does not load beside the CPU torch
    python examples/timm_sam.py --epochs 3

timm is not an extra of samkit and this script is untested in samkit's own
runs (see the README): timm 1.0 imports torchvision at ``import timm``. The
pieces used here are plain torch underneath:

* ``timm.optim.create_optimizer_v2`` builds the base optimizer (its
  no-weight-decay groups for biases and norms, layer decay, ...);
  ``samkit.SAM`` wraps the instance, so every group keeps its settings and
  gets SAM's ``rho``.
* A timm scheduler acts on ``opt.param_groups`` (the base optimizer's, which
  SAM forwards): ``step_update(num_updates)`` after each SAM step,
  ``step(epoch)`` after each epoch.
* ``ModelEmaV3.update(model, step=...)`` after each SAM step: the weights are
  back at ``w`` then (SAM restores them exactly before the base step), so the
  EMA averages the weights, never the perturbed ``w + e``.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import samkit


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A 10-class problem labelled by a random 'teacher' network."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(20, 64, generator=g) / 20**0.5
    w2 = torch.randn(64, 10, generator=g)
    x = torch.randn(n, 20, generator=g)
    return x, torch.tanh(x @ w1).matmul(w2).argmax(1)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--steps-per-epoch", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--opt", default="adamw", help="any timm optimizer name")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--rho", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        import timm.optim
        import timm.scheduler
        from timm.utils import ModelEmaV3
    except ImportError as exc:  # timm, or the torchvision it imports, is missing
        raise SystemExit(f"examples/timm_sam.py needs timm (and torchvision): {exc}") from exc

    torch.manual_seed(args.seed)
    x, y = make_data(4096, args.seed)
    model = nn.Sequential(nn.Linear(20, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10))
    base = timm.optim.create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=0.05)
    opt = samkit.SAM(base, rho=args.rho, model=model)  # model=: BatchNorm moves once per step
    scheduler, _ = timm.scheduler.create_scheduler_v2(
        opt,
        sched="cosine",
        num_epochs=args.epochs,
        warmup_epochs=1,
        step_on_epochs=False,
        updates_per_epoch=args.steps_per_epoch,
    )
    ema = ModelEmaV3(model, decay=0.9)
    loss_fn = nn.CrossEntropyLoss()

    losses, lrs, updates = [], [], 0
    for epoch in range(args.epochs):
        model.train()
        for _ in range(args.steps_per_epoch):
            idx = torch.randint(0, len(x), (args.batch,))
            xb, yb = x[idx], y[idx]

            def closure(xb=xb, yb=yb):
                loss = loss_fn(model(xb), yb)
                loss.backward()
                return loss

            losses.append(opt.step(closure).item())
            opt.zero_grad()
            updates += 1
            scheduler.step_update(num_updates=updates)
            ema.update(model, step=updates)
            lrs.append(opt.param_groups[0]["lr"])
        scheduler.step(epoch + 1)
        print(f"epoch {epoch}  loss {losses[-1]:.4f}  lr {lrs[-1]:.2e}")

    model.eval()
    ema.module.eval()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
        ema_accuracy = (ema.module(x).argmax(1) == y).float().mean().item()
    k = max(1, len(losses) // 5)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    print(f"loss {first:.4f} -> {last:.4f}; accuracy {accuracy:.3f}, EMA {ema_accuracy:.3f}")
    return {
        "losses": losses,
        "lrs": lrs,
        "first": first,
        "last": last,
        "accuracy": accuracy,
        "ema_accuracy": ema_accuracy,
        "steps": opt.steps,
        "groups": len(opt.param_groups),
    }


if __name__ == "__main__":
    main()
