"""Bad input fails loudly, naming the argument and what was expected."""

import math
import types

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastdal

from models import build


@pytest.fixture
def setup():
    model, make_inputs, classes = build("mlp")
    x = make_inputs(12, torch.float64)
    y = torch.randint(0, classes, (12,))
    labeled = DataLoader(TensorDataset(x[:6], y[:6]), batch_size=4)
    pool = DataLoader(TensorDataset(x[6:]), batch_size=4)
    return model, labeled, pool, fastdal.labeled_grad(model, labeled, layers="all")


class NoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 3, 3)

    def forward(self, x):
        return self.conv(x[:, None]).mean(-1)


def test_no_linear_head_for_last():
    labeled = DataLoader(TensorDataset(torch.randn(4, 8), torch.randint(0, 3, (4,))), batch_size=2)
    with pytest.raises(ValueError, match="layers='last' needs a linear operation the logits are computed from"):
        fastdal.labeled_grad(NoLinear(), labeled, layers="last")


def test_labeled_grad_names_must_match_model(setup):
    model, _, pool, g = setup
    with pytest.raises(ValueError, match="'net.9.weight', which is not a parameter of the model"):
        fastdal.score(model, pool, {"net.9.weight": torch.ones(3)})
    other, _, _ = build("wide_head")
    with pytest.raises(ValueError, match="not a parameter of the model"):
        fastdal.score(other, pool, g)


def test_labeled_grad_shapes_must_match_model(setup):
    model, _, pool, g = setup
    bad = dict(g.grads)
    bad["head.weight"] = torch.ones(7, 30, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"labeled_grad\['head.weight'\] has shape \(7, 30\).*\(7, 29\)"):
        fastdal.score(model, pool, bad)


def test_labeled_grad_type_and_values(setup):
    model, _, pool, _ = setup
    with pytest.raises(TypeError, match="labeled_grad must be a fastdal.LabeledGrad or a dict"):
        fastdal.score(model, pool, [torch.ones(3)])
    with pytest.raises(ValueError, match="labeled_grad is empty"):
        fastdal.score(model, pool, {})
    with pytest.raises(ValueError, match="finite floating-point"):
        fastdal.score(model, pool, {"head.bias": torch.full((7,), math.nan)})


def test_shuffled_pool_loader_is_refused(setup):
    model, _, pool, g = setup
    shuffled = DataLoader(pool.dataset, batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match="pool_loader draws samples with RandomSampler.*shuffle=False"):
        fastdal.score(model, shuffled, g)
    with pytest.raises(ValueError, match="drop_last=True"):
        fastdal.score(model, DataLoader(pool.dataset, batch_size=4, drop_last=True), g)
    with pytest.raises(TypeError, match="pool_loader must be an iterable of batches"):
        fastdal.score(model, torch.randn(3, 13), g)


class Poisoned(nn.Module):
    """Returns NaN logits for inputs whose first feature is exactly 42, inf for -42."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3, 4).double()

    def forward(self, x):
        z = self.head(x)
        return z + torch.where(x[:, :1] == 42, math.nan, 0.0) + torch.where(x[:, :1] == -42, math.inf, 0.0)


@pytest.mark.parametrize("layers", ["last", "all"])
@pytest.mark.parametrize("poison", [42.0, -42.0])
def test_non_finite_logits_name_the_pool_index(layers, poison):
    model = Poisoned()
    x = torch.randn(9, 3, dtype=torch.float64)
    g = fastdal.labeled_grad(model, DataLoader(TensorDataset(x[:4], torch.arange(4)), batch_size=2), layers=layers)
    x[6, 0] = poison
    with pytest.raises(ValueError, match="logits for pool index 6 are not finite"):
        fastdal.score(model, DataLoader(TensorDataset(x), batch_size=4), g)
    with pytest.raises(ValueError, match="logits for labeled index 6 are not finite"):
        fastdal.labeled_grad(model, DataLoader(TensorDataset(x, torch.zeros(9, dtype=torch.long)), batch_size=4))


def test_unreadable_batches(setup):
    model, labeled, pool, g = setup
    object_pool = [types.SimpleNamespace(x=b[0]) for b in pool]
    with pytest.raises(TypeError, match="cannot read model inputs from a batch of type SimpleNamespace.*inputs="):
        fastdal.score(model, object_pool, g)
    # A dict batch is keyword arguments by default (Hugging Face style); inputs= maps any other reading.
    dict_pool = [{"x": b[0]} for b in pool]
    assert torch.equal(fastdal.score(model, dict_pool, g), fastdal.score(model, pool, g))  # forward(x)
    with pytest.raises(TypeError, match="unexpected keyword argument 'image'"):
        fastdal.score(model, [{"image": b[0]} for b in pool], g)
    fine = fastdal.score(model, dict_pool, g, inputs=lambda b: b["x"])
    assert torch.equal(fine, fastdal.score(model, pool, g))
    with pytest.raises(TypeError, match="cannot read labels from a labeled batch.*labels="):
        fastdal.labeled_grad(model, [b[0] for b in labeled])
    with pytest.raises(TypeError, match="labels must be integer class indices"):
        fastdal.labeled_grad(model, [(b[0], b[1].double()) for b in labeled])
    with pytest.raises(ValueError, match="label 7 at labeled index 1 is outside"):
        fastdal.labeled_grad(model, [(b[0], torch.tensor([0, 7, 1, 2])[: len(b[1])]) for b in labeled])


def test_model_output_must_be_logits(setup):
    _, _, pool, _ = setup
    model = nn.Sequential(nn.Linear(13, 4)).double()
    g = {"0.bias": torch.ones(4, dtype=torch.float64)}
    with pytest.raises(TypeError, match="not a logits tensor; pass outputs="):
        fastdal.score(nn.Sequential(model, _ToTuple()), pool, {"0.0.bias": g["0.bias"]})
    scores = fastdal.score(nn.Sequential(model, _ToTuple()), pool, {"0.0.bias": g["0.bias"]}, outputs=lambda o: o[0])
    assert scores.shape == (6,)


class _ToTuple(nn.Module):
    def forward(self, z):
        return (z, z.sum())


def test_select_arguments():
    scores = torch.tensor([1.0, 3.0, 2.0])
    with pytest.raises(ValueError, match="b must be between 0 and the pool size 3, got 4"):
        fastdal.select(scores, 4)
    with pytest.raises(ValueError, match="got -1"):
        fastdal.select(scores, -1)
    with pytest.raises(TypeError, match="b must be an integer"):
        fastdal.select(scores, 1.5)
    with pytest.raises(ValueError, match="NaN at index 1"):
        fastdal.select(torch.tensor([1.0, math.nan]), 1)


def test_query_checks_b_before_work(setup):
    model, _, pool, _ = setup
    with pytest.raises(ValueError, match="b must be between 0 and the pool size 6, got 7"):
        fastdal.query(model, pool, _Exploding(), 7)


class _Exploding:
    def __iter__(self):
        raise AssertionError("query did work before checking b")


@pytest.mark.parametrize("gamma", [math.inf, -math.inf, math.nan, "2", None, True])
def test_gamma_must_be_finite(setup, gamma):
    model, _, pool, g = setup
    with pytest.raises(ValueError, match="gamma must be a finite real number"):
        fastdal.score(model, pool, g, gamma=gamma)


def test_empty_pool_gives_empty_tensor(setup):
    model, _, _, g = setup
    empty = DataLoader(TensorDataset(torch.zeros(0, 13, dtype=torch.float64)), batch_size=4)
    scores = fastdal.score(model, empty, g)
    assert scores.shape == (0,) and scores.dtype == torch.float64
    result = fastdal.score(model, empty, g, return_components=True)
    assert result.pseudo_label.shape == (0,) and result.pseudo_label.dtype == torch.long
    assert fastdal.select(scores, 0).shape == (0,)


def test_empty_labeled_set(setup):
    model, _, _, _ = setup
    with pytest.raises(ValueError, match="labeled_loader yielded no batches"):
        fastdal.labeled_grad(model, [])


def test_backend_names(setup):
    model, _, pool, g = setup
    with pytest.raises(ValueError, match=r"backend must be one of \['auto', 'torch', 'cpp', 'cuda', 'triton'"):
        fastdal.score(model, pool, g, backend="fast")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend 'cuda' cannot run: no CUDA device"):
            fastdal.score(model, pool, g, backend="cuda")


def test_layers_argument(setup):
    model, labeled, _, _ = setup
    with pytest.raises(ValueError, match="layers names 'nett', which is not a module of the model"):
        fastdal.labeled_grad(model, labeled, layers=["nett"])
    with pytest.raises(ValueError, match="layers must be 'last', 'all' or a non-empty list of module names"):
        fastdal.labeled_grad(model, labeled, layers=[])


def test_batchnorm_without_running_statistics():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2))
    labeled = DataLoader(TensorDataset(torch.randn(4, 3), torch.randint(0, 2, (4,))), batch_size=2)
    with pytest.raises(ValueError, match="BatchNorm '1' has track_running_stats=False"):
        fastdal.labeled_grad(model, labeled, layers="all")
