"""The model comes back exactly as it went in: flags, requires_grad, .grad, hooks, values."""

import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fastdal

from helpers import assert_same_state, loaders, snapshot
from models import build


def _dress_up(model):
    """Give the model state worth preserving: mixed train/eval flags, frozen params, grads, hooks."""
    model.train()
    modules = list(model.modules())
    modules[1].eval()
    params = list(model.parameters())
    params[0].requires_grad_(False)
    params[-1].grad = torch.randn_like(params[-1])
    model.register_forward_hook(lambda m, i, o: None)
    modules[-1].register_forward_pre_hook(lambda m, i: None)
    return model


class FailingLoader:
    """Yields batches from a loader, then raises half-way."""

    def __init__(self, loader, fail_at):
        self.loader, self.fail_at = loader, fail_at

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == self.fail_at:
                raise RuntimeError("injected failure")
            yield batch


@pytest.mark.parametrize("layers", ["last", "all"])
@pytest.mark.parametrize("name", ["rescnn", "transformer", "mha"])
def test_state_unchanged_after_success(name, layers):
    model, make_inputs, classes = build(name)
    labeled, pool = loaders(make_inputs, classes, torch.float64)
    _dress_up(model)
    before = snapshot(model)
    g = fastdal.labeled_grad(model, labeled, layers=layers)
    assert_same_state(before, snapshot(model))
    with warnings.catch_warnings():
        # Every module of these models has a closed form: no generic-fallback warning.
        warnings.filterwarnings("error", message="fastdal: module .* no closed form")
        fastdal.score(model, pool, g)
    assert_same_state(before, snapshot(model))
    fastdal.reference.score(model, pool, g)
    fastdal.reference.labeled_grad(model, labeled, layers=layers)
    assert_same_state(before, snapshot(model))


@pytest.mark.parametrize("where", ["loader", "forward"])
@pytest.mark.parametrize("layers", ["last", "all"])
def test_state_unchanged_after_exception(layers, where):
    model, make_inputs, classes = build("rescnn")
    labeled, pool = loaders(make_inputs, classes, torch.float64, n_pool=15)
    g = fastdal.labeled_grad(model, labeled, layers=layers)
    _dress_up(model)
    if where == "forward":
        calls = {"n": 0}

        def fail_on_second_batch(module, args):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("injected failure")

        handle = model.block2.register_forward_pre_hook(fail_on_second_batch)
        failing_pool, failing_labeled = pool, labeled
    else:
        failing_pool, failing_labeled = FailingLoader(pool, 1), FailingLoader(labeled, 1)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="injected failure"):
        fastdal.score(model, failing_pool, g)
    assert_same_state(before, snapshot(model))
    if where == "forward":
        calls["n"] = 0
    with pytest.raises(RuntimeError, match="injected failure"):
        fastdal.labeled_grad(model, failing_labeled, layers=layers)
    assert_same_state(before, snapshot(model))
    if where == "forward":
        handle.remove()


def test_explicit_device_matches_default():
    model, make_inputs, classes = build("mlp")
    labeled, pool = loaders(make_inputs, classes, torch.float64)
    g = fastdal.labeled_grad(model, labeled, layers="all", device="cpu")
    assert torch.equal(fastdal.score(model, pool, g, device="cpu"), fastdal.score(model, pool, g))


@pytest.mark.parametrize("call", ["labeled_grad", "score", "features"])
def test_model_split_over_devices_is_refused_before_any_work(call):
    """A model whose parameters live on two devices (pipeline-style over GPUs; here the CPU and "meta") gets the
    documented error naming the devices before a batch is drawn, and is left where it was."""
    model, make_inputs, classes = build("mlp")
    labeled, pool = loaders(make_inputs, classes, torch.float64)
    g = fastdal.labeled_grad(model, labeled, layers="all")
    model.head.to("meta")
    drawn = []

    def batches(loader):
        for batch in loader:
            drawn.append(batch)
            yield batch

    run = {
        "labeled_grad": lambda: fastdal.labeled_grad(model, batches(labeled)),
        "score": lambda: fastdal.score(model, batches(pool), g),
        "features": lambda: fastdal.features(model, batches(pool)),
    }[call]
    with pytest.raises(ValueError, match=r"model: its parameters are spread over \['cpu', 'meta'\]"):
        run()
    assert not drawn
    assert model.head.weight.device.type == "meta" and model.net[0].weight.device.type == "cpu"


class RenormedEmbedding(torch.nn.Module):
    """nn.Embedding(max_norm=...) rescales rows of its weight in place on every forward."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(9, 4, max_norm=0.5)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1))


def test_embedding_weights_rescaled_by_max_norm_come_back():
    model = RenormedEmbedding().double()
    with torch.no_grad():
        model.emb.weight.mul_(3)  # rows far above max_norm
    ids = torch.randint(0, 9, (6, 5))
    labeled = DataLoader(TensorDataset(ids, torch.randint(0, 3, (6,))), batch_size=4)
    pool = DataLoader(TensorDataset(ids), batch_size=4)
    before = snapshot(model)
    g = fastdal.labeled_grad(model, labeled, layers="all")
    fastdal.score(model, pool, g)
    assert_same_state(before, snapshot(model))
