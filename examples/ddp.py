"""SAM with DistributedDataParallel: a complete training script to copy.

    python examples/ddp.py                            # spawns 2 CPU processes (gloo) itself
    torchrun --nproc_per_node=4 examples/ddp.py       # any number; GPUs (nccl) if present

    --ascent local    each replica ascends along its own gradient (default; the
                      original SAM's m-sharpness, m = the per-replica batch)
    --ascent global   the ascent uses the all-reduced gradient (one shared e)
    --accumulate K    split each replica's batch into K micro-batches

The model has BatchNorm: passing ``model=ddp_model`` to SAM keeps its running
statistics to the first pass and, under local ascent, runs that pass under
``no_sync``. See docs/ddp.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import samkit


def make_data(n: int, seed: int) -> TensorDataset:
    """Ten Gaussian blobs in 20 dimensions, with 10 % of the labels flipped.

    Every process builds the same tensors from the same seed; the
    DistributedSampler gives each replica its share.
    """
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(10, 20, generator=g) * 1.5
    g.manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = centers[y] + torch.randn(n, 20, generator=g) * 2.0
    noisy = torch.rand(n, generator=g) < 0.1
    y = torch.where(noisy, torch.randint(0, 10, (n,), generator=g), y)
    return TensorDataset(x, y)


def train(rank: int, world: int, args: argparse.Namespace) -> dict:
    use_cuda = torch.cuda.is_available() and not args.cpu
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")

    torch.manual_seed(0)  # same initial weights everywhere (DDP also broadcasts them)
    model = nn.Sequential(
        nn.Linear(20, 64),
        nn.BatchNorm1d(64),
        nn.ReLU(),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    ).to(device)
    ddp = DDP(model, device_ids=[device.index] if use_cuda else None)

    base = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    # model=ddp: BatchNorm statistics from the first pass only; under local
    # ascent the first pass (forward and backward) runs under ddp.no_sync().
    opt = samkit.SAM(base, rho=args.rho, model=ddp, ddp_ascent=args.ascent)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)

    train_set, test_set = make_data(4096, seed=1), make_data(1024, seed=2)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=0)
    # batch_size is per replica: the global batch is batch_size * world.
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    test_loader = DataLoader(
        test_set, batch_size=256, sampler=DistributedSampler(test_set, world, rank, shuffle=False)
    )

    def make_closure(x: torch.Tensor, y: torch.Tensor):
        xs, ys = x.chunk(args.accumulate), y.chunk(args.accumulate)

        def closure() -> torch.Tensor:
            # SAM calls this twice (at w, then at w + e). With accumulation,
            # every micro-batch but the last runs under no_sync, so DDP
            # all-reduces once per pass; under local ascent SAM wraps the
            # whole first call in no_sync anyway.
            total = torch.zeros((), device=device)
            for i, (xi, yi) in enumerate(zip(xs, ys)):
                last = i == len(xs) - 1
                with contextlib.nullcontext() if last else ddp.no_sync():
                    loss = F.cross_entropy(ddp(xi), yi) * (len(yi) / len(y))
                    loss.backward()
                total += loss.detach()
            return total

        return closure

    losses, accuracies = [], []
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)  # a different shuffle each epoch, the same on every replica
        ddp.train()
        loss_sum = torch.zeros((), device=device)
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss_sum += opt.step(make_closure(x, y))
            opt.zero_grad()
        sched.step()

        ddp.eval()
        correct = torch.zeros(2, device=device)  # [correct, seen]
        with torch.no_grad():
            for x, y in test_loader:
                x, y = x.to(device), y.to(device)
                correct += torch.stack(
                    [(ddp(x).argmax(1) == y).sum(), torch.tensor(len(y), device=device)]
                )
        stats = torch.cat([loss_sum.reshape(1) / len(loader), correct])
        dist.all_reduce(stats)
        losses.append(stats[0].item() / world)
        accuracies.append(stats[1].item() / stats[2].item())
        if rank == 0:
            print(
                f"epoch {epoch + 1:2d}  train loss {losses[-1]:.4f}  "
                f"test acc {100 * accuracies[-1]:.1f} %  ({opt.ascents} ascents)"
            )

    # Every replica must hold the same weights. (Checkpoint from rank 0:
    # ddp.module.state_dict() and opt.state_dict().)
    flat = torch.cat([p.detach().reshape(-1) for p in ddp.module.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    same = all(torch.equal(gathered[0], g) for g in gathered[1:])
    if rank == 0:
        print(f"replicas identical: {same}")
    dist.barrier()  # let both replicas finish communicating before tearing down
    dist.destroy_process_group()
    return {
        "world_size": world,
        "losses": losses,
        "accuracy": accuracies[-1] if accuracies else float("nan"),
        "ascents": opt.ascents,
        "replicas_identical": same,
    }


def spawned(rank: int, world: int, port: int, args: argparse.Namespace, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    out = train(rank, world, args)
    if rank == 0:
        results.put(out)
    # Leave without the interpreter's teardown: with gloo (torch 2.13, CPU) a spawned
    # worker that has destroyed its process group now and then aborts while exiting
    # ("terminate called without an active exception", SIGABRT) after training finished
    # and the result was sent (seen in about 1 run in 6 on a loaded 2-core machine).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> dict:
    """Train; return rank 0's summary (losses per epoch, final accuracy, ...)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ascent", choices=["local", "global"], default="local")
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64, help="per replica")
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per replica batch")
    parser.add_argument(
        "--world-size", type=int, default=2, help="processes to spawn without torchrun"
    )
    parser.add_argument("--cpu", action="store_true", help="gloo on CPU even if GPUs are present")
    args = parser.parse_args(argv)
    if args.accumulate < 1 or args.batch_size % args.accumulate:
        parser.error(
            f"--accumulate {args.accumulate} must be >= 1 and divide --batch-size {args.batch_size}"
        )

    if "RANK" in os.environ:  # launched by torchrun, which set MASTER_ADDR/PORT
        return train(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
    with socket.socket() as s:  # a free port for the spawned group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if torch.cuda.is_available() and not args.cpu:
        args.world_size = min(args.world_size, torch.cuda.device_count())
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(spawned, args=(args.world_size, port, args, results), nprocs=args.world_size)
    return results.get()


if __name__ == "__main__":
    main()
