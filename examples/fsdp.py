"""SAM with FSDP2 (``fully_shard``) and sharded checkpoints: a complete script to copy.

    python examples/fsdp.py                           # spawns 2 CPU processes (gloo) itself
    torchrun --nproc_per_node=4 examples/fsdp.py      # any number; GPUs (nccl) if present
    python examples/fsdp.py --mesh hybrid             # HSDP: replicate x shard

    --checkpoint DIR   save a torch.distributed.checkpoint after every epoch (DIR/epoch<k>)
    --resume DIR/epoch<k>   continue from one: bit for bit the run that never stopped

Nothing about SAM changes under FSDP2: build it over the sharded module's
parameters. samkit sees that they are DTensors: it ascends on the local
shards, takes the norm of the *whole* gradient (the shards' squared norms
all-reduced over the shard dimension; with HSDP not over the replicas), and
restores each shard bit for bit. The ascent is the global one: FSDP2's
backward has already averaged the first-pass gradient over the ranks.
Checkpoints go through ``samkit.integrations.fsdp.get_state_dict`` /
``set_state_dict``, which carry samkit's counters beside torch's sharded
state dicts. See docs/fsdp.md for the variants that work and those refused.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import samkit
from samkit.integrations import fsdp


def make_data(n: int, seed: int) -> TensorDataset:
    """Ten Gaussian blobs in 20 dimensions, with 10 % of the labels flipped."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(10, 20, generator=g) * 1.5
    g.manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = centers[y] + torch.randn(n, 20, generator=g) * 2.0
    noisy = torch.rand(n, generator=g) < 0.1
    y = torch.where(noisy, torch.randint(0, 10, (n,), generator=g), y)
    return TensorDataset(x, y)


def train(rank: int, world: int, args: argparse.Namespace) -> dict:
    """One process: join the group, :func:`fit`, leave."""
    use_cuda = torch.cuda.is_available() and not args.cpu
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    else:
        torch.set_num_threads(1)
    out = fit(rank, world, args, "cuda" if use_cuda else "cpu")
    dist.destroy_process_group()
    return out


def fit(rank: int, world: int, args: argparse.Namespace, device_type: str = "cpu") -> dict:
    """Shard, train with SAM, checkpoint; in a process group that is already set up."""
    if args.mesh == "hybrid" and world % 2 == 0:
        # HSDP: shard within groups of world // 2 ranks, replicate across 2 of them
        mesh = init_device_mesh(device_type, (2, world // 2), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device_type, (world,), mesh_dim_names=("shard",))

    torch.manual_seed(0)  # same initial weights everywhere before sharding
    model = nn.Sequential(
        nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    ).to(device_type)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the root too: every parameter must be sharded

    base = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    opt = samkit.SAM(base, rho=args.rho, adaptive=args.adaptive)

    start = 0
    if args.resume:
        state = fsdp.get_state_dict(model, opt)
        dcp.load(state, checkpoint_id=args.resume)
        fsdp.set_state_dict(model, opt, state)
        start = int(Path(args.resume).name.removeprefix("epoch"))

    train_set = make_data(4096, seed=1)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True)

    losses = []
    for epoch in range(start, args.epochs):
        sampler.set_epoch(epoch)
        total = torch.zeros((), device=device_type)
        for x, y in loader:
            x, y = x.to(device_type), y.to(device_type)

            def closure(x=x, y=y) -> torch.Tensor:
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            total += opt.step(closure).detach()
            opt.zero_grad()
        dist.all_reduce(total)
        losses.append(total.item() / world / len(loader))
        if args.checkpoint:
            dcp.save(
                fsdp.get_state_dict(model, opt),
                checkpoint_id=os.path.join(args.checkpoint, f"epoch{epoch + 1}"),
            )
        if rank == 0:
            print(f"epoch {epoch + 1:2d}  train loss {losses[-1]:.4f}  ({opt.ascents} ascents)")

    weights = [p.full_tensor().detach().cpu() for p in model.parameters()]  # collective
    # two runs that end with the same digest have bit-identical weights
    digest = hashlib.sha256(b"".join(w.numpy().tobytes() for w in weights)).hexdigest()[:16]
    if rank == 0:
        print(f"weights digest {digest}")
    dist.barrier()
    return {"losses": losses, "steps": opt.steps, "digest": digest, "start_epoch": start}


def spawned(rank: int, world: int, port: int, args: argparse.Namespace, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    out = train(rank, world, args)
    if rank == 0:
        results.put(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--adaptive", action="store_true", help="ASAM (use rho about 0.5)")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64, help="per rank")
    parser.add_argument("--mesh", choices=["shard", "hybrid"], default="shard")
    parser.add_argument("--checkpoint", default=None, help="directory for per-epoch checkpoints")
    parser.add_argument("--resume", default=None, help="a checkpoint written by --checkpoint")
    parser.add_argument(
        "--world-size", type=int, default=2, help="processes to spawn without torchrun"
    )
    parser.add_argument("--cpu", action="store_true", help="gloo on CPU even if GPUs are present")
    args = parser.parse_args(argv)
    if args.resume and not (
        Path(args.resume).name.startswith("epoch") and Path(args.resume).is_dir()
    ):
        parser.error(f"--resume {args.resume}: expected a DIR/epoch<k> written by --checkpoint")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Train; return rank 0's summary (losses per epoch, SAM steps, the weights' digest)."""
    args = parse_args(argv)

    if "RANK" in os.environ:  # launched by torchrun
        return train(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if torch.cuda.is_available() and not args.cpu:
        args.world_size = min(args.world_size, torch.cuda.device_count())
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(spawned, args=(args.world_size, port, args, results), nprocs=args.world_size)
    return results.get()


if __name__ == "__main__":
    main()
