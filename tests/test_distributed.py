"""labeled_grad, score and query over torch.distributed equal one process's results.

2 and 3 processes are spawned with the gloo backend on CPU (no torchrun needed); each runs every case on
its own shard and compares with what this process computed on the whole pool and labeled set. Cases:
uneven consecutive shards and an empty one, DistributedSampler (with the padding it adds), a user-given
interleaved split, a DistributedDataParallel model, layers "last" and "all", top-b with ties, features with
BADGE and greedy selection, and a NaN on one rank (raised on every rank with its global pool index).
"""

from __future__ import annotations

import os
import tempfile

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


def _worker(rank: int, world: int, init_file: str, expected: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _check_all(rank, world, expected)
    finally:
        dist.destroy_process_group()


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
    expected = _expected()
    with tempfile.TemporaryDirectory() as folder:
        init_file = os.path.join(folder, "rendezvous")
        mp.spawn(_worker, args=(world, init_file, expected), nprocs=world, join=True)


def test_indices_without_a_process_group_is_an_error() -> None:
    model, (pool, labeled, labels) = _model(), _data()
    g = fastdal.labeled_grad(model, DataLoader(TensorDataset(labeled, labels), batch_size=4))
    with pytest.raises(ValueError, match="indices="):
        fastdal.score(model, DataLoader(TensorDataset(pool), batch_size=4), g, indices=list(range(N_POOL)))
