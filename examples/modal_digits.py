"""Active learning on scikit-learn's 8x8 digits with modAL, a skorch CNN and fastdal's DynamicAL.

    python3 examples/modal_digits.py                  # dynamic AL (Wang et al., NeurIPS 2022)
    python3 examples/modal_digits.py --method badge   # or greedy

modAL's own cycle: an ActiveLearner holds the labeled set and the skorch classifier, ``query`` picks a batch
from the pool, ``teach`` adds the oracle's labels and refits. The only fastdal line is the query strategy.
Exits non-zero if the final test accuracy is implausibly low.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path

import modAL.models.learners
import numpy as np
import torch
from modAL.models import ActiveLearner
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from skorch import NeuralNetClassifier
from torch import nn

# Run from a checkout, installed or not: this checkout's fastdal comes first.
_CHECKOUT = Path(__file__).resolve().parent.parent
if (_CHECKOUT / "fastdal" / "__init__.py").is_file():
    sys.path.insert(0, str(_CHECKOUT))

from fastdal.integrations.modal import DynamicAL  # noqa: E402


def let_modal_teach_on_current_scikit_learn() -> None:
    """modAL 0.4.2.1's ``teach`` validates with ``check_X_y(force_all_finite=...)``, which scikit-learn renamed
    ``ensure_all_finite`` in 1.6 and removed in 1.8 (modAL issue #196): pass it on under the new name."""
    check = modAL.models.learners.check_X_y
    if "force_all_finite" in inspect.signature(check).parameters:
        return

    def check_X_y(*args, force_all_finite=True, **kwargs):
        return check(*args, ensure_all_finite=force_all_finite, **kwargs)

    modAL.models.learners.check_X_y = check_X_y


class SmallCNN(nn.Module):
    """Two conv layers and a linear head returning logits (trained with CrossEntropyLoss): the head's
    gradient is what fastdal scores by default."""

    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
        )
        self.head = nn.Linear(64, n_classes)

    def forward(self, x):
        return self.head(self.features(x))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["dynamic", "badge", "greedy"], default="dynamic")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=30, help="labels queried per round")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # a model this small runs faster on one thread than split over several
    let_modal_teach_on_current_scikit_learn()

    digits = load_digits()
    X = (digits.images / 16.0).astype(np.float32)[:, None]  # (1797, 1, 8, 8)
    X_pool, X_test, y_pool, y_test = train_test_split(
        X, digits.target, test_size=400, stratify=digits.target, random_state=0
    )
    initial = np.concatenate([np.flatnonzero(y_pool == c)[:2] for c in range(10)])  # 2 samples of each class

    net = NeuralNetClassifier(
        SmallCNN,
        criterion=nn.CrossEntropyLoss,
        optimizer=torch.optim.Adam,
        lr=3e-3,
        max_epochs=40,
        batch_size=32,
        train_split=None,
        iterator_train__shuffle=True,
        verbose=0,
    )
    learner = ActiveLearner(
        estimator=net,
        query_strategy=DynamicAL(method=args.method),
        X_training=X_pool[initial],
        y_training=y_pool[initial],
    )
    X_pool, y_pool = np.delete(X_pool, initial, axis=0), np.delete(y_pool, initial)

    start = time.perf_counter()
    accuracy = 0.0
    for round_ in range(args.rounds + 1):
        accuracy = learner.score(X_test, y_test)
        print(f"round {round_}: {len(learner.y_training):4d} labels, test accuracy {accuracy:.3f}", flush=True)
        if round_ == args.rounds:
            break
        chosen, _ = learner.query(X_pool, n_instances=args.batch)
        learner.teach(X_pool[chosen], y_pool[chosen])  # the oracle answers; modAL refits on every label
        X_pool, y_pool = np.delete(X_pool, chosen, axis=0), np.delete(y_pool, chosen)
    print(f"{args.method}: {time.perf_counter() - start:.1f} s")
    if accuracy < 0.6:
        print(f"final accuracy {accuracy:.3f} is below 0.6: something is wrong", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
