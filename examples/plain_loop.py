"""SAM in a plain PyTorch training loop: wrap the optimizer, pass a closure.

    python examples/plain_loop.py --steps 300

The closure does forward + backward and returns the loss; ``opt.step(closure)``
runs it twice (at w, then at w + e) and returns the loss at w. Nothing else
in the loop changes. SAM: Foret et al., ICLR 2021, arXiv 2010.01412.
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
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rho", type=float, default=0.05)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    x, y = make_data(4096, args.seed)
    model = nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 10))
    base = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    opt = samkit.SAM(base, rho=args.rho)
    loss_fn = nn.CrossEntropyLoss()

    def closure_for(xb, yb):
        # A closure does forward + backward and returns the loss; SAM calls it twice.
        def closure():
            loss = loss_fn(model(xb), yb)
            loss.backward()
            return loss

        return closure

    losses = []
    for step in range(args.steps):
        idx = torch.randint(0, len(x), (args.batch,))
        loss = opt.step(closure_for(x[idx], y[idx]))
        opt.zero_grad()
        losses.append(loss.item())
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {losses[-1]:.4f}")

    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    k = max(1, len(losses) // 5)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    print(
        f"loss {first:.4f} -> {last:.4f} (mean of first/last {k} steps); train accuracy {acc:.3f}"
    )
    return {"losses": losses, "first": first, "last": last, "accuracy": acc, "steps": opt.steps}


if __name__ == "__main__":
    main()
