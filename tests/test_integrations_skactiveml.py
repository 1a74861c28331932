"""fastdal.integrations.skactiveml against the real scikit-activeml and skorch: picks equal fastdal's own API."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("skactiveml", reason="scikit-activeml is not installed: pip install fastdal[skactiveml]")
pytest.importorskip("skorch", reason="skorch is not installed: pip install fastdal[skactiveml]")

import numpy as np
import torch
from skactiveml.classifier import ParzenWindowClassifier, SkorchClassifier
from skactiveml.pool import SubSamplingWrapper
from skactiveml.utils import check_random_state
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastdal
from fastdal.integrations.skactiveml import DynamicAL

N, D, K, B = 90, 6, 3, 4
LOADER_BATCH = 32
RANDOM_STATE = 7
# Raw labels the module never sees: non-contiguous integers (NaN marks unlabeled, the library's default)
# and strings (None marks unlabeled). Each tuple is sorted, so class index k is the position in it.
LABEL_KINDS = {
    "int": ((3, 7, 9), np.nan),
    "str": (("cat", "dog", "emu"), None),
}


pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(D, 16), nn.ReLU())
        self.head = nn.Linear(16, K)

    def forward(self, x):
        return self.head(self.body(x))


class TwoOutputNet(Net):
    """Returns (logits, embedding), read by the classifier through forward_outputs."""

    def forward(self, x):
        h = self.body(x)
        return self.head(h), h


def blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three Gaussian blobs: samples and their class index."""
    rng = np.random.RandomState(seed)
    centers = rng.randn(K, D) * 2.5
    k = np.arange(N) % K
    rng.shuffle(k)
    return centers[k] + rng.randn(N, D), k


def make_clf(kind: str = "int", module=Net, **kwargs) -> SkorchClassifier:
    classes, missing = LABEL_KINDS[kind]
    params = dict(max_epochs=5, lr=0.1, batch_size=LOADER_BATCH, train_split=None, verbose=0)
    return SkorchClassifier(
        module, classes=list(classes), missing_label=missing, neural_net_param_dict=params, random_state=0, **kwargs
    )


def start(kind: str, per_class: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """X, y (only ``per_class`` samples of each class labeled), y_true and the labeled mask."""
    classes, missing = LABEL_KINDS[kind]
    X, k = blobs()
    y_true = np.array([classes[i] for i in k], dtype=object if kind == "str" else float)
    labeled = np.zeros(N, dtype=bool)
    for c in range(K):
        labeled[np.flatnonzero(k == c)[:per_class]] = True
    y = y_true.copy()
    y[~labeled] = missing
    return X, y, y_true, labeled


def loaders(X: np.ndarray, labeled: np.ndarray, pool_rows: np.ndarray) -> tuple[DataLoader, DataLoader]:
    """The pool and labeled loaders, built here from the raw arrays and the known class indices."""
    _, k = blobs()
    pool = DataLoader(TensorDataset(torch.tensor(pool_rows, dtype=torch.float32)), batch_size=LOADER_BATCH)
    lab = TensorDataset(torch.tensor(X[labeled], dtype=torch.float32), torch.tensor(k[labeled]))
    return pool, DataLoader(lab, batch_size=LOADER_BATCH)


def fastdal_positions(module, pool, lab, method: str, seed: int, **options) -> list[int]:
    """What fastdal's own API picks: positions in the pool loader."""
    if method == "dynamic":
        return fastdal.query(module, pool, lab, B, **options).tolist()
    layers, rank = options.get("layers", "last"), options.get("rank")
    feats = fastdal.features(module, pool, layers=layers, rank=rank, seed=seed)
    if method == "badge":
        return fastdal.select(feats, B, method="badge", seed=seed).tolist()
    grad = fastdal.labeled_grad(module, lab, layers=layers)
    return fastdal.select(feats, B, method="greedy", labeled_grad=grad).tolist()


def run_rounds(method: str, candidates: str, kind: str, rounds: int = 3, **options) -> None:
    """Label ``rounds`` times with the adapter; every round, its picks equal fastdal's on the same model."""
    torch.manual_seed(0)
    X, y, y_true, labeled = start(kind)
    clf = make_clf(kind)
    strategy = DynamicAL(method=method, missing_label=LABEL_KINDS[kind][1], random_state=RANDOM_STATE, **options)
    for _ in range(rounds):
        clf.fit(X, y)
        if candidates == "indices":  # every other sample, labeled ones included: those are skipped
            cand = np.arange(0, N, 2)
            pool_index = cand[~labeled[cand]]
        else:
            pool_index = np.flatnonzero(~labeled)
            cand = X[pool_index] if candidates == "samples" else None
        got = strategy.query(X, y, clf, fit_clf=False, candidates=cand, batch_size=B)

        # scikit-activeml seeds each query from random_state and the number of unlabeled samples + 1.
        seed = int(check_random_state(RANDOM_STATE, int((~labeled).sum()) + 1).randint(0, 2**31 - 1))
        pool, lab = loaders(X, labeled, X[pool_index])
        positions = fastdal_positions(clf.neural_net_.module_, pool, lab, method, seed, **options)
        # Indices refer to X, or to the candidates when those are samples (here: the pool rows in order).
        expected = positions if candidates == "samples" else pool_index[positions].tolist()
        assert isinstance(got, np.ndarray) and got.shape == (B,)
        assert got.tolist() == expected
        rows = pool_index[got] if candidates == "samples" else got
        assert not labeled[rows].any()
        y[rows], labeled[rows] = y_true[rows], True


@pytest.mark.parametrize("kind", sorted(LABEL_KINDS))
@pytest.mark.parametrize("candidates", ["none", "indices", "samples"])
@pytest.mark.parametrize("method", ["dynamic", "badge", "greedy"])
def test_picks_equal_fastdal_over_rounds(method, candidates, kind):
    run_rounds(method, candidates, kind)


@pytest.mark.parametrize("method", ["badge", "greedy"])
def test_projected_layers_equal_fastdal(method):
    """layers="all" with a rank: the projection seed follows random_state as BADGE's draws do."""
    run_rounds(method, "none", "int", layers="all", rank=4)


def test_gamma_reaches_the_score():
    run_rounds("dynamic", "none", "str", rounds=1, gamma=0.5)


def test_module_with_several_outputs_uses_the_criterion_output():
    """forward_outputs={"proba": (0, softmax), "emb": (1, None)}: the logits are output 0."""
    X, y, _, labeled = start("int")
    clf = make_clf("int", TwoOutputNet, forward_outputs={"proba": (0, nn.Softmax(dim=-1)), "emb": (1, None)}).fit(X, y)
    got = DynamicAL().query(X, y, clf, fit_clf=False, batch_size=B)
    pool_index = np.flatnonzero(~labeled)
    pool, lab = loaders(X, labeled, X[pool_index])
    expected = fastdal.query(clf.neural_net_.module_, pool, lab, B, outputs=lambda out: out[0])
    assert got.tolist() == pool_index[expected.numpy()].tolist()


def fitted(kind: str = "int"):
    torch.manual_seed(0)
    X, y, y_true, labeled = start(kind)
    return X, y, y_true, labeled, make_clf(kind).fit(X, y)


def test_dynamic_utilities_are_the_scores_in_the_library_layout():
    X, y, _, labeled, clf = fitted()
    idx, util = DynamicAL(random_state=0).query(X, y, clf, fit_clf=False, batch_size=B, return_utilities=True)
    assert util.shape == (B, N)
    assert np.isnan(util[:, labeled]).all()
    pool_index = np.flatnonzero(~labeled)
    pool, lab = loaders(X, labeled, X[pool_index])
    module = clf.neural_net_.module_
    scores = fastdal.score(module, pool, fastdal.labeled_grad(module, lab)).double().numpy()
    np.testing.assert_allclose(util[0, pool_index], scores, rtol=1e-6)
    for i in range(B):
        assert np.isnan(util[i, idx[:i]]).all()
        assert np.count_nonzero(~np.isnan(util[i])) == len(pool_index) - i
        assert np.nanargmax(util[i]) == idx[i]  # each row's best is the row's pick


@pytest.mark.parametrize("method", ["dynamic", "badge", "greedy"])
def test_utilities_with_candidate_indices_and_samples(method):
    X, y, _, labeled, clf = fitted()
    strategy = DynamicAL(method=method, random_state=0)
    cand = np.arange(0, N, 3)
    idx, util = strategy.query(X, y, clf, fit_clf=False, candidates=cand, batch_size=B, return_utilities=True)
    assert util.shape == (B, N)
    outside = np.ones(N, dtype=bool)
    outside[cand[~labeled[cand]]] = False  # the unlabeled candidates
    assert np.isnan(util[:, outside]).all()
    assert set(idx.tolist()) <= set(cand.tolist()) and not labeled[idx].any()

    samples = X[:10] + 0.5  # not in X
    idx, util = strategy.query(X, y, clf, fit_clf=False, candidates=samples, batch_size=B, return_utilities=True)
    assert util.shape == (B, 10)
    assert np.all((idx >= 0) & (idx < 10)) and len(set(idx.tolist())) == B
    for i in range(B):
        assert np.isnan(util[i, idx[:i]]).all()
        assert np.count_nonzero(~np.isnan(util[i])) == 10 - i
        assert np.nanargmax(util[i]) == idx[i]


@pytest.mark.parametrize("method", ["badge", "greedy"])
def test_batch_method_utilities_mark_each_pick(method):
    X, y, _, labeled, clf = fitted()
    idx, util = DynamicAL(method=method, random_state=0).query(
        X, y, clf, fit_clf=False, batch_size=B, return_utilities=True
    )
    remaining = int((~labeled).sum())
    for i in range(B):
        assert util[i, idx[i]] == 1.0
        assert np.count_nonzero(util[i] == 1.0) == 1
        assert np.count_nonzero(util[i] == 0.0) == remaining - i - 1
        assert np.isnan(util[i, idx[:i]]).all() and np.isnan(util[i, labeled]).all()


def test_query_leaves_the_classifier_as_it_was():
    X, y, _, _, clf = fitted()
    module = clf.neural_net_.module_
    module.train()
    before = {n: t.clone() for n, t in module.state_dict().items()}
    for method in ("dynamic", "badge", "greedy"):
        DynamicAL(method=method).query(X, y, clf, fit_clf=False, batch_size=B)
        DynamicAL(method=method).query(X, y, clf, batch_size=B)  # fits a clone
    assert clf.neural_net_.module_ is module and module.training
    assert all(torch.equal(before[n], t) for n, t in module.state_dict().items())

    fresh = make_clf()
    idx = DynamicAL().query(X, y, fresh, batch_size=B)  # fit_clf=True: the library fits a clone
    assert not hasattr(fresh, "neural_net_") and len(idx) == B


def test_badge_runs_without_labels_and_dynamic_says_why_it_cannot():
    X, _, _, _ = start("int")
    y = np.full(N, np.nan)
    clf = make_clf().fit(X, y)  # classes are given: an initialized, untrained network
    idx = DynamicAL(method="badge", random_state=0).query(X, y, clf, fit_clf=False, batch_size=B)
    assert len(set(idx.tolist())) == B
    for method in ("dynamic", "greedy"):
        with pytest.raises(ValueError, match="y has no labeled sample"):
            DynamicAL(method=method).query(X, y, clf, fit_clf=False, batch_size=B)


def test_batch_size_larger_than_the_unlabeled_candidates_is_cut_with_a_warning():
    X, y, _, labeled, clf = fitted()
    cand = np.concatenate([np.flatnonzero(labeled), np.flatnonzero(~labeled)[:2]])
    with pytest.warns(UserWarning, match="batch_size=2"):
        idx = DynamicAL().query(X, y, clf, fit_clf=False, candidates=cand, batch_size=B)
    assert sorted(idx.tolist()) == sorted(np.flatnonzero(~labeled)[:2].tolist())


def test_the_library_loop_end_to_end():
    """scikit-activeml's own cycle (query with fit_clf=True, label, refit), and its SubSamplingWrapper."""
    torch.manual_seed(0)
    X, y, y_true, _ = start("int", per_class=1)
    clf = make_clf()
    clf.fit(X, y)
    for strategy in (DynamicAL(random_state=0), SubSamplingWrapper(DynamicAL(random_state=0), max_candidates=30)):
        for _ in range(3):
            idx = strategy.query(X=X, y=y, clf=clf, batch_size=B)
            assert len(set(np.asarray(idx).tolist())) == B and np.isnan(y[idx]).all()
            y[idx] = y_true[idx]
            clf.fit(X, y)
    assert np.count_nonzero(~np.isnan(y)) == K + 2 * 3 * B
    assert clf.score(X, y_true) > 1 / K + 0.2  # blobs are easy: well above chance after a few rounds


def test_bad_input_errors():
    X, y, _, _, clf = fitted()
    with pytest.raises(ValueError, match="method"):
        DynamicAL(method="entropy").query(X, y, clf, fit_clf=False)
    with pytest.raises(ValueError, match="gamma"):
        DynamicAL(gamma=float("nan")).query(X, y, clf, fit_clf=False)
    with pytest.raises(ValueError, match="batch_size_loader"):
        DynamicAL(batch_size_loader=0).query(X, y, clf, fit_clf=False)
    with pytest.raises(TypeError, match="outputs"):
        DynamicAL(outputs="logits").query(X, y, clf, fit_clf=False)
    with pytest.raises(TypeError, match="clf"):
        DynamicAL().query(X, y, ParzenWindowClassifier(classes=[3, 7, 9]))
    with pytest.raises(ValueError, match="clf is not fitted"):
        DynamicAL().query(X, y, make_clf(), fit_clf=False)
    with pytest.raises(ValueError, match="missing_label"), pytest.warns(UserWarning, match="batch_size"):
        DynamicAL(missing_label=-1).query(X, y, clf, fit_clf=False)  # -1 marks nothing: all labeled, 0 candidates
    with pytest.raises(ValueError, match="sample_weight"):
        DynamicAL().query(X, y, clf, sample_weight=np.ones(N))
    unknown = y.copy()
    unknown[np.flatnonzero(~np.isnan(y))[0]] = 5
    with pytest.raises(ValueError, match=r"y holds labels \['5.0'\]"):
        DynamicAL().query(X, unknown, clf, fit_clf=False)
    mse = make_clf(criterion=nn.MSELoss)
    mse.neural_net_, mse.classes_ = clf.neural_net_, clf.classes_  # fitted as far as the strategy can tell
    with pytest.raises(ValueError, match="outputs="):
        DynamicAL().query(X, y, mse, fit_clf=False)
    with pytest.raises(ValueError, match="batch_size"):
        DynamicAL().query(X, y, clf, fit_clf=False, batch_size=0)


def test_fastdal_does_not_import_the_library_and_a_missing_one_says_how_to_install():
    code = (
        "import sys\n"
        "import fastdal, fastdal.integrations\n"
        "assert 'skactiveml' not in sys.modules and 'skorch' not in sys.modules, 'imported too early'\n"
        "sys.modules['skactiveml'] = None  # as if it were not installed\n"
        "try:\n"
        "    import fastdal.integrations.skactiveml\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "pip install fastdal[skactiveml]" in done.stdout
