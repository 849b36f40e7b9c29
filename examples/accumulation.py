"""SAM with gradient accumulation: loop over micro-batches inside the closure.

    python examples/accumulation.py --steps 100 --micro 4

A batch too large for memory is split into ``--micro`` micro-batches. The
closure runs forward + backward on each, with the loss divided by their
number, so ``.grad`` ends up holding the gradient of the mean loss over the
whole batch: SAM's ascent (first call) and the update (second call) both use
the full-batch gradient, exactly as without accumulation. The closure
returns the full-batch loss.

``--check`` also trains a second copy of the model on the undivided batches
and prints how far the two runs' weights end up apart (rounding only: the
sums are taken in a different order).

Note: the ascent here uses the whole batch's gradient. SAM's m-sharpness
(a separate ascent per sub-batch of size m, arXiv 2010.01412 Sec. 4.1) is a
different algorithm; under DDP samkit's default ``ddp_ascent="local"`` gives
it per replica.
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


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    # No BatchNorm: its batch statistics would differ between a micro-batch
    # and the full batch, and the --check comparison would not hold.
    return nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 10))


def train(
    model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], micro: int, rho: float
) -> list[float]:
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=rho)
    loss_fn = nn.CrossEntropyLoss()

    def closure_for(xb, yb):
        parts = list(zip(xb.chunk(micro), yb.chunk(micro)))

        def closure():
            total = 0.0
            for xm, ym in parts:
                # Weight by the micro-batch's share, so uneven splits still
                # give the mean over the batch.
                loss = loss_fn(model(xm), ym) * (len(ym) / len(yb))
                loss.backward()  # accumulates into .grad
                total = total + loss.detach()
            return total

        return closure

    losses = []
    for xb, yb in batches:
        losses.append(opt.step(closure_for(xb, yb)).item())
        opt.zero_grad()
    return losses


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--micro", type=int, default=4, help="micro-batches per batch")
    ap.add_argument("--rho", type=float, default=0.05)
    ap.add_argument("--check", action="store_true", help="compare with a run without accumulation")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.micro < 1 or args.micro > args.batch:
        ap.error(f"argument --micro: must be in [1, --batch], got {args.micro}")

    x, y = make_data(8192, args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    batches = []
    for _ in range(args.steps):
        idx = torch.randint(0, len(x), (args.batch,), generator=g)
        batches.append((x[idx], y[idx]))

    model = make_model(args.seed)
    losses = train(model, batches, args.micro, args.rho)
    for i in range(0, len(losses), max(1, len(losses) // 10)):
        print(f"step {i:4d}  loss {losses[i]:.4f}")
    k = max(1, len(losses) // 5)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    print(
        f"{args.micro} micro-batches of {args.batch // args.micro}: loss {first:.4f} -> {last:.4f}"
    )
    out = {"losses": losses, "first": first, "last": last}

    if args.check:
        ref = make_model(args.seed)
        ref_losses = train(ref, batches, 1, args.rho)
        diff = max((a - b).abs().max().item() for a, b in zip(model.parameters(), ref.parameters()))
        print(f"max |w_accumulated - w_full_batch| after {args.steps} steps: {diff:.2e}")
        out.update(ref_losses=ref_losses, max_weight_diff=diff)
    return out


if __name__ == "__main__":
    main()
