"""labeled_grad, score and query over torch.distributed equal one process's results.

2 and 3 processes are spawned with the gloo backend on CPU (no torchrun needed); each runs every case on
its own shard and compares with what this process computed on the whole pool and labeled set. Cases:
uneven consecutive shards and an empty one, DistributedSampler (with the padding it adds), a user-given
interleaved split, a DistributedDataParallel model, layers "last" and "all", top-b with ties, features with
BADGE and greedy selection, and a NaN on one rank (raised on every rank with its global pool index).

Then, on 2 and 3 ranks: labeled sets of 7 and 11 samples drawn by a DistributedSampler (shuffled or not), whose
padding must not count in G; the DistributedSampler set-ups that would lose or double samples, refused;
``indices=`` splits that overlap or leave a gap, refused by every entry point naming the index and the ranks;
and ``group=False`` calls under a default group, which stay on their rank and run no collective.
"""

from __future__ import annotations

import os
import sys
import tempfile
from datetime import timedelta
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset

import fastdal

N_POOL, N_LABELED, FEATURES, CLASSES = 23, 11, 5, 4


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, CLASSES)).double()


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    pool = torch.randn(N_POOL, FEATURES, generator=g, dtype=torch.float64)
    pool[7] = pool[3]  # equal samples, equal scores: the top-b tie rule decides between them
    pool[19] = pool[3]
    labeled = torch.randn(N_LABELED, FEATURES, generator=g, dtype=torch.float64)
    labels = torch.randint(0, CLASSES, (N_LABELED,), generator=g)
    return pool, labeled, labels


def _expected() -> dict:
    model, (pool, labeled, labels) = _model(), _data()
    pool_loader = DataLoader(TensorDataset(pool), batch_size=4)
    labeled_loader = DataLoader(TensorDataset(labeled, labels), batch_size=4)
    out = {}
    for layers in ("last", "all"):
        g = fastdal.labeled_grad(model, labeled_loader, layers=layers)
        result = fastdal.score(model, pool_loader, g, return_components=True)
        assert result.score[3] == result.score[7] == result.score[19]
        # b cuts the three equal scores after the second: the tie rule alone decides which two are in
        order = fastdal.select(result.score, N_POOL).tolist()
        b = min(order.index(i) for i in (3, 7, 19)) + 2
        picks = fastdal.query(model, pool_loader, labeled_loader, b, layers=layers)
        assert 3 in picks.tolist() and 7 in picks.tolist() and 19 not in picks.tolist()
        out[layers] = {"grad": g.grads, "score": result, "b": b, "query": picks}
        feats = fastdal.features(model, pool_loader, layers=layers, rank=4)
        out[layers]["features"] = (
            feats.sq_norm(),
            fastdal.select(feats, 5, method="badge", seed=3),
            fastdal.select(feats, 5, method="greedy", labeled_grad=g),
        )
    return out


def _consecutive(n: int, rank: int, world: int) -> range:
    """Uneven consecutive shards; with 3 ranks the middle one is empty."""
    cuts = {2: [0, 9, n], 3: [0, n // 3, n // 3, n]}[world]
    return range(cuts[rank], cuts[rank + 1])


def _worker(rank: int, world: int, init_file: str, expected: dict, check=None) -> None:
    # A collective that one rank skips fails after the timeout instead of hanging the test run.
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    try:
        (check or _check_all)(rank, world, expected)
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown: at exit a gloo thread still joinable has (rarely) aborted a
    # finished worker with "terminate called without an active exception", failing a test whose checks passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(world: int, expected: dict, check=None) -> None:
    with tempfile.TemporaryDirectory() as folder:
        init_file = os.path.join(folder, "rendezvous")
        mp.spawn(_worker, args=(world, init_file, expected, check), nprocs=world, join=True)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def _same_picks(picks: torch.Tensor, expected: torch.Tensor, scores: torch.Tensor) -> bool:
    """The one-process picks, except among samples whose scores tie up to rounding at the cut.

    The three equal pool samples score alike in one process, but over shards their labeled gradient is
    summed in another order and BLAS rounds a row differently in batches of other sizes: their scores may
    then differ in the last bit, and the cut between them falls where that bit says (1e-16 apart here).
    """
    if torch.equal(picks, expected):
        return True
    got, want = set(picks.tolist()), set(expected.tolist())
    if len(got) != len(picks) or len(got) != len(want):
        return False
    cut = min(scores[i].item() for i in want)
    return all(abs(scores[i].item() - cut) <= 1e-12 * abs(cut) for i in got ^ want)


def _check_all(rank: int, world: int, expected: dict) -> None:
    model, (pool, labeled, labels) = _model(), _data()
    pool_set, labeled_set = TensorDataset(pool), TensorDataset(labeled, labels)
    mine_labeled = _consecutive(N_LABELED, rank, world)
    labeled_loader = DataLoader(Subset(labeled_set, list(mine_labeled)), batch_size=4)
    interleaved = list(range(rank, N_POOL, world))[::-1]  # any disjoint split, in any order
    pools = {
        "consecutive": (DataLoader(Subset(pool_set, list(_consecutive(N_POOL, rank, world))), batch_size=4), None),
        "sampler": (DataLoader(pool_set, batch_size=4, sampler=DistributedSampler(pool_set, shuffle=False)), None),
        "indices": (DataLoader(Subset(pool_set, interleaved), batch_size=3), interleaved),
    }
    for layers in ("last", "all"):
        want = expected[layers]
        g = fastdal.labeled_grad(model, labeled_loader, layers=layers)
        assert g.num_samples == N_LABELED and g.names == list(want["grad"])
        for name, value in want["grad"].items():
            assert _close(g[name], value), (layers, name)
        for case, (loader, indices) in pools.items():
            got = fastdal.score(model, loader, g, return_components=True, indices=indices)
            for field in ("score", "sq_norm", "dot"):
                assert _close(getattr(got, field), getattr(want["score"], field)), (layers, case, field)
            assert torch.equal(got.pseudo_label, want["score"].pseudo_label), (layers, case)
            picks = fastdal.query(model, loader, labeled_loader, want["b"], layers=layers, indices=indices)
            assert _same_picks(picks, want["query"], want["score"].score), (layers, case, picks, want["query"])
            if case == "consecutive" and world == 3:  # an empty shard: features cannot read the projections
                with pytest.raises(ValueError, match="at least one sample"):
                    fastdal.features(model, loader, layers=layers, rank=4)
                continue
            feats = fastdal.features(model, loader, layers=layers, rank=4, indices=indices)
            sq_norm, badge, greedy = want["features"]
            assert _close(feats.sq_norm(), sq_norm), (layers, case)
            assert torch.equal(fastdal.select(feats, 5, method="badge", seed=3), badge), (layers, case)
            assert torch.equal(fastdal.select(feats, 5, method="greedy", labeled_grad=g), greedy), (layers, case)

    # A model wrapped in DistributedDataParallel is scored through its module.
    ddp = nn.parallel.DistributedDataParallel(model)
    loader, _ = pools["sampler"]
    g = fastdal.labeled_grad(ddp, labeled_loader)
    assert _close(fastdal.score(ddp, loader, g), expected["last"]["score"].score)

    # A NaN in one rank's shard: every rank raises, naming the global pool index.
    bad = pool.clone()
    bad[13, 0] = float("nan")
    bad_loader = DataLoader(TensorDataset(bad), batch_size=4, sampler=DistributedSampler(pool_set, shuffle=False))
    with pytest.raises(ValueError, match=r"global pool index 13\b"):
        fastdal.score(model, bad_loader, g)


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_results_equal_one_process(world: int) -> None:
    _spawn(world, _expected())


def test_indices_without_a_process_group_is_an_error() -> None:
    model, (pool, labeled, labels) = _model(), _data()
    g = fastdal.labeled_grad(model, DataLoader(TensorDataset(labeled, labels), batch_size=4))
    with pytest.raises(ValueError, match="indices="):
        fastdal.score(model, DataLoader(TensorDataset(pool), batch_size=4), g, indices=list(range(N_POOL)))


# --- A labeled set drawn by a DistributedSampler: its padding is not counted -------------------------------------

PADDED_SIZES, PADDED_BUDGET = (7, 11), 6  # 7 and 11 labeled samples pad by 1 (2 ranks), 2 and 1 (3 ranks)


def _expected_padded() -> dict:
    """One process's G, scores and picks for the first 7 and 11 labeled samples."""
    model, (pool, labeled, labels) = _model(), _data()
    pool_loader = DataLoader(TensorDataset(pool), batch_size=4)
    out = {}
    for n in PADDED_SIZES:
        labeled_loader = DataLoader(TensorDataset(labeled[:n], labels[:n]), batch_size=4)
        for layers in ("last", "all"):
            g = fastdal.labeled_grad(model, labeled_loader, layers=layers)
            scores = fastdal.score(model, pool_loader, g)
            picks = fastdal.query(model, pool_loader, labeled_loader, PADDED_BUDGET, layers=layers)
            out[n, layers] = {"grad": g.grads, "score": scores, "query": picks}
    return out


def _check_padded(rank: int, world: int, expected: dict) -> None:
    model, (pool, labeled, labels) = _model(), _data()
    pool_set = TensorDataset(pool)
    for n in PADDED_SIZES:
        labeled_set = TensorDataset(labeled[:n], labels[:n])
        # batch_size 1 puts the padding in a batch of its own, 3 beside real samples; shuffled samplers pad with
        # the start of their shuffled list
        for shuffle, batch_size in ((False, 3), (False, 1), (True, 3)):
            sampler = DistributedSampler(labeled_set, shuffle=shuffle, seed=5)
            assert len(sampler) * world > n  # the sampler pads: the case under test
            labeled_loader = DataLoader(labeled_set, batch_size=batch_size, sampler=sampler)
            pool_sampler = DistributedSampler(pool_set, shuffle=shuffle, seed=6)
            pool_loader = DataLoader(pool_set, batch_size=4, sampler=pool_sampler)
            for layers in ("last", "all"):
                want, case = expected[n, layers], (n, shuffle, batch_size, layers)
                g = fastdal.labeled_grad(model, labeled_loader, layers=layers)
                assert g.num_samples == n, case
                for name, value in want["grad"].items():
                    assert _close(g[name], value), (case, name)
                assert _close(fastdal.score(model, pool_loader, g), want["score"]), case
                picks = fastdal.query(model, pool_loader, labeled_loader, PADDED_BUDGET, layers=layers)
                assert _same_picks(picks, want["query"], want["score"]), (case, picks, want["query"])

    labeled_set, n = TensorDataset(labeled, labels), N_LABELED
    # drop_last=True would leave samples out of G (which ones depends on the set's size): refused, naming it.
    dropping = DataLoader(labeled_set, batch_size=4, sampler=DistributedSampler(labeled_set, drop_last=True))
    with pytest.raises(ValueError, match=r"labeled_loader draws with DistributedSampler\(drop_last=True\)"):
        fastdal.labeled_grad(model, dropping)
    dropping_pool = DataLoader(pool_set, batch_size=4, sampler=DistributedSampler(pool_set, drop_last=True))
    labeled_loader = DataLoader(labeled_set, batch_size=4, sampler=DistributedSampler(labeled_set))
    g = fastdal.labeled_grad(model, labeled_loader)
    calls = (
        lambda: fastdal.score(model, dropping_pool, g),
        lambda: fastdal.query(model, dropping_pool, labeled_loader, 2),
    )
    for call in calls:
        with pytest.raises(ValueError, match=r"pool_loader draws with DistributedSampler\(drop_last=True\)"):
            call()
    # The DataLoader's own drop_last cuts the last partial batch (6 or 4 samples a rank, batches of 5): the count tells.
    short = DataLoader(labeled_set, batch_size=5, drop_last=True, sampler=DistributedSampler(labeled_set))
    with pytest.raises(ValueError, match=r"labeled_loader yielded \d+ samples but its DistributedSampler draws"):
        fastdal.labeled_grad(model, short)
    # Samplers that split the set differently on each rank would count some samples twice and others never.
    for seed in (rank, 0):  # seeded apart, or one seed but each rank at another epoch
        apart = DistributedSampler(labeled_set, shuffle=True, seed=seed)
        apart.set_epoch(rank)
        with pytest.raises(ValueError, match="DistributedSamplers do not split one labeled set"):
            fastdal.labeled_grad(model, DataLoader(labeled_set, batch_size=4, sampler=apart))
    pool_apart = DataLoader(pool_set, batch_size=4, sampler=DistributedSampler(pool_set, shuffle=True, seed=rank))
    for call in (
        lambda: fastdal.query(model, pool_apart, labeled_loader, 2),
        lambda: fastdal.score(model, pool_apart, g),
    ):
        with pytest.raises(ValueError, match=r"exactly once: global index \d+ is held by rank"):
            call()
    # Without shuffling the seed is not used: samplers seeded apart still split one set.
    unshuffled = DistributedSampler(labeled_set, shuffle=False, seed=rank)
    assert fastdal.labeled_grad(model, DataLoader(labeled_set, batch_size=4, sampler=unshuffled)).num_samples == n
    wrong_world = DistributedSampler(labeled_set, num_replicas=world + 1, rank=rank)
    with pytest.raises(ValueError, match=f"num_replicas={world + 1}, but the process group has {world} ranks"):
        fastdal.labeled_grad(model, DataLoader(labeled_set, batch_size=4, sampler=wrong_world))


@pytest.mark.parametrize("world", [2, 3])
def test_labeled_sampler_padding_is_not_counted(world: int) -> None:
    _spawn(world, _expected_padded(), _check_padded)


# --- indices= must partition the pool -------------------------------------------------------------------------


def _overlapping(rank: int, world: int) -> list[int]:
    """Consecutive shards, except that rank 1 also holds rank 0's last sample and the last rank lacks index 22:
    the counts still add up to N_POOL."""
    cuts = [round(k * N_POOL / world) for k in range(world + 1)]
    mine = list(range(cuts[rank], cuts[rank + 1]))
    if rank == 1:
        mine = [cuts[1] - 1, *mine]
    if rank == world - 1:
        mine = mine[:-1]
    return mine


def _check_partition_errors(rank: int, world: int, expected: dict) -> None:
    model, (pool, labeled, labels) = _model(), _data()
    pool_set = TensorDataset(pool)
    g = fastdal.labeled_grad(model, DataLoader(TensorDataset(labeled, labels), batch_size=4))
    labeled_loader = DataLoader(Subset(TensorDataset(labeled, labels), [rank]), batch_size=4)
    twice = round(N_POOL / world) - 1
    mine = _overlapping(rank, world)
    loader = DataLoader(Subset(pool_set, mine), batch_size=4)
    calls = {
        "query": lambda idx: fastdal.query(model, loader, labeled_loader, 3, indices=idx),
        "score": lambda idx: fastdal.score(model, loader, g, indices=idx),
        "features": lambda idx: fastdal.features(model, loader, indices=idx),
    }
    for call in calls.values():
        with pytest.raises(ValueError, match=rf"indices=.*global index {twice} is held by rank 0 and rank 1$"):
            call(mine)
    # An index outside 0..N-1: the last rank's last one replaced by 40.
    outside = [*mine[:-1], 40] if rank == world - 1 else mine
    with pytest.raises(ValueError, match=rf"rank {world - 1} holds global index 40, outside 0..{N_POOL - 1}"):
        calls["query"](outside)
    if world == 2:  # rank 0 holds its first index twice and misses its last
        doubled = [mine[0], *mine[:-1]] if rank == 0 else [*mine[1:], N_POOL - 1]
        loader = DataLoader(Subset(pool_set, doubled), batch_size=4)
        with pytest.raises(ValueError, match=r"global index 0 is held by rank 0 \(2 times\)$"):
            fastdal.query(model, loader, labeled_loader, 3, indices=doubled)


@pytest.mark.parametrize("world", [2, 3])
def test_indices_must_partition_the_pool(world: int) -> None:
    _spawn(world, {}, _check_partition_errors)


# --- group=False: one rank alone under a default group ---------------------------------------------------------


def _local_data(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A rank's own data, of another size on each rank: a collective would mismatch or wait."""
    pool, labeled, labels = _data()
    return pool[: 5 + 4 * rank], labeled[: 3 + 2 * rank], labels[: 3 + 2 * rank]


def _local_results(model: nn.Module, pool, labeled, labels, group) -> dict:
    pool_loader = DataLoader(TensorDataset(pool), batch_size=4)
    labeled_loader = DataLoader(TensorDataset(labeled, labels), batch_size=4)
    kw = {} if group is None else {"group": group}
    g = fastdal.labeled_grad(model, labeled_loader, layers="all", **kw)
    return {
        "grad": g.grads,
        "score": fastdal.score(model, pool_loader, g, **kw),
        "query": fastdal.query(model, pool_loader, labeled_loader, 3, layers="all", **kw),
        "features": fastdal.features(model, pool_loader, layers="all", rank=4, **kw).sq_norm(),
    }


def _expected_local(world: int) -> dict:
    return {rank: _local_results(_model(), *_local_data(rank), None) for rank in range(world)}


def _no_collective(*args, **kwargs):
    raise AssertionError("a group=False call ran a collective")


def _check_group_false(rank: int, world: int, expected: dict) -> None:
    model = _model()
    collectives = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list", "barrier")
    with mock.patch.multiple(dist, **{name: _no_collective for name in collectives}):
        for _ in range(1 + rank):  # ranks make different numbers of calls
            got = _local_results(model, *_local_data(rank), False)
    want = expected[rank]
    for name, value in want["grad"].items():
        assert _close(got["grad"][name], value), name
    assert _close(got["score"], want["score"]) and got["score"].shape == (5 + 4 * rank,)
    assert torch.equal(got["query"], want["query"])
    assert _close(got["features"], want["features"])
    with pytest.raises(ValueError, match="indices="):
        fastdal.score(model, DataLoader(TensorDataset(_local_data(rank)[0])), got["grad"], group=False, indices=[0])
    # The ranks still meet in the same collectives afterwards: no call above left one half-done.
    everyone = [None] * world
    dist.all_gather_object(everyone, rank)
    assert everyone == list(range(world))


def test_group_false_is_one_process_under_a_default_group() -> None:
    _spawn(2, _expected_local(2), _check_group_false)


@pytest.mark.parametrize("group", [True, 1, "world"])
def test_group_must_be_none_false_or_a_process_group(group) -> None:
    model, (_, labeled, labels) = _model(), _data()
    with pytest.raises(TypeError, match="group must be None.*False.*ProcessGroup"):
        fastdal.labeled_grad(model, DataLoader(TensorDataset(labeled, labels), batch_size=4), group=group)


def test_group_false_without_a_process_group_is_one_process() -> None:
    model, (pool, labeled, labels) = _model(), _data()
    pool_loader = DataLoader(TensorDataset(pool), batch_size=4)
    labeled_loader = DataLoader(TensorDataset(labeled, labels), batch_size=4)
    g = fastdal.labeled_grad(model, labeled_loader, group=False)
    assert torch.equal(fastdal.score(model, pool_loader, g, group=False), fastdal.score(model, pool_loader, g))
