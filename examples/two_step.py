"""SAM's explicit two-step form, with BatchNorm and an LR scheduler.

    python examples/two_step.py --steps 200

For loops that cannot hand their forward/backward to a closure (custom
logging, several losses, frameworks that own the backward):

    loss_fn(model(x), y).backward()          # gradient at w
    if opt.first_step(zero_grad=True):       # w <- w + e(w)
        loss_fn(model(x), y).backward()      # gradient at w + e
    opt.second_step(zero_grad=True)          # w restored exactly, base step

``first_step`` returns False on steps that do not ascend (a policy declined,
rho is 0, or the gradient was not finite); the second pass is then skipped
and ``second_step`` uses the first gradient.

BatchNorm: with ``model=model``, SAM freezes the running statistics between
``first_step`` and ``second_step``, so they are updated once per step, by the
pass at w, and never by the pass at the perturbed weights.

LR schedulers take the SAM object directly (its ``param_groups`` are the base
optimizer's) and are stepped once per SAM step.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import samkit


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A 10-class problem labelled by a random 'teacher' network (inputs not centred)."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(20, 64, generator=g) / 20**0.5
    w2 = torch.randn(64, 10, generator=g)
    x = torch.randn(n, 20, generator=g)
    return 3.0 + 2.0 * x, torch.tanh(x @ w1).matmul(w2).argmax(1)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--rho", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    x, y = make_data(4096, args.seed)
    model = nn.Sequential(nn.Linear(20, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10))
    base = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True)
    opt = samkit.SAM(
        base, rho=args.rho, model=model
    )  # model=: BN statistics from the first pass only
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    loss_fn = nn.CrossEntropyLoss()

    model.train()
    losses, lrs = [], []
    for step in range(args.steps):
        idx = torch.randint(0, len(x), (args.batch,))
        xb, yb = x[idx], y[idx]

        loss = loss_fn(model(xb), yb)
        loss.backward()
        if opt.first_step(zero_grad=True):
            loss_fn(model(xb), yb).backward()
        opt.second_step(zero_grad=True)
        lrs.append(sched.get_last_lr()[0])
        sched.step()

        losses.append(loss.item())
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {losses[-1]:.4f}  lr {lrs[-1]:.4f}")

    bn = model[1]
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    k = max(1, len(losses) // 5)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    print(
        f"loss {first:.4f} -> {last:.4f}; eval-mode accuracy {acc:.3f}; "
        f"BN updates {int(bn.num_batches_tracked)} in {opt.steps} steps ({opt.ascents} ascents)"
    )
    return {
        "losses": losses,
        "lrs": lrs,
        "final_lr": sched.get_last_lr()[0],
        "first": first,
        "last": last,
        "accuracy": acc,
        "bn_updates": int(bn.num_batches_tracked),
        "steps": opt.steps,
        "ascents": opt.ascents,
    }


if __name__ == "__main__":
    main()
