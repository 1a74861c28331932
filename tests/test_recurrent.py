"""nn.LSTM, nn.GRU and nn.RNN in closed form (fastdal/recurrent.py): exact against the float64 reference for the
options of the stock modules (layers, directions, proj_size, no bias, sequence first, packed sequences, given
initial states, several calls), no generic-fallback warning for them, the model given back unchanged."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils.data import DataLoader, TensorDataset

import fastdal
from fastdal import recurrent
from fastdal.passes import BackwardPass

from conftest import TOLERANCE, cpu_backends, relative_error
from helpers import assert_same_state, materialized_gradients, snapshot

VOCAB, E, H, T, CLASSES = 11, 5, 6, 7, 3
FALLBACK = "no closed form"
CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class Classifier(nn.Module):
    """ids (B, T) -> Embedding (or float features (B, T, E) -> Linear) -> one recurrent module -> Linear head.

    Args:
        cell: "lstm", "gru" or "rnn". front: "embedding" (ids) or "linear" (float features).
        read: what the head reads: "last" (output at the last step), "mean" (output averaged over each sample's
            valid steps), "h_n" (final state of the last layer's directions) or "all" (the mean, every final state
            and, for an LSTM, every final cell state).
        packed: None, "sorted" (pack_padded_sequence with enforce_sorted=True: the loader sorts each batch by
            decreasing length) or "unsorted" (enforce_sorted=False); lengths come in the batch.
        initial: None (zero states), "given" (computed from each sample's input) or "shared" (one buffer expanded
            over the samples).
        options: keyword arguments of the recurrent module (num_layers, bidirectional, proj_size, bias,
            batch_first, nonlinearity); batch_first=False makes the model transpose its input.
    """

    def __init__(self, cell="lstm", front="embedding", read="mean", packed=None, initial=None, **options):
        super().__init__()
        self.cell, self.read, self.packed, self.initial = cell, read, packed, initial
        options.setdefault("batch_first", True)
        self.front = nn.Embedding(VOCAB, E) if front == "embedding" else nn.Linear(E, E)
        self.rnn = CELLS[cell](E, H, **options)
        directions = 2 if self.rnn.bidirectional else 1
        self.out_size = self.rnn.proj_size or H
        states = self.rnn.num_layers * directions
        if initial == "given":
            self.init_h = nn.Linear(E, states * self.out_size)
            self.init_c = nn.Linear(E, states * H) if cell == "lstm" else None
        elif initial == "shared":
            self.register_buffer("shared_h", torch.randn(states, 1, self.out_size))
            self.register_buffer("shared_c", torch.randn(states, 1, H))
        features = directions * self.out_size
        if read == "all":
            features += states * self.out_size + (states * H if cell == "lstm" else 0)
        self.head = nn.Linear(features, CLASSES)

    def _hx(self, x: torch.Tensor):
        n = x.shape[0]
        states = self.rnn.num_layers * (2 if self.rnn.bidirectional else 1)
        if self.initial == "given":
            pooled = x.mean(1)
            h0 = torch.tanh(self.init_h(pooled)).view(n, states, -1).transpose(0, 1).contiguous()
            if self.cell != "lstm":
                return h0
            return h0, torch.tanh(self.init_c(pooled)).view(n, states, -1).transpose(0, 1).contiguous()
        if self.initial == "shared":
            h0 = self.shared_h.expand(-1, n, -1).contiguous()
            return (h0, self.shared_c.expand(-1, n, -1).contiguous()) if self.cell == "lstm" else h0
        return None

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        x = self.front(ids)  # (B, T, E)
        n, steps = x.shape[:2]
        hx = self._hx(x)
        first = self.rnn.batch_first
        seq = x if first else x.transpose(0, 1)
        if self.packed is not None:
            seq = pack_padded_sequence(seq, lengths.cpu(), batch_first=first, enforce_sorted=self.packed == "sorted")
        out, states = self.rnn(seq, hx) if hx is not None else self.rnn(seq)
        if self.packed is not None:
            out = pad_packed_sequence(out, batch_first=True, total_length=steps)[0]
        elif not first:
            out = out.transpose(0, 1)
        valid = torch.ones(n, steps, 1, dtype=x.dtype) if lengths is None else _mask(lengths, steps, x.dtype)
        h_n = states[0] if self.cell == "lstm" else states
        if self.read == "last":
            features = out[:, -1]
        elif self.read == "h_n":
            directions = 2 if self.rnn.bidirectional else 1
            features = h_n[-directions:].transpose(0, 1).reshape(n, -1)
        else:
            features = (out * valid).sum(1) / valid.sum(1)
        if self.read == "all":
            finals = [h_n] + ([states[1]] if self.cell == "lstm" else [])
            features = torch.cat([features] + [torch.tanh(s).transpose(0, 1).reshape(n, -1) for s in finals], 1)
        return self.head(features)


def _mask(lengths: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
    return (torch.arange(steps)[None] < lengths[:, None]).to(dtype)[..., None]


CONFIGS = {
    "lstm": {"cell": "lstm", "read": "last"},
    "gru": {"cell": "gru", "read": "mean"},
    "rnn_tanh": {"cell": "rnn", "read": "h_n"},
    "rnn_relu": {"cell": "rnn", "read": "mean", "nonlinearity": "relu"},
    "lstm_two_layers_bidirectional": {"cell": "lstm", "read": "all", "num_layers": 2, "bidirectional": True},
    "gru_two_layers_bidirectional": {"cell": "gru", "read": "all", "num_layers": 2, "bidirectional": True},
    "rnn_relu_two_layers_bidirectional": {
        "cell": "rnn",
        "read": "all",
        "num_layers": 2,
        "bidirectional": True,
        "nonlinearity": "relu",
    },
    "lstm_proj": {"cell": "lstm", "read": "all", "proj_size": 4},
    "lstm_proj_two_layers_bidirectional": {
        "cell": "lstm",
        "read": "all",
        "num_layers": 2,
        "bidirectional": True,
        "proj_size": 4,
    },
    "lstm_no_bias": {"cell": "lstm", "read": "mean", "bias": False, "bidirectional": True},
    "gru_no_bias": {"cell": "gru", "read": "all", "bias": False, "num_layers": 2},
    "rnn_no_bias": {"cell": "rnn", "read": "last", "bias": False},
    "lstm_sequence_first": {"cell": "lstm", "read": "all", "batch_first": False, "bidirectional": True},
    "gru_sequence_first": {"cell": "gru", "read": "last", "batch_first": False, "num_layers": 2},
    "linear_front": {"cell": "gru", "front": "linear", "read": "mean", "bidirectional": True},
    "packed_sorted": {"cell": "lstm", "read": "all", "packed": "sorted", "num_layers": 2, "bidirectional": True},
    "packed_unsorted_gru": {"cell": "gru", "read": "all", "packed": "unsorted", "bidirectional": True},
    "packed_unsorted_lstm_proj": {
        "cell": "lstm",
        "read": "all",
        "packed": "unsorted",
        "proj_size": 4,
        "num_layers": 2,
        "bidirectional": True,
    },
    "packed_unsorted_rnn_relu": {"cell": "rnn", "read": "mean", "packed": "unsorted", "nonlinearity": "relu"},
    "packed_sequence_first": {
        "cell": "gru",
        "read": "all",
        "packed": "unsorted",
        "batch_first": False,
        "num_layers": 2,
        "bidirectional": True,
    },
    "given_states_lstm": {"cell": "lstm", "read": "all", "initial": "given", "num_layers": 2, "bidirectional": True},
    "given_states_lstm_proj_packed": {
        "cell": "lstm",
        "read": "all",
        "initial": "given",
        "packed": "unsorted",
        "proj_size": 4,
        "bidirectional": True,
    },
    "given_states_gru_sequence_first": {"cell": "gru", "read": "h_n", "initial": "given", "batch_first": False},
    "shared_states_rnn": {"cell": "rnn", "read": "all", "initial": "shared", "num_layers": 2},
    "shared_states_lstm_packed": {"cell": "lstm", "read": "all", "initial": "shared", "packed": "sorted"},
}


def _samples(config: dict, n: int, dtype: torch.dtype) -> list[dict]:
    """``n`` samples as dicts (``ids`` and, for packed models, ``lengths``); lengths from 3 to T, so that the
    layout's probes on 2 and 3 samples never see the packed data grow exactly as the samples do."""
    if config.get("front", "embedding") == "embedding":
        x = torch.randint(0, VOCAB, (n, T))
    else:
        x = torch.randn(n, T, E, dtype=dtype)
    samples = [{"ids": x[i]} for i in range(n)]
    if config.get("packed"):
        for sample in samples:
            sample["lengths"] = torch.randint(3, T + 1, ())
    return samples


def _loaders(config: dict, dtype: torch.dtype, n_labeled=7, n_pool=11, batch_size=4):
    samples = _samples(config, n_labeled + n_pool, dtype)
    labels = torch.randint(0, CLASSES, (n_labeled,))
    labeled, pool = samples[:n_labeled], samples[n_labeled:]
    for sample, y in zip(labeled, labels):
        sample["labels"] = y
    if config.get("packed") == "sorted":
        # enforce_sorted=True needs each batch by decreasing length: the pool is kept in that order.
        labeled.sort(key=lambda s: -int(s["lengths"]))
        pool.sort(key=lambda s: -int(s["lengths"]))
    return DataLoader(labeled, batch_size=batch_size), DataLoader(pool, batch_size=batch_size)


def _assert_exact(model, labeled, pool, layers="all", dtype=torch.float64, backend="auto") -> list[str]:
    """labeled_grad and every score component against the float64 reference, the model unchanged; returns the
    texts of the generic-fallback warnings fastdal gave."""
    before = snapshot(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g = fastdal.labeled_grad(model, labeled, layers=layers)
        expected_g = fastdal.reference.labeled_grad(model, labeled, layers=layers, dtype=torch.float64)
        result = fastdal.score(model, pool, expected_g, return_components=True, backend=backend)
        expected = fastdal.reference.score(model, pool, expected_g, dtype=torch.float64, return_components=True)
    assert_same_state(before, snapshot(model))
    assert g.names == expected_g.names
    flat = [torch.cat([t.reshape(-1).double() for t in grad.grads.values()]) for grad in (g, expected_g)]
    assert relative_error(*flat) < TOLERANCE[dtype]
    assert torch.equal(result.pseudo_label, expected.pseudo_label)
    for field in ("score", "sq_norm", "dot"):
        err = relative_error(getattr(result, field), getattr(expected, field))
        assert err < TOLERANCE[dtype], (field, err)
    return [str(w.message) for w in caught if FALLBACK in str(w.message)]


def _build(config: dict, dtype=torch.float64) -> Classifier:
    return Classifier(**config).to(dtype).eval()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_closed_form_is_exact(name, one_thread):
    config = CONFIGS[name]
    model = _build(config)
    labeled, pool = _loaders(config, torch.float64)
    assert _assert_exact(model, labeled, pool) == []


@pytest.mark.parametrize("name", ["lstm_two_layers_bidirectional", "packed_unsorted_lstm_proj", "gru_sequence_first"])
def test_closed_form_float32(name, one_thread):
    config = CONFIGS[name]
    model = _build(config, torch.float32)
    labeled, pool = _loaders(config, torch.float32)
    assert _assert_exact(model, labeled, pool, dtype=torch.float32) == []


@pytest.mark.parametrize("name", ["lstm_proj_two_layers_bidirectional", "packed_unsorted_gru"])
def test_layers_naming_the_recurrent_module(name, one_thread):
    config = CONFIGS[name]
    model = _build(config)
    labeled, pool = _loaders(config, torch.float64)
    assert _assert_exact(model, labeled, pool, layers=["rnn"]) == []


@pytest.mark.parametrize("backend", cpu_backends())
def test_backends(backend, one_thread):
    """float32 (Triton serves float32 only)."""
    config = CONFIGS["given_states_lstm_proj_packed"]
    model = _build(config, torch.float32)
    labeled, pool = _loaders(config, torch.float32)
    assert _assert_exact(model, labeled, pool, dtype=torch.float32, backend=backend) == []


@pytest.mark.parametrize(
    "frozen",
    [
        ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0", "weight_ih_l0_reverse"),  # from layer 1 up
        ("weight_hh_l0", "bias_ih_l1_reverse", "weight_ih_l1"),  # W_ih or W_hh alone, one bias alone
    ],
)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_some_parameters_frozen(cell, frozen, one_thread):
    """Only the parameters that require grad are covered; the recomputation still runs through the others."""
    config = {"cell": cell, "read": "all", "num_layers": 2, "bidirectional": True, "packed": "unsorted"}
    model = _build(config)
    for name in frozen:
        model.rnn.get_parameter(name).requires_grad_(False)
    labeled, pool = _loaders(config, torch.float64)
    assert _assert_exact(model, labeled, pool) == []
    assert not any(model.rnn.get_parameter(name).requires_grad for name in frozen)


def test_dropout_model_left_in_train_mode(one_thread):
    """Dropout between layers and a model left in train mode: fastdal runs it in eval mode and gives it back as it
    was; a last pool batch of one sample."""
    config = {"cell": "lstm", "read": "all", "num_layers": 3, "dropout": 0.5, "packed": "unsorted", "proj_size": 4}
    model = Classifier(**config).double()
    model.train()
    labeled, pool = _loaders(config, torch.float64, n_pool=9)
    assert _assert_exact(model, labeled, pool) == []
    assert model.training and model.rnn.training


class Twice(nn.Module):
    """One LSTM called twice per forward (on the sequence and on its second half, the second call starting from
    the first call's final states): a sample's gradient sums over both calls."""

    def __init__(self, cell="lstm"):
        super().__init__()
        self.cell = cell
        self.front = nn.Embedding(VOCAB, E)
        self.rnn = CELLS[cell](E, H, batch_first=True, bidirectional=True)
        self.head = nn.Linear(4 * H, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.front(ids)
        first, states = self.rnn(x)
        second, _ = self.rnn(x[:, T // 2 :], states)
        return self.head(torch.cat([first.mean(1), second[:, -1]], 1))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_reused_module_adds_over_calls(cell, one_thread):
    model = Twice(cell).double().eval()
    labeled, pool = _loaders({}, torch.float64)
    assert _assert_exact(model, labeled, pool) == []


class PerSample(nn.Module):
    """Runs its GRU on each sample alone (a 2-D, unbatched input: no batch inside the GRU's calls)."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(E, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, E)
        return torch.stack([self.rnn(sequence)[1][0] for sequence in x])


class Unbatched(nn.Module):
    def __init__(self):
        super().__init__()
        self.front = nn.Embedding(VOCAB, E)
        self.encoder = PerSample()
        self.head = nn.Linear(H, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.front(ids)))


def test_unbatched_calls_are_not_read_per_sample(one_thread):
    """A call on one unbatched sequence has no sample dimension: the GRU is not read in closed form, and the
    generic path of the module around it stays exact."""
    model = Unbatched().double().eval()
    labeled, pool = _loaders({}, torch.float64)
    messages = _assert_exact(model, labeled, pool)
    assert len(messages) == 1 and "'encoder'" in messages[0], messages


def _per_sample_reference(model: Classifier, batch: dict, names: list[str]) -> dict[str, torch.Tensor]:
    """(N, *shape) gradients of the cross-entropy at the pseudo label, one sample at a time."""
    params = dict(model.named_parameters())
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for i in range(batch["ids"].shape[0]):
        sample = {k: v[i : i + 1] for k, v in batch.items()}
        logits = model(**sample)
        loss = nn.functional.cross_entropy(logits, logits.argmax(1))
        for n, g in zip(names, torch.autograd.grad(loss, [params[n] for n in names])):
            rows[n].append(g)
    return {n: torch.stack(r) for n, r in rows.items()}


@pytest.mark.parametrize("name", ["lstm_proj_two_layers_bidirectional", "packed_sequence_first"])
def test_per_sample_gradients(name, one_thread):
    """The factors give each sample's gradient exactly (what projected features need)."""
    config = CONFIGS[name]
    model = _build(config)
    batch = next(iter(_loaders(config, torch.float64)[1]))
    names = [f"rnn.{n}" for n in model.rnn._flat_weights_names]
    backward = BackwardPass(model, {n: torch.empty(0) for n in names}, torch.float64, "auto")
    calls, logits, _ = backward.capture(batch, None, None, 0)
    (target,) = [t for t in calls if t.name == "rnn"]
    assert target.kind == "recurrent"
    found = recurrent.per_sample_gradients(target, calls[target], logits.shape[0], torch.float64)
    expected = _per_sample_reference(model, batch, names)
    assert sorted(found) == sorted(model.rnn._flat_weights_names)
    for local, g in found.items():
        assert relative_error(g, expected[f"rnn.{local}"]) < 1e-10, local


@pytest.mark.parametrize("name", ["lstm_proj_two_layers_bidirectional", "gru_sequence_first"])
def test_full_rank_features_are_exact(name, one_thread):
    """features(layers="all", rank=...) reads the recurrent weights' per-sample gradients from the factors: at full
    rank the projections are identities, so the Gram matrix and dot products equal the materialized ones."""
    model = _build(CONFIGS[name])
    x = torch.randint(0, VOCAB, (9, T))
    pool = DataLoader(x, batch_size=4)
    before = snapshot(model)
    f = fastdal.features(model, pool, layers="all", rank=1024)
    assert_same_state(before, snapshot(model))
    g = materialized_gradients(model, x, f.names)
    assert relative_error(f.gram(), g @ g.T) < 1e-10
    labeled = DataLoader(TensorDataset(x[:5], torch.randint(0, CLASSES, (5,))), batch_size=3)
    G = fastdal.labeled_grad(model, labeled, layers="all")
    flat_G = torch.cat([G[n].reshape(-1) for n in f.names])
    assert relative_error(f.dot(G), g @ flat_G) < 1e-10


def test_failure_inside_the_carried_module_leaves_everything_as_it_was(one_thread):
    """The recorded forward runs the recurrent module without grad: an error raised in its call (here by a hook of
    the user's on its third call, during the recorded forward of the first batch) turns grad back on, and the
    model comes back unchanged."""
    config = CONFIGS["lstm_two_layers_bidirectional"]
    model = _build(config)
    labeled, pool = _loaders(config, torch.float64)
    g = fastdal.labeled_grad(model, labeled, layers="all")
    calls = {"n": 0}

    def fail_on_third_call(module, args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure")

    handle = model.rnn.register_forward_pre_hook(fail_on_third_call)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="injected failure"):
        fastdal.score(model, pool, g)
    assert torch.is_grad_enabled()
    assert_same_state(before, snapshot(model))
    handle.remove()
    assert torch.isfinite(fastdal.score(model, pool, g)).all()
