"""Selection from gradient features: BADGE's k-means++ seeding, exact greedy, the approximation ratio,
each against the same computation on materialized per-sample gradients."""

import itertools

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fastdal
from fastdal import selection

from conftest import cpu_backends, relative_error
from helpers import loaders, materialized_gradients
from models import build


def _setup(name, n_pool=12, layers="last", rank=None, seed=0):
    torch.manual_seed(seed)
    model, make_inputs, classes = build(name)
    x = make_inputs(n_pool, torch.float64)
    pool = DataLoader(TensorDataset(x), batch_size=5)
    labeled, _ = loaders(make_inputs, classes, torch.float64)
    G = fastdal.labeled_grad(model, labeled, layers=layers)
    f = fastdal.features(model, pool, layers=layers, rank=rank)
    g = materialized_gradients(model, x, f.names)
    flat_G = torch.cat([G[n].reshape(-1) for n in f.names])
    return f, G, g, flat_G


def _materialized_kmeans_pp(g, b, seed):
    """k-means++ seeding as BADGE's authors do it, on explicit embeddings, with the same draws."""
    generator = torch.Generator().manual_seed(seed)
    chosen = [int(torch.argmax(g.square().sum(1)))]
    min_dist = (g - g[chosen[0]]).square().sum(1)
    while len(chosen) < b:
        min_dist[chosen] = 0
        u = torch.rand((), generator=generator, dtype=torch.float64).item()
        distances = min_dist.tolist()
        target = u * sum(distances)
        cumulative = itertools.accumulate(distances)
        index = next(i for i, (c, d) in enumerate(zip(cumulative, distances)) if c > target and d > 0)
        chosen.append(index)
        min_dist = torch.minimum(min_dist, (g - g[index]).square().sum(1))
    return chosen


@pytest.mark.parametrize("name", ["mlp", "wide_head", "rescnn"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_badge_picks_what_materialized_kmeans_pp_picks(name, seed):
    f, _, g, _ = _setup(name, n_pool=40, seed=seed)
    expected = _materialized_kmeans_pp(g, 8, seed)
    assert fastdal.select(f, 8, method="badge", seed=seed).tolist() == expected
    for backend in cpu_backends(("cpp", "triton")):  # CPU tensors: triton only under its interpreter
        picked = fastdal.select(f.to(torch.float32), 8, method="badge", seed=seed, backend=backend)
        assert picked.tolist() == expected, backend


def test_badge_distances_equal_materialized_ones():
    f, _, g, _ = _setup("wide_head", n_pool=30)
    sq = f.sq_norm()
    for center in (0, 7, 29):
        factored = selection._min_distance(f, sq, center, torch.full_like(sq, float("inf")), "torch")
        assert relative_error(factored, (g - g[center]).square().sum(1)) < 1e-10


def test_badge_on_identical_samples_still_returns_distinct_indices():
    model, _, _ = build("mlp")
    x = torch.randn(1, 13, dtype=torch.float64).repeat(6, 1)
    f = fastdal.features(model, DataLoader(TensorDataset(x), batch_size=3))
    picked = fastdal.select(f, 4, method="badge")
    assert len(set(picked.tolist())) == 4


def _objective(g, flat_G, subset):
    total = flat_G + g[list(subset)].sum(0)
    return (total.square().sum() - flat_G.square().sum()).item()


@pytest.mark.parametrize(
    "name, layers, seed",
    [("mlp", "last", 0), ("mlp", "last", 1), ("rescnn", "last", 0), ("mlp", "all", 2), ("conv1d_group", "all", 0)],
)
@pytest.mark.parametrize("b", [2, 3, 4])
def test_greedy_gains_equal_the_brute_force_objective(name, layers, seed, b):
    rank = 1024 if layers == "all" else None  # full rank: the features are exact
    f, G, g, flat_G = _setup(name, n_pool=10, layers=layers, rank=rank, seed=seed)
    every = {subset: _objective(g, flat_G, subset) for subset in itertools.combinations(range(10), b)}
    scale = max(abs(v) for v in every.values())
    for subset, value in itertools.islice(every.items(), 0, None, 7):
        assert abs(fastdal.subset_gain(f, list(subset), G).item() - value) <= 1e-10 * scale
    for block_size in (1, 2):
        result = selection.greedy(f, G, b, block_size=block_size)
        assert len(set(result.indices.tolist())) == b
        chosen_value = every[tuple(sorted(result.indices.tolist()))]
        assert abs(result.gains.sum().item() - chosen_value) <= 1e-10 * scale
        top_b = fastdal.select(f.score(G), b)
        assert chosen_value >= every[tuple(sorted(top_b.tolist()))] - 1e-10 * scale
    assert torch.equal(fastdal.select(f, b, method="greedy", labeled_grad=G), selection.greedy(f, G, b).indices)


def test_approximation_ratio_against_materialized_gradients():
    f, G, g, flat_G = _setup("mlp", n_pool=10)
    query = [1, 4, 7]
    single = sum(_objective(g, flat_G, [u]) for u in query)
    assert abs(fastdal.approximation_ratio(f, query, G) - single / _objective(g, flat_G, query)) < 1e-10
    with pytest.raises(ValueError, match="distinct"):
        fastdal.approximation_ratio(f, [1, 1], G)
    with pytest.raises(ValueError, match="at least one"):
        fastdal.approximation_ratio(f, [], G)


def test_topk_on_features_is_the_top_of_their_scores():
    f, G, _, _ = _setup("mlp")
    assert torch.equal(fastdal.select(f, 3, labeled_grad=G), fastdal.select(f.score(G), 3))


def test_select_bad_input():
    f, G, _, _ = _setup("mlp")
    with pytest.raises(ValueError, match="method must be"):
        fastdal.select(f, 2, method="kmeans")
    with pytest.raises(ValueError, match="needs the pool's fastdal.GradFeatures"):
        fastdal.select(torch.randn(5), 2, method="badge")
    with pytest.raises(ValueError, match="needs labeled_grad"):
        fastdal.select(f, 2, method="greedy")
    with pytest.raises(ValueError, match="between 0 and the pool size"):
        fastdal.select(f, 13, method="badge")
    with pytest.raises(ValueError, match="block_size"):
        selection.greedy(f, G, 2, block_size=0)
