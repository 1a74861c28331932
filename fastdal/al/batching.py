"""Shuffled training batches without a tiny last batch.

Cut a shuffled labeled set of ``n`` into batches of ``batch_size`` and the last one holds ``n % batch_size``
samples: 520 labeled samples in batches of 64 leave 8. With BatchNorm such a batch normalizes by the statistics
of a handful of samples, and with any model its gradient step weighs those few samples as much as a full batch,
so every epoch ends with a noisy step whose size depends on the labeled set's size, which changes every round.
Here a last batch smaller than half a batch is merged into the one before it (the 8 join the previous 64: one
batch of 72), so every batch holds between ``ceil(batch_size / 2)`` and ``batch_size + ceil(batch_size / 2) - 1``
samples, unless the whole set is smaller than that. No sample is dropped, so an epoch still sees every labeled
sample once.

The order is one ``torch.randperm(n, generator=generator)`` an epoch, so a seed fixes every epoch's batches.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def batch_sizes(n: int, batch_size: int) -> list[int]:
    """The sizes of the batches an epoch of ``n`` samples is cut into (see the module's rule)."""
    if batch_size < 1 or n < 0:
        raise ValueError(f"need batch_size >= 1 and n >= 0, got batch_size={batch_size}, n={n}")
    full, rest = divmod(n, batch_size)
    sizes = [batch_size] * full
    if rest and full and 2 * rest < batch_size:
        sizes[-1] += rest  # too small to stand alone: merged into the previous batch
    elif rest:
        sizes.append(rest)
    return sizes


class MergedLastBatchSampler(Sampler[list[int]]):
    """A batch sampler for DataLoader: each epoch, a fresh shuffle of ``range(n)`` cut by :func:`batch_sizes`."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator) -> None:
        self.sizes = batch_sizes(n, batch_size)
        self.n = n
        self.generator = generator

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.n, generator=self.generator)
        yield from (batch.tolist() for batch in order.split(self.sizes))

    def __len__(self) -> int:
        return len(self.sizes)
