"""Parameters read at the operations that use them (fastdal/uses.py, use_forms.py, pieces.py), whoever calls
them: bare parameters multiplied, added, expanded, matrix-multiplied; HF-style ``Conv1D`` on flattened rows;
position tables looked up with shared ids; functional norms; a learned attention bias; parametrizations; heads
written by hand; compiled models; modules that return a tensor they also use. Every case against the float64
per-sample reference, with no generic-path warning where a closed form exists, and the model left as it was."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize
from torch.utils.data import DataLoader, TensorDataset

import fastdal

from conftest import relative_error
from helpers import assert_same_state, materialized_gradients, snapshot


def _loaders(x, classes=4, batch_size=4, n_labeled=6):
    y = torch.randint(0, classes, (n_labeled,))
    return (
        DataLoader(TensorDataset(x[:n_labeled], y), batch_size=batch_size),
        DataLoader(TensorDataset(x[n_labeled:]), batch_size=batch_size),
    )


def _exact(model, labeled, pool, layers="all", tol=1e-9, fallback_allowed=False):
    """labeled_grad and every score component equal the float64 reference; no fastdal fallback warning unless
    allowed; the model comes back unchanged."""
    before = snapshot(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g = fastdal.labeled_grad(model, labeled, layers=layers)
        result = fastdal.score(model, pool, g, return_components=True)
    fallbacks = [str(w.message) for w in caught if str(w.message).startswith("fastdal:")]
    if not fallback_allowed:
        assert not fallbacks, fallbacks
    assert_same_state(before, snapshot(model))
    expected_g = fastdal.reference.labeled_grad(model, labeled, layers=layers, dtype=torch.float64)
    assert sorted(g.names) == sorted(expected_g.names)
    scale = max(expected_g[n].abs().max().item() for n in expected_g.names)
    for name in g.names:
        assert (g[name] - expected_g[name]).abs().max().item() <= tol * scale, name
    expected = fastdal.reference.score(model, pool, g, dtype=torch.float64, return_components=True)
    assert torch.equal(result.pseudo_label, expected.pseudo_label)
    for field in ("score", "sq_norm", "dot"):
        assert relative_error(getattr(result, field), getattr(expected, field)) < tol, field
    return g, fallbacks


# --------------------------------------------------------------------------------------------------
# Elementwise uses, tokens, tables
# --------------------------------------------------------------------------------------------------


class Elementwise(nn.Module):
    """A bare parameter in every elementwise position: scale, shift, divisor, dividend, subtrahend, in place."""

    def __init__(self, d=6, t=5, classes=4, op="mul"):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.p = nn.Parameter(torch.rand(t, d) + 0.5)
        self.op = op
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        p = self.p
        h = {
            "mul": lambda: self.p * h,
            "mul_": lambda: h.clone().mul_(p),
            "add": lambda: torch.add(h, p, alpha=0.5),
            "add_": lambda: h.clone().add_(p[0]),
            "sub": lambda: h - p,
            "rsub": lambda: p - h,
            "div": lambda: h / p,
            "rdiv": lambda: p / (h + 3.0),
            "rdiv_scalar": lambda: 2.0 / p * h,
            "row": lambda: h * p[:, :1],
        }[self.op]()
        return self.head(h.mean(1))


@pytest.mark.parametrize("op", ["mul", "mul_", "add", "add_", "sub", "rsub", "div", "rdiv", "rdiv_scalar", "row"])
def test_elementwise_uses(op, one_thread):
    model = Elementwise(op=op).double()
    labeled, pool = _loaders(torch.randn(15, 5, 6, dtype=torch.float64))
    _exact(model, labeled, pool)


class Tokens(nn.Module):
    """ViT's embeddings: a class token expanded along the batch and concatenated, a position table added, a
    layer scale, and a head written by hand as ``x @ W.T + b``."""

    def __init__(self, d=6, t=5, classes=4):
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, t + 1, d))
        self.gamma = nn.Parameter(torch.randn(d))
        self.W = nn.Parameter(torch.randn(classes, d))
        self.b = nn.Parameter(torch.randn(classes))

    def forward(self, x):
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.proj(x)], 1) + self.pos
        h = h + self.gamma * torch.tanh(h)
        return h[:, 0] @ self.W.T + self.b


def test_tokens_tables_and_a_hand_written_head(one_thread):
    model = Tokens().double()
    labeled, pool = _loaders(torch.randn(15, 5, 6, dtype=torch.float64))
    _exact(model, labeled, pool)
    g, _ = _exact(model, labeled, pool, layers="last")
    assert g.names == ["W", "b"]


class Positions(nn.Module):
    """Position tables looked up with ids shared by all samples: ``arange`` (each id once) and relative buckets
    (ids repeated), the latter as an additive attention bias inside scaled_dot_product_attention."""

    def __init__(self, d=8, t=5, classes=3, heads=2, buckets=4):
        super().__init__()
        self.tok = nn.Embedding(10, d)
        self.pos = nn.Embedding(t, d)
        self.bias = nn.Embedding(buckets, heads)
        self.qkv = nn.Linear(d, 3 * d)
        self.heads, self.buckets = heads, buckets
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        b, t = ids.shape
        h = self.tok(ids) + self.pos(torch.arange(t))
        q, k, v = self.qkv(h).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        relative = (torch.arange(t)[None, :] - torch.arange(t)[:, None]).abs().clamp(max=self.buckets - 1)
        bias = self.bias(relative).permute(2, 0, 1).unsqueeze(0)  # (1, heads, t, t)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.head(out.transpose(1, 2).reshape(b, t, -1).mean(1))


def test_position_tables_with_shared_ids(one_thread):
    model = Positions().double()
    labeled, pool = _loaders(torch.randint(0, 10, (15, 5)), classes=3)
    _exact(model, labeled, pool)


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 ``Conv1D``: a transposed Linear by ``addmm`` on the samples flattened into rows."""

    def __init__(self, nf, nx):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        size_out = (*x.size()[:-1], self.weight.shape[1])
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class MatrixUses(nn.Module):
    def __init__(self, d=6, classes=4):
        super().__init__()
        self.c = Conv1D(d, d)
        self.right = nn.Parameter(torch.randn(d, d) * 0.3)  # rows @ W
        self.left = nn.Parameter(torch.randn(d, d) * 0.3)  # W @ columns
        self.lin = nn.Parameter(torch.randn(d, d) * 0.3)  # F.linear with a bare weight and bias
        self.lin_b = nn.Parameter(torch.randn(d))
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = torch.tanh(self.c(x))
        h = torch.tanh(h @ self.right)
        h = torch.tanh((self.left @ h.transpose(1, 2)).transpose(1, 2))
        h = F.linear(h, self.lin, self.lin_b)
        return self.head(h.mean(1))


def test_matrix_uses_on_rows_and_columns(one_thread):
    model = MatrixUses().double()
    labeled, pool = _loaders(torch.randn(15, 5, 6, dtype=torch.float64))
    _exact(model, labeled, pool)


class FunctionalNorms(nn.Module):
    def __init__(self, d=6, classes=4):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.ln_w, self.ln_b = nn.Parameter(torch.randn(d)), nn.Parameter(torch.randn(d))
        self.rms_w = nn.Parameter(torch.randn(d))
        self.gn_w, self.gn_b = nn.Parameter(torch.randn(d)), nn.Parameter(torch.randn(d))
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.inp(x)
        h = F.layer_norm(h, (h.shape[-1],), self.ln_w, self.ln_b)
        h = F.rms_norm(h, (h.shape[-1],), self.rms_w, eps=1e-6)
        h = F.group_norm(h.transpose(1, 2), 2, self.gn_w, self.gn_b).transpose(1, 2)
        return self.head(h.mean(1))


def test_functional_norms_with_bare_parameters(one_thread):
    model = FunctionalNorms().double()
    labeled, pool = _loaders(torch.randn(15, 5, 6, dtype=torch.float64))
    _exact(model, labeled, pool)


class Einsum(nn.Module):
    def __init__(self, d=6, classes=4):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d) * 0.3)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(torch.tanh(torch.einsum("btd,de->be", x, self.w)))


def test_an_operation_without_a_closed_form_is_mapped_over_the_samples(one_thread):
    model = Einsum().double()
    labeled, pool = _loaders(torch.randn(15, 5, 6, dtype=torch.float64))
    _, fallbacks = _exact(model, labeled, pool, fallback_allowed=True)
    assert len(fallbacks) == 1 and "einsum" in fallbacks[0] and "'w'" in fallbacks[0]


def test_float32_model(one_thread):
    model = Tokens().float()
    labeled, pool = _loaders(torch.randn(15, 5, 6))
    g = fastdal.labeled_grad(model, labeled, layers="all")
    result = fastdal.score(model, pool, g, return_components=True)
    expected = fastdal.reference.score(model, pool, g, dtype=torch.float64, return_components=True)
    for field in ("score", "sq_norm", "dot"):
        assert relative_error(getattr(result, field), getattr(expected, field)) < 1e-4, field


# --------------------------------------------------------------------------------------------------
# Parametrizations, compiled models
# --------------------------------------------------------------------------------------------------


class Symmetric(nn.Module):
    def forward(self, w):
        return w.triu() + w.triu(1).transpose(-1, -2)


def _parametrized(kind: str) -> nn.Module:
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    if kind == "weight_norm":
        model[2] = parametrizations.weight_norm(model[2])
    elif kind == "spectral_norm":
        model[2] = parametrizations.spectral_norm(model[2])
    elif kind == "orthogonal":
        parametrizations.orthogonal(model[0])
    else:
        parametrize.register_parametrization(model[0], "weight", Symmetric())
    return model.eval()


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "orthogonal", "symmetric"])
@pytest.mark.parametrize("layers", ["last", "all", "module"])
def test_parametrizations(kind, layers, one_thread):
    model = _parametrized(kind)
    labeled, pool = _loaders(torch.randn(15, 6, dtype=torch.float64))
    parametrized = "2" if kind in ("weight_norm", "spectral_norm") else "0"
    request = [parametrized] if layers == "module" else layers
    g, _ = _exact(model, labeled, pool, layers=request)
    originals = [n for n in g.names if ".parametrizations." in n]
    if layers != "last" or parametrized == "2":
        assert originals, g.names  # the originals are covered, under the model's names for them
    if layers == "last":
        assert all(n.startswith("2.") for n in g.names)


def test_compiled_model_is_scored_through_its_original():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    labeled, pool = _loaders(torch.randn(15, 6, dtype=torch.float64))
    compiled = torch.compile(model)
    for layers in ("last", "all"):
        g = fastdal.labeled_grad(compiled, labeled, layers=layers)
        eager = fastdal.labeled_grad(model, labeled, layers=layers)
        assert g.names == eager.names and all(torch.equal(g[n], eager[n]) for n in g)
        assert torch.equal(fastdal.score(compiled, pool, g), fastdal.score(model, pool, eager))
    # G keyed by the compiled model's own names is read too
    prefixed = {f"_orig_mod.{n}": t for n, t in eager.items()}
    assert torch.equal(fastdal.score(compiled, pool, prefixed), fastdal.score(model, pool, eager))


# --------------------------------------------------------------------------------------------------
# Each use counted once
# --------------------------------------------------------------------------------------------------


class ReturnsWhatItUses(nn.Module):
    """A module returning an intermediate it also consumes: the gradient at that output's own edge holds the
    inner use too. It works through its batch two samples at a time, so its operations differ with the batch
    size and only the generic path can read it."""

    def __init__(self, d=6):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))

    def forward(self, x):
        h = torch.cat([piece * self.w for piece in x.split(2)])
        return h, torch.tanh(h) * 2


class UsesOutputs(nn.Module):
    def __init__(self, d=6, classes=4):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.inner = ReturnsWhatItUses(d)
        self.head = nn.Linear(2 * d, classes)

    def forward(self, x):
        h, y = self.inner(torch.tanh(self.inp(x)))
        return self.head(torch.cat([h, y], 1))


def test_module_returning_a_tensor_it_uses_counts_that_use_once(one_thread):
    model = UsesOutputs().double()
    labeled, pool = _loaders(torch.randn(15, 6, dtype=torch.float64))
    _, fallbacks = _exact(model, labeled, pool, fallback_allowed=True)
    assert any("'inner'" in w and "vmap" in w for w in fallbacks), fallbacks


class WeightReadTwice(nn.Module):
    """A Linear called normally whose weight its parent also reads directly: its module hook sees one use only."""

    def __init__(self, d=6, classes=4):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(x)) + x @ self.lin.weight)


def test_weight_also_read_outside_its_module(one_thread):
    model = WeightReadTwice().double()
    labeled, pool = _loaders(torch.randn(15, 6, dtype=torch.float64))
    _exact(model, labeled, pool)


def test_labeled_grad_is_a_read_only_mapping():
    model = nn.Sequential(nn.Linear(6, 4)).double()
    labeled, _ = _loaders(torch.randn(10, 6, dtype=torch.float64))
    g = fastdal.labeled_grad(model, labeled, layers="all")
    assert list(g.keys()) == ["0.weight", "0.bias"] and len(g) == 2 and "0.bias" in g
    assert dict(g)["0.weight"] is g["0.weight"] and [n for n, _ in g.items()] == list(g)
    with pytest.raises(TypeError):
        g["0.bias"] = torch.zeros(4)


def test_model_comes_back_when_a_call_fails_half_way(one_thread):
    """A NaN in the third batch: the error names the sample; modes, hooks and flags are gone, values unchanged."""
    model = MatrixUses().double()
    model.left.requires_grad_(False)
    x = torch.randn(19, 5, 6, dtype=torch.float64)
    x[6 + 9, 2, 1] = float("nan")  # pool index 9, in the third batch of four
    labeled, pool = _loaders(x)
    g = fastdal.labeled_grad(model, labeled, layers="all")
    before = snapshot(model)
    with pytest.raises(ValueError, match="pool index 9"):
        fastdal.score(model, pool, g)
    assert_same_state(before, snapshot(model))
    assert not torch._C._is_torch_function_mode_enabled()
    assert fastdal.score(model, _loaders(torch.randn(10, 5, 6, dtype=torch.float64))[1], g).isfinite().all()


@pytest.mark.parametrize("model", [Tokens, MatrixUses, FunctionalNorms], ids=lambda m: m.__name__)
def test_full_rank_features_of_parameters_read_by_operation(model, one_thread):
    """features(layers="all", rank=...) at full rank: the projections are identities, so the Gram matrix and
    the dot products equal those of per-sample gradients materialized by autograd."""
    model = model().double()
    x = torch.randn(7, 5, 6, dtype=torch.float64)
    pool = DataLoader(TensorDataset(x), batch_size=4)
    f = fastdal.features(model, pool, layers="all", rank=1024)
    g = materialized_gradients(model, x, f.names)
    assert relative_error(f.gram(), g @ g.T) < 1e-10
    labeled, _ = _loaders(torch.randn(10, 5, 6, dtype=torch.float64))
    G = fastdal.labeled_grad(model, labeled, layers="all")
    assert relative_error(f.dot(G), g @ torch.cat([G[n].reshape(-1) for n in f.names])) < 1e-10
