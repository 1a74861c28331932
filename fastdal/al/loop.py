"""The active-learning loop of the paper's Algorithm 1.

Start from ``initial`` random labeled samples (``balanced_initial``: as equal a number from each class as
the data allows); train on the labeled set until it is fit (see :func:`fit`: more than ``patience`` epochs
of the round at or above ``target_accuracy`` on the training set, and at least ``min_epochs`` epochs, or
``max_epochs``); evaluate on the test set; then for each of
``rounds`` rounds: query ``b`` pool samples with the strategy, add them to the labeled set, train
again and evaluate. As in the paper the model is not re-initialized between rounds unless
``reinit=True``. A seed fixes the initial set, the model's initialization, the order of training
batches and every random draw of the strategy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from .batching import MergedLastBatchSampler
from .strategy import RoundState, Strategy, _collate_xy


@dataclass
class LoopConfig:
    initial: int = 20
    b: int = 20
    rounds: int = 5
    max_epochs: int = 200
    target_accuracy: float = 0.99
    min_epochs: int = 1
    patience: int = 0  # epochs of the round at target_accuracy, beyond the first, before training stops
    eval_every: int = 0  # test accuracy every this many epochs too, for the best within the round (0: at the end)
    balanced_initial: bool = False
    lr: float = 1e-3
    batch_size: int = 64
    reinit: bool = False
    seed: int = 0
    device: str = "cpu"


# The convergence gate of the paper's official code (github.com/haonan3/Deep-Active-Learning-by-Leveraging-
# Training-Dynamics, src/main.py and src/main_utils.py: need_query): a round queries once its epoch count has
# reached a minimum (``--query_interval``, 70-140 epochs in its run.sh) and more than 10 of the round's epochs had
# a training accuracy above 0.97 (``--train_acc_threshold``), or after twice the minimum. The minimum is the
# experiment's to choose (it depends on the data, the model and the learning rate); the official gate also waits
# for a test accuracy above the previous round's best, which reads the test set and is left out here.
OFFICIAL_TARGET_ACCURACY = 0.97
OFFICIAL_PATIENCE = 10


def official_gate(config: LoopConfig, min_epochs: int) -> LoopConfig:
    """``config`` with the official code's convergence gate: ``min_epochs``, a cap of twice that, more than 10
    epochs at 0.97 training accuracy."""
    return replace(
        config,
        min_epochs=min_epochs,
        max_epochs=2 * min_epochs,
        target_accuracy=OFFICIAL_TARGET_ACCURACY,
        patience=OFFICIAL_PATIENCE,
    )


class RoundRecord(NamedTuple):
    round: int  # 0: trained on the initial set, before any query
    labeled: int  # size of the labeled set the model was trained on
    accuracy: float  # test accuracy at the end of the round's training
    epochs: int  # epochs the training took
    queried: list[int]  # dataset indices queried at this round (empty at round 0)
    seconds: float  # wall time of the query
    best_accuracy: float = float("nan")  # best test accuracy seen during the round's training (eval_every)
    train_loss: float = float("nan")  # mean cross-entropy on the labeled set when training stopped (eval mode)
    train_accuracy: float = float("nan")  # accuracy on the labeled set when training stopped
    class_recall: tuple[float, ...] = ()  # test recall of each class (its accuracy on that class's samples)


class Fit(NamedTuple):
    """What :func:`fit` did: epochs run, and the labeled set's loss and accuracy (eval mode) at the end, and
    the best test accuracy it saw (NaN without a test set)."""

    epochs: int
    loss: float
    accuracy: float
    best_test: float


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
    if config.min_epochs < 1 or config.patience < 0 or config.min_epochs > config.max_epochs or config.eval_every < 0:
        raise ValueError(
            "need 1 <= min_epochs <= max_epochs, patience >= 0 and eval_every >= 0, "
            f"got min_epochs={config.min_epochs}, max_epochs={config.max_epochs}, patience={config.patience}, "
            f"eval_every={config.eval_every}"
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
    fitted = fit(model, train, labeled, config, generator, test)
    records = [_record(0, labeled, model, test, config, fitted, [], 0.0)]
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
        fitted = fit(model, train, labeled, config, generator, test)
        strategy.update(
            RoundState(model, train, labeled, _pool(n, labeled), r - 1, generator, config.batch_size, device), queried
        )
        records.append(_record(r, labeled, model, test, config, fitted, queried.tolist(), seconds))
        if on_round:
            on_round(records[-1])
    return records


def _record(r, labeled, model, test, config, fitted: Fit, queried: list[int], seconds: float) -> RoundRecord:
    correct, total = correct_by_class(model, test)
    final = int(correct.sum()) / max(int(total.sum()), 1)
    recall = tuple(int(c) / int(t) if t else math.nan for c, t in zip(correct, total))
    best = final if math.isnan(fitted.best_test) else max(final, fitted.best_test)
    return RoundRecord(
        r, len(labeled), final, fitted.epochs, queried, seconds, best, fitted.loss, fitted.accuracy, recall
    )


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


def fit(
    model: nn.Module,
    train: Dataset,
    labeled: Tensor,
    config: LoopConfig,
    generator: torch.Generator,
    test: Dataset | None = None,
) -> Fit:
    """Train on ``train[labeled]`` with Adam, in shuffled batches of ``config.batch_size`` where a last batch
    smaller than half a batch is merged into the previous one (:mod:`.batching`).

    Training stops after the first epoch, from ``min_epochs`` on, by which more than ``patience`` of the
    round's epochs (not necessarily consecutive, as in the official code) ended with a training accuracy of at
    least ``target_accuracy``; with the defaults (1 and 0) that is the first epoch to reach it; after
    ``max_epochs`` at the latest. With ``test`` and ``config.eval_every``, the test accuracy is also measured
    every ``eval_every`` epochs and the best is returned (the official code's metric, measured every 5 epochs).
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    subset = Subset(train, labeled.tolist())
    device = next(model.parameters()).device
    fitted, tested = 0, []
    for epoch in range(1, config.max_epochs + 1):
        model.train()
        # No tiny last batch: one smaller than half a batch joins the previous one (see .batching)
        batches = MergedLastBatchSampler(len(subset), config.batch_size, generator)
        loader = DataLoader(subset, batch_sampler=batches, collate_fn=_collate_xy)
        for x, y in loader:
            if len(y) == 1 and _has_batchnorm(model):
                continue  # BatchNorm cannot train on a batch of one
            optimizer.zero_grad()
            F.cross_entropy(model(x.to(device)), y.to(device)).backward()
            optimizer.step()
        fitted += accuracy(model, subset, config) >= config.target_accuracy
        if test is not None and config.eval_every and epoch % config.eval_every == 0:
            tested.append(accuracy(model, test, config))
        if epoch >= config.min_epochs and fitted > config.patience:
            break
    loss, acc = loss_and_accuracy(model, subset)
    return Fit(epoch, loss, acc, max(tested, default=float("nan")))


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def loss_and_accuracy(model: nn.Module, dataset: Dataset) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of the model on ``dataset`` (eval mode; the mode is restored)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss = correct = total = 0.0
    for x, y in DataLoader(dataset, batch_size=512, collate_fn=_collate_xy):
        logits = model(x.to(device)).float().cpu()
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        total += len(y)
    model.train(was_training)
    return loss / max(total, 1), correct / max(total, 1)


@torch.no_grad()
def correct_by_class(model: nn.Module, dataset: Dataset) -> tuple[Tensor, Tensor]:
    """For each class, how many of its samples in ``dataset`` the model classifies correctly, and how many
    there are (eval mode; the model's mode is restored). Their ratio is the class's recall; an imbalanced pool
    (arm B) can leave the overall accuracy steady while the rare classes' recall moves."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = total = torch.zeros(0, dtype=torch.long)
    for x, y in DataLoader(dataset, batch_size=512, collate_fn=_collate_xy):
        logits = model(x.to(device)).cpu()
        classes = logits.shape[1]
        hits = torch.bincount(y[logits.argmax(1) == y], minlength=classes)
        seen = torch.bincount(y, minlength=classes)
        correct = hits if not len(correct) else correct + hits
        total = seen if not len(total) else total + seen
    model.train(was_training)
    return correct, total


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
