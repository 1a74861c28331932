"""fastdal.integrations.small_text against the real small-text: picks equal fastdal's own API, small-text's
PoolBasedActiveLearner runs with the strategy, and bad input gets a clear error.

Both classifier families run: KimCNNClassifier, and TransformerBasedClassification on a tiny BERT built
from a BertConfig and saved with its tokenizer to a local directory (nothing is downloaded).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("small_text", reason="small-text is not installed (pip install fastdal[small-text])")

from scipy.sparse import csr_matrix
from small_text import PoolBasedActiveLearner
from small_text.base import LABEL_UNLABELED
from small_text.integrations.pytorch.classifiers import KimCNNClassifier, KimCNNFactory
from small_text.integrations.pytorch.datasets import PytorchTextClassificationDataset
from small_text.query_strategies import EmptyPoolException, PoolExhaustedException

import fastdal
from fastdal.integrations.small_text import DynamicAL

CLASSES = 3
LENGTH = 12  # max_seq_len of the classifiers: every text is padded to it
VOCAB = 24  # token ids 1..23, 0 pads; ids 1 + 4c .. 4 + 4c mark class c, the rest is noise
POOL = 90
INITIAL = 12
BUDGET = 8
ROUNDS = 3
BATCH = 16
SEED = 3


pytestmark = pytest.mark.usefixtures("one_thread")


def token_lists(n: int = POOL, seed: int = 0) -> tuple[list[list[int]], np.ndarray]:
    """Texts of 4..LENGTH tokens, about half of them words of their class and the rest noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    texts = []
    for c in y:
        length = int(rng.integers(4, LENGTH + 1))
        own = rng.integers(1 + 4 * c, 5 + 4 * c, length)
        noise = rng.integers(1 + 4 * CLASSES, VOCAB, length)
        texts.append(np.where(rng.random(length) < 0.5, own, noise).tolist())
    return texts, y


def padded(texts: list[list[int]]) -> torch.Tensor:
    """The texts as the (N, LENGTH) id tensor KimCNN reads, built here independently of small-text."""
    x = torch.zeros(len(texts), LENGTH, dtype=torch.long)
    for i, t in enumerate(texts):
        x[i, : len(t)] = torch.tensor(t)
    return x


def kimcnn_dataset(texts: list[list[int]]) -> PytorchTextClassificationDataset:
    """The pool as small-text holds it: every sample unlabeled, the labels living in the learner's ``y``."""
    data = [(torch.tensor(t), LABEL_UNLABELED) for t in texts]
    return PytorchTextClassificationDataset(data, [f"w{i}" for i in range(VOCAB)], target_labels=np.arange(CLASSES))


KIMCNN_KWARGS = dict(
    embedding_matrix=torch.randn(VOCAB, 8, generator=torch.Generator().manual_seed(0)),
    num_epochs=1,
    mini_batch_size=BATCH,
    max_seq_len=LENGTH,
    out_channels=4,
    kernel_heights=[2, 3],
    device="cpu",
    verbosity=0,
)


def kimcnn() -> KimCNNClassifier:
    return KimCNNClassifier(CLASSES, **KIMCNN_KWARGS)


def fit(clf, dataset, indices: np.ndarray, y: np.ndarray):
    """Train ``clf`` on the labeled samples as PoolBasedActiveLearner does (a relabeled clone)."""
    train = dataset[indices].clone()
    train.y = y
    return clf.fit(train)


def expected_picks(method: str, layers: str, model, pool_loader, labeled_loader, unlabeled: np.ndarray, **kw):
    """What fastdal's own API picks, mapped to dataset indices here."""
    rank = kw.pop("rank", None)
    if method == "dynamic":
        positions = fastdal.query(model, pool_loader, labeled_loader, BUDGET, layers=layers, **kw)
    else:
        feats = fastdal.features(model, pool_loader, layers=layers, rank=rank, seed=SEED, **kw)
        if method == "badge":
            positions = fastdal.select(feats, BUDGET, method="badge", seed=SEED)
        else:
            grad = fastdal.labeled_grad(model, labeled_loader, layers=layers, **kw)
            positions = fastdal.select(feats, BUDGET, method="greedy", labeled_grad=grad)
    return unlabeled[positions.numpy()]


def run_rounds(clf, dataset, y_true, strategy, loaders, expected_kw):
    """ROUNDS of query and labeling; each round's picks are checked against fastdal's own API."""
    labeled = np.arange(INITIAL)
    fit(clf, dataset, labeled, y_true[labeled])
    y_before = dataset.y.copy()
    for _ in range(ROUNDS):
        unlabeled = np.setdiff1d(np.arange(len(dataset)), labeled)
        state = {k: v.clone() for k, v in clf.model.state_dict().items()}
        training = clf.model.training
        picks = strategy.query(clf, dataset, unlabeled, labeled, y_true[labeled], n=BUDGET)

        assert isinstance(picks, np.ndarray) and np.issubdtype(picks.dtype, np.integer)
        assert len(picks) == BUDGET and len(set(picks.tolist())) == BUDGET
        assert set(picks.tolist()) <= set(unlabeled.tolist())
        pool_loader, labeled_loader = loaders(unlabeled, labeled, y_true[labeled])
        a = strategy.acquisition
        want = expected_picks(a.method, a.layers, clf.model, pool_loader, labeled_loader, unlabeled, **expected_kw)
        np.testing.assert_array_equal(picks, want)
        # The user's model and data come back as they were.
        assert clf.model.training == training
        assert all(torch.equal(v, state[k]) for k, v in clf.model.state_dict().items())
        np.testing.assert_array_equal(dataset.y, y_before)

        labeled = np.concatenate([labeled, picks])
        fit(clf, dataset, labeled, y_true[labeled])


@pytest.fixture(scope="module")
def text_task():
    texts, y = token_lists()
    return texts, y, kimcnn_dataset(texts)


@pytest.mark.parametrize(
    "method, layers, rank",
    [
        ("dynamic", "last", None),
        ("dynamic", "all", None),
        ("badge", "last", None),
        ("greedy", "last", None),
        ("greedy", "all", 8),
    ],
)
def test_kimcnn_picks_equal_fastdal(text_task, method, layers, rank):
    texts, y_true, dataset = text_task
    x = padded(texts)

    def loaders(unlabeled, labeled, y_labeled):
        pool = DataLoader(TensorDataset(x[unlabeled]), batch_size=BATCH, shuffle=False)
        lab = DataLoader(TensorDataset(x[labeled], torch.as_tensor(y_labeled)), batch_size=BATCH, shuffle=False)
        return pool, lab

    strategy = DynamicAL(method, layers=layers, rank=rank, seed=SEED)
    run_rounds(kimcnn(), dataset, y_true, strategy, loaders, {"rank": rank} if method != "dynamic" else {})


def test_kimcnn_in_pool_based_active_learner(text_task):
    """small-text's own loop: initialize, then query / update with training between rounds; each query is
    the one fastdal.query makes from the learner's own labeled set and labels."""
    texts, y_true, dataset = text_task
    x = padded(texts)
    learner = PoolBasedActiveLearner(KimCNNFactory("kimcnn", CLASSES, KIMCNN_KWARGS), DynamicAL(), dataset)
    learner.initialize_data(np.arange(INITIAL), y_true[:INITIAL])
    for round_ in range(ROUNDS):
        labeled, y_labeled = learner.indices_labeled.copy(), learner.y.copy()
        unlabeled = np.setdiff1d(np.arange(POOL), labeled)
        queried = learner.query(num_samples=BUDGET)
        pool_loader = DataLoader(TensorDataset(x[unlabeled]), batch_size=BATCH)
        labeled_loader = DataLoader(TensorDataset(x[labeled], torch.as_tensor(y_labeled)), batch_size=BATCH)
        want = unlabeled[fastdal.query(learner.classifier.model, pool_loader, labeled_loader, BUDGET).numpy()]
        np.testing.assert_array_equal(queried, want)
        learner.update(y_true[queried])
        assert len(learner.indices_labeled) == INITIAL + (round_ + 1) * BUDGET
    assert np.array_equal(learner.y, y_true[learner.indices_labeled])


def test_user_mappings_win(text_task):
    texts, y_true, dataset = text_task
    clf = fit(kimcnn(), dataset, np.arange(INITIAL), y_true[:INITIAL])
    calls = {"inputs": 0, "outputs": 0}

    def inputs(batch):
        calls["inputs"] += 1
        return batch[0]

    def outputs(logits):
        calls["outputs"] += 1
        return 3.0 * logits  # a temperature changes the scores, so the mapping must be the one used

    unlabeled, labeled = np.arange(INITIAL, POOL), np.arange(INITIAL)
    picks = DynamicAL(inputs=inputs, outputs=outputs).query(clf, dataset, unlabeled, labeled, y_true[labeled], n=5)
    assert calls["inputs"] > 0 and calls["outputs"] > 0
    x = padded(texts)
    pool = DataLoader(TensorDataset(x[unlabeled]), batch_size=BATCH)
    lab = DataLoader(TensorDataset(x[labeled], torch.as_tensor(y_true[labeled])), batch_size=BATCH)
    want = fastdal.query(clf.model, pool, lab, 5, outputs=lambda logits: 3.0 * logits)
    np.testing.assert_array_equal(picks, unlabeled[want.numpy()])


# ---- TransformerBasedClassification on a tiny local BERT ----------------------------------------------------

WORDS = [f"w{i}" for i in range(1, VOCAB)]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A local model directory (BertConfig + random weights + tokenizer) and a TransformersDataset over it."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    from small_text.integrations.transformers import TransformersDataset

    directory = tmp_path_factory.mktemp("tiny-bert")
    (directory / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = transformers.BertTokenizer(vocab_file=str(directory / "vocab.txt"))
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=LENGTH + 4,
        num_labels=CLASSES,
    )
    transformers.BertForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)

    texts, y = token_lists(seed=1)
    strings = [" ".join(WORDS[t - 1] for t in text) for text in texts]
    enc = tokenizer(strings, padding="max_length", max_length=LENGTH, truncation=True, return_tensors="pt")
    data = [(enc["input_ids"][i : i + 1], enc["attention_mask"][i : i + 1], LABEL_UNLABELED) for i in range(len(y))]
    dataset = TransformersDataset(data, target_labels=np.arange(CLASSES))
    return directory, enc["input_ids"], enc["attention_mask"], y, dataset


def transformer_setup(directory) -> tuple:
    """The classifier's model arguments (the local directory, never the hub) and its keyword arguments."""
    from small_text.integrations.transformers import ModelLoadingStrategy, TransformerModelArguments

    arguments = TransformerModelArguments(str(directory), model_loading_strategy=ModelLoadingStrategy.ALWAYS_LOCAL)
    kwargs = dict(num_epochs=1, lr=1e-3, mini_batch_size=BATCH, device="cpu", verbosity=0, cache_dir=str(directory))
    return arguments, kwargs


def transformer_classifier(directory):
    from small_text.integrations.transformers import TransformerBasedClassification

    arguments, kwargs = transformer_setup(directory)
    return TransformerBasedClassification(arguments, CLASSES, **kwargs)


class DictRows(torch.utils.data.Dataset):
    """Rows of named tensors: DataLoader collates them into the dict batches Hugging Face models take."""

    def __init__(self, **columns: torch.Tensor) -> None:
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.columns.items()}


@pytest.mark.parametrize("method", ["dynamic", "badge", "greedy"])
def test_transformer_picks_equal_fastdal(tiny_bert, method):
    directory, ids, mask, y_true, dataset = tiny_bert

    def loaders(unlabeled, labeled, y_labeled):
        pool = DataLoader(DictRows(input_ids=ids[unlabeled], attention_mask=mask[unlabeled]), batch_size=BATCH)
        rows = DictRows(input_ids=ids[labeled], attention_mask=mask[labeled], labels=torch.as_tensor(y_labeled))
        return pool, DataLoader(rows, batch_size=BATCH)

    strategy = DynamicAL(method, seed=SEED)
    run_rounds(transformer_classifier(directory), dataset, y_true, strategy, loaders, {"outputs": lambda o: o.logits})


def test_transformer_in_pool_based_active_learner(tiny_bert):
    from small_text.integrations.transformers import TransformerBasedClassificationFactory

    directory, ids, mask, y_true, dataset = tiny_bert
    arguments, kwargs = transformer_setup(directory)
    factory = TransformerBasedClassificationFactory(arguments, CLASSES, kwargs)
    learner = PoolBasedActiveLearner(factory, DynamicAL("badge", seed=SEED), dataset, reuse_model=True)
    learner.initialize_data(np.arange(INITIAL), y_true[:INITIAL])
    for _ in range(ROUNDS):
        unlabeled = np.setdiff1d(np.arange(POOL), learner.indices_labeled)
        queried = learner.query(num_samples=BUDGET)
        pool = DataLoader(DictRows(input_ids=ids[unlabeled], attention_mask=mask[unlabeled]), batch_size=BATCH)
        feats = fastdal.features(learner.classifier.model, pool, seed=SEED, outputs=lambda o: o.logits)
        want = unlabeled[fastdal.select(feats, BUDGET, method="badge", seed=SEED).numpy()]
        np.testing.assert_array_equal(queried, want)
        learner.update(y_true[queried])
    assert len(learner.indices_labeled) == INITIAL + ROUNDS * BUDGET


# ---- bad input ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted(text_task):
    _, y_true, dataset = text_task
    return fit(kimcnn(), dataset, np.arange(INITIAL), y_true[:INITIAL]), dataset, y_true


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"method": "entropy"}, ValueError, "method"),
        ({"gamma": float("nan")}, ValueError, "gamma"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"batch_size": 2.5}, ValueError, "batch_size"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        DynamicAL(**kwargs)


def test_bad_query_arguments(fitted):
    clf, dataset, y_true = fitted
    labeled = np.arange(INITIAL)
    unlabeled = np.arange(INITIAL, POOL)
    y = y_true[labeled]
    strategy = DynamicAL()

    with pytest.raises(ValueError, match=r"clf\.model is None"):
        strategy.query(kimcnn(), dataset, unlabeled, labeled, y)
    with pytest.raises(TypeError, match="clf must be a small-text PyTorch classifier"):
        strategy.query(object(), dataset, unlabeled, labeled, y)
    with pytest.raises(TypeError, match="dataset must be"):
        strategy.query(clf, np.zeros((POOL, 4)), unlabeled, labeled, y)
    with pytest.raises(ValueError, match="indices_unlabeled holds index 90"):
        strategy.query(clf, dataset, np.arange(INITIAL, POOL + 1), labeled, y)
    with pytest.raises(TypeError, match="indices_labeled must be a one-dimensional array of integer"):
        strategy.query(clf, dataset, unlabeled, labeled.astype(float), y)
    with pytest.raises(ValueError, match="indices_unlabeled holds an index more than once"):
        strategy.query(clf, dataset, np.r_[unlabeled, INITIAL], labeled, y)
    with pytest.raises(ValueError, match="share index 11"):
        strategy.query(clf, dataset, np.arange(INITIAL - 1, POOL), labeled, y)
    with pytest.raises(ValueError, match="y must hold one label per index"):
        strategy.query(clf, dataset, unlabeled, labeled, y[:-1])
    with pytest.raises(ValueError, match="multi-label"):
        strategy.query(clf, dataset, unlabeled, labeled, csr_matrix(np.eye(INITIAL, CLASSES, dtype=int)))
    with pytest.raises(ValueError, match=r"y holds label 7 at position 0, outside \[0, 3\)"):
        strategy.query(clf, dataset, unlabeled, labeled, np.r_[7, y[1:]])
    with pytest.raises(TypeError, match="y must hold integer class labels"):
        strategy.query(clf, dataset, unlabeled, labeled, y.astype(float))
    with pytest.raises(ValueError, match="n must be a non-negative int"):
        strategy.query(clf, dataset, unlabeled, labeled, y, n=-1)
    with pytest.raises(PoolExhaustedException):
        strategy.query(clf, dataset, unlabeled, labeled, y, n=POOL)
    with pytest.raises(EmptyPoolException):
        strategy.query(clf, dataset, np.array([], dtype=int), labeled, y)
    with pytest.raises(ValueError, match="needs labeled samples, but indices_labeled is empty"):
        strategy.query(clf, dataset, unlabeled, np.array([], dtype=int), np.array([], dtype=int))
    # BADGE reads no labeled set, so an empty one is fine.
    picks = DynamicAL("badge").query(clf, dataset, unlabeled, np.array([], dtype=int), np.array([], dtype=int), n=4)
    assert len(picks) == 4 and set(picks.tolist()) <= set(unlabeled.tolist())
