"""nn.EmbeddingBag's closed form (fastdal/bags.py): every mode and option, 2-D and flat (torchtext) layouts,
against per-sample autograd in float64."""

import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastdal
from fastdal import bags
from fastdal.capture import Call, Target

from conftest import TOLERANCE, cpu_backends, relative_error
from helpers import assert_same_state, materialized_gradients, snapshot

# Every fastdal call here must take the closed form: a warning of the generic path fails the test.
pytestmark = pytest.mark.filterwarnings("error:fastdal. module")

VOCAB, DIM, CLASSES = 11, 4, 3  # a small vocabulary: ids repeat inside bags and across samples


class FastText(nn.Module):
    """EmbeddingBag -> Linear (fastText), or with a Linear and a ReLU between."""

    def __init__(self, hidden: bool = False, **bag_options):
        super().__init__()
        self.bag = nn.EmbeddingBag(VOCAB, DIM, **bag_options)
        self.hidden = nn.Sequential(nn.Linear(DIM, 5), nn.ReLU()) if hidden else nn.Identity()
        self.fc = nn.Linear(5 if hidden else DIM, CLASSES)

    def forward(self, text, offsets=None, per_sample_weights=None):
        return self.fc(self.hidden(self.bag(text, offsets, per_sample_weights=per_sample_weights)))


class TwoFields(nn.Module):
    """One bag module called twice per sample (title and body, ``x: (B, 2, L)``): the gradients add up."""

    def __init__(self, **bag_options):
        super().__init__()
        self.bag = nn.EmbeddingBag(VOCAB, DIM, **bag_options)
        self.fc = nn.Linear(2 * DIM, CLASSES)

    def forward(self, x):
        return self.fc(torch.cat([self.bag(x[:, 0]), torch.tanh(self.bag(x[:, 1]))], 1))


class BagByEmbedding(nn.Module):
    """An EmbeddingBag's documented math through nn.Embedding: the ground truth of ``scale_grad_by_freq``, whose
    CPU backward in torch 2.13 divides a row by the count of another id (pytorch/pytorch#190063; CUDA divides by
    the row's own count). Takes one bag (1-D input) or a batch of one row per bag."""

    def __init__(self, bag: nn.EmbeddingBag):
        super().__init__()
        self.weight, self.mode, self.padding_idx = bag.weight, bag.mode, bag.padding_idx
        assert bag.mode in ("sum", "mean") and bag.max_norm is None

    def forward(self, x, offsets=None, per_sample_weights=None):
        if x.dim() == 1:
            x = x[None]
            per_sample_weights = None if per_sample_weights is None else per_sample_weights[None]
        e = F.embedding(x, self.weight, self.padding_idx, scale_grad_by_freq=True)  # counts over the batch of one
        keep = torch.ones_like(x, dtype=e.dtype) if self.padding_idx is None else (x != self.padding_idx).to(e.dtype)
        coef = keep if per_sample_weights is None else keep * per_sample_weights
        out = (e * coef[..., None]).sum(1)
        return out / keep.sum(1).clamp(min=1)[:, None] if self.mode == "mean" else out


def _truth(model: nn.Module) -> nn.Module:
    """The model whose per-sample autograd is the ground truth: the model itself, or a copy whose bag goes through
    :class:`BagByEmbedding` where PyTorch's own gradient is wrong."""
    if not model.bag.scale_grad_by_freq:
        return model
    twin = copy.deepcopy(model)
    twin.bag = BagByEmbedding(twin.bag)
    return twin


def test_twin_matches_the_bag_forward():
    bag = nn.EmbeddingBag(VOCAB, DIM, mode="mean", padding_idx=0, scale_grad_by_freq=True).double()
    x = _ids_2d(6, 5, 0)
    assert torch.allclose(BagByEmbedding(bag)(x), bag(x))


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def _texts(n: int, padding_idx: int | None, dtype=torch.float64) -> list[tuple]:
    """``(ids, per_sample_weights, label)`` of random lengths 0..9, some bags of padding only."""
    samples = []
    for i in range(n):
        ids = torch.randint(0, VOCAB, (int(torch.randint(0, 10, ())),))
        if padding_idx is not None and i % 5 == 3:
            ids = torch.full((2,), padding_idx)
        samples.append((ids, torch.randn(ids.shape[0], dtype=dtype), int(torch.randint(0, CLASSES, ()))))
    samples[1] = (samples[1][0][:0], samples[1][1][:0], samples[1][2])  # an empty bag
    return samples


def _collate(samples: list[tuple], include_last_offset: bool) -> tuple:
    """torchtext's layout: ``(text_flat, offsets, labels, per_sample_weights_flat)``."""
    lengths = torch.tensor([len(s[0]) for s in samples])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    if not include_last_offset:
        offsets = offsets[:-1]
    text = torch.cat([s[0] for s in samples])
    weights = torch.cat([s[1] for s in samples])
    return text, offsets, torch.tensor([s[2] for s in samples]), weights


def _flat_inputs(weighted: bool):
    return (lambda b: (b[0], b[1], b[3])) if weighted else (lambda b: (b[0], b[1]))


def _one_bag(text: torch.Tensor, include_last_offset: bool) -> torch.Tensor:
    return torch.tensor([0, len(text)] if include_last_offset else [0])


def _expected(model, samples, grads, names, include_last_offset, weighted):
    """(sq_norm, dot, pseudo labels, G at the true labels) by plain per-sample autograd, one bag at a time, on a
    float64 copy of the model (a max_norm forward rescales rows in place)."""
    work = copy.deepcopy(_truth(model)).double()
    params = dict(work.named_parameters())
    g_flat = None if grads is None else torch.cat([grads[n].double().reshape(-1) for n in names])
    sq, dot, pseudo, total = [], [], [], 0
    for text, w, label in samples:
        logits = work(text, _one_bag(text, include_last_offset), w.double() if weighted else None)
        grads_at = {}
        for key, y in (("pseudo", logits.argmax(1)), ("label", torch.tensor([label]))):
            found = torch.autograd.grad(F.cross_entropy(logits, y), [params[n] for n in names], retain_graph=True)
            grads_at[key] = torch.cat([g.reshape(-1) for g in found])
        g = grads_at["pseudo"]
        pseudo.append(logits.argmax(1))
        sq.append(g @ g)
        dot.append(g @ g_flat if g_flat is not None else g.new_zeros(()))
        total = total + grads_at["label"]
    return torch.stack(sq), torch.stack(dot), torch.cat(pseudo), total


# --------------------------------------------------------------------------------------------------
# The flat (torchtext) layout
# --------------------------------------------------------------------------------------------------

CASES = {
    "sum": dict(mode="sum"),
    "sum-padding": dict(mode="sum", padding_idx=0),
    "sum-weights": dict(mode="sum", weighted=True),
    "sum-weights-padding-freq": dict(mode="sum", weighted=True, padding_idx=3, scale_grad_by_freq=True),
    "sum-max_norm": dict(mode="sum", max_norm=1.0),
    "mean": dict(mode="mean"),
    "mean-padding": dict(mode="mean", padding_idx=2),
    "mean-padding-freq": dict(mode="mean", padding_idx=2, scale_grad_by_freq=True),
    "mean-max_norm": dict(mode="mean", max_norm=0.7, norm_type=1.0),
    "max": dict(mode="max"),
    "max-padding": dict(mode="max", padding_idx=0),
    "max-max_norm": dict(mode="max", max_norm=1.0, padding_idx=VOCAB - 1),
}


def _run_flat(case: dict, include_last_offset: bool, hidden: bool, dtype=torch.float64, layers="all"):
    options = dict(case)
    weighted = options.pop("weighted", False)
    model = FastText(hidden, include_last_offset=include_last_offset, **options).to(dtype)
    samples = _texts(21, options.get("padding_idx"), dtype)
    labeled, pool = samples[:8], samples[8:]
    collate = partial(_collate, include_last_offset=include_last_offset)
    labeled_loader = DataLoader(labeled, batch_size=3, collate_fn=collate)
    pool_loader = DataLoader(pool, batch_size=4, collate_fn=collate)
    inputs = _flat_inputs(weighted)
    before = snapshot(model)
    names = ["bag.weight"] if layers != "all" else [n for n, _ in model.named_parameters()]

    expected_g = _expected(model, labeled, None, names, include_last_offset, weighted)[3]
    if not options.get("scale_grad_by_freq"):
        # (A batch's scale_grad_by_freq gradient counts ids over the whole batch: not a sum of per-sample ones.)
        g = fastdal.labeled_grad(model, labeled_loader, layers=layers, inputs=inputs, labels=lambda b: b[2])
        assert list(g.names) == names
        got = torch.cat([g.grads[n].double().reshape(-1) for n in names])
        assert relative_error(got, expected_g) < TOLERANCE[dtype]
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters() if n in names}
    sq, dot, pseudo, _ = _expected(model, pool, grads, names, include_last_offset, weighted)
    result = fastdal.score(model, pool_loader, grads, inputs=inputs, return_components=True)
    assert torch.equal(result.pseudo_label, pseudo)
    for field, expected in (("score", sq + 2 * dot), ("sq_norm", sq), ("dot", dot)):
        err = relative_error(getattr(result, field), expected)
        assert err < TOLERANCE[dtype], (field, err)
    assert_same_state(before, snapshot(model))
    return result


@pytest.mark.parametrize("include_last_offset", [False, True], ids=["offsets", "last_offset"])
@pytest.mark.parametrize("case", list(CASES))
def test_flat_layout_against_per_sample_autograd(case, include_last_offset):
    _run_flat(CASES[case], include_last_offset, hidden=list(CASES).index(case) % 2 == 1)


@pytest.mark.parametrize("case", ["sum-weights", "mean-padding", "max"])
def test_flat_layout_bag_only(case):
    """layers=["bag"]: only the bag's weight, by its module name."""
    _run_flat(CASES[case], include_last_offset=False, hidden=True, layers=["bag"])


@pytest.mark.parametrize("case", ["sum-weights", "mean-padding", "max-max_norm"])
def test_flat_layout_float32(case):
    _run_flat(CASES[case], include_last_offset=True, hidden=True, dtype=torch.float32)


# --------------------------------------------------------------------------------------------------
# 2-D input (B, L): fastdal.reference cuts the batches itself
# --------------------------------------------------------------------------------------------------


def _loaders_2d(tensors: tuple, batch_size: int, n_labeled: int = 9):
    y = torch.randint(0, CLASSES, (tensors[0].shape[0],))
    labeled = DataLoader(TensorDataset(*[t[:n_labeled] for t in tensors], y[:n_labeled]), batch_size=batch_size)
    pool = DataLoader(TensorDataset(*[t[n_labeled:] for t in tensors]), batch_size=batch_size)
    return labeled, pool


def _compare_2d(model, tensors, inputs, layers="all", dtype=torch.float64, batch_size=5, backend="auto"):
    labeled, pool = _loaders_2d(tensors, batch_size)
    labels = lambda b: b[-1]  # noqa: E731
    before = snapshot(model)
    truth = _truth(model)
    expected_g = fastdal.reference.labeled_grad(
        truth, labeled, layers=layers, dtype=torch.float64, inputs=inputs, labels=labels
    )
    if truth is model:  # (PyTorch's batched gradient is the wrong one where the truth is a twin)
        g = fastdal.labeled_grad(model, labeled, layers=layers, inputs=inputs, labels=labels)
        assert g.names == expected_g.names
        flat = [torch.cat([t.double().reshape(-1) for t in grad.grads.values()]) for grad in (g, expected_g)]
        assert relative_error(*flat) < TOLERANCE[dtype]
    expected = fastdal.reference.score(
        truth, pool, expected_g, dtype=torch.float64, inputs=inputs, return_components=True
    )
    result = fastdal.score(model, pool, expected_g, inputs=inputs, return_components=True, backend=backend)
    assert torch.equal(result.pseudo_label, expected.pseudo_label)
    for field in ("score", "sq_norm", "dot"):
        err = relative_error(getattr(result, field), getattr(expected, field))
        assert err < TOLERANCE[dtype], (field, err)
    assert_same_state(before, snapshot(model))


def _ids_2d(n: int, length: int, padding_idx: int | None = None) -> torch.Tensor:
    x = torch.randint(0, VOCAB, (n, length))
    if padding_idx is not None:
        x[::3, : length // 2] = padding_idx
        x[4] = padding_idx  # a bag of padding only
    return x


@pytest.mark.parametrize(
    "options",
    [
        dict(mode="sum"),
        dict(mode="sum", padding_idx=1, max_norm=1.0),
        dict(mode="mean", padding_idx=0, scale_grad_by_freq=True),
        dict(mode="max", padding_idx=2),
        dict(mode="max", max_norm=0.9),
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
@pytest.mark.parametrize("layers", ["all", ["bag"]], ids=["all", "bag"])
def test_2d_input(options, layers):
    model = FastText(hidden=True, **options).double()
    x = _ids_2d(22, 7, options.get("padding_idx"))
    _compare_2d(model, (x,), inputs=lambda b: b[0], layers=layers)


def test_2d_per_sample_weights():
    model = FastText(hidden=False, mode="sum", padding_idx=0).double()
    x = _ids_2d(22, 6, 0)
    w = torch.randn(22, 6, dtype=torch.float64)
    _compare_2d(model, (x, w), inputs=lambda b: (b[0], None, b[1]))


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_2d_batch_size_equal_to_bag_length(mode):
    """(5, 5) batches: which dimension holds the samples is probed, not read from sizes."""
    model = FastText(hidden=True, mode=mode).double()
    _compare_2d(model, (_ids_2d(19, 5),), inputs=lambda b: b[0], batch_size=5)


@pytest.mark.parametrize("backend", cpu_backends())
def test_2d_cpu_backends(backend):
    """float32 (Triton serves float32 only); the bag's math is the same on every backend, the Linears' is not."""
    model = FastText(hidden=True, mode="mean", padding_idx=0)
    _compare_2d(model, (_ids_2d(22, 7, 0),), inputs=lambda b: b[0], dtype=torch.float32, backend=backend)


@pytest.mark.parametrize(
    "options",
    [dict(mode="sum"), dict(mode="mean", padding_idx=0, scale_grad_by_freq=True), dict(mode="max")],
    ids=["sum", "mean-padding-freq", "max"],
)
def test_module_called_twice(options):
    """Two calls of one bag module per sample: the cross terms between them count (ids repeat across calls)."""
    model = TwoFields(**options).double()
    x = torch.randint(0, 4, (22, 2, 5))
    x[:, 1, 0] = x[:, 0, 0]
    _compare_2d(model, (x,), inputs=lambda b: b[0])


# --------------------------------------------------------------------------------------------------
# The module's functions on recorded calls made by hand
# --------------------------------------------------------------------------------------------------


def _call(bag: nn.EmbeddingBag, x, offsets=None, weights=None, in_dims=None) -> Call:
    """A recorded call of ``bag`` as fastdal/capture.py makes it, with a random output gradient."""
    kwargs = {} if weights is None else {"per_sample_weights": weights}
    args = (x,) if offsets is None else (x, offsets)
    inputs = [t for t in (*args, weights) if t is not None]
    out = bag(*args, **kwargs)
    dims = in_dims if in_dims is not None else [0 if x.dim() == 2 else None, *[0] * (len(inputs) - 1)]
    return Call(
        args, kwargs, inputs, [out], [out._version], [None], deltas=[torch.randn_like(out)], in_dims=dims, out_dims=[0]
    )


def _sample_gradient(bag: nn.EmbeddingBag, call: Call, b: int) -> torch.Tensor:
    """Sample ``b``'s weight gradient of ``<output_b, delta_b>``: its bag alone through autograd."""
    x, offsets, weights = bags._arguments(call)
    if x.dim() == 2:
        x, weights = x[b : b + 1], None if weights is None else weights[b : b + 1]
        one = None
    else:
        starts = [*offsets[: call.deltas[0].shape[0]].tolist(), len(x)]
        x, weights = x[starts[b] : starts[b + 1]], None if weights is None else weights[starts[b] : starts[b + 1]]
        one = _one_bag(x, bag.include_last_offset)
    truth = BagByEmbedding(bag) if bag.scale_grad_by_freq else bag
    out = truth(x, one, per_sample_weights=weights)
    return torch.autograd.grad((out * call.deltas[0][b : b + 1]).sum(), bag.weight)[0]


@pytest.mark.parametrize("layout", ["2d", "flat"])
@pytest.mark.parametrize(
    "options",
    [
        dict(mode="sum", weighted=True, padding_idx=0),
        dict(mode="sum", scale_grad_by_freq=True),
        dict(mode="mean", padding_idx=1, scale_grad_by_freq=True),
        dict(mode="max", padding_idx=0),
    ],
    ids=["sum-weights-padding", "sum-freq", "mean-padding-freq", "max-padding"],
)
@pytest.mark.parametrize("n_calls", [1, 3])
def test_per_sample_gradients_and_terms(options, layout, n_calls):
    options = dict(options)
    weighted = options.pop("weighted", False)
    bag = nn.EmbeddingBag(VOCAB, DIM, include_last_offset=layout == "flat", **options).double()
    target = Target("bag", bag, "bag", {"weight": "bag.weight"})
    batch_size = 6
    calls = []
    for _ in range(n_calls):
        if layout == "2d":
            x = _ids_2d(batch_size, 5, options.get("padding_idx"))
            offsets = None
        else:
            samples = _texts(batch_size, options.get("padding_idx"))
            x, offsets = _collate(samples, include_last_offset=True)[:2]
        weights = torch.randn(x.shape, dtype=torch.float64) if weighted else None
        calls.append(_call(bag, x, offsets, weights))
    assert all(bags.readable(target, call, batch_size) for call in calls)
    expected = torch.stack([sum(_sample_gradient(bag, c, b) for c in calls) for b in range(batch_size)])
    with torch.no_grad():
        per_sample = bags.per_sample_gradients(target, calls, batch_size, torch.float64)["weight"]
        assert relative_error(per_sample, expected) < 1e-12
        grad = torch.randn_like(bag.weight)
        sq, dot = bags.bag_terms(target, calls, {"weight": grad}, batch_size, torch.float64)
        flat = expected.reshape(batch_size, -1)
        assert relative_error(sq, flat.square().sum(1)) < 1e-12
        assert relative_error(dot, flat @ grad.reshape(-1)) < 1e-12
        sq_only, no_dot = bags.bag_terms(target, calls, {}, batch_size, torch.float64)
        assert torch.equal(sq_only, sq) and not no_dot.any()


def test_readable_refuses_bags_that_are_not_the_samples():
    bag = nn.EmbeddingBag(VOCAB, DIM).double()
    target = Target("bag", bag, "bag", {"weight": "bag.weight"})
    x = _ids_2d(4, 4)
    assert bags.readable(target, _call(bag, x), 4)
    assert not bags.readable(target, _call(bag, x, in_dims=[1]), 4)  # (L, B): the bags are not the samples
    assert not bags.readable(target, _call(bag, x, in_dims=[None]), 4)
    text, offsets = _collate(_texts(5, None), include_last_offset=False)[:2]
    assert bags.readable(target, _call(bag, text, offsets), 5)
    assert not bags.readable(target, _call(bag, text, offsets[:4]), 5)  # 4 bags in a batch of 5 samples
    last = nn.EmbeddingBag(VOCAB, DIM, include_last_offset=True).double()
    last_target = Target("bag", last, "bag", {"weight": "bag.weight"})
    assert not bags.readable(last_target, _call(last, text, offsets), 5)  # 5 offsets: only 4 bags
    call = _call(bag, text, offsets)
    call.out_dims = [None]
    assert not bags.readable(target, call, 5)


@pytest.mark.parametrize("mode", ["sum", "max"])
def test_full_rank_features_are_exact(mode):
    """fastdal.features(rank=) flattens the bag's per-sample gradients; at full rank they are exact."""
    model = FastText(hidden=True, mode=mode, padding_idx=0).double()
    x = _ids_2d(13, 6, 0)
    f = fastdal.features(model, DataLoader(TensorDataset(x), batch_size=5), layers="all", rank=8)
    g = materialized_gradients(model, x, f.names)
    assert relative_error(f.gram(), g @ g.T) < 1e-10


@pytest.mark.parametrize("include_last_offset", [False, True], ids=["offsets", "last_offset"])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_flat_layout_against_the_reference(mode, include_last_offset):
    """fastdal on flat batches of several texts against fastdal.reference on flat batches of one text each (a
    batch whose model gives one logits row is one sample to the reference)."""
    model = FastText(hidden=True, mode=mode, include_last_offset=include_last_offset).double()
    samples = _texts(17, None)
    labeled, pool = samples[:7], samples[7:]
    collate = partial(_collate, include_last_offset=include_last_offset)
    inputs, labels = _flat_inputs(False), (lambda b: b[2])
    one_text = dict(batch_size=1, collate_fn=collate)
    g = fastdal.labeled_grad(
        model, DataLoader(labeled, batch_size=3, collate_fn=collate), layers="all", inputs=inputs, labels=labels
    )
    expected_g = fastdal.reference.labeled_grad(
        model, DataLoader(labeled, **one_text), layers="all", dtype=torch.float64, inputs=inputs, labels=labels
    )
    flat = [torch.cat([t.reshape(-1) for t in grad.values()]) for grad in (g, expected_g)]
    assert relative_error(*flat) < 1e-9
    result = fastdal.score(
        model, DataLoader(pool, batch_size=4, collate_fn=collate), g, inputs=inputs, return_components=True
    )
    expected = fastdal.reference.score(
        model, DataLoader(pool, **one_text), g, inputs=inputs, dtype=torch.float64, return_components=True
    )
    assert torch.equal(result.pseudo_label, expected.pseudo_label)
    for field in ("score", "sq_norm", "dot"):
        assert relative_error(getattr(result, field), getattr(expected, field)) < 1e-9, field


def test_reference_refuses_to_cut_a_flat_batch():
    """(labels, text, offsets): cut along the labels' dimension, every sample would read the whole text from its
    offset on; the reference sees that the cut gives other logits than the batch and says what to pass."""
    model = FastText(hidden=True).double()
    samples = _texts(8, None)

    def labels_first(batch):
        text, offsets, labels, _ = _collate(batch, include_last_offset=False)
        return labels, text, offsets

    pool = DataLoader(samples, batch_size=4, collate_fn=labels_first)
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="every batch is one sample"):
        fastdal.reference.score(model, pool, grads, inputs=lambda b: (b[1], b[2]))
