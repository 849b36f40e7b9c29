"""rho="auto" in a plain loop with no validation set: hold back a slice of the samples.

    python examples/held_back.py --epochs 30 --noise 0.4
    python examples/held_back.py --no-hold-back     # the same loop, rho="auto" from the gradients alone

The dataset returns each sample's index; the closure computes one loss per
sample and hands it to ``opt.hold_back(losses, ids, epoch=epoch)``, which keeps
a fixed 10 % of the samples (chosen by a hash of their index) out of training
and reports their mean loss to the radius once an epoch. Nothing else in the
loop changes: no validation loader, no evaluation. With noisy labels the
held-back loss stops improving once the network starts memorising, and the
radius rises (docs/autorho.md, "A loop with no validation").

On this problem (40 % noise, 30 epochs; seeds 0, 1, 2 on one CPU) the held-back
run reaches 0.508, 0.474 and 0.530 test accuracy on clean labels; the same
loop without ``hold_back`` (every sample trained on, the radius learnt from
the gradients alone) 0.410, 0.403 and 0.435, as a fixed rho of 0.05 does.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

import samkit


class WithIndex(Dataset):
    """A map-style dataset whose items end with their index: the id hold_back needs."""

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple:
        return (*self.data[i], i)


def make_data(n: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 10-class problem labelled by a random 'teacher' network; a share ``noise`` of the
    labels replaced by a random other class. Returns inputs, noisy and clean labels."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(20, 64, generator=g) / 20**0.5
    w2 = torch.randn(64, 10, generator=g)
    x = torch.randn(n, 20, generator=g)
    clean = torch.tanh(x @ w1).matmul(w2).argmax(1)
    flip = torch.rand(n, generator=g) < noise
    noisy = torch.where(flip, (clean + torch.randint(1, 10, (n,), generator=g)) % 10, clean)
    return x, noisy, clean


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--noise", type=float, default=0.4)
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-hold-back", action="store_true", help="train on every sample")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    x, y, clean = make_data(args.train + 2000, args.noise, args.seed)
    train = WithIndex(TensorDataset(x[: args.train], y[: args.train]))
    loader = DataLoader(train, batch_size=args.batch, shuffle=True)
    model = nn.Sequential(nn.Linear(20, 256), nn.ReLU(), nn.Linear(256, 10))
    base = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    opt = samkit.SAM(base, rho="auto", model=model)

    rhos = []
    for epoch in range(args.epochs):
        for xb, yb, ids in loader:

            def closure(xb=xb, yb=yb, ids=ids, epoch=epoch):
                losses = F.cross_entropy(model(xb), yb, reduction="none")
                if args.no_hold_back:
                    loss = losses.mean()
                else:
                    loss = opt.hold_back(losses, ids, epoch=epoch)  # the kept samples' mean
                loss.backward()
                return loss

            opt.step(closure)
            opt.zero_grad()
        rhos.append(float(opt.param_groups[0]["rho"]))
        print(f"epoch {epoch + 1:3d}  rho {rhos[-1]:.3f}")

    with torch.no_grad():  # the clean labels of samples never seen
        test = (model(x[args.train :]).argmax(1) == clean[args.train :]).float().mean().item()
    print(f"test accuracy (clean labels) {test:.3f}; rho {rhos[0]:.3f} -> {rhos[-1]:.3f}")
    return {"rhos": rhos, "test": test, "steps": opt.steps, "best": opt.rho_controller.best}


if __name__ == "__main__":
    main()
