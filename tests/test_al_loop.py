"""The active-learning loop: bookkeeping of labeled and pool sets with every strategy, reproducibility."""

from dataclasses import replace

import pytest
import torch
from torch.utils.data import Subset

from fastdal import al
from fastdal.al import data, grid

CONFIG = al.LoopConfig(initial=10, b=5, rounds=2, max_epochs=3, batch_size=32)


@pytest.fixture(scope="module")
def digits_subset():
    """Train and test as disjoint subsets of one dataset, so that queried indices can be traced back."""
    splits = data.load("digits", seed=0)
    base = splits.train
    order = torch.randperm(len(base), generator=torch.Generator().manual_seed(1))
    train_idx, test_idx = order[:120].tolist(), order[120:160].tolist()
    return base, train_idx, test_idx


@pytest.mark.parametrize("strategy", list(al.STRATEGIES))
def test_two_rounds_keep_the_books(strategy, digits_subset):
    base, train_idx, test_idx = digits_subset
    train, test = Subset(base, train_idx), Subset(base, test_idx)
    records = al.run(train, test, lambda: grid.make_model("mlp", (1, 8, 8), 10), al.make_strategy(strategy), CONFIG)
    assert [r.round for r in records] == [0, 1, 2]
    assert [r.labeled for r in records] == [10, 15, 20]  # grows by exactly b
    queried = [i for r in records for i in r.queried]
    assert len(queried) == len(set(queried)) == 10  # nothing queried twice
    assert all(0 <= i < len(train) for i in queried)
    in_base = {train_idx[i] for i in queried}
    assert not in_base & set(test_idx)  # no test sample ever queried
    generator = torch.Generator().manual_seed(CONFIG.seed)
    initial = set(torch.randperm(len(train), generator=generator)[: CONFIG.initial].tolist())
    assert not initial & set(queried)  # nothing labeled is queried again
    assert all(0.0 <= r.accuracy <= 1.0 for r in records)


def test_runs_are_reproducible(digits_subset):
    base, train_idx, test_idx = digits_subset
    train, test = Subset(base, train_idx), Subset(base, test_idx)

    def once():
        records = al.run(train, test, lambda: grid.make_model("cnn", (1, 8, 8), 10), al.make_strategy("badge"), CONFIG)
        return [r._replace(seconds=0.0) for r in records]  # everything but the wall time

    assert once() == once()


def test_reinit_option_and_bad_config(digits_subset):
    base, train_idx, test_idx = digits_subset
    train, test = Subset(base, train_idx), Subset(base, test_idx)
    factory_calls = []

    def factory():
        factory_calls.append(1)
        return grid.make_model("mlp", (1, 8, 8), 10)

    al.run(train, test, factory, al.make_strategy("random"), CONFIG)
    assert len(factory_calls) == 1  # like the paper: not re-initialized between rounds
    al.run(train, test, factory, al.make_strategy("random"), replace(CONFIG, reinit=True))
    assert len(factory_calls) == 1 + 3
    with pytest.raises(ValueError, match="must fit in the training set"):
        al.run(train, test, factory, al.make_strategy("random"), replace(CONFIG, b=100))


@pytest.mark.parametrize("model", grid.MODELS)
def test_every_model_trains_on_both_image_sizes(model):
    for shape in ((1, 8, 8), (1, 28, 28)):
        net = grid.make_model(model, shape, 10)
        assert net(torch.randn(2, *shape)).shape == (2, 10)


def test_datasets_ship_offline():
    digits = data.load("digits")
    assert digits.num_classes == 10 and digits.image_shape == (1, 8, 8)
    assert len(digits.train) + len(digits.test) == 1797
    mnist = data.load("mnist5k")
    assert mnist.image_shape == (1, 28, 28) and len(mnist.train) + len(mnist.test) == 5000
    with pytest.raises(ValueError, match="dataset must be one of"):
        data.load("cifar10")
