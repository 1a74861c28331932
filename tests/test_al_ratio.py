"""The paper's Figure 4 quantity: E_Q R(Q|S) over query sets Q, against a brute-force expectation on a pool of 8."""

import itertools
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

import fastdal
from fastdal.al.ratio import expected_ratio, query_sets, subset_gains, subset_ratios
from fastdal.al.strategy import _collate_x, _collate_xy


def setting():
    """A float64 two-layer net, 5 labeled samples and a pool of 8, in one dataset."""
    data = torch.Generator().manual_seed(7)
    x = torch.randn(13, 4, generator=data, dtype=torch.float64)
    y = torch.randint(0, 3, (13,), generator=data)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    return model, TensorDataset(x, y), torch.arange(5), torch.arange(5, 13)


def brute_force_gains(model, dataset, labeled, pool, q) -> tuple[float, float]:
    """Eq. 14's numerator and denominator from explicit per-sample gradients of every parameter."""
    x, y = dataset.tensors
    params = list(model.parameters())

    def flat(xi, yi):
        loss = nn.functional.cross_entropy(model(xi[None]), yi[None])
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])

    G = sum(flat(x[i], y[i]) for i in labeled.tolist())
    with torch.no_grad():
        pseudo = model(x).argmax(1)
    g = torch.stack([flat(x[i], pseudo[i]) for i in pool[q].tolist()])
    single = ((g * g).sum(1) + 2 * g @ G).sum()
    total = g.sum(0)
    return float(single), float((G + total).square().sum() - G.square().sum())


def brute_force_ratio(model, dataset, labeled, pool, q) -> float:
    numerator, denominator = brute_force_gains(model, dataset, labeled, pool, q)
    return numerator / denominator


@pytest.mark.parametrize("b", [2, 3, 5, 8])
def test_expectation_over_every_subset_matches_brute_force(b):
    model, dataset, labeled, pool = setting()
    ratios = expected_ratio(model, dataset, labeled, pool, b, draws=100)
    assert len(ratios) == math.comb(8, b)  # few enough subsets: all of them, so the mean is exact
    expected = [
        brute_force_ratio(model, dataset, labeled, pool, torch.tensor(q)) for q in itertools.combinations(range(8), b)
    ]
    torch.testing.assert_close(ratios, torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ratios.mean().item(), sum(expected) / len(expected), rtol=1e-9, atol=1e-12)


def test_random_draws_and_their_ratios():
    model, dataset, labeled, pool = setting()
    queries = query_sets(8, 4, 10, torch.Generator().manual_seed(1))  # 70 subsets > 10 draws: sampled
    assert len(queries) == 10 and all(len(set(q.tolist())) == 4 for q in queries)
    assert len({tuple(sorted(q.tolist())) for q in queries}) > 1
    ratios = subset_ratios(model, dataset, labeled, pool, queries)
    expected = [brute_force_ratio(model, dataset, labeled, pool, q) for q in queries]
    torch.testing.assert_close(ratios, torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    again = expected_ratio(model, dataset, labeled, pool, 4, draws=10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again, ratios)
    with pytest.raises(ValueError, match="1 <= b <= n"):
        query_sets(8, 9, 10, torch.Generator())


def test_last_layer_ratio_agrees_with_the_features_path():
    """Over the head alone, the ratio equals fastdal.approximation_ratio on exact last-layer features."""
    model, dataset, labeled, pool = setting()
    q = torch.tensor([0, 2, 3, 7])
    ratio = subset_ratios(model, dataset, labeled, pool, [q], layers="last")
    G = fastdal.labeled_grad(model, DataLoader(Subset(dataset, labeled.tolist()), batch_size=4, collate_fn=_collate_xy))
    features = fastdal.features(model, DataLoader(Subset(dataset, pool.tolist()), batch_size=3, collate_fn=_collate_x))
    torch.testing.assert_close(ratio.item(), fastdal.approximation_ratio(features, q, G), rtol=1e-9, atol=1e-12)


def test_numerators_and_denominators_apart():
    """Figure 4's ratio of expectations needs both parts of each ratio, not only their quotient."""
    model, dataset, labeled, pool = setting()
    queries = [torch.tensor([1, 4]), torch.tensor([0, 2, 3, 7])]
    numerators, denominators = subset_gains(model, dataset, labeled, pool, queries)
    expected = [brute_force_gains(model, dataset, labeled, pool, q) for q in queries]
    torch.testing.assert_close(numerators, torch.tensor([n for n, _ in expected], dtype=torch.float64))
    torch.testing.assert_close(denominators, torch.tensor([d for _, d in expected], dtype=torch.float64))
