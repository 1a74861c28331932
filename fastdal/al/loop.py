"""The active-learning loop of the paper's Algorithm 1.

Start from ``initial`` random labeled samples (``balanced_initial``: as equal a number from each class as
the data allows); train on the labeled set until it is fit (see :func:`fit`: the training accuracy has been
at least ``target_accuracy`` for more than ``patience`` consecutive epochs, and at least ``min_epochs``
epochs have run, or ``max_epochs``); evaluate on the test set; then for each of
``rounds`` rounds: query ``b`` pool samples with the strategy, add them to the labeled set, train
again and evaluate. As in the paper the model is not re-initialized between rounds unless
``reinit=True``. A seed fixes the initial set, the model's initialization, the order of training
batches and every random draw of the strategy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from .strategy import RoundState, Strategy, _collate_xy


@dataclass
class LoopConfig:
    initial: int = 20
    b: int = 20
    rounds: int = 5
    max_epochs: int = 200
    target_accuracy: float = 0.99
    min_epochs: int = 1
    patience: int = 0  # consecutive epochs at target_accuracy, beyond the first, before training stops
    balanced_initial: bool = False
    lr: float = 1e-3
    batch_size: int = 64
    reinit: bool = False
    seed: int = 0
    device: str = "cpu"


class RoundRecord(NamedTuple):
    round: int  # 0: trained on the initial set, before any query
    labeled: int  # size of the labeled set the model was trained on
    accuracy: float  # test accuracy
    epochs: int  # epochs the training took
    queried: list[int]  # dataset indices queried at this round (empty at round 0)
    seconds: float  # wall time of the query


def run(
    train: Dataset,
    test: Dataset,
    model_factory: Callable[[], nn.Module],
    strategy: Strategy,
    config: LoopConfig,
    on_round: Callable[[RoundRecord], None] | None = None,
) -> list[RoundRecord]:
    """Run the loop; returns one record per round (``rounds + 1`` with round 0)."""
    n = len(train)
    if config.min_epochs < 1 or config.patience < 0 or config.min_epochs > config.max_epochs:
        raise ValueError(
            f"need 1 <= min_epochs <= max_epochs and patience >= 0, got min_epochs={config.min_epochs}, "
            f"max_epochs={config.max_epochs}, patience={config.patience}"
        )
    if not 0 < config.initial <= n:
        raise ValueError(f"initial must be between 1 and the training set size {n}, got {config.initial}")
    if config.b < 1 or config.initial + config.rounds * config.b > n:
        raise ValueError(
            f"b={config.b} x rounds={config.rounds} plus initial={config.initial} must fit in the training set of {n}"
        )
    device = torch.device(config.device)
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(n, generator=generator)
    if config.balanced_initial:
        order = _round_robin_by_class(order, _labels(train))
    labeled = order[: config.initial].sort().values
    torch.manual_seed(config.seed)
    model = model_factory().to(device)
    epochs = fit(model, train, labeled, config, generator)
    records = [RoundRecord(0, len(labeled), accuracy(model, test, config), epochs, [], 0.0)]
    if on_round:
        on_round(records[-1])
    for r in range(1, config.rounds + 1):
        pool = _pool(n, labeled)
        state = RoundState(model, train, labeled, pool, r - 1, generator, config.batch_size, device)
        start = time.perf_counter()
        queried = torch.as_tensor(strategy.select(state, config.b), dtype=torch.long).cpu()
        seconds = time.perf_counter() - start
        _check_query(queried, pool, config.b, strategy)
        labeled = torch.cat([labeled, queried]).sort().values
        if config.reinit:
            torch.manual_seed(config.seed + r)
            model = model_factory().to(device)
        epochs = fit(model, train, labeled, config, generator)
        strategy.update(
            RoundState(model, train, labeled, _pool(n, labeled), r - 1, generator, config.batch_size, device), queried
        )
        records.append(RoundRecord(r, len(labeled), accuracy(model, test, config), epochs, queried.tolist(), seconds))
        if on_round:
            on_round(records[-1])
    return records


def _labels(train: Dataset) -> Tensor:
    """The class label of every training sample (read from a TensorDataset, or one sample at a time)."""
    if isinstance(train, TensorDataset):
        return train.tensors[1].long()
    return torch.as_tensor([int(train[i][1]) for i in range(len(train))])


def _round_robin_by_class(order: Tensor, labels: Tensor) -> Tensor:
    """``order`` rearranged to take one sample of each class in turn (each class's samples in ``order``'s
    order): any prefix then holds as equal a number of each class as the data allows."""
    classes = labels[order]
    grouped = torch.sort(classes, stable=True).indices  # by class, each class in ``order``'s order
    counts = torch.bincount(classes)
    first = torch.cumsum(counts, 0) - counts  # where each class's group starts in ``grouped``
    turn = torch.empty_like(order)  # how many of the sample's class come before it in ``order``
    turn[grouped] = torch.arange(len(order)) - first[classes[grouped]]
    return order[torch.sort(turn, stable=True).indices]


def _pool(n: int, labeled: Tensor) -> Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[labeled] = False
    return mask.nonzero().flatten()


def _check_query(queried: Tensor, pool: Tensor, b: int, strategy: Strategy) -> None:
    """A strategy that breaks the bookkeeping is a bug: stop loudly rather than corrupt the run."""
    if queried.dim() != 1 or queried.numel() != b:
        raise RuntimeError(f"{strategy!r} returned {tuple(queried.shape)} indices, expected {b}")
    if queried.unique().numel() != b:
        raise RuntimeError(f"{strategy!r} returned an index twice")
    if not torch.isin(queried, pool).all():
        raise RuntimeError(f"{strategy!r} returned indices that are not in the pool")


def fit(model: nn.Module, train: Dataset, labeled: Tensor, config: LoopConfig, generator: torch.Generator) -> int:
    """Train on ``train[labeled]``; returns the epochs run.

    Training stops after the first epoch, from ``min_epochs`` on, at which the training accuracy has been at
    least ``target_accuracy`` for more than ``patience`` consecutive epochs (the defaults, 1 and 0: the first
    epoch that reaches it), and after ``max_epochs`` at the latest.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    subset = Subset(train, labeled.tolist())
    device = next(model.parameters()).device
    streak = 0
    for epoch in range(1, config.max_epochs + 1):
        model.train()
        loader = DataLoader(
            subset, batch_size=config.batch_size, shuffle=True, generator=generator, collate_fn=_collate_xy
        )
        for x, y in loader:
            if len(y) == 1 and _has_batchnorm(model):
                continue  # BatchNorm cannot train on a batch of one
            optimizer.zero_grad()
            F.cross_entropy(model(x.to(device)), y.to(device)).backward()
            optimizer.step()
        streak = streak + 1 if accuracy(model, subset, config) >= config.target_accuracy else 0
        if epoch >= config.min_epochs and streak > config.patience:
            return epoch
    return config.max_epochs


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def accuracy(model: nn.Module, dataset: Dataset, config: LoopConfig) -> float:
    """Fraction of ``dataset`` the model classifies correctly (eval mode; the model's mode is restored)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    for x, y in DataLoader(dataset, batch_size=512, collate_fn=_collate_xy):
        correct += int((model(x.to(device)).argmax(1).cpu() == y).sum())
        total += len(y)
    model.train(was_training)
    return correct / max(total, 1)
