"""Scaling of fastdal.query across processes: the collectives' time against the scoring time, and memory.

    python bench/bench_distributed.py [--measure time memory] [--sizes 10000 100000 1000000]
        [--memory-sizes 65536 262144 1048576] [--world 2]
    # writes bench/results/distributed-cpu.json (time) and distributed-memory-cpu.json (memory), prints tables

On paper (fastdal/distributed.py): with W ranks, a pool of N samples, a labeled gradient of P floats and a
budget b, ``query`` costs each rank the scoring of N / W samples plus one all-reduce of P floats (the labeled
gradient), gathers of W counts and of W shard descriptions (the partition check; ``indices=`` splits
all-gather their N indices instead), and a gather of b x W (score, index) candidates: the collectives do not
grow with N, so their share of the time falls as the pool grows. ``score`` all-gathers the N scores instead (every
rank returns the whole pool's), O(N) bytes on each rank. Memory on a rank beyond its own shard of the data:
a batch's temporaries (constant in N), the results of its shard until they are exchanged (O(N / W)), and, for
``score``, the whole pool's scores (O(N)).

Time: W processes (gloo, CPU) each score a shard of a pool of synthetic 64-feature inputs with a small
MLP (last layer, K=10), for each pool size: the wall time of ``query`` on each rank, the time of the same
work without collectives (the rank's labeled sum, scores and top b, in one process's code path), their
difference (the collectives, the global-index bookkeeping and the waiting for the slower rank; a negative
value is noise), the time of ``score`` (which all-gathers the N scores), each a median of 3, and each rank's
resident memory before the query and its peak (the process's, pool data included). The benchmark holds the
whole pool's inputs on every rank (a TensorDataset that the DistributedSampler indexes): that data, not
fastdal, is what grows with N there. One run, same machine, sizes in increasing order; the ratios are the
result, not the seconds.

Memory: for each pool size, W fresh processes (so that no earlier size's freed memory is reused unseen), each
with the pool's inputs already in memory and fastdal's first-call allocations made on a pool of 2 batches a
rank, measure the extra peak resident memory of one call: the peak (VmHWM, reset through
/proc/self/clear_refs just before the call, after the C heap's free pages were handed back) minus the resident
memory before it. Measured on each rank: one pass of the loader alone (the DataLoader and its
DistributedSampler, which builds a list of all N indices at every pass: not fastdal's), ``query``, ``score``
and ``labeled_grad`` (a fixed labeled set: a control that must not grow). The growth per pool sample and what
is left at N = 0, by a straight line through all sizes and ranks, are the result; "beyond loader" subtracts
the loader pass, whose index list lives through the calls' passes too.
"""

from __future__ import annotations

import argparse
import gc
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
from fastdal import api, distributed
from fastdal.allocator import release_free_memory

FEATURES, CLASSES, BATCH, BUDGET = 64, 10, 4096, 100
RESULTS = Path(__file__).resolve().parent / "results" / "distributed-cpu.json"
MEMORY_RESULTS = Path(__file__).resolve().parent / "results" / "distributed-memory-cpu.json"
LABELED = 1000


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
    shard = distributed.labeled_shard(labeled, dist.group.WORLD)
    api._labeled_grad_here(model, labeled, "last", None, False, None, None, None, shard)
    scores = api._score_here(model, loader, grad, 2.0, "auto", None, False, None, None, dist.group.WORLD)
    fastdal.select(scores.score, BUDGET)


def _rss_mb() -> float:
    """Resident memory now (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def _labeled_loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    labeled_set = TensorDataset(torch.randn(LABELED, FEATURES, generator=g), torch.randint(0, CLASSES, (LABELED,)))
    return DataLoader(labeled_set, batch_size=BATCH, sampler=DistributedSampler(labeled_set, shuffle=False))


def _pool_loader(n: int) -> DataLoader:
    pool = TensorDataset(torch.randn(n, FEATURES, generator=torch.Generator().manual_seed(n)))
    return DataLoader(pool, batch_size=BATCH, sampler=DistributedSampler(pool, shuffle=False))


def _worker(rank: int, world: int, init_file: str, sizes: list[int], out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = _model()
    labeled = _labeled_loader()
    rows = []
    for n in sizes:
        loader = _pool_loader(n)
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


def _status_mb(field: str) -> float:
    """A /proc/self/status memory field (VmRSS, VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _extra_peak_mb(fn) -> float:
    """Peak resident memory during ``fn()`` minus the resident memory before it, on this rank (what ``fn``
    returns is held until the peak is read, as a caller would hold it)."""
    dist.barrier()
    gc.collect()
    release_free_memory()  # free heap pages left by earlier calls would be reused unseen
    before = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    result = fn()
    extra = _status_mb("VmHWM") - before
    del result
    return extra


def _loader_pass(loader: DataLoader) -> int:
    return sum(batch[0].shape[0] for batch in loader)


def _memory_worker(rank: int, world: int, init_file: str, n: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model, labeled, loader = _model(), _labeled_loader(), _pool_loader(n)
    grad = fastdal.labeled_grad(model, labeled)
    # What stays for the process's life (thread pools, gloo's buffers, first-call state) is allocated here, on a
    # pool of 2 batches a rank, so that it is not counted as the measured calls'.
    warm = _pool_loader(2 * BATCH * world)
    fastdal.query(model, warm, labeled, BUDGET)
    fastdal.score(model, warm, grad)
    _loader_pass(warm)
    row = {
        "pool": n,
        "rank": rank,
        "shard": len(loader.sampler),
        "loader_pass_mb": _extra_peak_mb(partial(_loader_pass, loader)),
        "query_mb": _extra_peak_mb(partial(fastdal.query, model, loader, labeled, BUDGET)),
        "score_mb": _extra_peak_mb(partial(fastdal.score, model, loader, grad)),
        "labeled_grad_mb": _extra_peak_mb(partial(fastdal.labeled_grad, model, labeled)),
    }
    everyone = [None] * world
    dist.all_gather_object(everyone, row)
    if rank == 0:
        Path(out).write_text(json.dumps(everyone))
    dist.destroy_process_group()


def _fit(rows: list[dict], key: str) -> dict:
    """Least-squares line through (pool size, extra MiB) over all ranks: bytes per pool sample and MiB at N = 0."""
    xs, ys = [float(r["pool"]) for r in rows], [r[key] for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return {"bytes_per_pool_sample": slope * 2**20, "mb_at_zero": my - slope * mx}


def measure_memory(sizes: list[int], world: int) -> None:
    rows = []
    for n in sizes:  # fresh processes for every size
        with tempfile.TemporaryDirectory() as folder:
            out = os.path.join(folder, "rows.json")
            mp.spawn(_memory_worker, args=(world, os.path.join(folder, "init"), n, out), nprocs=world)
            rows += json.loads(Path(out).read_text())
    keys = ("loader_pass_mb", "query_mb", "score_mb", "labeled_grad_mb")
    print(f"{'pool':>9} {'rank':>4} {'shard':>8} " + " ".join(f"{k[:-3]:>13}" for k in keys) + "   (extra peak MiB)")
    for r in rows:
        print(f"{r['pool']:>9} {r['rank']:>4} {r['shard']:>8} " + " ".join(f"{r[k]:>13.1f}" for k in keys))
    for r in rows:  # the loader's own index list lives through the whole pass: what the calls hold beyond it
        r["query_beyond_loader_mb"] = r["query_mb"] - r["loader_pass_mb"]
        r["score_beyond_loader_mb"] = r["score_mb"] - r["loader_pass_mb"]
    fits = {k[:-3]: _fit(rows, k) for k in (*keys, "query_beyond_loader_mb", "score_beyond_loader_mb")}
    for name, f in fits.items():
        print(f"{name:>20}: {f['bytes_per_pool_sample']:6.1f} bytes a pool sample, {f['mb_at_zero']:6.1f} MiB at N = 0")
    report = {
        "device": cpu_name(),
        "world": world,
        "backend": "gloo",
        "torch": torch.__version__,
        "model": f"MLP {FEATURES}-64-{CLASSES}, last layer, batch {BATCH}, b={BUDGET}, {LABELED} labeled samples",
        "measure": "extra peak resident memory of one call on each rank (VmHWM after minus VmRSS before), MiB",
        "fit": fits,
        "rows": rows,
    }
    MEMORY_RESULTS.write_text(json.dumps(report, indent=1) + "\n")
    print(f"written: {MEMORY_RESULTS}")


def measure_time(sizes: list[int], world: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "rows.json")
        mp.spawn(_worker, args=(world, os.path.join(folder, "init"), sizes, out), nprocs=world)
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
        "world": world,
        "backend": "gloo",
        "torch": torch.__version__,
        "model": f"MLP {FEATURES}-64-{CLASSES}, last layer, batch {BATCH}, b={BUDGET}",
        "rows": rows,
    }
    RESULTS.write_text(json.dumps(report, indent=1) + "\n")
    print(f"written: {RESULTS}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", nargs="+", choices=("time", "memory"), default=["time", "memory"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--memory-sizes", type=int, nargs="+", default=[65_536, 262_144, 1_048_576])
    parser.add_argument("--world", type=int, default=2)
    args = parser.parse_args()
    if "memory" in args.measure:
        measure_memory(args.memory_sizes, args.world)
    if "time" in args.measure:
        measure_time(args.sizes, args.world)


if __name__ == "__main__":
    main()
