"""Hugging Face-style models without glue: dict batches (``input_ids``, ``attention_mask``, ``labels``) and
outputs with a ``.logits`` field work with no mapping functions, and explicit mappings still win.

Tiny BERT, DistilBERT, GPT-2 (also returning its hidden states), T5, BART and ViT classifiers are built from
configs (nothing is downloaded), in float64, with padded batches; ``labeled_grad`` and ``score`` with
``layers="last"`` and ``"all"`` are checked against the float64 reference, which runs the model one sample at a
time. Every parameter of them has a closed form, at the module or at the operation that uses it (GPT-2's
``Conv1D`` by ``addmm``, position tables looked up with shared ids, T5's relative attention bias inside
``scaled_dot_product_attention``, ViT's class token and position table): no fastdal fallback warning."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import fastdal

from conftest import relative_error
from helpers import assert_same_state, snapshot

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


def gpt2_hidden_states() -> torch.nn.Module:
    """Its hidden states, returned, are also what its next blocks read: each use must count once."""
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=16,
        num_labels=CLASSES,
        pad_token_id=PAD,
        output_hidden_states=True,
    )
    return transformers.GPT2ForSequenceClassification(config)


def distilbert() -> torch.nn.Module:
    config = transformers.DistilBertConfig(
        vocab_size=VOCAB,
        dim=16,
        n_layers=2,
        n_heads=2,
        hidden_dim=24,
        max_position_embeddings=16,
        num_labels=CLASSES,
        pad_token_id=PAD,
    )
    return transformers.DistilBertForSequenceClassification(config)


# T5 and BART classify from the last end-of-sequence token: every sequence ends in one (EOS), none elsewhere.
EOS = 2


def t5() -> torch.nn.Module:
    config = transformers.T5Config(
        vocab_size=VOCAB,
        d_model=16,
        d_kv=8,
        d_ff=24,
        num_layers=2,
        num_heads=2,
        num_labels=CLASSES,
        pad_token_id=PAD,
        eos_token_id=EOS,
        decoder_start_token_id=PAD,
        relative_attention_num_buckets=8,
    )
    return transformers.T5ForSequenceClassification(config)


def bart() -> torch.nn.Module:
    config = transformers.BartConfig(
        vocab_size=VOCAB,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=24,
        decoder_ffn_dim=24,
        max_position_embeddings=16,
        num_labels=CLASSES,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=1,
    )
    return transformers.BartForSequenceClassification(config)


MODELS = {
    "bert": bert,
    "gpt2": gpt2,
    "gpt2_hidden_states": gpt2_hidden_states,
    "distilbert": distilbert,
    "t5": t5,
    "bart": bart,
}
ENDS_IN_EOS = ("t5", "bart")


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return MODELS[name]().double().eval()


def _assert_same_grad(got, expected) -> None:
    """Equal up to float64 rounding, relative to the largest gradient entry: some gradients are zero in exact
    arithmetic (an attention key bias shifts every score of a query equally) and only rounding is left there."""
    scale = max(expected[n].abs().max().item() for n in expected.names)
    for n in expected.names:
        assert (got[n] - expected[n]).abs().max().item() <= 1e-9 * scale, n


def _ending_in_eos(data: TokenDataset) -> TokenDataset:
    """Full-length sequences of ids above EOS, each ending in one EOS (what T5's and BART's heads read)."""
    data.ids = torch.randint(EOS + 1, VOCAB, data.ids.shape, generator=torch.Generator().manual_seed(7))
    data.ids[:, -1] = EOS
    data.mask[:] = 1
    return data


@pytest.mark.parametrize("layers", ["last", "all"])
@pytest.mark.parametrize("name", list(MODELS))
def test_dict_batches_and_logits_outputs_match_the_reference(name: str, layers: str) -> None:
    model = _model(name)
    labeled_data, pool_data = TokenDataset(10, seed=1, labeled=True), TokenDataset(9, seed=2, labeled=True)
    if name in ENDS_IN_EOS:
        labeled_data, pool_data = _ending_in_eos(labeled_data), _ending_in_eos(pool_data)
    labeled = DataLoader(labeled_data, batch_size=4)
    # The pool's batches carry labels too: they must be neither passed to the model nor read.
    pool = DataLoader(pool_data, batch_size=4)

    with torch.no_grad():  # transformers installs hooks of its own on the first forward returning hidden states
        model(**{k: v for k, v in next(iter(pool)).items() if k != "labels"})
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fastdal:")
        g = fastdal.labeled_grad(model, labeled, layers=layers)
        result = fastdal.score(model, pool, g, return_components=True)
    assert_same_state(before, snapshot(model))
    expected_g = fastdal.reference.labeled_grad(model, labeled, layers=layers)
    assert g.names == expected_g.names and len(g.names) > (0 if layers == "last" else 10)
    _assert_same_grad(g, expected_g)

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


class ImageDataset(Dataset):
    """Images as dicts of ``pixel_values`` (what a ViT image processor gives), with labels."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64)
        self.labels = torch.randint(0, CLASSES, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.x[i], "labels": self.labels[i]}


@pytest.mark.parametrize("layers", ["last", "all"])
def test_vit_class_token_and_position_table(layers: str) -> None:
    """ViT's class token is expanded along the batch and concatenated, its position table added: both bare
    parameters, read where those operations use them."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        num_labels=CLASSES,
    )
    model = transformers.ViTForImageClassification(config).double().eval()
    labeled = DataLoader(ImageDataset(6, seed=1), batch_size=4)
    pool = DataLoader(ImageDataset(9, seed=2), batch_size=4)
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fastdal:")
        g = fastdal.labeled_grad(model, labeled, layers=layers)
        result = fastdal.score(model, pool, g, return_components=True)
    assert_same_state(before, snapshot(model))
    if layers == "all":
        assert {"vit.embeddings.cls_token", "vit.embeddings.position_embeddings"} <= set(g.names)
    _assert_same_grad(g, fastdal.reference.labeled_grad(model, labeled, layers=layers))
    expected = fastdal.reference.score(model, pool, g, return_components=True)
    for field in ("score", "sq_norm", "dot"):
        assert relative_error(getattr(result, field), getattr(expected, field)) < 1e-9, field
