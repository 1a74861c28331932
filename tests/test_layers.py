"""Per-module math beyond the model zoo: both norm strategies, chunking, layer variants, memory bound."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

import fastdal
import fastdal.torch_ops

from conftest import relative_error
from helpers import loaders
from models import build


def _random_grad(model):
    return {n: torch.randn_like(p) for n, p in model.named_parameters()}


def _compare(model, pool, grads, tol=1e-9):
    expected = fastdal.reference.score(model, pool, grads, dtype=torch.float64, return_components=True)
    result = fastdal.score(model, pool, grads, return_components=True)
    assert torch.equal(result.pseudo_label, expected.pseudo_label)
    for field in ("sq_norm", "dot"):
        assert relative_error(getattr(result, field), getattr(expected, field)) < tol, field


@pytest.mark.parametrize("strategy", ["direct", "ghost"])
@pytest.mark.parametrize("name", ["rescnn", "conv1d_group", "transformer", "reused"])
def test_ghost_and_direct_norms_in_small_chunks(monkeypatch, name, strategy):
    # MATERIALIZE_COST 0 makes every layer take the direct norm, a huge one the ghost norm; a tiny
    # chunk budget makes every layer work one or two samples at a time.
    monkeypatch.setattr(fastdal.torch_ops, "MATERIALIZE_COST", 0 if strategy == "direct" else 10**12)
    monkeypatch.setattr(fastdal.torch_ops, "CHUNK_ELEMENTS", 64)
    model, make_inputs, classes = build(name)
    _, pool = loaders(make_inputs, classes, torch.float64)
    _compare(model, pool, _random_grad(model))


def test_norm_choice_follows_cost():
    assert fastdal.torch_ops.use_ghost_norm(positions=1, d_in=512, d_out=10)  # plain Linear: always ghost
    assert fastdal.torch_ops.use_ghost_norm(positions=16, d_in=4608, d_out=512)  # late conv, few positions
    assert not fastdal.torch_ops.use_ghost_norm(positions=1024, d_in=27, d_out=32)  # early conv, many positions


class ConvVariants(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2))
        self.b = nn.Conv2d(6, 6, 3, padding=1, padding_mode="circular", groups=3)
        self.c = nn.Conv2d(6, 4, 2, padding="same", padding_mode="replicate", bias=False)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.tanh(self.c(torch.tanh(self.b(torch.tanh(self.a(x))))))
        return self.head(x.mean((2, 3)))


class ManyLeadingDims(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):  # x: (B, 2, 3, 4)
        return self.head(torch.tanh(self.lin(x)).sum((1, 2)))


class FrequencyScaledEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 4, scale_grad_by_freq=True, padding_idx=1)
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)).sum(1))


@pytest.mark.parametrize(
    "factory, inputs",
    [
        (ConvVariants, torch.randn(7, 3, 9, 8, dtype=torch.float64)),
        (ManyLeadingDims, torch.randn(7, 2, 3, 4, dtype=torch.float64)),
        (FrequencyScaledEmbedding, torch.randint(0, 5, (7, 8))),
    ],
    ids=["conv_variants", "leading_dims", "freq_embedding"],
)
def test_layer_variants(factory, inputs):
    model = factory().double().eval()
    pool = DataLoader(TensorDataset(inputs), batch_size=3)
    _compare(model, pool, _random_grad(model))


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("strategy", ["direct", "ghost"])
def test_no_batch_by_parameters_tensor(monkeypatch, strategy):
    """The largest tensor any op creates stays well below batch x parameters, for either norm strategy."""
    monkeypatch.setattr(fastdal.torch_ops, "CHUNK_ELEMENTS", 4096)
    monkeypatch.setattr(fastdal.torch_ops, "MATERIALIZE_COST", 0 if strategy == "direct" else 10**12)
    model = nn.Sequential(
        nn.Conv2d(16, 64, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(2),
        nn.Linear(36, 40),
        nn.Tanh(),
        nn.Flatten(1),
        nn.Linear(64 * 40, 10),
    ).eval()
    batch = 32
    pool = DataLoader(TensorDataset(torch.randn(batch, 16, 6, 6)), batch_size=batch)
    grads = _random_grad(model)
    batch_by_params = batch * sum(p.numel() for p in model.parameters())
    activation = batch * 64 * 40
    with _LargestTensor() as probe:
        fastdal.score(model, pool, grads)
    assert activation <= probe.largest <= 2 * activation, probe.largest
    assert probe.largest * 8 < batch_by_params
    # and the same configuration is still exact
    model.double()
    pool64 = DataLoader(TensorDataset(torch.randn(9, 16, 6, 6, dtype=torch.float64)), batch_size=4)
    _compare(model, pool64, {n: g.double() for n, g in grads.items()})
