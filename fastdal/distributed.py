"""Pools larger than one machine: the collectives behind ``labeled_grad``, ``score``, ``query`` and
``features`` over ``torch.distributed``.

Each rank passes a loader over its own shard of the pool (or labeled set). This module says which global
sample each local result belongs to, and moves as little as it can between ranks:

* ``labeled_grad``: the local sums are all-reduced (one all-reduce per covered parameter), so every rank
  holds the same ``G``, the sum over all ranks' labeled shards (equal to one process's up to the float
  summation order of the all-reduce).
* ``score``: every rank gets the scores of the whole pool in global order (an all-gather of N scores).
* ``query``: each rank sends its local top-``b`` (score, global index) pairs, ``b x world size`` in all,
  and every rank picks the same global top-``b`` with the one-process tie rule (higher score first, the
  lower global index on ties).
* ``features``: every rank gets the whole set's features in global order (an all-gather), so BADGE and
  greedy selection run the same on every rank.

Which global index a local sample has:

* the loader's sampler is a ``DistributedSampler``: the indices it yields, with the padding it adds to even
  out the shards (positions past the dataset's end in its padded list) dropped;
* ``indices=`` given: the global indices of the shard's samples, in loader order (any disjoint split whose
  union is 0..N-1);
* otherwise: the shards are consecutive in rank order (rank 0's samples first, then rank 1's, ...).

A failure on one rank (bad input, a non-finite logit) is raised on every rank, naming the rank and, for a
sample, its global index, instead of leaving the other ranks waiting in a collective.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler

from .capture import unwrapped

T = TypeVar("T")

Group = Any  # a torch.distributed ProcessGroup


def active_group(group: Group | None) -> Group | None:
    """The process group to work across: ``group`` if given, else the default group when one is initialized
    with more than one rank, else None (one process)."""
    if not torch.distributed.is_available():
        if group is not None:
            raise RuntimeError("group= was given, but this torch has no torch.distributed")
        return None
    if group is not None:
        return group
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        return torch.distributed.group.WORLD
    return None


def rank_and_size(group: Group) -> tuple[int, int]:
    return torch.distributed.get_rank(group), torch.distributed.get_world_size(group)


def distributed_sampler(loader: Iterable) -> DistributedSampler | None:
    """The loader's DistributedSampler, if it draws its samples with one."""
    if not isinstance(loader, DataLoader):
        return None
    sampler = loader.batch_sampler.sampler if loader.batch_sampler is not None else loader.sampler
    return sampler if isinstance(sampler, DistributedSampler) else None


def gather_objects(obj: T, group: Group) -> list[T]:
    """``obj`` of every rank, in rank order, on every rank."""
    out: list[Any] = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(out, obj, group=group)
    return out


def run_on_all(fn: Callable[[], T], group: Group, global_index: Callable[[int], int] | None = None) -> T:
    """``fn()`` on this rank; if it raised on any rank, the same error is raised on every rank.

    The error names the rank where it happened; an error about one sample (the batch checks attach
    ``fastdal_sample = (what, local index)`` to it) also names the sample's global index.
    """
    try:
        value, failure = fn(), None
    except Exception as error:  # every failure must reach the other ranks
        value, failure = None, _describe_failure(error, global_index)
    failures = gather_objects(failure, group)
    for rank, found in enumerate(failures):
        if found is not None:
            kind, message = found
            raise (ValueError if kind == "ValueError" else TypeError if kind == "TypeError" else RuntimeError)(
                f"fastdal (rank {rank} of {len(failures)}): {message}"
            )
    return value  # type: ignore[return-value]


def _describe_failure(error: Exception, global_index: Callable[[int], int] | None) -> tuple[str, str]:
    message = f"{type(error).__name__}: {error}"
    sample = getattr(error, "fastdal_sample", None)
    if sample is not None and global_index is not None:
        what, local = sample
        with contextlib.suppress(Exception):
            message += f" (local {what} index {local} is global {what} index {global_index(local)})"
    return type(error).__name__, message


class Shard:
    """The global indices of one rank's samples, known once the rank has counted them."""

    def __init__(self, loader: Iterable, group: Group, indices: Sequence[int] | Tensor | None):
        self.group = group
        self.rank, self.world = rank_and_size(group)
        self.sampler = distributed_sampler(loader)
        self.user_indices = None if indices is None else torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if self.sampler is not None and self.user_indices is not None:
            raise ValueError("indices= was given for a loader with a DistributedSampler, which says them already")
        self._planned: Tensor | None = None
        if self.sampler is not None:
            self._planned = torch.as_tensor(list(iter(self.sampler)), dtype=torch.long)
        elif self.user_indices is not None:
            self._planned = self.user_indices

    def local_to_global(self, local: int) -> int:
        """The global index of local sample ``local`` (before the shards were counted: planned indices only)."""
        if self._planned is not None:
            return int(self._planned[local])
        raise LookupError("consecutive shards: global indices are known after counting")

    def resolve(self, count: int, counts: Sequence[int]) -> tuple[Tensor, Tensor, int]:
        """(global indices of the local samples, which of them to keep, pool size N), given every rank's count."""
        if self.sampler is not None:
            planned = self._planned
            if planned.numel() != count:
                raise ValueError(f"the loader yielded {count} samples but its DistributedSampler {planned.numel()}")
            # DistributedSampler pads its list to a multiple of the world size by repeating its start; the padded
            # positions are those past the dataset's end: rank + k * num_replicas >= N.
            n = len(self.sampler.dataset)
            positions = self.sampler.rank + self.sampler.num_replicas * torch.arange(count)
            return planned, positions < n, n
        if self.user_indices is not None:
            if self.user_indices.numel() != count:
                raise ValueError(
                    f"indices= has {self.user_indices.numel()} entries but the loader yielded {count} samples"
                )
            n = sum(counts)
            return self.user_indices, torch.ones(count, dtype=torch.bool), n
        offset = sum(counts[: self.rank])
        return offset + torch.arange(count), torch.ones(count, dtype=torch.bool), sum(counts)


def check_partition(indices: Sequence[Tensor], n: int) -> None:
    """The kept global indices of all ranks together are 0..n-1, each exactly once."""
    allidx = torch.cat(list(indices)) if indices else torch.zeros(0, dtype=torch.long)
    if allidx.numel() != n or (allidx.numel() and (allidx.min() < 0 or allidx.max() >= n)):
        raise ValueError(
            f"the ranks' shards must cover global indices 0..{n - 1} exactly once; got {allidx.numel()} samples "
            f"with indices in [{int(allidx.min()) if allidx.numel() else 0}, "
            f"{int(allidx.max()) if allidx.numel() else 0}]"
        )
    seen = torch.zeros(n, dtype=torch.bool)
    seen[allidx] = True
    if not bool(seen.all()):
        missing = int((~seen).nonzero()[0, 0])
        raise ValueError(f"the ranks' shards overlap: no rank has global index {missing}")


def all_reduce_sum(tensors: Iterator[Tensor], group: Group) -> None:
    """Sums each tensor over the ranks in place, through the device the backend communicates on."""
    comm = _comm_device(group)
    for t in tensors:
        buffer = t.to(comm)
        torch.distributed.all_reduce(buffer, op=torch.distributed.ReduceOp.SUM, group=group)
        t.copy_(buffer.to(t.device))


def _comm_device(group: Group) -> torch.device:
    if torch.distributed.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def top(scores: Tensor, index: Tensor, b: int) -> tuple[Tensor, Tensor]:
    """The ``b`` best (scores, global indices): higher score first, the lower global index on ties (what one
    process's stable sort over the pool in global order gives)."""
    by_index = torch.argsort(index)  # an index sort, then a stable score sort, breaks ties by index
    order = by_index[torch.sort(scores[by_index], descending=True, stable=True).indices][:b]
    return scores[order], index[order]


def merge_top(candidates: Sequence[tuple[Tensor, Tensor]], b: int) -> Tensor:
    """The global indices of the top ``b`` of every rank's (scores, global indices) candidates."""
    scores = torch.cat([s.double() for s, _ in candidates])
    return top(scores, torch.cat([i for _, i in candidates]), b)[1]


def scored_module(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose gradients fastdal computes: a DistributedDataParallel's wrapped module (DDP keeps a
    full copy of the parameters on each rank), a ``torch.compile``d model's original; wrappers that shard the
    parameters are refused."""
    model = unwrapped(model)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return unwrapped(model.module)
    sharded = type(model).__name__ in ("FullyShardedDataParallel",) or hasattr(model, "_fsdp_wrapped_module")
    with contextlib.suppress(ImportError, AttributeError):
        from torch.distributed.fsdp import FSDPModule

        sharded = sharded or isinstance(model, FSDPModule)
    with contextlib.suppress(ImportError):
        from torch.distributed.tensor import DTensor

        sharded = sharded or any(isinstance(p, DTensor) for p in model.parameters())
    if sharded:
        raise TypeError(
            f"fastdal needs every parameter whole on each rank; {type(model).__name__} shards them (FSDP, DTensor). "
            "Supported: a plain nn.Module or one wrapped in DistributedDataParallel (scored through its .module)"
        )
    return model
