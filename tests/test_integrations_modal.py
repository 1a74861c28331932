"""fastdal.integrations.modal against the real modAL and skorch: picks equal fastdal's own API."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("modAL", reason="modAL is not installed: pip install fastdal[modal]")
pytest.importorskip("skorch", reason="skorch is not installed: pip install fastdal[modal]")

import numpy as np
import torch
from modAL.models import ActiveLearner, Committee
from sklearn.linear_model import LogisticRegression
from skorch import NeuralNetClassifier
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastdal
from fastdal.integrations.modal import DynamicAL, LogOfProbabilities, dynamic_al

N, D, K = 90, 6, 3
LOADER_BATCH = 16  # several batches per pass
SEED = 3

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def modal_teach_on_current_scikit_learn(monkeypatch):
    """modAL 0.4.2.1's ``teach`` validates with ``check_X_y(force_all_finite=...)``, an argument scikit-learn
    renamed to ``ensure_all_finite`` in 1.6 and removed in 1.8 (modAL issue #196): passed on under its new name."""
    import inspect

    import modAL.models.learners as learners

    check = learners.check_X_y
    if "force_all_finite" in inspect.signature(check).parameters:
        return

    def check_X_y(*args, force_all_finite=True, **kwargs):
        return check(*args, ensure_all_finite=force_all_finite, **kwargs)

    monkeypatch.setattr(learners, "check_X_y", check_X_y)


class Net(nn.Module):
    """Logits, for CrossEntropyLoss."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(D, 16), nn.ReLU())
        self.head = nn.Linear(16, K)

    def forward(self, x):
        return self.head(self.body(x))


class SoftmaxNet(Net):
    """Probabilities, as skorch's NeuralNetClassifier expects under its default NLLLoss."""

    def forward(self, x):
        return torch.softmax(super().forward(x), dim=-1)


def blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(seed)
    centers = rng.randn(K, D) * 2.5
    k = np.arange(N) % K
    rng.shuffle(k)
    return (centers[k] + rng.randn(N, D)).astype(np.float32), k


def make_net(module=Net, criterion=nn.CrossEntropyLoss) -> NeuralNetClassifier:
    return NeuralNetClassifier(
        module, criterion=criterion, max_epochs=5, lr=0.1, batch_size=LOADER_BATCH, train_split=None, verbose=0
    )


def start(module=Net, criterion=nn.CrossEntropyLoss, strategy=None, per_class: int = 2):
    """A fitted learner on ``per_class`` samples of each class; the rest is the pool."""
    torch.manual_seed(0)
    X, k = blobs()
    labeled = np.concatenate([np.flatnonzero(k == c)[:per_class] for c in range(K)])
    pool = np.setdiff1d(np.arange(N), labeled)
    learner = ActiveLearner(
        estimator=make_net(module, criterion),
        query_strategy=strategy or DynamicAL(),
        X_training=X[labeled],
        y_training=k[labeled],
    )
    return learner, X[pool], k[pool]


def expected_picks(learner, X_pool, b: int, method: str = "dynamic", outputs=None, **options) -> list[int]:
    """What fastdal's own API picks on the learner's module: positions in X_pool."""
    module = learner.estimator.module_
    pool = DataLoader(TensorDataset(torch.tensor(X_pool)), batch_size=LOADER_BATCH)
    lab = DataLoader(
        TensorDataset(torch.tensor(learner.X_training), torch.tensor(learner.y_training)), batch_size=LOADER_BATCH
    )
    layers, rank = options.get("layers", "last"), options.get("rank")
    if method == "dynamic":
        return fastdal.query(
            module, pool, lab, b, outputs=outputs, layers=layers, gamma=options.get("gamma", 2.0)
        ).tolist()
    feats = fastdal.features(module, pool, layers=layers, rank=rank, seed=SEED, outputs=outputs)
    if method == "badge":
        return fastdal.select(feats, b, method="badge", seed=SEED).tolist()
    grad = fastdal.labeled_grad(module, lab, layers=layers, outputs=outputs)
    return fastdal.select(feats, b, method="greedy", labeled_grad=grad).tolist()


@pytest.mark.parametrize("b", [1, 2, 5])
@pytest.mark.parametrize("method", ["dynamic", "badge", "greedy"])
def test_picks_equal_fastdal(method, b):
    learner, X_pool, _ = start(strategy=DynamicAL(method=method, seed=SEED))
    indices, rows = learner.query(X_pool, n_instances=b)
    assert isinstance(indices, np.ndarray) and indices.dtype == np.int64 and indices.shape == (b,)
    assert indices.tolist() == expected_picks(learner, X_pool, b, method)
    np.testing.assert_array_equal(rows, X_pool[indices])


@pytest.mark.parametrize("method", ["dynamic", "badge", "greedy"])
def test_probability_module_under_nll_scores_its_log_probabilities(method):
    """skorch's default criterion: the module returns probabilities and the loss reads log(p + eps). The head's
    output is then not the logits, so BADGE's and greedy's features of it come projected (rank=)."""
    options = {} if method == "dynamic" else {"rank": 8}
    learner, X_pool, _ = start(SoftmaxNet, nn.NLLLoss, DynamicAL(method=method, seed=SEED, **options))
    indices, _ = learner.query(X_pool, n_instances=4)
    assert indices.tolist() == expected_picks(learner, X_pool, 4, method, outputs=LogOfProbabilities(), **options)


def test_nll_gradient_is_the_classifier_loss_gradient():
    """G from the adapter's outputs is the gradient of the summed loss skorch trains (its get_loss)."""
    learner, _, _ = start(SoftmaxNet, nn.NLLLoss)
    net, module = learner.estimator, learner.estimator.module_
    X, y = torch.tensor(learner.X_training), torch.tensor(learner.y_training)
    lab = DataLoader(TensorDataset(X, y), batch_size=LOADER_BATCH)
    grad = fastdal.labeled_grad(module, lab, layers="all", outputs=LogOfProbabilities())
    module.zero_grad()
    (net.get_loss(module(X), y) * len(y)).backward()  # skorch's loss is the batch mean
    for name, parameter in module.named_parameters():
        torch.testing.assert_close(grad[name], parameter.grad, rtol=1e-4, atol=1e-6)
    module.zero_grad(set_to_none=True)


def test_metrics_are_the_chosen_scores():
    learner, X_pool, _ = start()
    indices, _, metrics = learner.query(X_pool, n_instances=3, return_metrics=True)
    module = learner.estimator.module_
    pool = DataLoader(TensorDataset(torch.tensor(X_pool)), batch_size=LOADER_BATCH)
    lab = DataLoader(TensorDataset(torch.tensor(learner.X_training), torch.tensor(learner.y_training)))
    scores = fastdal.score(module, pool, fastdal.labeled_grad(module, lab)).double().numpy()
    np.testing.assert_allclose(metrics, scores[indices], rtol=1e-6)
    assert np.all(np.diff(metrics) <= 0)
    _, _, badge_metrics = start(strategy=DynamicAL(method="badge"))[0].query(X_pool, n_instances=3, return_metrics=True)
    assert badge_metrics.shape == (3,) and np.isnan(badge_metrics).all()


def test_two_instances_are_not_misread_as_a_pair():
    """modAL unpacks a strategy's result as (indices, metrics) first: two picks must stay two picks."""
    learner, X_pool, _ = start()
    indices, rows = learner.query(X_pool, n_instances=2)
    assert indices.shape == (2,) and rows.shape == (2, D)
    assert indices.tolist() == expected_picks(learner, X_pool, 2)


def test_list_and_tensor_pools_pick_as_the_array():
    learner, X_pool, _ = start()
    expected = expected_picks(learner, X_pool, 4)
    assert learner.query(X_pool.tolist(), n_instances=4)[0].tolist() == expected
    assert learner.query(torch.tensor(X_pool), n_instances=4)[0].tolist() == expected


@pytest.mark.parametrize("method", ["dynamic", "badge", "greedy"])
def test_plain_function_with_options_through_query(method):
    learner, X_pool, _ = start(strategy=dynamic_al)
    indices, _ = learner.query(X_pool, n_instances=3, method=method, seed=SEED, gamma=0.5)
    assert indices.tolist() == expected_picks(learner, X_pool, 3, method, gamma=0.5)


def test_projected_layers_equal_fastdal():
    learner, X_pool, _ = start(strategy=DynamicAL(method="badge", layers="all", rank=4, seed=SEED))
    indices, _ = learner.query(X_pool, n_instances=4)
    assert indices.tolist() == expected_picks(learner, X_pool, 4, "badge", layers="all", rank=4)


@pytest.mark.parametrize("method", ["dynamic", "badge", "greedy"])
def test_full_modal_loop(method):
    """query then teach for several rounds; each round's picks equal fastdal's on that round's model."""
    learner, X_pool, y_pool = start(strategy=DynamicAL(method=method, seed=SEED))
    labeled = len(learner.y_training)
    for _ in range(4):
        indices, _ = learner.query(X_pool, n_instances=5)
        assert indices.tolist() == expected_picks(learner, X_pool, 5, method)
        assert len(set(indices.tolist())) == 5
        learner.teach(X_pool[indices], y_pool[indices])
        X_pool, y_pool = np.delete(X_pool, indices, axis=0), np.delete(y_pool, indices)
        labeled += 5
        assert len(learner.y_training) == labeled and len(X_pool) == N - labeled
    assert learner.score(X_pool, y_pool) > 0.5


def test_model_state_comes_back():
    learner, X_pool, _ = start()
    module = learner.estimator.module_
    module.train()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    flags = [p.requires_grad for p in module.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in module.parameters()]  # skorch's last step's
    learner.query(X_pool, n_instances=3)
    assert module.training
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert [p.requires_grad for p in module.parameters()] == flags
    for grad, p in zip(grads, module.parameters()):
        assert (p.grad is None) if grad is None else torch.equal(p.grad, grad)


def test_zero_instances():
    learner, X_pool, _ = start()
    indices, metrics = DynamicAL()(learner, X_pool, n_instances=0)
    assert indices.shape == (0,) and metrics.shape == (0,)


def test_refuses_what_it_cannot_score():
    learner, X_pool, _ = start()
    with pytest.raises(ValueError, match="method must be one of"):
        DynamicAL(method="entropy")
    with pytest.raises(ValueError, match="batch_size"):
        DynamicAL(batch_size=0)
    with pytest.raises(ValueError, match="n_instances=100 is larger than X_pool"):
        DynamicAL()(learner, X_pool, n_instances=100)
    with pytest.raises(ValueError, match="n_instances must be a non-negative integer"):
        DynamicAL()(learner, X_pool, n_instances=1.5)
    with pytest.raises(TypeError, match="X_pool must be"):
        DynamicAL()(learner, {"x": X_pool}, n_instances=1)

    sklearn_learner = ActiveLearner(LogisticRegression(), X_training=X_pool[:6], y_training=np.arange(6) % K)
    with pytest.raises(TypeError, match="skorch.NeuralNetClassifier over a torch nn.Module, got LogisticRegression"):
        DynamicAL()(sklearn_learner, X_pool, n_instances=1)
    committee = Committee([learner, start()[0]])
    with pytest.raises(TypeError, match="ActiveLearner.*got Committee"):
        DynamicAL()(committee, X_pool, n_instances=1)

    unfitted = ActiveLearner(make_net())
    with pytest.raises(ValueError, match="not initialized"):
        DynamicAL()(unfitted, X_pool, n_instances=1)

    initialized = ActiveLearner(make_net().initialize())  # a module but no labeled set: BADGE only
    with pytest.raises(ValueError, match="no labeled set.*method='dynamic'"):
        DynamicAL()(initialized, X_pool, n_instances=1)
    assert DynamicAL(method="badge")(initialized, X_pool, n_instances=2)[0].shape == (2,)

    learner.y_training = learner.y_training + 0.5
    with pytest.raises(ValueError, match="class indices"):
        DynamicAL()(learner, X_pool, n_instances=1)

    odd = ActiveLearner(make_net(criterion=nn.MSELoss).initialize())
    odd.X_training, odd.y_training = X_pool[:3], np.arange(3)
    with pytest.raises(ValueError, match="MSELoss.*pass outputs="):
        DynamicAL()(odd, X_pool, n_instances=1)


def test_fastdal_import_does_not_import_modal():
    code = "import sys, fastdal, fastdal.integrations; assert 'modAL' not in sys.modules, 'modAL imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_missing_modal_says_how_to_install(monkeypatch):
    for name in [m for m in sys.modules if m == "modAL" or m.startswith("modAL.") or m == "fastdal.integrations.modal"]:
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "modAL", None)  # makes `import modAL` raise ImportError
    with pytest.raises(ImportError, match="pip install --no-deps modAL-python==0.4.2.1 skorch==1.4.0"):
        import fastdal.integrations.modal  # noqa: F401
