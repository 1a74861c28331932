"""Active learning on scikit-learn's 8x8 digits with scikit-activeml, a skorch CNN and fastdal's DynamicAL.

    python3 examples/skactiveml_digits.py                  # dynamic AL (Wang et al., NeurIPS 2022)
    python3 examples/skactiveml_digits.py --method badge   # or greedy

scikit-activeml's own cycle: fit the classifier on the labeled samples (``y`` holds NaN, the library's
MISSING_LABEL, where a label is unknown), query a batch, reveal those labels, repeat. The only fastdal
line is the strategy. Exits non-zero if the final test accuracy is implausibly low.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from skactiveml.classifier import SkorchClassifier
from skactiveml.utils import MISSING_LABEL
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

# Run from a checkout, installed or not: this checkout's fastdal comes first.
_CHECKOUT = Path(__file__).resolve().parent.parent
if (_CHECKOUT / "fastdal" / "__init__.py").is_file():
    sys.path.insert(0, str(_CHECKOUT))

from fastdal.integrations.skactiveml import DynamicAL  # noqa: E402


class SmallCNN(nn.Module):
    """Two conv layers and a linear head: the head's gradient is what fastdal scores by default."""

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

    digits = load_digits()
    X = (digits.images / 16.0).astype(np.float32)[:, None]  # (1797, 1, 8, 8)
    X_pool, X_test, y_pool_true, y_test = train_test_split(
        X, digits.target, test_size=400, stratify=digits.target, random_state=0
    )
    y = np.full(len(X_pool), MISSING_LABEL)  # nothing labeled yet, but 2 samples of each class
    for c in range(10):
        first = np.flatnonzero(y_pool_true == c)[:2]
        y[first] = y_pool_true[first]

    clf = SkorchClassifier(
        SmallCNN,
        classes=np.arange(10),
        neural_net_param_dict=dict(
            optimizer=torch.optim.Adam,
            lr=3e-3,
            max_epochs=40,
            batch_size=32,
            train_split=None,
            iterator_train__shuffle=True,
            verbose=0,
        ),
        random_state=0,
    )
    strategy = DynamicAL(method=args.method, random_state=0)

    start = time.perf_counter()
    accuracy = 0.0
    for round_ in range(args.rounds + 1):
        clf.fit(X_pool, y)
        accuracy = clf.score(X_test, y_test)
        n_labeled = int(np.count_nonzero(~np.isnan(y)))
        print(f"round {round_}: {n_labeled:4d} labels, test accuracy {accuracy:.3f}", flush=True)
        if round_ == args.rounds:
            break
        chosen = strategy.query(X_pool, y, clf, fit_clf=False, batch_size=args.batch)
        y[chosen] = y_pool_true[chosen]  # the oracle answers
    print(f"{args.method}: {time.perf_counter() - start:.1f} s")
    if accuracy < 0.6:
        print(f"final accuracy {accuracy:.3f} is below 0.6: something is wrong", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
