"""The pools of the experiments at the paper's proportions: class counts of arms A and B, and the initial set."""

import pytest
import torch
from torch.utils.data import TensorDataset

from fastdal.al import data, loop, pools

from helpers import fashion_mnist_or_skip

# floor(r * 2000) for the official ratios, by hand: 593.4, 988.2, 1407, 847.2, 350.4, 1552.8, 773.4, 271, 1792, 1774.2
ARM_B_COUNTS = [593, 988, 1407, 847, 350, 1552, 773, 271, 1792, 1774]


def synthetic_splits(per_class: int = 2500, classes: int = 10) -> data.Splits:
    y = torch.arange(classes).repeat_interleave(per_class)[torch.randperm(classes * per_class)]
    x = y.float()[:, None, None, None].expand(-1, 1, 2, 2).clone()  # each image remembers its label
    return data.Splits(TensorDataset(x, y), TensorDataset(x[:10], y[:10]), classes, (1, 2, 2))


def test_arm_a_is_stratified_and_seeded():
    splits = synthetic_splits()
    arm_a = pools.pool_splits(splits, 20000, seed=3)
    x, y = arm_a.train.tensors
    assert torch.bincount(y).tolist() == [2000] * 10
    assert torch.equal(x[:, 0, 0, 0].long(), y)  # images travel with their labels
    assert arm_a.test is splits.test
    again = pools.stratified_pool(splits.train.tensors[1], 20000, seed=3)
    assert torch.equal(again, pools.stratified_pool(splits.train.tensors[1], 20000, seed=3))
    assert not torch.equal(again, pools.stratified_pool(splits.train.tensors[1], 20000, seed=4))


def test_arm_b_keeps_the_official_ratios_of_arm_a():
    labels = synthetic_splits().train.tensors[1]
    arm_a = pools.stratified_pool(labels, 20000, seed=0)
    arm_b = pools.keep_by_class(labels, arm_a, pools.OFFICIAL_KEEP_RATIOS, seed=0)
    assert torch.bincount(labels[arm_b]).tolist() == ARM_B_COUNTS and len(arm_b) == 10347
    assert torch.isin(arm_b, arm_a).all() and arm_b.unique().numel() == len(arm_b)


def test_the_initial_set_is_class_balanced_in_both_arms():
    splits = synthetic_splits()
    for ratios in (None, pools.OFFICIAL_KEEP_RATIOS):
        labels = pools.pool_splits(splits, 20000, keep_ratios=ratios).train.tensors[1]
        for seed in (0, 1):
            order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
            initial = loop._round_robin_by_class(order, labels)[:500]
            assert torch.bincount(labels[initial]).tolist() == [50] * 10


def test_bad_requests_are_refused():
    labels = synthetic_splits(per_class=30).train.tensors[1]
    with pytest.raises(ValueError, match="multiple of the 10 classes"):
        pools.stratified_pool(labels, 205, seed=0)
    with pytest.raises(ValueError, match="smallest class has 30"):
        pools.stratified_pool(labels, 400, seed=0)
    with pytest.raises(ValueError, match="one per class"):
        pools.keep_by_class(labels, torch.arange(len(labels)), [0.5] * 9, seed=0)


def test_the_fashion_mnist_arms():
    splits = fashion_mnist_or_skip()
    arm_a = pools.pool_splits(splits, 20000, seed=0)
    arm_b = pools.pool_splits(splits, 20000, seed=0, keep_ratios=pools.OFFICIAL_KEEP_RATIOS)
    assert torch.bincount(arm_a.train.tensors[1]).tolist() == [2000] * 10
    assert torch.bincount(arm_b.train.tensors[1]).tolist() == ARM_B_COUNTS
    assert torch.bincount(arm_b.test.tensors[1]).tolist() == [1000] * 10


def test_a_grid_run_on_a_fashion_mnist_pool_records_class_recall(tmp_path):
    fashion_mnist_or_skip()
    from fastdal.al import grid

    config = loop.LoopConfig(initial=20, b=10, rounds=1, max_epochs=1, balanced_initial=True)
    spec = pools.PoolSpec(200, pools.OFFICIAL_KEEP_RATIOS)
    (task,) = grid.tasks(("fashion-mnist",), "mlp", ("random",), (0,), config, "arm-b", pool=spec)
    rows = grid.run_task(task)
    assert [r["labeled"] for r in rows] == [20, 30] and rows[0]["setting"] == "arm-b"
    assert grid._splits("fashion-mnist", None, spec).train.tensors[1].bincount().tolist() == [
        5, 9, 14, 8, 3, 15, 7, 2, 17, 17  # floor(r x 20) of a 20-a-class pool
    ]  # fmt: skip
    grid.write_csv(rows, tmp_path / "rows.csv")
    read = grid.read_csv(tmp_path / "rows.csv")
    assert all(len(r["class_recall"]) == 10 for r in read)
    # the test set is balanced (1,000 a class): the accuracy is the mean of the recalls
    assert sum(read[-1]["class_recall"]) / 10 == pytest.approx(read[-1]["accuracy"], abs=1e-4)
