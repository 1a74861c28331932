"""Hugging Face-style models without glue: dict batches (``input_ids``, ``attention_mask``, ``labels``) and
outputs with a ``.logits`` field work with no mapping functions, and explicit mappings still win.

Tiny BERT and GPT-2 sequence classifiers are built from configs (nothing is downloaded), in float64, with
padded batches; ``labeled_grad`` and ``score`` with ``layers="last"`` and ``"all"`` are checked against the
float64 reference, which runs the model one sample at a time."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import fastdal

from conftest import relative_error

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install fastdal[hf])")

VOCAB, LENGTH, CLASSES, PAD = 40, 7, 3, 0


class TokenDataset(Dataset):
    """Padded token sequences as dicts, the way a tokenizer's output reaches a DataLoader."""

    def __init__(self, n: int, seed: int, labeled: bool) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, LENGTH), generator=g)
        lengths = torch.randint(2, LENGTH + 1, (n,), generator=g)
        self.mask = (torch.arange(LENGTH)[None, :] < lengths[:, None]).long()
        self.ids[self.mask == 0] = PAD
        self.labels = torch.randint(0, CLASSES, (n,), generator=g) if labeled else None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        item = {"input_ids": self.ids[i], "attention_mask": self.mask[i]}
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item


def bert() -> torch.nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
        num_labels=CLASSES,
        pad_token_id=PAD,
    )
    return transformers.BertForSequenceClassification(config)


def gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=16, num_labels=CLASSES, pad_token_id=PAD
    )
    return transformers.GPT2ForSequenceClassification(config)


MODELS = {"bert": bert, "gpt2": gpt2}


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return MODELS[name]().double().eval()


def _assert_same_grad(got, expected) -> None:
    """Equal up to float64 rounding, relative to the largest gradient entry: some gradients are zero in exact
    arithmetic (an attention key bias shifts every score of a query equally) and only rounding is left there."""
    scale = max(expected[n].abs().max().item() for n in expected.names)
    for n in expected.names:
        assert (got[n] - expected[n]).abs().max().item() <= 1e-9 * scale, n


@pytest.mark.parametrize("layers", ["last", "all"])
@pytest.mark.parametrize("name", list(MODELS))
def test_dict_batches_and_logits_outputs_match_the_reference(name: str, layers: str) -> None:
    model = _model(name)
    labeled = DataLoader(TokenDataset(10, seed=1, labeled=True), batch_size=4)
    # The pool's batches carry labels too: they must be neither passed to the model nor read.
    pool = DataLoader(TokenDataset(9, seed=2, labeled=True), batch_size=4)

    g = fastdal.labeled_grad(model, labeled, layers=layers)
    expected_g = fastdal.reference.labeled_grad(model, labeled, layers=layers)
    assert g.names == expected_g.names and len(g.names) > (0 if layers == "last" else 10)
    _assert_same_grad(g, expected_g)

    result = fastdal.score(model, pool, g, return_components=True)
    expected = fastdal.reference.score(model, pool, g, return_components=True)
    assert torch.equal(result.pseudo_label, expected.pseudo_label)
    for field in ("score", "sq_norm", "dot"):
        assert relative_error(getattr(result, field), getattr(expected, field)) < 1e-9, field

    picks = fastdal.query(model, pool, labeled, 4, layers=layers)
    assert torch.equal(picks, fastdal.select(expected.score, 4))


def test_explicit_mappings_still_win() -> None:
    """inputs=/labels=/outputs= given by the user are used as they are, even on dict batches."""
    model = _model("bert")
    labeled = DataLoader(TokenDataset(8, seed=3, labeled=True), batch_size=4)
    pool = DataLoader(TokenDataset(8, seed=4, labeled=False), batch_size=4)
    # Without the attention mask and with labels shifted by one: both must change the result.
    inputs = lambda batch: {"input_ids": batch["input_ids"]}  # noqa: E731
    labels = lambda batch: (batch["labels"] + 1) % CLASSES  # noqa: E731
    outputs = lambda out: out.logits * 2  # noqa: E731
    g = fastdal.labeled_grad(model, labeled, inputs=inputs, labels=labels, outputs=outputs)
    expected_g = fastdal.reference.labeled_grad(model, labeled, inputs=inputs, labels=labels, outputs=outputs)
    default_g = fastdal.labeled_grad(model, labeled)
    _assert_same_grad(g, expected_g)
    assert any(relative_error(g[n], default_g[n]) > 1e-3 for n in g.names)
    scores = fastdal.score(model, pool, g, inputs=inputs, outputs=outputs)
    expected = fastdal.reference.score(model, pool, g, inputs=inputs, outputs=outputs)
    assert relative_error(scores, expected) < 1e-9


def test_dict_batch_without_labels_is_a_clear_error() -> None:
    model = _model("bert")
    unlabeled = DataLoader(TokenDataset(4, seed=5, labeled=False), batch_size=4)
    with pytest.raises(TypeError, match="labels"):
        fastdal.labeled_grad(model, unlabeled)


def test_dict_batch_of_only_labels_is_a_clear_error() -> None:
    model = _model("bert")
    g = fastdal.labeled_grad(model, DataLoader(TokenDataset(4, seed=6, labeled=True), batch_size=4))
    with pytest.raises(TypeError, match="dict of keyword arguments"):
        fastdal.score(model, [{"labels": torch.zeros(2, dtype=torch.long)}], g)
