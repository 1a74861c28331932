"""Scaling of fastdal.query across processes: the collectives' time against the scoring time, and memory.

    python bench/bench_distributed.py [--sizes 10000 100000 1000000] [--world 2]
    # writes bench/results/distributed-cpu.json and prints a table

On paper (fastdal/distributed.py): with W ranks, a pool of N samples, a labeled gradient of P floats and a
budget b, ``query`` costs each rank the scoring of N / W samples plus one all-reduce of P floats (the labeled
gradient), a gather of W counts, and a gather of b x W (score, index) candidates: the collectives do not grow
with N, so their share of the time falls as the pool grows. ``score`` all-gathers the N scores instead (every
rank returns the whole pool's), O(N) bytes on each rank. Memory on a rank beyond its own shard of the data:
the scores of its shard (O(N / W)) and a batch's temporaries, nothing of size N.

Measured here: W processes (gloo, CPU) each score a shard of a pool of synthetic 64-feature inputs with a small
MLP (last layer, K=10), for each pool size: the wall time of ``query`` on each rank, the time of the same
work without collectives (the rank's labeled sum, scores and top b, in one process's code path), their
difference (the collectives, the global-index bookkeeping and the waiting for the slower rank; a negative
value is noise), the time of ``score`` (which all-gathers the N scores), each a median of 3, and each rank's
resident memory before the query and its peak. The benchmark holds the whole pool's inputs on every rank
(a TensorDataset that the DistributedSampler indexes): that data, not fastdal, is what grows with N there.
One run, same machine, sizes in increasing order; the ratios are the result, not the seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_name

import fastdal
from fastdal import api

FEATURES, CLASSES, BATCH, BUDGET = 64, 10, 4096, 100
RESULTS = Path(__file__).resolve().parent / "results" / "distributed-cpu.json"


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU(), nn.Linear(64, CLASSES)).eval()


def _median(fn, barrier: bool, reps: int = 3) -> float:
    """Median wall seconds of ``fn()`` over ``reps`` calls (after a barrier each, for collective calls)."""
    times = []
    for _ in range(reps):
        if barrier:
            dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _local_work(model: nn.Module, labeled: DataLoader, loader: DataLoader, grad) -> None:
    """A query's work on this rank's shards without any collective: its labeled sum, its scores, its top b."""
    api._labeled_grad_here(model, labeled, "last", None, False, None, None, None)
    scores = api._score_here(model, loader, grad, 2.0, "auto", None, False, None, None, dist.group.WORLD)
    fastdal.select(scores.score, BUDGET)


def _rss_mb() -> float:
    """Resident memory now (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def _worker(rank: int, world: int, init_file: str, sizes: list[int], out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = _model()
    g = torch.Generator().manual_seed(1)
    labeled_set = TensorDataset(torch.randn(1000, FEATURES, generator=g), torch.randint(0, CLASSES, (1000,)))
    labeled = DataLoader(labeled_set, batch_size=BATCH, sampler=DistributedSampler(labeled_set, shuffle=False))
    rows = []
    for n in sizes:
        pool = TensorDataset(torch.randn(n, FEATURES, generator=torch.Generator().manual_seed(n)))
        loader = DataLoader(pool, batch_size=BATCH, sampler=DistributedSampler(pool, shuffle=False))
        grad = fastdal.labeled_grad(model, labeled)
        fastdal.query(model, loader, labeled, BUDGET)  # warm-up
        rss_before = _rss_mb()
        query_s = _median(partial(fastdal.query, model, loader, labeled, BUDGET), barrier=True)
        score_s = _median(partial(fastdal.score, model, loader, grad), barrier=True)
        local_s = _median(partial(_local_work, model, labeled, loader, grad), barrier=False)
        shard_mb = len(loader.sampler) * FEATURES * 4 / 2**20
        rows.append(
            {
                "pool": n,
                "rank": rank,
                "query_s": query_s,
                "score_all_gather_s": score_s,
                "local_scoring_s": local_s,
                "distributed_overhead_s": query_s - local_s,
                "rss_before_query_mb": rss_before,
                "peak_rss_mb": _peak_rss_mb(),
                "shard_input_mb": shard_mb,
            }
        )
    everything = [None] * world
    dist.all_gather_object(everything, rows)
    if rank == 0:
        Path(out).write_text(json.dumps([r for part in everything for r in part]))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--world", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "rows.json")
        mp.spawn(_worker, args=(args.world, os.path.join(folder, "init"), args.sizes, out), nprocs=args.world)
        rows = json.loads(Path(out).read_text())
    print(
        f"{'pool':>9} {'rank':>4} {'query s':>8} {'local s':>8} {'overhead s':>10} {'share':>6} {'score s':>8} "
        f"{'peak MB':>8} {'shard MB':>8}"
    )
    for r in rows:
        share = r["distributed_overhead_s"] / r["query_s"]
        print(
            f"{r['pool']:>9} {r['rank']:>4} {r['query_s']:>8.3f} {r['local_scoring_s']:>8.3f} "
            f"{r['distributed_overhead_s']:>10.3f} {share:>6.1%} {r['score_all_gather_s']:>8.3f} "
            f"{r['peak_rss_mb']:>8.0f} {r['shard_input_mb']:>8.1f}"
        )
    report = {
        "device": cpu_name(),
        "world": args.world,
        "backend": "gloo",
        "torch": torch.__version__,
        "model": f"MLP {FEATURES}-64-{CLASSES}, last layer, batch {BATCH}, b={BUDGET}",
        "rows": rows,
    }
    RESULTS.write_text(json.dumps(report, indent=1) + "\n")
    print(f"written: {RESULTS}")


if __name__ == "__main__":
    main()
