"""The unlabeled pools of the experiments at the paper's proportions: a seeded, class-stratified sample of a
large training set (arm A), and the same pool made imbalanced by the official code's keep ratios (arm B).

Arm B follows the official code's ``imbalanced_cf10`` setting (src/data_loader.py of
github.com/haonan3/Deep-Active-Learning-by-Leveraging-Training-Dynamics: ``pool_imbalance`` with a balanced
test set): of each class ``c`` it keeps ``floor(ratio_c * count_c)`` samples drawn without replacement, the
ratios of :data:`OFFICIAL_KEEP_RATIOS` (the code's own figures, which the paper's text rounds). Here the ratios
apply to the classes of the stratified pool (2,000 a class for a pool of 20,000: 10,347 samples in all) and
the class-balanced initial labeled set is then drawn from what is kept, by the loop
(``LoopConfig.balanced_initial``), a different draw for every run seed; the official code draws its initial
set first and applies the ratios to the rest of each class, which moves each class's count by under 50
(``floor(r * 1950)`` unlabeled instead of ``floor(r * 2000) - 50``). The kept samples of arm B are a subset of
arm A's pool for the same seed, so the two arms differ by the imbalance alone. The test set is the dataset's
official one, balanced, in both arms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from .data import Splits

# Per-class keep ratios of the official code's imbalanced CIFAR-10 (classes 0..9)
OFFICIAL_KEEP_RATIOS = (0.2967, 0.4941, 0.7035, 0.4236, 0.1752, 0.7764, 0.38670932, 0.1355, 0.8960, 0.8871)
# Added before the floor: 0.1355 * 2000 is 271 in decimal but may come out a hair under it in floating point
FLOOR_SLACK = 1e-9


def stratified_pool(labels: Tensor, size: int, seed: int) -> Tensor:
    """Sorted indices of ``size`` samples, ``size / K`` of each of the K classes, drawn without replacement
    (seeded by ``seed``)."""
    classes = int(labels.max()) + 1
    if size < classes or size % classes:
        raise ValueError(f"size must be a positive multiple of the {classes} classes, got {size}")
    per_class = size // classes
    counts = torch.bincount(labels, minlength=classes)
    if int(counts.min()) < per_class:
        raise ValueError(f"size={size} needs {per_class} samples of each class; the smallest class has {counts.min()}")
    generator = torch.Generator().manual_seed(seed)
    picked = [_draw(torch.nonzero(labels == c).flatten(), per_class, generator) for c in range(classes)]
    return torch.cat(picked).sort().values


def keep_by_class(labels: Tensor, indices: Tensor, ratios: Sequence[float], seed: int) -> Tensor:
    """Sorted subset of ``indices`` keeping ``floor(ratios[c] * count_c)`` of each class ``c`` (``count_c`` its
    samples among ``indices``), drawn without replacement (seeded by ``seed``)."""
    classes = int(labels[indices].max()) + 1
    if len(ratios) != classes or not all(0 < r <= 1 for r in ratios):
        raise ValueError(f"ratios must be {classes} numbers in (0, 1], one per class, got {list(ratios)}")
    generator = torch.Generator().manual_seed(seed)
    kept = []
    for c, ratio in enumerate(ratios):
        members = indices[labels[indices] == c]
        kept.append(_draw(members, math.floor(ratio * len(members) + FLOOR_SLACK), generator))
    return torch.cat(kept).sort().values


def _draw(members: Tensor, count: int, generator: torch.Generator) -> Tensor:
    return members[torch.randperm(len(members), generator=generator)[:count]]


def pool_splits(splits: Splits, size: int, seed: int = 0, keep_ratios: Sequence[float] | None = None) -> Splits:
    """``splits`` with its training set replaced by a stratified pool of ``size`` (arm A), made imbalanced by
    ``keep_ratios`` when given (arm B; :data:`OFFICIAL_KEEP_RATIOS` for the official code's); the test set is
    kept. The pool is a copy (a TensorDataset), so that the loop reads its labels at once."""
    if not isinstance(splits.train, TensorDataset):
        raise TypeError(f"splits.train must be a TensorDataset, got {type(splits.train).__name__}")
    x, y = splits.train.tensors
    indices = stratified_pool(y, size, seed)
    if keep_ratios is not None:
        indices = keep_by_class(y, indices, keep_ratios, seed)
    return splits._replace(train=TensorDataset(x[indices], y[indices]))


@dataclass(frozen=True)
class PoolSpec:
    """A pool as a run asks for it (hashable, so that a worker builds each pool once): ``size`` samples drawn
    class-stratified with ``seed``, then ``keep_ratios`` applied when given."""

    size: int
    keep_ratios: tuple[float, ...] | None = None
    seed: int = 0

    def apply(self, splits: Splits) -> Splits:
        return pool_splits(splits, self.size, self.seed, self.keep_ratios)
