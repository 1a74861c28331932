"""``python -m fastdal demo``: one dynamic-AL query on scikit-learn's 8x8 digits, and its cost.

Trains a small CNN on 100 labeled digits, scores the remaining pool with dynamic AL (whole model,
exact), prints the selected samples, then times pool scoring with fastdal (``layers="last"`` and
``layers="all"``) and with the naive per-sample autograd loop, in the same run.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import fastdal
from fastdal.models import VanillaCNN


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 8x8 digit images that scikit-learn ships (no download), as (N, 1, 8, 8) in [0, 1]."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(digits.target, dtype=torch.long)


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = torch.randperm(len(x), generator=generator)[:32]
        optimizer.zero_grad()
        F.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
    model.eval()


def _samples_per_second(fn, n: int, repeats: int = 3) -> float:
    fn()  # warm-up
    best = min(_timed(fn) for _ in range(repeats))
    return n / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(labeled: int = 100, budget: int = 10, seed: int = 0, steps: int = 300, naive_samples: int = 200) -> None:
    torch.manual_seed(seed)
    x, y = load_digits()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    labeled_idx, pool_idx = order[:labeled], order[labeled:]
    model = VanillaCNN(in_channels=1, num_classes=10, widths=(16, 32, 32))
    train(model, x[labeled_idx], y[labeled_idx], steps, seed)
    with torch.no_grad():
        accuracy = (model(x[pool_idx]).argmax(1) == y[pool_idx]).float().mean().item()
    print(f"digits: {len(x)} images of 8x8; a vanilla CNN trained on {labeled} of them: pool accuracy {accuracy:.1%}")

    labeled_loader = DataLoader(TensorDataset(x[labeled_idx], y[labeled_idx]), batch_size=128)
    pool_loader = DataLoader(TensorDataset(x[pool_idx]), batch_size=128)
    grad = fastdal.labeled_grad(model, labeled_loader, layers="all")
    result = fastdal.score(model, pool_loader, grad, return_components=True)
    chosen = fastdal.select(result, budget)
    print(f"\ndynamic AL (layers='all', gamma=2): the {budget} pool samples to label next")
    header = ("rank", "pool idx", "digits idx", "score", "||g||^2", "<g,G>", "pred", "true")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (4, 8, 10, 10, 10, 10, 4, 4))))
    for rank, i in enumerate(chosen.tolist(), 1):
        print(
            f"{rank:4d} {i:8d} {int(pool_idx[i]):10d} {result.score[i]:10.4f} {result.sq_norm[i]:10.4f} "
            f"{result.dot[i]:10.4f} {int(result.pseudo_label[i]):4d} {int(y[pool_idx[i]]):4d}"
        )
    print("selected digits indices:", pool_idx[chosen].tolist())

    subset = DataLoader(TensorDataset(x[pool_idx[:naive_samples]]), batch_size=128)
    naive = fastdal.reference.score(model, subset, grad)
    fast = fastdal.score(model, subset, grad)
    error = ((fast - naive).abs().max() / naive.abs().max()).item()
    grad_last = fastdal.labeled_grad(model, labeled_loader, layers="last")
    n = len(pool_idx)
    rates = {
        "fastdal, layers='last'": _samples_per_second(lambda: fastdal.score(model, pool_loader, grad_last), n),
        "fastdal, layers='all'": _samples_per_second(lambda: fastdal.score(model, pool_loader, grad), n),
        "naive per-sample autograd, all": _samples_per_second(
            lambda: fastdal.reference.score(model, subset, grad), naive_samples, repeats=1
        ),
    }
    baseline = rates["naive per-sample autograd, all"]
    print(f"\npool-scoring throughput on this machine ({torch.get_num_threads()} threads), measured in this run")
    print(f"| {'method':32s} | {'samples/s':>10} | {'vs naive':>8} |")
    print(f"|{'-' * 34}|{'-' * 12}|{'-' * 10}|")
    for name, rate in rates.items():
        print(f"| {name:32s} | {rate:10.0f} | {rate / baseline:7.1f}x |")
    print(f"fastdal 'all' against the naive loop on {naive_samples} samples: max relative difference {error:.1e}")
