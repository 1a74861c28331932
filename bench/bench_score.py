"""Pool-scoring cost of fastdal against plain forward/backward passes and the naive per-sample loop.

Measured in one process, on the paper's vanilla CNN (3 conv + global average pooling, 32x32x3 inputs,
K=10, batch 128) and a CIFAR ResNet-18 (batch 32), on random inputs:

* ``last / forward``: ``fastdal.score`` with a ``layers="last"`` gradient over a no-grad forward of
  the same pool;
* ``all / train step``: ``fastdal.score`` with a ``layers="all"`` gradient over one training step
  (forward, cross-entropy, backward, SGD step) on the same pool, on a copy of the model;
* ``naive / all``: the per-sample autograd loop of fastdal.reference (model dtype) over fastdal's
  ``layers="all"``, per sample.

Each ratio comes from adjacent pairs of runs, alternating which of the two goes first; the reported
ratio is the median of the per-pair ratios, which cancels most of the drift of a shared machine. Results go to
``bench/results/score-<device type>.json`` and, on CPU, into the README's table.

    python bench/bench_score.py [--rounds 7] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import device_name

import fastdal
from fastdal.models import VanillaCNN, resnet18

RESULTS = Path(__file__).parent / "results"


def _clock(device: torch.device):
    if device.type == "cuda":

        def timed(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3

        return timed

    def timed(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return timed


def measure(name: str, model: torch.nn.Module, batch: int, batches: int, naive_samples: int, rounds: int, device):
    torch.manual_seed(0)
    model = model.to(device).eval()
    x = torch.randn(batch * batches, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch * batches,), device=device)
    pool = [(xb,) for xb in x.split(batch)]
    labeled = [(x[:batch], y[:batch])]
    grad_last = fastdal.labeled_grad(model, labeled, layers="last")
    grad_all = fastdal.labeled_grad(model, labeled, layers="all")
    trained = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(trained.parameters(), lr=1e-4)
    naive_pool = [(x[:naive_samples],)]

    def forward():
        with torch.no_grad():
            for (xb,) in pool:
                model(xb)

    def train_step():
        for (xb,), yb in zip(pool, y.split(batch)):
            optimizer.zero_grad()
            F.cross_entropy(trained(xb), yb).backward()
            optimizer.step()

    def score_last():
        fastdal.score(model, pool, grad_last)

    def score_all():
        fastdal.score(model, pool, grad_all)

    def naive():
        fastdal.reference.score(model, naive_pool, grad_all)

    functions = dict(forward=forward, train_step=train_step, last=score_last, all=score_all, naive=naive)
    timed = _clock(device)
    for fn in functions.values():  # warm-up
        fn()
    n = batch * batches
    # Each comparison is timed as adjacent pairs, alternating which of the two runs first, so that
    # both see the same state of the machine; the ratio is the median of the per-pair ratios.
    comparisons = {
        "last_over_forward": ("last", "forward", 1.0),
        "all_over_train_step": ("all", "train_step", 1.0),
        "naive_over_all_per_sample": ("naive", "all", n / naive_samples),
    }
    times: dict[str, list[float]] = {k: [] for k in functions}
    ratios = {}
    for key, (a, b, scale) in comparisons.items():
        per_pair = []
        for r in range(rounds):
            order = (a, b) if r % 2 == 0 else (b, a)
            pair = {k: timed(functions[k]) for k in order}
            times[a].append(pair[a])
            times[b].append(pair[b])
            per_pair.append(pair[a] / pair[b] * scale)
        ratios[key] = statistics.median(per_pair)
    return {
        "model": name,
        "batch": batch,
        "pool": n,
        "naive_samples": naive_samples,
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds_median": {k: statistics.median(v) for k, v in times.items()},
        "seconds_all": times,
        "samples_per_second": {
            "last": n / statistics.median(times["last"]),
            "all": n / statistics.median(times["all"]),
            "naive": naive_samples / statistics.median(times["naive"]),
        },
        "ratios": ratios,
    }


def table(results: list[dict]) -> str:
    lines = [
        "| model | batch | last / no-grad forward | all / train step | naive / all, per sample | all, samples/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        q = r["ratios"]
        lines.append(
            f"| {r['model']} | {r['batch']} | {q['last_over_forward']:.2f}x | {q['all_over_train_step']:.2f}x "
            f"| {q['naive_over_all_per_sample']:.1f}x | {r['samples_per_second']['all']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="fewer batches and rounds (a smoke run)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rounds = 2 if args.quick else args.rounds
    results = [
        measure("vanilla CNN", VanillaCNN(), 128, 1 if args.quick else 2, 16 if args.quick else 64, rounds, device),
        measure("ResNet-18", resnet18(), 32, 1 if args.quick else 4, 8 if args.quick else 32, rounds, device),
    ]
    report = {
        "device": device_name(device),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fastdal": fastdal.__version__,
        "rounds": rounds,
        "date": time.strftime("%Y-%m-%d"),
        "results": results,
    }
    print(f"device: {report['device']} ({report['machine']}), torch {torch.__version__}, {rounds} rounds\n")
    print(table(results))
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        out = RESULTS / f"score-{device.type}.json"
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwritten to {out}")
        if device.type == "cpu":
            update_readme(table(results), rounds)


def update_readme(text: str, rounds: int) -> None:
    """Replace the table between the README's bench markers with this run's."""
    readme = Path(__file__).parent.parent / "README.md"
    start, end = "<!-- bench_score:start -->", "<!-- bench_score:end -->"
    content = readme.read_text()
    if start in content and end in content:
        head, rest = content.split(start, 1)
        _, tail = rest.split(end, 1)
        readme.write_text(f"{head}{start}\n{text}\n\n(median over {rounds} pairs of runs){end}{tail}")
        print(f"README table updated from {rounds} rounds")


if __name__ == "__main__":
    main()
