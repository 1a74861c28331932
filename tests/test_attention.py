"""nn.MultiheadAttention in closed form (fastdal/attention.py): exact against the float64 reference for every
option of the stock forward, no generic-fallback warning for it, and the fallback still exact where it is
needed (a subclass with its own forward, a per-sample mask over several heads)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastdal

from conftest import TOLERANCE, relative_error
from helpers import assert_same_state, materialized_gradients, snapshot

T, SOURCE, D, CLASSES = 5, 4, 8, 3
FALLBACK = "no closed form"


class Attend(nn.Module):
    """(B, T, 5) inputs, linear embeddings, one nn.MultiheadAttention called as configured, mean pool, head.

    ``source``: "self" (query, key and value one tensor), "kv" (key is value, SOURCE positions) or "cross"
    (three tensors). ``padding``/``mask``: None, "bool" or "float" key padding mask (from the input, per
    sample) and attention mask (a buffer shared by the samples); mask "causal" with ``is_causal=True``, mask
    "per_sample" a 3-D (samples * heads, L, S) mask from the input. ``weights``: None (need_weights=False),
    "unused" (returned, not used), "mean" or "heads" (used in the logits, averaged over heads or not).
    """

    def __init__(self, source="self", padding=None, mask=None, weights=None, heads=2, **options):
        super().__init__()
        self.source, self.padding, self.mask, self.weights, self.heads = source, padding, mask, weights, heads
        kdim, vdim = options.get("kdim") or D, options.get("vdim") or D
        self.q = nn.Linear(5, D)
        self.k = nn.Linear(5, kdim)
        self.v = nn.Linear(5, vdim)
        self.mha = nn.MultiheadAttention(D, heads, **options)
        self.scale = nn.Linear(1, D, bias=False)  # how much the attention weights add to the pooled features
        self.head = nn.Linear(D, CLASSES)
        length = T if source == "self" else SOURCE
        if mask == "bool":
            shared = torch.rand(T, length) < 0.4
            shared[:, 0] = False  # every query keeps a key
            self.register_buffer("shared_mask", shared)
        elif mask == "float":
            self.register_buffer("shared_mask", torch.randn(T, length))
        elif mask == "causal":
            self.register_buffer("shared_mask", nn.Transformer.generate_square_subsequent_mask(T))

    def forward(self, x):  # x: (B, T, 5)
        query = self.q(x)
        if self.source == "self":
            key = value = query
        elif self.source == "kv":
            key = value = self.k(x[:, :SOURCE])
        else:
            key, value = self.k(x[:, :SOURCE]), self.v(x[:, 1 : SOURCE + 1])
        if not self.mha.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
            if self.source == "self":
                key = value = query
            elif self.source == "kv":
                value = key
        kwargs = {"need_weights": self.weights is not None, "average_attn_weights": self.weights != "heads"}
        length = key.shape[1 if self.mha.batch_first else 0]
        if self.padding is not None:
            padded = x[:, :length, 0] > 0.3
            padded[:, 0] = False
            kwargs["key_padding_mask"] = padded if self.padding == "bool" else padded.to(x.dtype) * -1.5
        if self.mask == "per_sample":
            blocked = x[:, :T, None, 1] > x[:, None, :length, 2]  # (B, T, S) from the sample itself
            blocked[:, :, 0] = False
            kwargs["attn_mask"] = blocked.repeat_interleave(self.heads, 0)
        elif self.mask is not None:
            kwargs["attn_mask"] = self.shared_mask
            kwargs["is_causal"] = self.mask == "causal"
        out, weights = self.mha(query, key, value, **kwargs)
        if not self.mha.batch_first:
            out = out.transpose(0, 1)
        h = torch.tanh(out).mean(1)
        if self.weights in ("mean", "heads"):
            h = h + self.scale(weights.square().flatten(1).sum(1, keepdim=True))
        return self.head(h)


CONFIGS = {
    "self_batch_first": {"batch_first": True},
    "self_sequence_first": {},
    "cross_kdim_vdim": {"source": "cross", "kdim": 3, "vdim": 6, "batch_first": True},
    "cross_kdim_vdim_sequence_first": {"source": "cross", "kdim": 3, "vdim": 6},
    "cross_packed": {"source": "cross", "batch_first": True},
    "key_is_value_packed": {"source": "kv", "batch_first": True},
    "key_is_value_kdim": {"source": "kv", "kdim": 6, "vdim": 6},
    "padding_bool": {"padding": "bool", "batch_first": True},
    "padding_float": {"padding": "float"},
    "mask_bool": {"mask": "bool", "batch_first": True},
    "mask_float": {"source": "cross", "mask": "float", "kdim": 3, "vdim": 6},
    "padding_and_mask": {"padding": "bool", "mask": "bool", "batch_first": True},
    "causal": {"mask": "causal", "batch_first": True},
    "causal_padding": {"mask": "causal", "padding": "float"},
    "causal_weights": {"mask": "causal", "weights": "mean", "batch_first": True},
    "no_bias": {"bias": False, "source": "cross", "batch_first": True},
    "no_bias_kdim": {"bias": False, "source": "cross", "kdim": 3, "vdim": 6},
    "bias_kv": {"add_bias_kv": True, "batch_first": True},
    "bias_kv_masks": {"add_bias_kv": True, "padding": "bool", "mask": "bool", "source": "kv"},
    "bias_kv_causal": {"add_bias_kv": True, "mask": "causal", "batch_first": True},
    "zero_attn": {"add_zero_attn": True, "batch_first": True},
    "zero_attn_masks_weights": {"add_zero_attn": True, "padding": "float", "mask": "float", "weights": "heads"},
    "zero_attn_bias_kv": {"add_zero_attn": True, "add_bias_kv": True, "source": "cross", "kdim": 3, "vdim": 6},
    "everything": {
        "add_zero_attn": True,
        "add_bias_kv": True,
        "source": "cross",
        "kdim": 3,
        "vdim": 6,
        "padding": "bool",
        "mask": "bool",
        "weights": "mean",
    },
    "weights_mean": {"weights": "mean", "batch_first": True},
    "weights_heads": {"weights": "heads", "source": "cross"},
    "weights_unused": {"weights": "unused", "batch_first": True},
    "one_head_per_sample_mask": {"heads": 1, "mask": "per_sample", "batch_first": True},
}


def _loaders(model, dtype, n_labeled=7, n_pool=11, batch_size=4, make=None):
    x = make(n_labeled + n_pool) if make is not None else torch.randn(n_labeled + n_pool, T, 5, dtype=dtype)
    classes = model.head.out_features
    labeled = DataLoader(TensorDataset(x[:n_labeled], torch.randint(0, classes, (n_labeled,))), batch_size=batch_size)
    return labeled, DataLoader(TensorDataset(x[n_labeled:]), batch_size=batch_size)


def _assert_exact(model, labeled, pool, layers="all", dtype=torch.float64):
    """labeled_grad and every score component against the float64 reference; returns the texts of the
    generic-fallback warnings fastdal gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g = fastdal.labeled_grad(model, labeled, layers=layers)
        expected_g = fastdal.reference.labeled_grad(model, labeled, layers=layers, dtype=torch.float64)
        result = fastdal.score(model, pool, expected_g, return_components=True)
        expected = fastdal.reference.score(model, pool, expected_g, dtype=torch.float64, return_components=True)
    assert g.names == expected_g.names
    flat = [torch.cat([t.reshape(-1).double() for t in grad.grads.values()]) for grad in (g, expected_g)]
    assert relative_error(*flat) < TOLERANCE[dtype]
    assert torch.equal(result.pseudo_label, expected.pseudo_label)
    for field in ("score", "sq_norm", "dot"):
        err = relative_error(getattr(result, field), getattr(expected, field))
        assert err < TOLERANCE[dtype], (field, err)
    return [str(w.message) for w in caught if FALLBACK in str(w.message)]


def _build(config, dtype=torch.float64):
    return Attend(**config).to(dtype).eval()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_closed_form_is_exact(name, one_thread):
    model = _build(CONFIGS[name])
    labeled, pool = _loaders(model, torch.float64)
    assert _assert_exact(model, labeled, pool) == []


@pytest.mark.parametrize("name", ["self_sequence_first", "cross_kdim_vdim", "bias_kv_masks", "weights_heads"])
def test_closed_form_float32(name, one_thread):
    model = _build(CONFIGS[name], torch.float32)
    labeled, pool = _loaders(model, torch.float32)
    assert _assert_exact(model, labeled, pool, dtype=torch.float32) == []


def test_plan_keeps_out_proj_with_the_attention():
    """out_proj is never called by the stock forward: its parameters join the attention's own closed form."""
    model = _build(CONFIGS["bias_kv"])
    _, pool = _loaders(model, torch.float64)
    g = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    from fastdal.passes import BackwardPass

    backward = BackwardPass(model, g, torch.float64, "auto")
    backward(next(iter(pool)), None, None, 0)
    target = backward.plan.targets[("mha", "module")]
    assert target.kind == "mha"
    assert sorted(target.params) == [
        "bias_k",
        "bias_v",
        "in_proj_bias",
        "in_proj_weight",
        "out_proj.bias",
        "out_proj.weight",
    ]
    assert "mha.out_proj" not in backward.plan.targets


@pytest.mark.parametrize("layers", [["mha"], ["mha.out_proj"], ["q", "mha"]])
def test_layers_naming_the_attention(layers, one_thread):
    model = _build(CONFIGS["cross_kdim_vdim_sequence_first"])
    labeled, pool = _loaders(model, torch.float64)
    assert _assert_exact(model, labeled, pool, layers=layers) == []
    named = fastdal.labeled_grad(model, labeled, layers=layers).names
    assert all(n.startswith(tuple(f"{layer}." for layer in layers)) for n in named)


def test_frozen_projection_is_left_out(one_thread):
    """Only the parameters that require grad are covered; the recomputation still runs on the frozen ones."""
    model = _build(CONFIGS["padding_and_mask"])
    model.mha.in_proj_weight.requires_grad_(False)
    labeled, pool = _loaders(model, torch.float64)
    assert _assert_exact(model, labeled, pool) == []
    assert model.mha.in_proj_weight.requires_grad is False


class Twice(nn.Module):
    """One attention module called twice per forward, as self- and as cross-attention: gradients add."""

    def __init__(self, heads=2):
        super().__init__()
        self.inp = nn.Linear(5, D)
        self.mha = nn.MultiheadAttention(D, heads, batch_first=True, add_bias_kv=True)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, x):
        h = self.inp(x)
        a, _ = self.mha(h, h, h, need_weights=False)
        memory = torch.tanh(h[:, :SOURCE])
        b, _ = self.mha(a, memory, memory)
        return self.head(torch.tanh(b).mean(1))


def test_reused_module_adds_over_calls(one_thread):
    model = Twice().double().eval()
    labeled, pool = _loaders(model, torch.float64)
    assert _assert_exact(model, labeled, pool) == []


class EncoderClassifier(nn.Module):
    """Embedding, a stock two-layer nn.TransformerEncoder (batch first), mean pool, Linear head."""

    def __init__(self, norm_first, padding=False, causal=False, vocab=13, heads=2, classes=4):
        super().__init__()
        self.padding, self.causal = padding, causal
        self.emb = nn.Embedding(vocab, D)
        layer = nn.TransformerEncoderLayer(D, heads, dim_feedforward=12, batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(D, classes)

    def forward(self, ids):
        kwargs = {}
        if self.padding:
            kwargs["src_key_padding_mask"] = ids == 0
        if self.causal:
            kwargs["mask"] = nn.Transformer.generate_square_subsequent_mask(ids.shape[1], dtype=self.head.weight.dtype)
            kwargs["is_causal"] = True
        return self.head(self.encoder(self.emb(ids), **kwargs).mean(1))


def _ids(n, vocab=13, length=7):
    ids = torch.randint(0, vocab, (n, length))
    ids[:, 0] = torch.randint(1, vocab, (n,))  # never a sample of padding only
    return ids


@pytest.mark.parametrize(("padding", "causal"), [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_classifier(norm_first, padding, causal, one_thread):
    """Dropout 0.1 and a model left in train mode: fastdal runs it in eval mode and gives it back as it was."""
    model = EncoderClassifier(norm_first, padding, causal).double()
    model.train()
    labeled, pool = _loaders(model, torch.float64, make=_ids)
    before = snapshot(model)
    assert _assert_exact(model, labeled, pool) == []
    assert_same_state(before, snapshot(model))
    assert model.training


class DecoderClassifier(nn.Module):
    """A stock nn.TransformerDecoderLayer: causal self-attention, then cross-attention to a memory (key is value)."""

    def __init__(self, batch_first, vocab=13, heads=2, classes=4):
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(vocab, D)
        self.memory = nn.Linear(D, D)
        self.decoder = nn.TransformerDecoderLayer(D, heads, dim_feedforward=12, batch_first=batch_first)
        self.head = nn.Linear(D, classes)

    def forward(self, ids):
        x = self.emb(ids)
        memory = torch.tanh(self.memory(x[:, :SOURCE]))
        if not self.batch_first:
            x, memory = x.transpose(0, 1), memory.transpose(0, 1)
        causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1 if self.batch_first else 0], dtype=x.dtype)
        h = self.decoder(x, memory, tgt_mask=causal, tgt_is_causal=True)
        return self.head(h.mean(1 if self.batch_first else 0))


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_decoder_layer(batch_first, one_thread):
    model = DecoderClassifier(batch_first).double().eval()
    labeled, pool = _loaders(model, torch.float64, make=_ids)
    assert _assert_exact(model, labeled, pool) == []


class OwnForward(nn.MultiheadAttention):
    """A subclass whose forward is its own: not the stock computation, so the module's closed form does not
    apply; its parameters are read where F.multi_head_attention_forward uses them, an operation without a
    closed form of its own, mapped over the samples."""

    def forward(self, query, key, value, **kwargs):
        out, weights = super().forward(query, key, value, **kwargs)
        return 2 * out, weights


@pytest.mark.parametrize("name", ["padding_bool", "weights_heads"])
def test_subclass_with_its_own_forward_falls_back(name, one_thread):
    """Per-head weights are a view of the softmax, which also weighs the values: the gradient of the view itself is
    read, not that of the softmax."""
    model = _build(CONFIGS[name])
    stock = model.mha
    model.mha = OwnForward(D, 2, batch_first=stock.batch_first).double().eval()
    model.mha.load_state_dict(stock.state_dict())
    labeled, pool = _loaders(model, torch.float64)
    messages = _assert_exact(model, labeled, pool)
    # One output: the operation is mapped over the samples; with the weights returned too, the module is.
    expected = "'multi_head_attention_forward'" if name == "padding_bool" else "module 'mha' (OwnForward)"
    assert len(messages) == 1 and expected in messages[0], messages


def test_per_sample_mask_over_several_heads_falls_back(one_thread):
    """A 3-D mask (samples * heads, L, S) does not hold the samples in one dimension of its own: the attention's
    call is not read per sample, its parameters go up to the model, which the generic path handles exactly."""
    model = _build({"mask": "per_sample", "batch_first": True})
    labeled, pool = _loaders(model, torch.float64)
    messages = _assert_exact(model, labeled, pool)
    assert len(messages) == 1 and "'<model>'" in messages[0], messages


# Models whose every parameter reaches the logits (materialized_gradients asks autograd for all of them).
@pytest.mark.parametrize("name", ["encoder", "weights_heads", "everything"])
def test_full_rank_features_are_exact(name, one_thread):
    """features(layers="all", rank=...) on models with attention: at full rank the projections are identities,
    so the Gram matrix and dot products equal those of the materialized per-sample gradients."""
    if name == "encoder":
        model = EncoderClassifier(norm_first=True, padding=True).double().eval()
        x = _ids(9)
    else:
        model = _build(CONFIGS[name])
        x = torch.randn(9, T, 5, dtype=torch.float64)
    pool = DataLoader(TensorDataset(x), batch_size=4)
    before = snapshot(model)
    f = fastdal.features(model, pool, layers="all", rank=1024)
    assert_same_state(before, snapshot(model))
    g = materialized_gradients(model, x, f.names)
    assert relative_error(f.gram(), g @ g.T) < 1e-10
    labeled = DataLoader(TensorDataset(x[:5], torch.randint(0, model.head.out_features, (5,))), batch_size=3)
    G = fastdal.labeled_grad(model, labeled, layers="all")
    flat_G = torch.cat([G[n].reshape(-1) for n in f.names])
    assert relative_error(f.dot(G), g @ flat_G) < 1e-10
    small = fastdal.features(model, pool, layers="all", rank=3)
    assert len(small) == 9 and torch.isfinite(small.sq_norm()).all()
