"""The active-learning loop: bookkeeping of labeled and pool sets with every strategy, reproducibility."""

import math
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


def test_convergence_gate_waits_for_min_epochs_and_patience(monkeypatch):
    """Training stops at the first epoch >= min_epochs by which more than `patience` of the round's epochs
    (consecutive or not, as the official code counts them) reached the target."""
    from fastdal.al import loop

    script = [0.5, 0.99, 0.995, 0.8, 0.99, 0.99, 0.99, 0.99, 0.99, 0.99, 0.99, 0.99]
    base = replace(CONFIG, target_accuracy=0.99, max_epochs=len(script))
    model = torch.nn.Linear(2, 2)
    train = torch.utils.data.TensorDataset(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]))

    def epochs(**changes) -> int:
        calls = iter(script)
        monkeypatch.setattr(loop, "accuracy", lambda *args: next(calls))
        config = replace(base, **changes)
        return loop.fit(model, train, torch.arange(4), config, torch.Generator().manual_seed(0)).epochs

    assert epochs() == 2  # the defaults: the first epoch at the target
    assert epochs(patience=1) == 3  # epochs 2 and 3
    assert epochs(patience=2) == 5  # epochs 2, 3 and 5: epoch 4 below the target does not reset the count
    assert epochs(patience=2, min_epochs=9) == 9
    assert epochs(target_accuracy=0.995, patience=1) == 12  # only epoch 3 ever reaches 0.995: the cap
    assert epochs(patience=20) == len(script)  # never: the cap
    with pytest.raises(ValueError, match="min_epochs"):
        al.run(train, train, lambda: model, al.make_strategy("random"), replace(base, min_epochs=0))
    with pytest.raises(ValueError, match="eval_every"):
        al.run(train, train, lambda: model, al.make_strategy("random"), replace(base, eval_every=-1))
    gate = loop.official_gate(base, 30)
    assert (gate.min_epochs, gate.max_epochs, gate.target_accuracy, gate.patience) == (30, 60, 0.97, 10)


def test_rounds_record_the_training_state_and_the_best_test_accuracy(digits_subset):
    """Each record carries the labeled set's loss and accuracy when training stopped, and the best test
    accuracy of the evaluations during the round, which is never below the final one."""
    from fastdal.al import loop

    base, train_idx, test_idx = digits_subset
    train, test = Subset(base, train_idx), Subset(base, test_idx)
    config = replace(CONFIG, max_epochs=6, min_epochs=6, eval_every=2)
    seen = []
    real = loop.accuracy

    def spy(model, dataset, config):
        value = real(model, dataset, config)
        if dataset is test:
            seen.append(value)
        return value

    real_by_class = loop.correct_by_class

    def spy_by_class(model, dataset):  # the end of the round's evaluation, which records the class recall too
        correct, total = real_by_class(model, dataset)
        if dataset is test:
            seen.append(int(correct.sum()) / int(total.sum()))
        return correct, total

    loop.accuracy, loop.correct_by_class, saved = spy, spy_by_class, (loop.accuracy, loop.correct_by_class)
    try:
        records = al.run(train, test, lambda: grid.make_model("mlp", (1, 8, 8), 10), al.make_strategy("random"), config)
    finally:
        loop.accuracy, loop.correct_by_class = saved
    assert len(seen) == 3 * 4  # 3 rounds: epochs 2, 4, 6 and the final evaluation
    for r, chunk in zip(records, [seen[i : i + 4] for i in range(0, 12, 4)]):
        assert r.accuracy == chunk[-1] and r.best_accuracy == max(chunk) >= r.accuracy
        assert r.epochs == 6 and 0 <= r.train_accuracy <= 1 and r.train_loss > 0
    model = grid.make_model("mlp", (1, 8, 8), 10)
    labeled = torch.arange(20)
    fitted = loop.fit(model, train, labeled, replace(config, eval_every=0), torch.Generator().manual_seed(0))
    assert math.isnan(fitted.best_test)
    assert (fitted.loss, fitted.accuracy) == loop.loss_and_accuracy(model, Subset(train, labeled.tolist()))


def test_balanced_initial_set(digits_subset):
    base, train_idx, test_idx = digits_subset
    train, test = Subset(base, train_idx), Subset(base, test_idx)
    config = replace(CONFIG, initial=23, b=1, rounds=1, max_epochs=1, balanced_initial=True)
    labels = torch.tensor([int(train[i][1]) for i in range(len(train))])

    class Spy(al.Strategy):
        """Records the labeled set the loop starts from, then queries the first pool sample."""

        def select(self, state, b):
            self.labeled = state.labeled.clone()
            return state.pool[:b]

    starts = []
    for seed in (0, 1):
        spy = Spy()
        al.run(train, test, lambda: grid.make_model("mlp", (1, 8, 8), 10), spy, replace(config, seed=seed))
        counts = torch.bincount(labels[spy.labeled], minlength=10)
        assert counts.sum() == 23 and counts.min() >= 2 and counts.max() <= 3, counts
        starts.append(spy.labeled)
    assert not torch.equal(starts[0], starts[1])
    # The initial set itself: 23 samples of 10 classes, 2 or 3 of each, different for another seed.
    from fastdal.al.loop import _labels, _round_robin_by_class

    assert torch.equal(_labels(train), labels)
    picks = [
        _round_robin_by_class(torch.randperm(len(train), generator=torch.Generator().manual_seed(s)), labels)[:23]
        for s in (0, 1)
    ]
    for chosen in picks:
        counts = torch.bincount(labels[chosen], minlength=10)
        assert counts.sum() == 23 and counts.min() >= 2 and counts.max() <= 3, counts
    assert not torch.equal(picks[0].sort().values, picks[1].sort().values)


def test_class_recall_by_hand():
    from torch import nn
    from torch.utils.data import TensorDataset

    from fastdal.al import loop

    model = nn.Linear(1, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[-1.0], [0.0], [1.0]]))  # x < 0: class 0, x > 0: class 2
    x = torch.tensor([[-1.0], [-2.0], [3.0], [1.0], [2.0], [-4.0]])
    y = torch.tensor([0, 0, 0, 2, 1, 2])
    correct, total = loop.correct_by_class(model, TensorDataset(x, y))
    assert correct.tolist() == [2, 0, 1] and total.tolist() == [3, 1, 2]
    fitted = loop.Fit(1, 0.0, 0.0, math.nan)
    record = loop._record(0, torch.arange(2), model, TensorDataset(x, y), loop.LoopConfig(), fitted, [], 0.0)
    assert record.class_recall == (2 / 3, 0.0, 0.5) and record.accuracy == 3 / 6
