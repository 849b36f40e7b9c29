"""SAM with mixed precision: bf16 autocast, or fp16 autocast with a GradScaler.

    python examples/amp.py --steps 200                  # cuda: fp16 + GradScaler; cpu: bf16
    python examples/amp.py --precision fp16 --steps 200 # the GradScaler recipe, on any device

bf16 has float32's exponent range, so it needs no loss scaling: autocast the
forward inside the closure and nothing else changes.

fp16 needs a ``GradScaler``. The closure calls ``scaler.scale(loss).backward()``
and the step takes the scaler::

    loss = opt.step(closure, scaler=scaler)
    scaler.update()

SAM unscales the first-pass gradients itself before measuring their norm (the
ascent must not depend on the loss scale), and ``scaler.step`` unscales the
second-pass ones. If either pass overflows, the step is skipped with the
weights restored exactly, and ``scaler.update()`` lowers the scale, as in any
fp16 loop.
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
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--precision", choices=["auto", "bf16", "fp16"], default="auto")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument(
        "--init-scale", type=float, default=2.0**16, help="GradScaler's initial scale (fp16)"
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = args.precision
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "bf16"
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16

    torch.manual_seed(args.seed)
    x, y = (t.to(device) for t in make_data(8192, args.seed))
    model = nn.Sequential(
        nn.Linear(20, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    ).to(device)
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), rho=0.05)
    loss_fn = nn.CrossEntropyLoss()
    scaler = (
        torch.amp.GradScaler(device.type, init_scale=args.init_scale)
        if precision == "fp16"
        else None
    )

    def closure_for(xb, yb):
        def closure():
            with torch.autocast(device.type, dtype=dtype):  # the forward only
                loss = loss_fn(model(xb), yb)
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
            return loss

        return closure

    losses, scales = [], []
    for step in range(args.steps):
        idx = torch.randint(0, len(x), (args.batch,), device=device)
        loss = opt.step(closure_for(x[idx], y[idx]), scaler=scaler)
        if scaler is not None:
            scaler.update()
            scales.append(scaler.get_scale())
        opt.zero_grad()
        losses.append(loss.item())
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            extra = f"  scale {scales[-1]:g}" if scaler is not None else ""
            print(f"step {step:4d}  loss {losses[-1]:.4f}{extra}")

    k = max(1, len(losses) // 5)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    finite = all(torch.isfinite(p).all().item() for p in model.parameters())
    print(f"{device.type} {precision}: loss {first:.4f} -> {last:.4f}; weights finite: {finite}")
    return {
        "device": device.type,
        "precision": precision,
        "losses": losses,
        "scales": scales,
        "first": first,
        "last": last,
        "finite": finite,
        "steps": opt.steps,
    }


if __name__ == "__main__":
    main()
