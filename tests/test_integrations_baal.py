"""fastdal.integrations.baal: DynamicALLoop picks what fastdal's own API picks, inside baal's loop."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("baal", reason="baal is not installed (pip install fastdal[baal])")

import numpy as np
import torch
from baal import ActiveLearningDataset, ModelWrapper
from baal.active import ActiveLearningLoop
from baal.modelwrapper import TrainingArgs
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.dataloader import default_collate

import fastdal
from fastdal.integrations.baal import DynamicALLoop

from helpers import assert_same_state, snapshot

N, DIM, CLASSES, BATCH = 60, 6, 3, 8
# Per method, the options the loop and the reference computation share.
OPTIONS = {
    "dynamic": dict(layers="all", gamma=2.0),
    "badge": dict(layers="last"),
    "greedy": dict(layers="all", rank=3),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_data(n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, DIM, generator=generator)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()  # learnable, three classes
    return x, y


def make_wrapper(batch_size: int = BATCH, collate_fn=default_collate, epoch: int = 1) -> ModelWrapper:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(DIM, 10), nn.Tanh(), nn.Linear(10, CLASSES))
    args = TrainingArgs(
        optimizer=torch.optim.SGD(model.parameters(), lr=0.2),
        criterion=nn.CrossEntropyLoss(),
        batch_size=batch_size,
        epoch=epoch,
        use_cuda=False,
        workers=0,
        collate_fn=collate_fn,
    )
    return ModelWrapper(model, args)


def make_dataset(x, y, n_labeled: int = 6, **kwargs) -> ActiveLearningDataset:
    dataset = ActiveLearningDataset(TensorDataset(x, y), random_state=0, **kwargs)
    if n_labeled:  # baal's label([]) would label everything (zip_longest pads the empty index list)
        dataset.label_randomly(n_labeled)
    return dataset


def reference_picks(method, model, x, y, labeled, candidates, b, seed) -> np.ndarray:
    """Dataset indices fastdal's API picks among ``candidates``, from loaders built here on the raw tensors."""
    pool_loader = DataLoader(TensorDataset(x[candidates]), batch_size=BATCH)
    lab = np.flatnonzero(labeled)  # baal iterates the labeled set in dataset order
    labeled_loader = DataLoader(TensorDataset(x[lab], y[lab]), batch_size=BATCH)
    options = OPTIONS[method]
    if method == "dynamic":
        positions = fastdal.query(model, pool_loader, labeled_loader, b, **options)
    else:
        feats = fastdal.features(model, pool_loader, seed=seed, **options)
        if method == "badge":
            positions = fastdal.select(feats, b, method="badge", seed=seed)
        else:
            grad = fastdal.labeled_grad(model, labeled_loader, layers=options["layers"])
            positions = fastdal.select(feats, b, method="greedy", labeled_grad=grad)
    return candidates[positions.numpy()]


@pytest.mark.parametrize("max_sample", [-1, 25])
@pytest.mark.parametrize("method", list(OPTIONS))
def test_picks_equal_fastdal_api_over_rounds(method, max_sample):
    x, y = make_data()
    dataset, wrapper = make_dataset(x, y), make_wrapper()
    seed, query_size = 3, 5
    loop = DynamicALLoop(
        dataset, wrapper, query_size=query_size, max_sample=max_sample, method=method, seed=seed, **OPTIONS[method]
    )
    labeled = dataset.labelled.copy()
    subsample = np.random.default_rng(seed)  # the documented draw of max_sample candidates
    rounds_with_subsample = 0
    for _ in range(4):
        wrapper.train_on_dataset(dataset)  # the model changes between rounds, so each round picks anew
        pool = np.flatnonzero(~labeled)
        candidates = pool
        if max_sample != -1 and max_sample < len(pool):
            candidates = pool[np.sort(subsample.choice(len(pool), max_sample, replace=False))]
            rounds_with_subsample += 1
        expected = reference_picks(method, wrapper.model, x, y, labeled, candidates, query_size, seed)
        before = dataset.labelled.copy()
        assert loop.step() is True
        newly = np.flatnonzero(dataset.labelled & ~before)
        assert sorted(newly.tolist()) == sorted(expected.tolist())
        labeled[expected] = True
        assert np.array_equal(dataset.labelled, labeled)
    assert rounds_with_subsample == (4 if max_sample != -1 else 0)


@pytest.mark.parametrize(
    "make_unlabelled",
    [lambda item: item[0], lambda item: (item[0], (item[1] + 1) % CLASSES)],
    ids=["target-dropped", "target-wrong"],
)
@pytest.mark.parametrize("method", ["dynamic", "greedy"])
def test_pool_targets_are_never_read(method, make_unlabelled):
    """The dynamic score reads a pool sample at its predicted label: what baal's make_unlabelled leaves of
    the pool's targets (nothing, or a wrong one) changes nothing."""
    x, y = make_data()
    picks = []
    for kwargs in ({}, {"make_unlabelled": make_unlabelled}):
        dataset, wrapper = make_dataset(x, y, **kwargs), make_wrapper()
        wrapper.train_on_dataset(dataset)
        DynamicALLoop(dataset, wrapper, query_size=7, method=method, **OPTIONS[method]).step()
        picks.append(dataset.labelled.copy())
    assert picks[0].sum() == 6 + 7
    assert np.array_equal(picks[0], picks[1])


def test_wrapper_batching_and_batch_mappings_are_used():
    """The loaders use the wrapper's batch_size and collate_fn; a collate_fn that builds dicts works with
    inputs= and labels= and picks the same samples."""
    x, y = make_data()
    sizes: list[int] = []

    def dict_collate(items):
        sizes.append(len(items))
        xs, ys = default_collate(items)
        return {"pixels": xs, "target": ys}

    picks = []
    for collate, mappings in (
        (default_collate, {}),
        (dict_collate, dict(inputs=lambda b: b["pixels"], labels=lambda b: b["target"])),
    ):
        dataset, wrapper = make_dataset(x, y, n_labeled=11), make_wrapper(batch_size=7, collate_fn=collate)
        loop = DynamicALLoop(dataset, wrapper, query_size=4, method="dynamic", layers="all", **mappings)
        loop.step()
        picks.append(dataset.labelled.copy())
    assert np.array_equal(picks[0], picks[1])
    # labeled set of 11, then the pool of 49, each in batches of the wrapper's size 7
    assert sizes == [7, 4] + [7] * 7


def test_step_leaves_the_model_as_it_was():
    x, y = make_data()
    dataset, wrapper = make_dataset(x, y), make_wrapper()
    wrapper.train_on_dataset(dataset)  # leaves the model in train mode, with (zeroed) gradients
    before = snapshot(wrapper.model)
    for method in OPTIONS:
        assert DynamicALLoop(dataset, wrapper, query_size=3, method=method, **OPTIONS[method]).step()
    assert_same_state(before, snapshot(wrapper.model))
    assert wrapper.model.training


def test_step_with_a_given_pool_labels_positions_as_baal_does():
    """step(pool=...) passes positions in that pool to dataset.label, which reads them as pool indices."""
    x, y = make_data()
    dataset, wrapper = make_dataset(x, y), make_wrapper()
    loop = DynamicALLoop(dataset, wrapper, query_size=4, method="dynamic")
    initial = dataset.labelled.copy()
    positions = loop.pick(dataset.pool)
    assert len(positions) == 4
    expected = initial.copy()
    expected[np.flatnonzero(~initial)[positions]] = True
    assert loop.step(pool=dataset.pool) is True
    assert np.array_equal(dataset.labelled, expected)


def test_baal_loop_end_to_end_with_training():
    """baal's own round structure: train_on_dataset, test_on_dataset, step, until step() says the pool is empty."""
    x, y = make_data(70)
    train_x, train_y, test_x, test_y = x[:50], y[:50], x[50:], y[50:]
    dataset, wrapper = make_dataset(train_x, train_y, n_labeled=4), make_wrapper(epoch=3)
    loop = DynamicALLoop(dataset, wrapper, query_size=12, max_sample=30, method="dynamic", layers="all")
    assert isinstance(loop, ActiveLearningLoop)
    sizes, losses = [], []
    for _ in range(10):
        history = wrapper.train_on_dataset(dataset)
        assert len(history) == 3
        losses.append(wrapper.test_on_dataset(TensorDataset(test_x, test_y)))
        sizes.append(len(dataset))
        if not loop.step():
            break
    # 46 in the pool: 12, 12, 12, then the 10 left (max_sample=30 >= pool from the third step on)
    assert sizes == [4, 16, 28, 40, 50]
    assert dataset.n_unlabelled == 0 and len(dataset.pool) == 0
    assert loop.step() is False
    assert all(np.isfinite(losses))


def test_badge_needs_no_labeled_set_but_dynamic_does():
    x, y = make_data()
    dataset, wrapper = make_dataset(x, y, n_labeled=0), make_wrapper()
    with pytest.raises(ValueError, match="label_randomly"):
        DynamicALLoop(dataset, wrapper, query_size=3, method="dynamic").step()
    assert DynamicALLoop(dataset, wrapper, query_size=3, method="badge").step()
    assert len(dataset) == 3


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(method="entropy"), ValueError, "method"),
        (dict(query_size=0), ValueError, "query_size"),
        (dict(query_size=-2), ValueError, "query_size"),
        (dict(query_size=2.5), ValueError, "query_size"),
        (dict(query_size=True), ValueError, "query_size"),
        (dict(max_sample=0), ValueError, "max_sample"),
        (dict(max_sample=-3), ValueError, "max_sample"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(gamma=float("nan")), ValueError, "gamma"),
        (dict(dataset=TensorDataset(torch.zeros(3, DIM))), TypeError, "dataset"),
        (dict(wrapper=nn.Linear(DIM, CLASSES)), TypeError, "wrapper"),
    ],
)
def test_bad_input_is_refused_with_its_name(kwargs, error, match):
    x, y = make_data()
    arguments = {"dataset": make_dataset(x, y), "wrapper": make_wrapper(), **kwargs}
    with pytest.raises(error, match=match):
        DynamicALLoop(**arguments)


def test_missing_baal_says_how_to_install(monkeypatch):
    for name in ("baal", "baal.active", "baal.active.dataset", "fastdal.integrations.baal"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "baal", None)  # makes `import baal...` raise ImportError
    with pytest.raises(ImportError, match=r"pip install fastdal\[baal\]"):
        import fastdal.integrations.baal  # noqa: F401


def test_importing_fastdal_does_not_import_baal():
    code = "import sys, fastdal, fastdal.integrations; assert 'baal' not in sys.modules, 'baal imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
