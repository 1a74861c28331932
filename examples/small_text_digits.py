"""Active learning on scikit-learn's 8x8 digits with small-text's PoolBasedActiveLearner and fastdal's DynamicAL.

    python3 examples/small_text_digits.py                  # dynamic AL (Wang et al., NeurIPS 2022)
    python3 examples/small_text_digits.py --method badge   # or greedy

small-text is a text library, so each image is written as a "text" of 64 tokens, one per pixel, the token
being the pixel's intensity (0..16), in a PytorchTextClassificationDataset. The classifier is small-text's
KimCNNClassifier (its training loop, validation split, early stopping and model selection) with its model
swapped for a small CNN over the 8x8 grid of token embeddings. small-text's own loop: initialize with a
few labels, query a batch, reveal those labels (the learner retrains), repeat. The only fastdal line is the
strategy. Exits non-zero if the final test accuracy is implausibly low.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from small_text import PoolBasedActiveLearner
from small_text.base import LABEL_UNLABELED
from small_text.classifiers.factories import AbstractClassifierFactory
from small_text.integrations.pytorch.classifiers import KimCNNClassifier
from small_text.integrations.pytorch.datasets import PytorchTextClassificationDataset
from torch import nn

# Run from a checkout, installed or not: this checkout's fastdal comes first.
_CHECKOUT = Path(__file__).resolve().parent.parent
if (_CHECKOUT / "fastdal" / "__init__.py").is_file():
    sys.path.insert(0, str(_CHECKOUT))

from fastdal.integrations.small_text import DynamicAL  # noqa: E402

LEVELS = 17  # pixel intensities 0..16: the "vocabulary"
EMBED = 4
CLASSES = 10


class PixelCNN(nn.Module):
    """Token ids (batch, 64) -> an 8x8 grid of intensity embeddings -> two convs -> a linear head (whose
    gradient is what fastdal scores by default)."""

    def __init__(self, embedding_matrix: torch.Tensor, n_classes: int = CLASSES):
        super().__init__()
        self.embedding = nn.Embedding.from_pretrained(embedding_matrix, freeze=False)
        self.features = nn.Sequential(
            nn.Conv2d(EMBED, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
        )
        self.head = nn.Linear(64, n_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        grid = self.embedding(ids).view(-1, 8, 8, EMBED).permute(0, 3, 1, 2)
        return self.head(self.features(grid))


class PixelCNNClassifier(KimCNNClassifier):
    """KimCNNClassifier's training and prediction, with PixelCNN as its model."""

    def initialize_kimcnn_model(self, sub_train) -> None:
        self.model = PixelCNN(self.embedding_matrix, self.num_classes)


class PixelCNNFactory(AbstractClassifierFactory):
    """What PoolBasedActiveLearner calls to get a fresh classifier for every retraining."""

    def new(self) -> PixelCNNClassifier:
        return PixelCNNClassifier(
            CLASSES,
            embedding_matrix=torch.randn(LEVELS, EMBED, generator=torch.Generator().manual_seed(0)),
            num_epochs=40,
            lr=3.0,  # KimCNNClassifier trains with Adadelta, whose natural step is lr=1.0; few labels want more
            mini_batch_size=16,
            max_seq_len=64,
            device="cpu",
            verbosity=0,
        )


def as_dataset(images: np.ndarray, labels: np.ndarray | None) -> PytorchTextClassificationDataset:
    rows = images.reshape(len(images), 64).astype(np.int64)
    y = labels if labels is not None else np.full(len(rows), LABEL_UNLABELED)
    data = [(torch.from_numpy(row), int(label)) for row, label in zip(rows, y)]
    return PytorchTextClassificationDataset(data, [str(i) for i in range(LEVELS)], target_labels=np.arange(CLASSES))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["dynamic", "badge", "greedy"], default="dynamic")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=30, help="labels queried per round")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the model is tiny: more threads only add synchronization
    torch.manual_seed(0)
    np.random.seed(0)  # small-text draws its validation splits with numpy

    digits = load_digits()
    images_pool, images_test, y_pool_true, y_test = train_test_split(
        digits.images, digits.target, test_size=400, stratify=digits.target, random_state=0
    )
    pool = as_dataset(images_pool, None)  # the pool is unlabeled: the learner keeps the labels it is given
    test = as_dataset(images_test, y_test)
    initial = np.concatenate([np.flatnonzero(y_pool_true == c)[:2] for c in range(CLASSES)])

    # With a handful of labels, a validation split of them is too small to stop on or select by.
    fit_kwargs = dict(early_stopping="none", model_selection="none")
    learner = PoolBasedActiveLearner(PixelCNNFactory(), DynamicAL(args.method), pool, fit_kwargs=fit_kwargs)
    start = time.perf_counter()
    learner.initialize_data(initial, y_pool_true[initial])
    accuracy = 0.0
    for round_ in range(args.rounds + 1):
        accuracy = float(np.mean(learner.classifier.predict(test) == y_test))
        print(f"round {round_}: {len(learner.indices_labeled):4d} labels, test accuracy {accuracy:.3f}", flush=True)
        if round_ == args.rounds:
            break
        queried = learner.query(num_samples=args.batch)
        learner.update(y_pool_true[queried])  # the oracle answers; the learner retrains
    print(f"{args.method}: {time.perf_counter() - start:.1f} s")
    if accuracy < 0.6:
        print(f"final accuracy {accuracy:.3f} is below 0.6: something is wrong", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
