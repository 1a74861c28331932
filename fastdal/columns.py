"""Per-sample results written batch by batch into a few preallocated columns.

A pass that keeps every batch's small result tensors until the end leaves many small long-lived allocations
among each batch's large short-lived ones (activations, gradients). glibc's allocator can then not give the
freed space back, and a pass over a million samples held hundreds of MiB more than its results. Copying each
batch's results into columns sized for the whole pool (known for a DataLoader over a sized dataset; otherwise
grown by doubling) keeps what outlives a batch to the results alone.
"""

from __future__ import annotations

from torch import Tensor

# Smallest allocation of a column whose final length is unknown: the first doublings cost little.
_FIRST_CAPACITY = 4096


class Columns:
    """Columns of per-sample results: each :meth:`append` adds one batch's rows to every column."""

    def __init__(self, expected: int | None = None):
        self.expected = expected  # the pool's length when known: the columns are allocated at that size once
        self.count = 0
        self.columns: list[Tensor] | None = None

    def append(self, *parts: Tensor) -> None:
        rows = parts[0].shape[0]
        if self.columns is None:
            capacity = max(self.expected or _FIRST_CAPACITY, rows)
            self.columns = [p.new_empty((capacity, *p.shape[1:])) for p in parts]
        elif self.count + rows > self.columns[0].shape[0]:
            capacity = max(2 * self.columns[0].shape[0], self.count + rows)
            grown = [c.new_empty((capacity, *c.shape[1:])) for c in self.columns]
            for new, old in zip(grown, self.columns):
                new[: self.count].copy_(old[: self.count])
            self.columns = grown
        for column, part in zip(self.columns, parts):
            column[self.count : self.count + rows].copy_(part)
        self.count += rows

    def finish(self) -> list[Tensor] | None:
        """The columns cut to the rows appended (a copy only when they were allocated larger), or None if
        nothing was appended."""
        if self.columns is None:
            return None
        if self.count == self.columns[0].shape[0]:
            return self.columns
        return [c[: self.count].clone() for c in self.columns]
