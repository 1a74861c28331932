"""One dynamic-AL query over a pool split across processes, with torch.distributed.

    torchrun --nproc_per_node=2 examples/distributed_query.py    # 2 ranks (gloo on CPU, nccl on GPUs)
    python3 examples/distributed_query.py                         # the same query in one process

Each rank passes fastdal its own shards of the pool and of the labeled set, both through a DistributedSampler
(fastdal drops the padding it adds to even out the shards: with 3 ranks, say, no labeled sample counts twice in
G). fastdal all-reduces the labeled gradient, exchanges each rank's top-b candidates and returns the same global
pool indices on every rank: those one process would pick over the whole pool. Data: scikit-learn's 8x8 digits
(ships offline).
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import fastdal

LABELED, BUDGET = 100, 20


def trained_model(x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    """A small MLP trained on the labeled set, the same on every rank (same seed, same data)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


def main() -> None:
    distributed = "WORLD_SIZE" in os.environ  # set by torchrun
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.set_num_threads(1)

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target)
    labeled, pool = TensorDataset(x[:LABELED], y[:LABELED]), TensorDataset(x[LABELED:])
    model = trained_model(x[:LABELED], y[:LABELED])

    # This rank's shards. Any split of the labeled set works (consecutive slices too); a sampler must not drop
    # samples (drop_last=False, its default).
    pool_loader = DataLoader(pool, batch_size=128, sampler=DistributedSampler(pool) if distributed else None)
    labeled_sampler = DistributedSampler(labeled, shuffle=True, seed=0) if distributed else None
    labeled_loader = DataLoader(labeled, batch_size=128, sampler=labeled_sampler)

    start = time.perf_counter()
    picks = fastdal.query(model, pool_loader, labeled_loader, BUDGET, layers="all")
    seconds = time.perf_counter() - start

    if distributed:  # every rank must hold the same picks
        everyone = [None] * world
        dist.all_gather_object(everyone, picks.tolist())
        if any(p != everyone[0] for p in everyone):
            raise SystemExit(f"ranks disagree on the picks: {everyone}")
    if rank == 0:
        print(f"{world} process(es), pool of {len(pool)}: picked {picks.tolist()} in {seconds:.2f} s")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
