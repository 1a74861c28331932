"""Exact on models outside the zoo: norm layers on rank-2 inputs, sequence-first layers whose length equals
the batch size, inputs= that reorder dimensions, heads proven from the logits' graph, tied heads, bad
devices, and labels and numbers of any dtype. Each case is checked against the float64 reference."""

from __future__ import annotations

import ast
import pathlib

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastdal

from conftest import relative_error
from helpers import assert_same_state, materialized_gradients, snapshot


def _pool_and_labeled(x, classes, batch_size, n_labeled):
    y = torch.randint(0, classes, (n_labeled,))
    labeled = DataLoader(TensorDataset(x[:n_labeled], y), batch_size=batch_size)
    pool = DataLoader(TensorDataset(x[n_labeled:]), batch_size=batch_size)
    return labeled, pool


def _assert_exact(model, labeled, pool, layers, inputs=None, tol=1e-9):
    """labeled_grad, score (all components) and the pseudo labels equal the float64 reference."""
    g = fastdal.labeled_grad(model, labeled, layers=layers, inputs=inputs)
    expected_g = fastdal.reference.labeled_grad(model, labeled, layers=layers, dtype=torch.float64, inputs=inputs)
    assert g.names == expected_g.names
    for name in g.names:
        scale = max(expected_g[name].abs().max().item(), 1e-12)
        assert (g[name] - expected_g[name]).abs().max().item() <= tol * scale, name
    result = fastdal.score(model, pool, g, return_components=True, inputs=inputs)
    expected = fastdal.reference.score(model, pool, g, dtype=torch.float64, return_components=True, inputs=inputs)
    assert torch.equal(result.pseudo_label, expected.pseudo_label)
    for field in ("score", "sq_norm", "dot"):
        assert relative_error(getattr(result, field), getattr(expected, field)) < tol, field
    return g, result


# --------------------------------------------------------------------------------------------------
# Case 1: norm layers on inputs without extra dimensions
# --------------------------------------------------------------------------------------------------


class NormMLP(nn.Module):
    def __init__(self, norm: nn.Module, d=6, classes=3):
        super().__init__()
        self.inp = nn.Linear(5, d)
        self.norm = norm
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.inp(x))))


def _randomized(norm: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in norm.parameters():
            p.uniform_(0.5, 1.5)
        if isinstance(norm, nn.BatchNorm1d):
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
    return norm


@pytest.mark.parametrize(
    "norm",
    [
        lambda: nn.BatchNorm1d(6),
        lambda: nn.LayerNorm(6),
        lambda: nn.RMSNorm(6),
        lambda: nn.GroupNorm(2, 6),
        lambda: nn.LayerNorm(6, bias=False),
    ],
    ids=["batchnorm1d", "layernorm", "rmsnorm", "groupnorm", "layernorm-no-bias"],
)
def test_norm_layers_on_rank_two_inputs(norm):
    model = NormMLP(_randomized(norm())).double().eval()
    x = torch.randn(17, 5, dtype=torch.float64)
    labeled, pool = _pool_and_labeled(x, 3, 4, 6)
    _g, _ = _assert_exact(model, labeled, pool, "all")
    features = fastdal.features(model, pool, layers="all", rank=64)  # full rank: every projection the identity
    per_sample = materialized_gradients(model, x[6:], features.names)
    assert relative_error(features.gram(), per_sample @ per_sample.T) < 1e-9


class SequenceLayerNorm(nn.Module):
    """LayerNorm over the whole (T, D) of each sample: no dimension is left between samples and features."""

    def __init__(self, t=3, d=4, classes=3):
        super().__init__()
        self.inp = nn.Linear(2, d)
        self.norm = nn.LayerNorm((t, d))
        self.head = nn.Linear(d, classes)

    def forward(self, x):  # (B, T, 2)
        return self.head(self.norm(self.inp(x)).mean(1))


def test_layernorm_over_all_but_the_sample_dimension():
    model = SequenceLayerNorm().double().eval()
    _randomized(model.norm)
    labeled, pool = _pool_and_labeled(torch.randn(15, 3, 2, dtype=torch.float64), 3, 5, 5)
    _assert_exact(model, labeled, pool, "all")


# --------------------------------------------------------------------------------------------------
# Case 2: sequence-first layers with as many positions as samples
# --------------------------------------------------------------------------------------------------


class EncoderSeqFirst(nn.Module):
    """A stock nn.TransformerEncoderLayer (batch_first=False) fed (T, B, D)."""

    def __init__(self, d=8, classes=3):
        super().__init__()
        self.inp = nn.Linear(3, d)
        self.encoder = nn.TransformerEncoderLayer(d, 2, dim_feedforward=12, dropout=0.0)
        self.head = nn.Linear(d, classes)

    def forward(self, x):  # (B, T, 3)
        return self.head(self.encoder(self.inp(x).transpose(0, 1)).mean(0))


class LinearOnTransposed(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.lin = nn.Linear(3, 5)
        self.head = nn.Linear(5, classes)

    def forward(self, x):  # (B, T, 3)
        return self.head(torch.tanh(self.lin(x.transpose(0, 1))).sum(0))


class PositionTable(nn.Module):
    """A position table looked up with arange(T) and broadcast over the batch."""

    def __init__(self, max_len=8, classes=3):
        super().__init__()
        self.proj = nn.Linear(3, 5)
        self.pos = nn.Embedding(max_len, 5)
        self.head = nn.Linear(5, classes)

    def forward(self, x):  # (B, T, 3)
        h = self.proj(x) + self.pos(torch.arange(x.shape[1]))
        return self.head(torch.tanh(h).mean(1))


@pytest.mark.filterwarnings("ignore:fastdal. module")
@pytest.mark.parametrize("factory", [EncoderSeqFirst, LinearOnTransposed, PositionTable])
@pytest.mark.parametrize("seq", [4, 5])
def test_sequence_length_equal_to_the_batch_size(factory, seq):
    """T = 4 with batches of 4 (and a last batch of 1): the result must not depend on T == B."""
    torch.manual_seed(1)
    model = factory().double().eval()
    labeled, pool = _pool_and_labeled(torch.randn(17, seq, 3, dtype=torch.float64), 3, 4, 8)
    _assert_exact(model, labeled, pool, "all")


# --------------------------------------------------------------------------------------------------
# Case 3: inputs= hands the model a sequence-first tensor; micro-batches cut the collated batch
# --------------------------------------------------------------------------------------------------


class SeqFirstInput(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.lin = nn.Linear(1, 6)
        self.head = nn.Linear(6, classes)

    def forward(self, x):  # (T, B)
        return self.head(torch.tanh(self.lin(x.unsqueeze(-1))).mean(0))


def _transpose(batch):
    return batch[0].transpose(0, 1)


@pytest.mark.parametrize("batch_size", [5, 40])
def test_sequence_first_inputs_are_cut_by_sample(batch_size):
    """(T=40, B) through inputs=: micro-batches of 32 are cut along B, one score per pool sample."""
    model = SeqFirstInput().double().eval()
    x = torch.randn(10 + 45, 40, dtype=torch.float64)
    labeled, pool = _pool_and_labeled(x, 4, batch_size, 10)
    _, result = _assert_exact(model, labeled, pool, "all", inputs=_transpose)
    assert result.score.shape == (45,)
    chosen = fastdal.select(result, 7)
    assert chosen.max() < 45
    features = fastdal.features(model, pool, layers="all", rank=64, inputs=_transpose)
    assert len(features) == 45


def test_reference_cuts_batches_before_inputs():
    """The reference scores a (T, B) input one sample at a time, as the loader collated them."""
    model = SeqFirstInput().double().eval()
    x = torch.randn(6, 40, dtype=torch.float64)
    pool = DataLoader(TensorDataset(x), batch_size=3)
    g = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    expected = torch.stack([fastdal.score(model, [(x[i : i + 1],)], g, inputs=_transpose)[0] for i in range(6)])
    assert torch.allclose(fastdal.reference.score(model, pool, g, inputs=_transpose), expected, rtol=1e-12)


def test_a_batch_the_loader_collated_sequence_first_is_refused_when_ambiguous():
    """Batches collated (T, B, C) cannot be cut into samples: with T == B the layout is refused, naming the
    module; with T != B the sizes decide and every sample gets one score."""
    model = LinearOnTransposedInput().double().eval()
    g = {n: torch.randn_like(p) for n, p in model.named_parameters()}

    def loader(t, b):
        data = torch.randn(2 * b, t, 3, dtype=torch.float64)
        return DataLoader(TensorDataset(data), batch_size=b, collate_fn=lambda s: torch.stack([x for (x,) in s], 1))

    with pytest.raises(ValueError, match="module 'lin'.*several|module 'lin'.* 2 dimensions"):
        fastdal.score(model, loader(4, 4), g)
    assert fastdal.score(model, loader(5, 4), g).shape == (8,)


class LinearOnTransposedInput(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.lin = nn.Linear(3, 5)
        self.head = nn.Linear(5, classes)

    def forward(self, x):  # (T, B, 3)
        return self.head(torch.tanh(self.lin(x)).sum(0))


def test_logits_rows_must_match_the_samples():
    """A model that drops samples from its logits gets an error, never a shorter result."""

    class DropsOne(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            return self.head(x[1:] if x.shape[0] > 3 else x)

    model = DropsOne().double()
    pool = DataLoader(TensorDataset(torch.randn(9, 3, dtype=torch.float64)), batch_size=5)
    g = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="logits rows"):
        fastdal.score(model, pool, g)


# --------------------------------------------------------------------------------------------------
# Case 4: the head is the Linear the logits are computed from
# --------------------------------------------------------------------------------------------------


class SideBranchAfterHead(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.body = nn.Linear(5, 6)
        self.classifier = nn.Linear(6, classes)
        self.proj = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        logits = self.classifier(h) / 2
        self.proj(h)  # called after the head; its output never reaches the logits
        return logits


def test_last_layer_is_the_linear_the_logits_come_from():
    model = SideBranchAfterHead().double().eval()
    labeled, pool = _pool_and_labeled(torch.randn(20, 5, dtype=torch.float64), 4, 4, 8)
    g, result = _assert_exact(model, labeled, pool, "last")
    assert g.names == ["classifier.weight", "classifier.bias"]
    assert result.score.abs().min() > 0
    assert fastdal.query(model, pool, labeled, 3).tolist() == fastdal.select(result, 3).tolist()


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 3)

    def forward(self, x):
        return self.a(x) + self.b(x)


class NoLinearHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 4)
        self.conv = nn.Conv1d(1, 3, 4)

    def forward(self, x):
        self.embed(x)  # a Linear that runs but does not reach the logits
        return self.conv(x.unsqueeze(1)).squeeze(-1)


def test_no_single_head_is_a_clear_error():
    labeled, _ = _pool_and_labeled(torch.randn(6, 4), 3, 3, 6)
    with pytest.raises(ValueError, match="several linear operations \\(a, b\\)"):
        fastdal.labeled_grad(TwoHeads(), labeled, layers="last")
    with pytest.raises(ValueError, match="none reaches the logits"):
        fastdal.labeled_grad(NoLinearHead(), labeled, layers="last")


# --------------------------------------------------------------------------------------------------
# Case 5: a head tied to an Embedding
# --------------------------------------------------------------------------------------------------


class TiedHead(nn.Module):
    def __init__(self, vocab=7, d=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.head = nn.Linear(d, vocab)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids).mean(1)))


@pytest.mark.filterwarnings("ignore:fastdal. module")
@pytest.mark.parametrize("layers", ["last", ["head"]])
def test_tied_head_is_exact(layers):
    model = TiedHead().double().eval()
    ids = torch.randint(0, 7, (18, 3))
    labeled, pool = _pool_and_labeled(ids, 7, 4, 6)
    g, _ = _assert_exact(model, labeled, pool, layers)
    assert set(g.names) == {"emb.weight", "head.bias"}  # the tied weight under the model's name for it


# --------------------------------------------------------------------------------------------------
# Case 6: devices a model cannot come back from
# --------------------------------------------------------------------------------------------------


def test_meta_device_is_refused_before_anything_moves():
    model = NormMLP(nn.LayerNorm(6)).double()
    labeled, pool = _pool_and_labeled(torch.randn(8, 5, dtype=torch.float64), 3, 4, 4)
    g = fastdal.labeled_grad(model, labeled)
    before = snapshot(model)
    for call in (
        lambda: fastdal.score(model, pool, g, device="meta"),
        lambda: fastdal.labeled_grad(model, labeled, device="meta"),
        lambda: fastdal.features(model, pool, device="meta"),
        lambda: fastdal.reference.score(model, pool, g, device="meta"),
    ):
        with pytest.raises(ValueError, match="meta"):
            call()
        assert_same_state(before, snapshot(model))
        assert all(p.device.type == "cpu" for p in model.parameters())
    with pytest.raises(ValueError, match="device must be"):
        fastdal.score(model, pool, g, device="not a device")


def test_failed_move_puts_the_model_back(monkeypatch):
    model = NormMLP(nn.LayerNorm(6)).double()
    labeled, pool = _pool_and_labeled(torch.randn(8, 5, dtype=torch.float64), 3, 4, 4)
    g = fastdal.labeled_grad(model, labeled)
    moves = []
    real_to = nn.Module.to

    def to_that_fails_once(self, *args, **kwargs):
        moves.append(args)
        real_to(self, *args, **kwargs)
        if len(moves) == 1:
            raise RuntimeError("out of memory half-way")
        return self

    monkeypatch.setattr(nn.Module, "to", to_that_fails_once)
    with pytest.raises(RuntimeError, match="half-way"):
        fastdal.score(model, pool, g, device="cpu:0")  # another name for the CPU: a move there and back
    assert len(moves) == 2  # moved there, then back
    assert all(p.device == torch.device("cpu") for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# Case 7: labels of any integer dtype, 0-d tensors where numbers are taken
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
@pytest.mark.parametrize("layers", ["last", "all"])
def test_labels_of_any_integer_dtype(dtype, layers):
    model = NormMLP(nn.LayerNorm(6)).double().eval()
    x = torch.randn(9, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (9,))
    as_int64 = fastdal.labeled_grad(model, DataLoader(TensorDataset(x, y), batch_size=4), layers=layers)
    narrow = DataLoader(TensorDataset(x, y.to(dtype)), batch_size=4)
    g = fastdal.labeled_grad(model, narrow, layers=layers)
    expected = fastdal.reference.labeled_grad(model, narrow, layers=layers)
    for name in g.names:
        assert torch.allclose(g[name], as_int64[name], rtol=1e-12, atol=0)
        assert torch.allclose(g[name], expected[name], rtol=1e-9, atol=1e-12)
    features = fastdal.features(model, narrow, layers=layers, rank=64, labeled=True)
    assert features.labels.tolist() == y.tolist()


def test_zero_dimensional_tensors_work_where_numbers_do():
    model = NormMLP(nn.LayerNorm(6)).double().eval()
    labeled, pool = _pool_and_labeled(torch.randn(12, 5, dtype=torch.float64), 3, 4, 4)
    g = fastdal.labeled_grad(model, labeled)
    as_number = fastdal.score(model, pool, g, gamma=1.5)
    for gamma in (torch.tensor(1.5), torch.tensor(1.5, dtype=torch.float64), np.float32(1.5)):
        assert torch.equal(fastdal.score(model, pool, g, gamma=gamma), as_number)
    for b in (torch.tensor(3), np.int64(3)):
        assert torch.equal(fastdal.select(as_number, b), fastdal.select(as_number, 3))
        assert torch.equal(fastdal.query(model, pool, labeled, b), fastdal.query(model, pool, labeled, 3))
    result = fastdal.score(model, pool, g, return_components=True)
    assert torch.equal(result.with_gamma(torch.tensor(1.5)), result.with_gamma(1.5))
    features = fastdal.features(model, pool, rank=torch.tensor(4), seed=torch.tensor(0))
    assert torch.equal(
        fastdal.select(features, torch.tensor(2), method="badge"), fastdal.select(features, 2, method="badge")
    )
    for bad in (torch.tensor(1.5), torch.tensor([3]), torch.tensor(True)):
        with pytest.raises((TypeError, ValueError), match="b must be"):
            fastdal.select(as_number, bad)


# --------------------------------------------------------------------------------------------------
# Imports run one way
# --------------------------------------------------------------------------------------------------


def _package_imports(path: pathlib.Path, package: pathlib.Path) -> set[str]:
    """Modules of the package that a file imports, at any depth of the file (function-level too)."""
    module = path.relative_to(package.parent).with_suffix("").parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = (
                module[: len(module) - node.level]
                if path.name != "__init__.py"
                else module[: len(module) - node.level + 1]
            )
            stem = base + tuple(node.module.split(".")) if node.module else base
            if node.module is None:
                found.update(".".join((*stem, alias.name)) for alias in node.names)
            else:
                found.add(".".join(stem))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fastdal"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("fastdal"))
    return found


def test_no_import_circle_inside_fastdal():
    package = pathlib.Path(fastdal.__file__).parent
    graph = {}
    for path in package.glob("*.py"):
        if path.name == "__init__.py":
            continue
        name = f"fastdal.{path.stem}"
        graph[name] = {
            m for m in _package_imports(path, package) if m in {f"fastdal.{p.stem}" for p in package.glob("*.py")}
        }
    assert "fastdal.features" in graph["fastdal.api"], "the import scan must see the package's imports"
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, set())):
            if state.get(nxt) == 1:
                raise AssertionError(f"import circle: {' -> '.join([*path, nxt])}")
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


# --------------------------------------------------------------------------------------------------
# Found by the fuzz suite: a Linear on 3-D inputs returns a view, then written in place
# --------------------------------------------------------------------------------------------------


class InPlaceAfterLinearView(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):  # (B, T, 3): nn.Linear returns a view of its 2-D product
        h = self.lin(x)
        h += x  # re-roots the view's history
        return self.head(torch.relu_(self.lin(h)).mean(1))


def test_in_place_write_into_a_linear_view_keeps_its_terms():
    model = InPlaceAfterLinearView().double().eval()
    x = torch.randn(13, 2, 3, dtype=torch.float64)
    labeled, pool = _pool_and_labeled(x, 2, 4, 5)
    _assert_exact(model, labeled, pool, "all")
    features = fastdal.features(model, pool, layers="all", rank=64)
    per_sample = materialized_gradients(model, x[5:], features.names)
    assert relative_error(features.gram(), per_sample @ per_sample.T) < 1e-9
