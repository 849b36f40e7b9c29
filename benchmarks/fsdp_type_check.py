"""What the FSDP2 hook costs plain (non-sharded) training: one type check per parameter.

    python benchmarks/fsdp_type_check.py

SAM looks at its parameters' types every step to find FSDP2's DTensors
(``samkit.optim._fsdp.localize``); on plain parameters it returns at once.
This times that check against SAM's own per-step work (``first_step`` +
``second_step`` without the base step, as in benchmarks/overhead.py) on a
120-tensor transformer stack, side by side in one process, and prints the
ratio (best of 5 repeats, three rounds for the spread).
"""

from __future__ import annotations

import argparse
import timeit

import torch

import samkit
from samkit.optim import _fsdp


def main(argv: list[str] | None = None) -> list[float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--number", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    layer = torch.nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
    params = list(torch.nn.TransformerEncoder(layer, 10).parameters())
    grads = [torch.randn_like(p) for p in params]
    opt = samkit.SAM(torch.optim.SGD(params, lr=0.0), rho=0.05)

    def put() -> None:
        for p, g in zip(params, grads):
            p.grad = g.clone()

    def sam_own() -> None:
        put()
        opt.first_step()
        opt.second_step()

    put()
    gathered = opt._gather()
    n = args.number
    ratios = []
    for _ in range(args.rounds):
        check = min(timeit.repeat(lambda: _fsdp.localize(gathered), number=n, repeat=5)) / n
        putting = min(timeit.repeat(put, number=n, repeat=5)) / n
        own = min(timeit.repeat(sam_own, number=n, repeat=5)) / n - putting
        ratios.append(check / own)
        print(
            f"{len(params)} tensors: type check {check * 1e6:.1f} us, "
            f"SAM's own step {own * 1e6:.0f} us, ratio {check / own:.3%}"
        )
    return ratios


if __name__ == "__main__":
    main()
