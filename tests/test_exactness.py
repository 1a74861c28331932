"""Chain of truth: fastdal against the float64 per-sample reference, on every model family."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fastdal

from conftest import TOLERANCE, cpu_backends, relative_error
from helpers import loaders
from models import EXTRA_MODELS, MODELS, build


def _flat(grad):
    return torch.cat([t.reshape(-1).double() for t in grad.grads.values()])


def _check(name, dtype, layers, batch_size=5):
    model, make_inputs, classes = build(name, dtype)
    labeled, pool = loaders(make_inputs, classes, dtype, batch_size=batch_size)
    expected_g = fastdal.reference.labeled_grad(model, labeled, layers=layers, dtype=torch.float64)
    g = fastdal.labeled_grad(model, labeled, layers=layers)
    assert g.names == expected_g.names
    assert relative_error(_flat(g), _flat(expected_g)) < TOLERANCE[dtype]

    expected = fastdal.reference.score(model, pool, expected_g, dtype=torch.float64, return_components=True)
    result = fastdal.score(model, pool, expected_g, return_components=True)
    assert result.score.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert result.score.shape == (13,)
    assert not any(t.requires_grad for t in result), "results must not hold on to the model's graph"
    assert torch.equal(result.pseudo_label, expected.pseudo_label)
    for field in ("score", "sq_norm", "dot"):
        err = relative_error(getattr(result, field), getattr(expected, field))
        assert err < TOLERANCE[dtype], (field, err)
    return result


@pytest.mark.parametrize("layers", ["last", "all"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(MODELS))
def test_acceptance_models(name, dtype, layers):
    _check(name, dtype, layers)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(EXTRA_MODELS))
def test_other_structures(name, dtype, recwarn):
    """Parameters shared or used outside a module's call (a bare position parameter, tied weights), sequence-first
    layouts, reused layers: all in closed form, at the operations that use them, with no generic fallback."""
    _check(name, dtype, "all")
    assert not [str(w.message) for w in recwarn if str(w.message).startswith("fastdal:")]


@pytest.mark.parametrize("batch_size", [1, 7, 13])
def test_batch_sizes(batch_size):
    _check("rescnn", torch.float64, "all", batch_size=batch_size)


def test_large_batches():
    """Batches of 70 and 5: results and indices line up with the reference."""
    model, make_inputs, _ = build("rescnn")
    x = make_inputs(75, torch.float64)
    pool = DataLoader(TensorDataset(x), batch_size=70)
    g = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    expected = fastdal.reference.score(model, pool, g, dtype=torch.float64, return_components=True)
    result = fastdal.score(model, pool, g, return_components=True)
    assert torch.equal(result.pseudo_label, expected.pseudo_label)
    assert relative_error(result.score, expected.score) < 1e-9
    x[66] = float("nan")
    with pytest.raises(ValueError, match="pool index 66"):
        fastdal.score(model, pool, g)


def test_module_subset():
    model, make_inputs, classes = build("transformer")
    labeled, pool = loaders(make_inputs, classes, torch.float64)
    layers = ["blocks.1.att", "pos", "ln"]
    g = fastdal.labeled_grad(model, labeled, layers=layers)
    assert g.layers == tuple(layers)
    assert all(n.startswith(("blocks.1.att.", "pos.", "ln.")) for n in g.names)
    expected = fastdal.reference.score(model, pool, g, dtype=torch.float64, return_components=True)
    result = fastdal.score(model, pool, g, return_components=True)
    assert relative_error(result.score, expected.score) < 1e-9


def test_gamma_variants_from_one_pass():
    model, make_inputs, classes = build("mlp")
    labeled, pool = loaders(make_inputs, classes, torch.float64)
    g = fastdal.labeled_grad(model, labeled, layers="all")
    result = fastdal.score(model, pool, g, return_components=True)
    for gamma in (0.0, 1.0, 2.0, 1e6):
        direct = fastdal.score(model, pool, g, gamma=gamma)
        assert relative_error(result.with_gamma(gamma), direct) < 1e-12
    assert torch.equal(result.with_gamma(0), result.sq_norm)


@pytest.mark.parametrize("layers", ["last", "all"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["mlp", "rescnn"])
def test_low_precision_model_accumulates_in_float32(name, dtype, layers):
    model, make_inputs, classes = build(name, dtype)
    labeled, pool = loaders(make_inputs, classes, dtype)
    g = fastdal.labeled_grad(model, labeled, layers=layers)
    assert all(t.dtype == torch.float32 for t in g.grads.values())
    result = fastdal.score(model, pool, g, return_components=True)
    assert result.score.dtype == torch.float32
    # The forward itself runs in 16 bits: compare with the float64 reference of the same weights loosely.
    expected = fastdal.reference.score(model, pool, g, dtype=torch.float64, return_components=True)
    same_label = result.pseudo_label == expected.pseudo_label
    assert same_label.float().mean() > 0.8
    # (bf16 keeps 8 bits of mantissa, fp16 11; the backward pass runs in that precision)
    tolerance = {torch.bfloat16: 0.15, torch.float16: 0.05}[dtype]
    assert relative_error(result.sq_norm[same_label], expected.sq_norm[same_label]) < tolerance


# The models run on CPU: triton only under its interpreter (never on a GPU machine, where it needs CUDA tensors).
NATIVE_BACKENDS = [pytest.param(name, id=name) for name in cpu_backends(("cpp", "triton"))]


@pytest.mark.parametrize("layers", ["last", "all"])
@pytest.mark.parametrize("name", [*MODELS, "reused", "seq_first"])
@pytest.mark.parametrize("backend", NATIVE_BACKENDS)
def test_native_backends_match_reference(backend, name, layers):
    """fastdal.score on the cpp and triton backends (Triton's interpreter without a GPU), float32 models."""
    model, make_inputs, classes = build(name, torch.float32)
    labeled, pool = loaders(make_inputs, classes, torch.float32)
    g = fastdal.reference.labeled_grad(model, labeled, layers=layers, dtype=torch.float64)
    expected = fastdal.reference.score(model, pool, g, dtype=torch.float64, return_components=True)
    result = fastdal.score(model, pool, g, backend=backend, return_components=True)
    assert torch.equal(result.pseudo_label, expected.pseudo_label)
    for field in ("score", "sq_norm", "dot"):
        assert relative_error(getattr(result, field), getattr(expected, field)) < TOLERANCE[torch.float32], field


def test_paper_cnn_at_full_size_float32():
    """The paper's vanilla CNN on 32x32x3 inputs, float32: the test models above are small, and some kernels
    only take over at full width (PyTorch's convolution backward goes to oneDNN for 32 input channels on a
    32x32 map, where a per-sample gradient formed inside a parallel region once came out halved)."""
    torch.manual_seed(0)
    model = fastdal.models.VanillaCNN(3, 10).eval()
    pool = DataLoader(TensorDataset(torch.randn(6, 3, 32, 32)), batch_size=3)
    labeled = DataLoader(TensorDataset(torch.randn(4, 3, 32, 32), torch.arange(4)), batch_size=4)
    g = fastdal.reference.labeled_grad(model, labeled, layers="all", dtype=torch.float64)
    expected = fastdal.reference.score(model, pool, g, dtype=torch.float64, return_components=True)
    result = fastdal.score(model, pool, g, return_components=True)
    for field in ("sq_norm", "dot"):
        err = relative_error(getattr(result, field), getattr(expected, field))
        assert err < TOLERANCE[torch.float32], (field, err)
