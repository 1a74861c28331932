"""``fastdal.features``: exact factored last-layer features, projections that are exact at full rank,
unbiased below it, and as good as the issue asks on the vanilla CNN."""

import itertools

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fastdal
from fastdal.demo import load_digits, train
from fastdal.features import GradFeatures, ProjectedBlock, _concat
from fastdal.models import VanillaCNN

from conftest import cpu_backends, relative_error
from helpers import assert_same_state, loaders, materialized_gradients, snapshot, spearman
from models import MODELS, build


def _pool(name, n=13, dtype=torch.float64):
    model, make_inputs, classes = build(name, dtype)
    x = make_inputs(n, dtype)
    return model, x, DataLoader(TensorDataset(x), batch_size=5), classes


@pytest.mark.filterwarnings("ignore:fastdal.*no closed form")  # mha and tied use the generic path, as in score
@pytest.mark.parametrize("name", [*MODELS, "mha", "tied", "reused"])
def test_full_rank_features_are_exact(name):
    """With a rank at least every dimension, projections are identities: Gram matrix, norms and dots
    equal those of the materialized per-sample gradients."""
    model, x, pool, classes = _pool(name)
    f = fastdal.features(model, pool, layers="all", rank=1024)
    g = materialized_gradients(model, x, f.names)
    assert relative_error(f.gram(), g @ g.T) < 1e-10
    assert relative_error(f.sq_norm(), g.square().sum(1)) < 1e-10
    labeled, _ = loaders(lambda n, d: x[:n], classes, torch.float64)
    G = fastdal.labeled_grad(model, labeled, layers="all")
    flat_G = torch.cat([G[n].reshape(-1) for n in f.names])
    assert relative_error(f.dot(G), g @ flat_G) < 1e-10
    assert torch.equal(f.labels, model(x).argmax(1))


@pytest.mark.parametrize("name", ["mlp", "wide_head", "rescnn"])
def test_last_layer_features_factored_exactly(name):
    model, x, pool, _ = _pool(name)
    f = fastdal.features(model, pool)
    assert f.exact and len(f.blocks) == 1
    g = materialized_gradients(model, x, f.names)
    assert relative_error(f.gram(), g @ g.T) < 1e-10
    distances = torch.cdist(g, g).square()
    factored = (f.sq_norm()[:, None] + f.sq_norm()[None, :] - 2 * f.gram()).clamp_min(0)
    assert relative_error(factored, distances) < 1e-10


def test_features_at_true_labels_sum_to_the_labeled_grad():
    """Features are linear in the gradient: summed over the labeled set at the true labels, their
    inner product with a pool sample's features is that sample's dot with G projected the same way."""
    model, make_inputs, classes = build("rescnn")
    labeled, pool = loaders(make_inputs, classes, torch.float64, batch_size=4)
    G = fastdal.labeled_grad(model, labeled, layers="all")
    f_labeled = fastdal.features(model, labeled, layers="all", rank=3, labeled=True)
    f_pool = fastdal.features(model, pool, layers="all", rank=3)
    assert not f_pool.exact
    both = GradFeatures(
        [_concat([a, b]) for a, b in zip(f_labeled.blocks, f_pool.blocks)],
        torch.cat([f_labeled.labels, f_pool.labels]),
        f_pool.names,
        3,
        0,
    )
    n = len(f_labeled)
    through_sum = both.gram(slice(0, n), slice(n, None)).sum(0)
    assert relative_error(through_sum, f_pool.dot(G)) < 1e-10


def test_same_seed_same_projection_on_every_backend():
    model, _, pool, _ = _pool("rescnn", dtype=torch.float32)
    reference = fastdal.features(model, pool, layers="all", rank=4, seed=7, backend="torch")
    again = fastdal.features(model, pool, layers="all", rank=4, seed=7, backend="torch")
    other_seed = fastdal.features(model, pool, layers="all", rank=4, seed=8, backend="torch")
    assert torch.equal(reference.gram(), again.gram())
    assert relative_error(other_seed.gram(), reference.gram()) > 1e-3
    for name in cpu_backends(("cpp", "triton")):  # CPU tensors: triton only under its interpreter
        got = fastdal.features(model, pool, layers="all", rank=4, seed=7, backend=name)
        assert relative_error(got.gram(), reference.gram()) < 1e-4, name


def _cnn_and_pool(n=48):
    torch.manual_seed(0)
    model = VanillaCNN(in_channels=1, num_classes=10, widths=(16, 32, 64)).double().eval()
    x = torch.randn(n, 1, 8, 8, dtype=torch.float64)
    return model, x, DataLoader(TensorDataset(x), batch_size=16)


def _projected_gram(f):
    """The Gram matrix of the projected blocks alone (the exact head block has no error to measure)."""
    return sum(b.inner(slice(None), slice(None)) for b in f.blocks if isinstance(b, ProjectedBlock))


def test_projected_inner_products_shrink_with_rank():
    model, _, pool = _cnn_and_pool(24)
    exact = _projected_gram(fastdal.features(model, pool, layers="all", rank=4096))
    errors = {}
    for rank in (2, 8, 32):
        grams = [_projected_gram(fastdal.features(model, pool, layers="all", rank=rank, seed=s)) for s in range(12)]
        # The median over seeds: single errors are heavy-tailed (products of chi-square variables).
        errors[rank] = torch.tensor([((g - exact).norm() / exact.norm()).item() for g in grams]).median().item()
    ranks = sorted(errors)
    assert all(errors[a] > errors[b] for a, b in itertools.pairwise(ranks)), errors


def test_projected_inner_products_are_unbiased():
    """Over many seeds the mean of a projected norm and of a projected inner product approaches the
    exact value like 1/sqrt(seeds): each stays within 4 standard errors."""
    model, _, pool = _cnn_and_pool(4)
    exact = fastdal.features(model, pool, layers="all", rank=4096).gram()
    draws = torch.stack([fastdal.features(model, pool, layers="all", rank=2, seed=s).gram() for s in range(200)])
    for i, j in ((0, 0), (0, 1), (2, 3)):
        values = draws[:, i, j]
        assert (values.mean() - exact[i, j]).abs() <= 4 * values.std() / len(values) ** 0.5, (i, j)
        assert values.std() > 1e-3 * exact[i, j].abs()  # the projection is random, not an identity


def test_projected_scores_rank_like_exact_scores_on_the_vanilla_cnn():
    """The paper's vanilla CNN trained on 100 digits: projected whole-model scores at a rank whose
    features take under 2% of the parameter count order the pool like the exact scores."""
    x, y = load_digits()
    x = x.double()
    torch.manual_seed(0)
    model = VanillaCNN(in_channels=1, num_classes=10).double()
    train(model, x[:100], y[:100], steps=150, seed=0)
    pool = DataLoader(TensorDataset(x[100:400]), batch_size=100)
    G = fastdal.labeled_grad(model, DataLoader(TensorDataset(x[:100], y[:100]), batch_size=100), layers="all")
    exact = fastdal.score(model, pool, G)
    f = fastdal.features(model, pool, layers="all", rank=24, seed=0)
    parameters = sum(p.numel() for p in model.parameters())
    assert f.floats_per_sample <= 0.02 * parameters, (f.floats_per_sample, parameters)
    assert spearman(f.score(G), exact) >= 0.95


def test_features_leave_the_model_as_it_was():
    model, _, pool, _ = _pool("rescnn")
    model.train()
    before = snapshot(model)
    fastdal.features(model, pool, layers="all", rank=3)
    assert_same_state(before, snapshot(model))


def test_features_bad_input():
    model, x, pool, _ = _pool("rescnn")
    with pytest.raises(ValueError, match="rank="):
        fastdal.features(model, pool, layers="all")
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        fastdal.features(model, pool, layers="all", rank=0)
    shuffled = DataLoader(TensorDataset(x), batch_size=5, shuffle=True)
    with pytest.raises(ValueError, match="loader"):
        fastdal.features(model, shuffled)
    f = fastdal.features(model, pool)
    with pytest.raises(ValueError, match="exactly the parameters"):
        f.dot({"fc.weight": torch.zeros(5, 10, dtype=torch.float64)})
