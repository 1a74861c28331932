"""fastdal as a small-text query strategy: :class:`DynamicAL` for its PyTorch and transformers classifiers.

    from fastdal.integrations.small_text import DynamicAL
    from small_text import PoolBasedActiveLearner

    learner = PoolBasedActiveLearner(clf_factory, DynamicAL("dynamic"), train)   # or "badge", "greedy"
    learner.initialize_data(indices_initial, y_initial)
    indices_queried = learner.query(num_samples=20)
    learner.update(y_train[indices_queried])

The strategy scores the fitted torch module of the classifier (``clf.model``) on batches made by the
classifier's own collate function (``clf._create_collate_fn()``, the one its ``predict`` uses), so the
model sees exactly what it sees when predicting. It supplies the batch mappings of small-text's classifier
families itself: a :class:`~small_text.integrations.pytorch.classifiers.KimCNNClassifier` batch
``(text, label, weight)`` is what fastdal reads by default, and a
:class:`~small_text.integrations.transformers.classifiers.TransformerBasedClassification` batch
``(input_ids, attention_mask, label, weight)`` is mapped to the keyword arguments its model is called
with, the logits read from the output's ``.logits``. Mappings passed to the constructor win.

The gradients are those of the cross-entropy over the model's logits (the paper's definition), also where
small-text trains a two-class model with a binary cross-entropy. Multi-label classification is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ._common import Acquisition

try:
    from scipy.sparse import issparse
    from small_text.query_strategies import QueryStrategy
except ImportError as error:
    raise ImportError("fastdal.integrations.small_text needs small-text: pip install fastdal[small-text]") from error

try:
    from small_text.integrations.transformers.classifiers.classification import TransformerBasedClassification
except ImportError:  # small-text without its transformers extra: no such classifier can exist
    TransformerBasedClassification = None

__all__ = ["DynamicAL"]


def _transformer_inputs(batch: Sequence[Tensor]) -> dict[str, Tensor]:
    """What ``TransformerBasedClassification`` passes its model: ``model(input_ids, attention_mask=...)``."""
    return {"input_ids": batch[0], "attention_mask": batch[1]}


def _transformer_labels(batch: Sequence[Tensor]) -> Tensor:
    return batch[2]


def _transformer_logits(output: Any) -> Tensor:
    return output.logits


class DynamicAL(QueryStrategy):
    """small-text query strategy choosing with fastdal: the dynamic-AL score, BADGE or the greedy objective.

    Args:
        method: "dynamic" (the ``n`` highest scores ``||g||^2 + gamma <g, G>``), "badge" (k-means++ over
            the gradient features) or "greedy" (the paper's subset objective); see
            :class:`fastdal.integrations.Acquisition`.
        layers, gamma, rank, seed, backend: as in :class:`fastdal.integrations.Acquisition`.
        device: where fastdal computes; default: where ``clf.model`` is (small-text's ``clf.device``).
        batch_size: samples per batch; default: the classifier's ``mini_batch_size``, as in its ``predict``.
        inputs, labels, outputs: batch mappings over the classifier's collated batches, as in
            :func:`fastdal.score`; default: those of the classifier's family (see the module docstring).
    """

    def __init__(
        self,
        method: str = "dynamic",
        *,
        layers: str | Sequence[str] = "last",
        gamma: float = 2.0,
        rank: int | None = None,
        seed: int = 0,
        backend: str = "auto",
        device: torch.device | str | None = None,
        batch_size: int | None = None,
        inputs: Callable[[Any], Any] | None = None,
        labels: Callable[[Any], Tensor] | None = None,
        outputs: Callable[[Any], Tensor] | None = None,
    ) -> None:
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        self.acquisition = Acquisition(
            method=method,
            layers=layers,
            gamma=gamma,
            rank=rank,
            seed=seed,
            backend=backend,
            device=device,
            inputs=inputs,
            labels=labels,
            outputs=outputs,
        )
        self.batch_size = batch_size

    def query(
        self,
        clf: Any,
        dataset: Any,
        indices_unlabeled: Any,
        indices_labeled: Any,
        y: Any,
        n: int = 10,
    ) -> np.ndarray:
        """Indices into ``dataset`` (of ``indices_unlabeled``) of the ``n`` samples to label, in pick order.

        ``y`` holds the labels of ``indices_labeled``, position by position, as small-text passes them.
        """
        model = _fitted_model(clf)
        collate = clf._create_collate_fn()
        size = _dataset_size(dataset)
        pool = _indices(indices_unlabeled, "indices_unlabeled", size)
        labeled = _indices(indices_labeled, "indices_labeled", size)
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        self._validate_query_input(pool, n)  # small-text's own EmptyPoolException / PoolExhaustedException
        overlap = np.intersect1d(pool, labeled)
        if overlap.size:
            raise ValueError(f"indices_unlabeled and indices_labeled share index {int(overlap[0])}")

        acquisition = self._acquisition_for(clf)
        batch_size = self.batch_size or clf.mini_batch_size
        entries = dataset.data
        pool_loader = DataLoader([entries[i] for i in pool], batch_size=batch_size, shuffle=False, collate_fn=collate)
        labeled_loader = None
        if acquisition.needs_labeled:
            if labeled.size == 0:
                raise ValueError(f"method={acquisition.method!r} needs labeled samples, but indices_labeled is empty")
            labeled_set = _relabeled(dataset, labeled, y, getattr(clf, "num_classes", None))
            labeled_loader = DataLoader(labeled_set.data, batch_size=batch_size, shuffle=False, collate_fn=collate)
        positions = acquisition.pick(model, pool_loader, labeled_loader, int(n))
        return pool[positions.numpy()]

    def _acquisition_for(self, clf: Any) -> Acquisition:
        """The acquisition with the batch mappings of ``clf``'s family where the user gave none."""
        if TransformerBasedClassification is None or not isinstance(clf, TransformerBasedClassification):
            return self.acquisition  # KimCNN's (text, label, weight) batches are fastdal's default layout
        given = self.acquisition
        return replace(
            given,
            inputs=given.inputs or _transformer_inputs,
            labels=given.labels or _transformer_labels,
            outputs=given.outputs or _transformer_logits,
        )

    def __str__(self) -> str:
        a = self.acquisition
        return f"DynamicAL(method={a.method!r}, layers={a.layers!r}, gamma={a.gamma}, seed={a.seed})"


def _fitted_model(clf: Any) -> nn.Module:
    """``clf.model``, after checking that ``clf`` is a fitted small-text PyTorch classifier."""
    if not callable(getattr(clf, "_create_collate_fn", None)) or not hasattr(clf, "mini_batch_size"):
        raise TypeError(
            f"clf must be a small-text PyTorch classifier (KimCNNClassifier, TransformerBasedClassification or "
            f"another PytorchClassifier with _create_collate_fn), got {type(clf).__name__}"
        )
    model = getattr(clf, "model", None)
    if model is None:
        raise ValueError("clf has no model yet (clf.model is None): fit it before querying")
    if not isinstance(model, nn.Module):
        raise TypeError(f"clf.model must be a torch.nn.Module, got {type(model).__name__}")
    if getattr(clf, "multi_label", False):
        raise ValueError("clf is a multi-label classifier; DynamicAL supports single-label classification only")
    return model


def _dataset_size(dataset: Any) -> int:
    if not hasattr(dataset, "data") or not hasattr(dataset, "clone"):
        raise TypeError(
            "dataset must be the small-text dataset of the classifier (PytorchTextClassificationDataset, "
            f"TransformersDataset or a view of one), got {type(dataset).__name__}; DynamicAL cannot score an "
            "alternative representation"
        )
    return len(dataset)


def _indices(values: Any, argument: str, size: int) -> np.ndarray:
    """``values`` as a one-dimensional int array of distinct indices into a dataset of ``size`` samples."""
    array = np.asarray(values)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise TypeError(
            f"{argument} must be a one-dimensional array of integer indices, got {array.dtype} {array.shape}"
        )
    bad = (array < 0) | (array >= size)
    if bad.any():
        raise ValueError(f"{argument} holds index {int(array[bad][0])}, outside a dataset of {size} samples")
    if np.unique(array).size != array.size:
        raise ValueError(f"{argument} holds an index more than once")
    return array


def _relabeled(dataset: Any, labeled: np.ndarray, y: Any, num_classes: int | None) -> Any:
    """The labeled samples carrying ``y``, made as small-text makes its training set (the user's data untouched)."""
    if issparse(y):
        raise ValueError(
            "y is a sparse (multi-label) label matrix; DynamicAL supports single-label classification only"
        )
    y = np.asarray(y)
    if y.shape != labeled.shape:
        raise ValueError(f"y must hold one label per index of indices_labeled ({labeled.size}), got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"y must hold integer class labels, got dtype {y.dtype}")
    bad = (y < 0) | (y >= (num_classes if num_classes is not None else np.inf))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"y holds label {int(y[i])} at position {i}, outside [0, {num_classes}) for clf.num_classes")
    labeled_set = dataset[labeled].clone()
    labeled_set.y = y
    return labeled_set
