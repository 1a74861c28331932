"""The public API around the score: select, query, LabeledGrad, head finding, the reference backend."""

import io

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastdal
import fastdal.api
import fastdal.ops
import fastdal.passes

from conftest import relative_error
from helpers import loaders
from models import build


def test_select_orders_by_score_and_breaks_ties_by_index():
    scores = torch.tensor([0.5, 2.0, 1.0, 2.0, -1.0, 1.0])
    assert fastdal.select(scores, 4).tolist() == [1, 3, 2, 5]
    assert fastdal.select(scores, 6).tolist() == [1, 3, 2, 5, 0, 4]
    assert fastdal.select(torch.ones(5), 3).tolist() == [0, 1, 2]


def test_query_chains_labeled_grad_score_and_select():
    model, make_inputs, classes = build("rescnn")
    labeled, pool = loaders(make_inputs, classes, torch.float64)
    chosen = fastdal.query(model, pool, labeled, 4, layers="all", gamma=1.0)
    g = fastdal.labeled_grad(model, labeled, layers="all")
    assert torch.equal(chosen, fastdal.select(fastdal.score(model, pool, g, gamma=1.0), 4))
    assert len(set(chosen.tolist())) == 4


def test_labeled_grad_roundtrips_through_torch_save_and_moves():
    model, make_inputs, classes = build("transformer")
    labeled, pool = loaders(make_inputs, classes, torch.float64)
    g = fastdal.labeled_grad(model, labeled, layers="all")
    buffer = io.BytesIO()
    torch.save(g, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)  # weights_only loading: LabeledGrad is allow-listed
    assert isinstance(loaded, fastdal.LabeledGrad)
    assert loaded.layers == "all" and loaded.num_samples == 9 and loaded.names == g.names
    assert loaded.shapes == {n: p.shape for n, p in model.named_parameters()}
    assert all(torch.equal(loaded[n], g[n]) for n in g.names)
    half = g.to(torch.float32)
    assert all(t.dtype == torch.float32 for t in half.grads.values()) and g["head.bias"].dtype == torch.float64
    assert torch.equal(fastdal.score(model, pool, g), fastdal.score(model, pool, dict(g.grads)))


def test_last_layer_uses_the_closed_form(monkeypatch):
    model, make_inputs, classes = build("wide_head")
    labeled, pool = loaders(make_inputs, classes, torch.float64)
    g = fastdal.labeled_grad(model, labeled, layers="last")
    assert g.layers == "last" and g.names == ["head.weight", "head.bias"]

    def no_backward(*args, **kwargs):
        raise AssertionError("layers='last' ran a backward pass")

    monkeypatch.setattr(fastdal.passes.BackwardPass, "__call__", no_backward)
    fastdal.score(model, pool, g)


def test_last_layer_after_a_temperature_falls_back_exactly():
    model, make_inputs, classes = build("head_then_scale")
    labeled, pool = loaders(make_inputs, classes, torch.float64)
    g = fastdal.labeled_grad(model, labeled, layers="last")
    assert g.names == ["head.weight", "head.bias"]
    expected = fastdal.reference.score(model, pool, g, dtype=torch.float64)
    assert relative_error(fastdal.score(model, pool, g), expected) < 1e-9


class RegisteredOutOfOrder(nn.Module):
    """The head is registered before the body; the head is the Linear whose output is returned."""

    def __init__(self):
        super().__init__()
        self.classifier = nn.Linear(6, 3)
        self.body = nn.Linear(4, 6)

    def forward(self, x):
        return self.classifier(torch.relu(self.body(x)))


def test_head_is_found_by_what_the_model_returns():
    model = RegisteredOutOfOrder().double()
    labeled = DataLoader(TensorDataset(torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))), batch_size=2)
    assert fastdal.labeled_grad(model, labeled).names == ["classifier.weight", "classifier.bias"]


def test_reference_backend_matches_reference():
    model, make_inputs, classes = build("mlp", torch.float32)
    labeled, pool = loaders(make_inputs, classes, torch.float32)
    g = fastdal.labeled_grad(model, labeled, layers="all")
    via_backend = fastdal.score(model, pool, g, backend="reference", return_components=True)
    direct = fastdal.reference.score(model, pool, g, dtype=torch.float64, return_components=True)
    assert via_backend.score.dtype == torch.float32
    assert torch.equal(via_backend.score, direct.score.float())
    assert relative_error(fastdal.score(model, pool, g), direct.score) < 1e-4


def test_backends_report_availability():
    report = fastdal.backends.available()
    assert set(report) == {"torch", "cpp", "cuda", "triton", "reference"}
    assert report["torch"] is None and report["reference"] is None
    assert all(reason is None or (isinstance(reason, str) and reason) for reason in report.values())
    if not torch.cuda.is_available():
        assert "no CUDA device" in report["cuda"]


def test_cuda_backend_without_device_code_for_the_gpu_says_so(monkeypatch):
    """A build with no device code for the GPU (a T4 or V100 and a build for newer ones): the cuda backend
    reports the reason, and the automatic choice passes on to the next backend instead of failing at launch."""
    backends = fastdal.backends
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "Tesla T4")
    monkeypatch.setattr(fastdal._ext, "load", lambda: None)
    monkeypatch.setattr(fastdal._ext, "has_kernel", lambda op, key: True)
    monkeypatch.setattr(backends, "_IMAGE_REASONS", {})
    probed = []

    def no_image(probe):
        probed.append(probe)
        return 0

    monkeypatch.setattr(torch.ops.fastdal, "cuda_kernel_image", no_image, raising=False)
    monkeypatch.setattr(torch, "empty", lambda *args, device=None, **kwargs: device)
    reason = backends.available()["cuda"]
    assert "no device code for cuda:0" in reason and "7.5" in reason and "TORCH_CUDA_ARCH_LIST" in reason
    assert backends._machine_reason("cuda", torch.device("cuda:0")) == reason
    assert len(probed) == 1  # asked once per device


def test_progress_bar_is_shown_on_request(capsys):
    model, make_inputs, classes = build("mlp")
    labeled, pool = loaders(make_inputs, classes, torch.float64)
    g = fastdal.labeled_grad(model, labeled, layers="all", progress=False)
    assert capsys.readouterr().err == ""
    fastdal.score(model, pool, g, progress=True)
    assert "fastdal.score" in capsys.readouterr().err


def test_frozen_parameters_are_left_out_of_all():
    model, make_inputs, classes = build("mlp")
    model.net[0].requires_grad_(False)
    labeled, pool = loaders(make_inputs, classes, torch.float64)
    g = fastdal.labeled_grad(model, labeled, layers="all")
    assert "net.0.weight" not in g.names and "head.weight" in g.names
    expected = fastdal.reference.score(model, pool, g, dtype=torch.float64)
    assert relative_error(fastdal.score(model, pool, g), expected) < 1e-9
    assert not model.net[0].weight.requires_grad


@pytest.mark.parametrize("name", ["mlp", "rescnn"])
def test_dict_of_a_subset_of_parameters(name):
    model, make_inputs, classes = build(name)
    _, pool = loaders(make_inputs, classes, torch.float64)
    params = dict(model.named_parameters())
    subset = {n: torch.randn_like(params[n]) for n in list(params)[::3]}
    expected = fastdal.reference.score(model, pool, subset, dtype=torch.float64, return_components=True)
    result = fastdal.score(model, pool, subset, return_components=True)
    assert relative_error(result.sq_norm, expected.sq_norm) < 1e-9
    assert relative_error(result.dot, expected.dot) < 1e-9


def test_labeled_grad_last_is_closed_form_and_exact(monkeypatch):
    """layers='last' sums E^T H without a backward pass when the model returns the head's output."""
    model, make_inputs, classes = build("wide_head", torch.float32)
    labeled, _ = loaders(make_inputs, classes, torch.float32)
    expected = fastdal.reference.labeled_grad(model, labeled, layers="last", dtype=torch.float64)

    def no_backward(*args, **kwargs):
        raise AssertionError("layers='last' ran a backward pass")

    monkeypatch.setattr(fastdal.api, "labeled_batch_grads", no_backward)
    g = fastdal.labeled_grad(model, labeled, layers="last")
    for name in g.names:
        assert relative_error(g[name], expected[name]) < 1e-4


def test_fastdal_backend_environment_variable(monkeypatch):
    model, make_inputs, classes = build("mlp", torch.float32)
    labeled, pool = loaders(make_inputs, classes, torch.float32)
    g = fastdal.labeled_grad(model, labeled, layers="all")
    monkeypatch.setenv("FASTDAL_BACKEND", "reference")
    via_env = fastdal.score(model, pool, g)
    assert torch.equal(via_env, fastdal.reference.score(model, pool, g, dtype=torch.float64).float())
    assert relative_error(fastdal.score(model, pool, g, backend="torch"), via_env) < 1e-4  # an explicit name wins
    monkeypatch.setenv("FASTDAL_BACKEND", "fastest")
    with pytest.raises(ValueError, match="the FASTDAL_BACKEND environment variable must be one of"):
        fastdal.score(model, pool, g)
    monkeypatch.setenv("FASTDAL_BACKEND", "reference")
    with pytest.raises(ValueError, match="the reference backend computes fastdal.score only"):
        fastdal.ops.linear_sample_score(torch.randn(2, 3, 4), torch.randn(2, 3, 5))


def test_forced_backend_lists_why_it_cannot_serve():
    h = torch.randn(3, 4, dtype=torch.float16)
    w = torch.randn(5, 4, dtype=torch.float16)
    with pytest.raises(ValueError, match="backend 'cpp' cannot run last_layer_score on these tensors: .*float16"):
        fastdal.ops.last_layer_score(h, w, None, w, None, backend="cpp")
    result = fastdal.ops.last_layer_score(h, w, None, w, None)  # auto falls back to torch
    assert result.score.dtype == torch.float32
