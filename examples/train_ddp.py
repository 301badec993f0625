"""Train a tiny MLP with DistributedDataParallel and ``fastopt.torch.AdamW`` (gloo, CPU, 2 processes).

    torchrun --nproc-per-node 2 examples/train_ddp.py
    python examples/train_ddp.py            # no torchrun: spawns the 2 processes itself

Each process holds the whole model and trains on its own shard of a synthetic
regression set (``DistributedSampler``); DDP averages the gradients during
``backward()``, so every rank's ``fastopt.torch.AdamW`` takes the same step
and the replicas stay identical, which the last line checks. fastopt.torch is
a drop-in: construct it on the DDP model's parameters exactly as you would
``torch.optim.AdamW``.

On GPUs with NCCL: one process per GPU; ``init_process_group("nccl")``,
``torch.cuda.set_device(local_rank)``, the model and each batch on
``f"cuda:{local_rank}"``, ``DistributedDataParallel(model,
device_ids=[local_rank])``; the optimizer line does not change (fastopt steps
CUDA parameters with its CUDA backend).
"""
from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import fastopt.torch


def make_data(n: int = 2048, d_in: int = 16, d_out: int = 4, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)  # the same data set on every rank; the sampler shards it
    x = torch.randn(n, d_in, generator=gen)
    y = torch.sin(2 * x[:, :d_out]) + 0.1 * torch.randn(n, d_out, generator=gen)
    return TensorDataset(x, y)


def train(args: argparse.Namespace) -> None:
    """One rank's training loop; the process group is set up by the caller (torchrun's env:// or spawn)."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # don't oversubscribe the cores

    torch.manual_seed(0)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.LayerNorm(64),
                                torch.nn.Linear(64, 4))
    ddp = DistributedDataParallel(model)
    opt = fastopt.torch.AdamW(ddp.parameters(), lr=args.lr, weight_decay=0.01)

    data = make_data()
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=args.batch, sampler=sampler, drop_last=True)
    if rank == 0:
        n = sum(p.numel() for p in model.parameters())
        print(f"{world} ranks, {n} parameters, {len(loader)} steps per epoch of {args.batch} samples per rank")

    step = 0
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)  # a different shuffle each epoch, the same on every rank
        for x, y in loader:
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(ddp(x), y)
            loss.backward()  # DDP all-reduces (averages) the gradients here
            opt.step()
            step += 1
            if step % args.every == 0:
                mean = loss.detach().clone()
                dist.all_reduce(mean)  # the loss averaged over the ranks, for printing
                if rank == 0:
                    print(f"epoch {epoch} step {step:4d}  loss {mean.item() / world:.5f}")

    # Every rank should hold the same parameters: compare each with rank 0's.
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    worst = max((g - gathered[0]).abs().max().item() for g in gathered)
    if rank == 0:
        print(f"ranks agree: {worst == 0.0} (largest difference from rank 0's parameters: {worst:.3g})")
    dist.destroy_process_group()
    if worst != 0.0:
        raise SystemExit(1)


def _spawned(local_rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    # What torchrun would have set.
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    train(args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32, help="samples per rank per step")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--every", type=int, default=16, help="print the loss every N steps")
    ap.add_argument("--nproc", type=int, default=2, help="processes to spawn without torchrun")
    args = ap.parse_args()
    if "RANK" in os.environ:  # started by torchrun
        train(args)
        return
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_spawned, args=(args.nproc, port, args), nprocs=args.nproc, join=True)


if __name__ == "__main__":
    main()
