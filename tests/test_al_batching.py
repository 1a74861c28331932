"""Training batches without a tiny last batch: the rule, the sampler, and the loop's use of it."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fastdal.al import batching, loop


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (520, [64] * 7 + [72]),  # 8 left over: merged
        (543, [64] * 7 + [95]),  # 31 < 32: merged, the largest batch there can be
        (544, [64] * 8 + [32]),  # 32 is half a batch: stands alone
        (512, [64] * 8),
        (40, [40]),  # smaller than a batch: the one batch there is
        (0, []),
    ],
)
def test_batch_sizes_by_hand(n, expected):
    assert batching.batch_sizes(n, 64) == expected


def test_every_size_respects_the_bounds():
    for batch_size in (1, 2, 5, 64):
        for n in range(batch_size, 4 * batch_size + 1):
            sizes = batching.batch_sizes(n, batch_size)
            assert sum(sizes) == n
            assert all((batch_size + 1) // 2 <= s <= batch_size + (batch_size + 1) // 2 - 1 for s in sizes)
    with pytest.raises(ValueError, match="batch_size >= 1"):
        batching.batch_sizes(10, 0)


def test_the_sampler_covers_every_sample_once_an_epoch_in_a_seeded_order():
    sampler = batching.MergedLastBatchSampler(130, 64, torch.Generator().manual_seed(0))
    epochs = [list(sampler) for _ in range(2)]
    for batches in epochs:
        assert [len(b) for b in batches] == [64, 66] and sorted(i for b in batches for i in b) == list(range(130))
    assert epochs[0] != epochs[1]  # a fresh shuffle each epoch
    again = batching.MergedLastBatchSampler(130, 64, torch.Generator().manual_seed(0))
    assert list(again) == epochs[0] and len(again) == 2


class BatchSizeRecorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.seen: list[int] = []

    def forward(self, x):
        if self.training:
            self.seen.append(len(x))
        return self.linear(x)


def test_fit_trains_on_merged_batches():
    model = BatchSizeRecorder()
    train = TensorDataset(torch.randn(200, 2), torch.randint(0, 2, (200,)))
    config = loop.LoopConfig(batch_size=64, max_epochs=2, min_epochs=2, target_accuracy=2.0)
    loop.fit(model, train, torch.arange(140), config, torch.Generator().manual_seed(0))
    assert model.seen == [64, 76] * 2  # 140 = 64 + 64 + 12: the 12 joined the second batch
