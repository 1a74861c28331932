"""Dynamic active learning on scikit-learn's 8x8 digits with baal's own loop and fastdal's choice.

    python3 examples/baal_digits.py                      # dynamic AL, all layers
    python3 examples/baal_digits.py --method badge       # or greedy

baal does the bookkeeping (ActiveLearningDataset), the training (ModelWrapper.train_on_dataset) and the
rounds (ActiveLearningLoop.step); the one line of glue is DynamicALLoop, which makes step() label the
samples fastdal picks. Runs in a few seconds on a CPU; no download, no pretrained weights.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

# Run from a checkout, use the fastdal next to this script rather than another installed copy.
REPO = Path(__file__).resolve().parents[1]
if (REPO / "fastdal" / "__init__.py").exists():
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import structlog  # noqa: E402
import torch  # noqa: E402
from baal import ActiveLearningDataset, ModelWrapper  # noqa: E402
from baal.modelwrapper import TrainingArgs  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from fastdal.integrations.baal import DynamicALLoop  # noqa: E402


def digits(seed: int) -> tuple[TensorDataset, TensorDataset]:
    """Train and test splits of the 1797 digits, pixels scaled to [0, 1], as 1x8x8 images."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, train = order[:400], order[400:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 16 x 4 x 4
        nn.Flatten(),
        nn.Linear(256, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


@torch.no_grad()
def accuracy(model: nn.Module, dataset: TensorDataset, device: torch.device) -> float:
    was_training = model.training
    model.eval()
    correct = sum(
        int((model(x.to(device)).argmax(1) == y.to(device)).sum()) for x, y in DataLoader(dataset, batch_size=256)
    )
    model.train(was_training)
    return correct / len(dataset)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["dynamic", "badge", "greedy"], default="dynamic")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--initial", type=int, default=20)
    parser.add_argument("--query-size", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    # baal logs every training run at INFO level, and its loss metric warns on every batch: quiet both.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")
    # A model this small runs fastest on one thread; more only wait on each other (badly on a busy machine).
    torch.set_num_threads(1)

    torch.manual_seed(options.seed)
    np.random.seed(options.seed)
    train, test = digits(options.seed)
    al_dataset = ActiveLearningDataset(train, random_state=options.seed)
    al_dataset.label_randomly(options.initial)

    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda" if use_cuda else "cpu")
    model = small_cnn().to(device)
    args = TrainingArgs(
        optimizer=torch.optim.Adam(model.parameters(), lr=3e-3),
        criterion=nn.CrossEntropyLoss(),
        batch_size=32,
        epoch=15,
        use_cuda=use_cuda,
        workers=0,
    )
    wrapper = ModelWrapper(model, args)

    # The glue: baal's ActiveLearningLoop, choosing with fastdal among 600 pool samples per round.
    loop = DynamicALLoop(
        al_dataset,
        wrapper,
        query_size=options.query_size,
        max_sample=600,
        method=options.method,
        layers="all",
        rank=16,
        seed=options.seed,
    )

    start = time.perf_counter()
    print(f"digits: {len(train)} train, {len(test)} test; method={options.method}, layers=all")
    history = []
    for round_ in range(options.rounds + 1):
        wrapper.train_on_dataset(al_dataset)
        acc = accuracy(model, test, device)
        history.append((len(al_dataset), acc))
        print(f"round {round_}: {len(al_dataset):4d} labeled, test accuracy {acc:.3f}")
        if round_ < options.rounds and not loop.step():
            break
    print(f"done in {time.perf_counter() - start:.1f} s")

    expected = [options.initial + r * options.query_size for r in range(options.rounds + 1)]
    if [n for n, _ in history] != expected:
        print(f"FAILED: labeled sizes {[n for n, _ in history]}, expected {expected}", file=sys.stderr)
        return 1
    if history[-1][1] < 0.7:
        print(f"FAILED: final accuracy {history[-1][1]:.3f} is below 0.7", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
