"""Pools larger than one machine: the collectives behind ``labeled_grad``, ``score``, ``query`` and
``features`` over ``torch.distributed``.

Each rank passes a loader over its own shard of the pool (or labeled set). This module says which global
sample each local result belongs to, and moves as little as it can between ranks:

* ``labeled_grad``: the local sums are all-reduced (one all-reduce per covered parameter), so every rank
  holds the same ``G``, the sum over all ranks' labeled shards (equal to one process's up to the float
  summation order of the all-reduce). A labeled loader drawing with a ``DistributedSampler`` has the padding
  the sampler adds cut from its batches before the model sees them (the padded samples are the last ones
  a rank draws), so no labeled sample is counted twice.
* ``score``: every rank gets the scores of the whole pool in global order (an all-gather of N scores).
* ``query``: each rank sends its local top-``b`` (score, global index) pairs, ``b x world size`` in all,
  and every rank picks the same global top-``b`` with the one-process tie rule (higher score first, the
  lower global index on ties). Its shards are checked to partition the pool: ``DistributedSampler``s of one
  configuration and consecutive shards are partitions by construction (only a description of each rank's
  shard crosses); ``indices=`` splits are all-gathered once (8 bytes a sample) and checked.
* ``features``: every rank gets the whole set's features in global order (an all-gather), so BADGE and
  greedy selection run the same on every rank.

Which global index a local sample has:

* the loader's sampler is a ``DistributedSampler``: the indices it yields, with the padding it adds to even
  out the shards (positions past the dataset's end in its padded list) dropped;
* ``indices=`` given: the global indices of the shard's samples, in loader order (any disjoint split whose
  union is 0..N-1; an index held twice, or none holding one, is an error naming the index and the ranks);
* otherwise: the shards are consecutive in rank order (rank 0's samples first, then rank 1's, ...).

A ``DistributedSampler(drop_last=True)`` is refused, for the pool and the labeled set alike: it leaves up to
``world size - 1`` samples out (the score of a pool sample, a labeled sample's share of ``G``), and which ones
depends on the set's size, which grows every active-learning round.

``group=False`` asks for one process's computation on this rank's loader even where a default group is
initialized (a rank-local call under torchrun): no collective is run.

A failure on one rank (bad input, a non-finite logit) is raised on every rank, naming the rank and, for a
sample, its global index, instead of leaving the other ranks waiting in a collective.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from .capture import unwrapped

T = TypeVar("T")

Group = Any  # a torch.distributed ProcessGroup


def active_group(group: Group | bool | None) -> Group | None:
    """The process group to work across: ``group`` if given; None (this process alone) for ``group=False``;
    for ``group=None`` the default group when one is initialized with more than one rank, else None."""
    if group is False:  # a rank-local call under torchrun: no collective at all
        return None
    if group is not None and (group is True or not _is_process_group(group)):
        raise TypeError(
            "group must be None (the default group, if initialized with more than one rank), False (this process "
            f"alone) or a torch.distributed ProcessGroup, got {group!r}"
        )
    if not torch.distributed.is_available():
        if group is not None:
            raise RuntimeError("group= was given, but this torch has no torch.distributed")
        return None
    if group is not None:
        return group
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        return torch.distributed.group.WORLD
    return None


def _is_process_group(group: object) -> bool:
    # Without torch.distributed there is no ProcessGroup type: any object then fails in active_group's next check.
    return not torch.distributed.is_available() or isinstance(group, torch.distributed.ProcessGroup)


def rank_and_size(group: Group) -> tuple[int, int]:
    return torch.distributed.get_rank(group), torch.distributed.get_world_size(group)


def distributed_sampler(loader: Iterable) -> DistributedSampler | None:
    """The loader's DistributedSampler, if it draws its samples with one."""
    if not isinstance(loader, DataLoader):
        return None
    if loader.batch_sampler is None:
        sampler = loader.sampler
    else:
        sampler = getattr(loader.batch_sampler, "sampler", None)
        if isinstance(sampler, DistributedSampler) and not isinstance(loader.batch_sampler, BatchSampler):
            # Which sample is where (and which is padding) follows from the sampler's order, which a custom batch
            # sampler may change.
            raise ValueError(
                f"the loader's custom batch_sampler ({type(loader.batch_sampler).__name__}) draws from a "
                "DistributedSampler: fastdal needs the sampler's own order, so build the DataLoader with "
                "sampler=DistributedSampler(...) and batch_size="
            )
    return sampler if isinstance(sampler, DistributedSampler) else None


def sampler_kept(sampler: DistributedSampler) -> Tensor:
    """Which of the samples a rank's DistributedSampler draws are real, not padding: (len(sampler),) bool.

    DistributedSampler pads its (shuffled or not) list to a multiple of the world size by repeating the list's
    start, then gives rank ``r`` the positions ``r + k * num_replicas``; the padded positions are those past the
    dataset's end, so on each rank they are the last ones it draws.
    """
    positions = sampler.rank + sampler.num_replicas * torch.arange(len(sampler))
    return positions < len(sampler.dataset)


def check_sampler(sampler: DistributedSampler, group: Group, argument: str) -> None:
    """A DistributedSampler that splits its set over this group without leaving a sample out."""
    world = torch.distributed.get_world_size(group)
    if sampler.drop_last:
        raise ValueError(
            f"{argument} draws with DistributedSampler(drop_last=True), which leaves up to {world - 1} samples of the "
            "set out, which ones depending on the set's size; build it with drop_last=False (fastdal drops the "
            "padding it adds instead)"
        )
    if sampler.num_replicas != world:
        raise ValueError(
            f"{argument}'s DistributedSampler has num_replicas={sampler.num_replicas}, but the process group has "
            f"{world} ranks: each rank's sampler must split the set over the group's ranks"
        )


def labeled_shard(loader: Iterable, group: Group) -> tuple[int, int] | None:
    """(how many of the samples this rank's labeled loader draws are real, how many it draws) for a loader drawing
    with a DistributedSampler, whose padding must not count in ``G``; None for any other loader (all count)."""
    sampler = distributed_sampler(loader)
    if sampler is None:
        return None
    check_sampler(sampler, group, "labeled_loader")
    return int(sampler_kept(sampler).sum()), len(sampler)


def sampler_global_index(loader: Iterable) -> Callable[[int], int]:
    """The global index of a local sample of a loader drawing with a DistributedSampler, for an error message:
    it is only called on a failure (and raises LookupError without such a sampler)."""

    def global_index(local: int) -> int:
        sampler = distributed_sampler(loader)
        if sampler is None:
            raise LookupError("no DistributedSampler: the global index is unknown")
        return list(iter(sampler))[local]  # the sampler's order is fixed by its seed and epoch

    return global_index


def sampler_plan(sampler: DistributedSampler | None) -> tuple | None:
    """What fixes a DistributedSampler's split (None without one): ranks whose samplers share it and have
    distinct ranks draw a partition of the set."""
    if sampler is None:
        return None
    shuffled = (sampler.seed, sampler.epoch) if sampler.shuffle else (None, None)  # unused without shuffling
    return (len(sampler.dataset), sampler.num_replicas, sampler.shuffle, *shuffled), sampler.rank


def samplers_disagree(plans: Sequence[tuple | None], world: int) -> str | None:
    """Why the ranks' DistributedSamplers (``plans`` from :func:`sampler_plan`, in rank order) do not split one
    set between them, or None if they do."""
    if all(p is None for p in plans):
        return None
    if None in plans:
        with_one = next(r for r, p in enumerate(plans) if p is not None)
        return f"rank {plans.index(None)} draws without a DistributedSampler, rank {with_one} with one"
    splits = [p[0] for p in plans]
    for r, split in enumerate(splits):
        if split != splits[0]:
            return (
                f"the DistributedSamplers of ranks 0 and {r} split different sets (dataset size, num_replicas, "
                f"shuffle, seed, epoch: {splits[0]} and {split})"
            )
    ranks = [p[1] for p in plans]
    if sorted(ranks) != list(range(world)):
        return f"the DistributedSamplers' ranks are {ranks}; the group's {world} ranks need 0..{world - 1}, one each"
    return None


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

    def __init__(
        self, loader: Iterable, group: Group, indices: Sequence[int] | Tensor | None, argument: str = "the loader"
    ):
        self.group = group
        self.rank, self.world = rank_and_size(group)
        self.sampler = distributed_sampler(loader)
        self.user_indices = None if indices is None else torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if self.sampler is not None and self.user_indices is not None:
            raise ValueError("indices= was given for a loader with a DistributedSampler, which says them already")
        self._planned: Tensor | None = None
        if self.sampler is not None:
            check_sampler(self.sampler, group, argument)
            self._planned = torch.as_tensor(list(iter(self.sampler)), dtype=torch.long)
        elif self.user_indices is not None:
            self._planned = self.user_indices
        # How this rank's shard was split off, for query's partition check (:func:`check_shards`).
        self.plan: tuple = ("consecutive",)
        if self.user_indices is not None:
            self.plan = ("indices",)
        elif self.sampler is not None:
            self.plan = ("sampler", sampler_plan(self.sampler))

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
            return planned, sampler_kept(self.sampler), len(self.sampler.dataset)
        if self.user_indices is not None:
            if self.user_indices.numel() != count:
                raise ValueError(
                    f"indices= has {self.user_indices.numel()} entries but the loader yielded {count} samples"
                )
            n = sum(counts)
            return self.user_indices, torch.ones(count, dtype=torch.bool), n
        offset = sum(counts[: self.rank])
        return offset + torch.arange(count), torch.ones(count, dtype=torch.bool), sum(counts)


def check_shards(shard: Shard, kept: Tensor, n: int) -> None:
    """:func:`check_partition` of the ranks' kept global indices ``kept``, moving N indices only where needed.

    Consecutive shards, and shards drawn by DistributedSamplers that split one set (:func:`samplers_disagree`),
    are partitions by construction: only each rank's description of its shard crosses. Otherwise (``indices=``,
    samplers set up differently on some rank, or a mix) every rank's indices are all-gathered (8 bytes a sample)
    and checked exactly.
    """
    plans = gather_objects(shard.plan, shard.group)
    if all(p == ("consecutive",) for p in plans):
        return
    if all(p[0] == "sampler" for p in plans) and samplers_disagree([p[1] for p in plans], shard.world) is None:
        return
    check_partition(gather_objects(kept, shard.group), n)


def check_partition(indices: Sequence[Tensor], n: int) -> None:
    """The kept global indices of all ranks (``indices``, in rank order) together are 0..n-1, each exactly once;
    else a ValueError naming the first offending global index and the ranks that hold it."""
    rule = (
        f"the ranks' shards (each rank's indices=, DistributedSampler or place in rank order) must hold every global "
        f"index 0..{n - 1} exactly once"
    )
    for rank, idx in enumerate(indices):
        outside = (idx < 0) | (idx >= n)
        if bool(outside.any()):
            raise ValueError(f"{rule}: rank {rank} holds global index {int(idx[outside][0])}, outside 0..{n - 1}")
    counts = torch.zeros(n, dtype=torch.long)
    for idx in indices:
        counts += torch.bincount(idx, minlength=n)
    twice = (counts > 1).nonzero()
    if twice.numel():
        i = int(twice[0, 0])
        holders = [(rank, int((idx == i).sum())) for rank, idx in enumerate(indices) if bool((idx == i).any())]
        where = " and ".join(f"rank {rank}" + (f" ({k} times)" if k > 1 else "") for rank, k in holders)
        raise ValueError(f"{rule}: global index {i} is held by {where}")
    missing = (counts == 0).nonzero()
    if missing.numel():
        raise ValueError(f"{rule}: no rank holds global index {int(missing[0, 0])}")


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
