"""fastdal's whole-model score on the models people bring: Hugging Face transformers, a ConvNeXt, an LSTM, fastText.

Every model is built here from a small config (nothing is downloaded) and scored with ``layers="all"``:
``G = fastdal.labeled_grad(model, labeled, layers="all")`` once beforehand (not timed), then
``fastdal.score(model, pool, G, return_components=True)``. For each model:

* **fastdal / train step**: the score over one training step on the same pool batches (forward, cross-entropy at
  random labels, backward, SGD step, on a copy of the model). Both run in eval mode, so that dropout is off in
  both and they compute the same function.
* **torch.func / fastdal**: the same components from ``vmap(grad(per-sample loss))`` over ``functional_call`` of
  every parameter, in chunks of samples whose per-sample gradients fit in FUNC_CHUNK_BYTES; its agreement with
  fastdal is ``max_u |x_u - fastdal_u| / max_u |fastdal_u|``. Where torch.func raises, the first line of the
  exception is recorded instead ("cannot run").
* **warnings**: every ``fastdal:`` warning raised while fastdal computes G and the scores (a module or an
  operation fastdal has no closed form for, handled by its exact but slow generic path). The goal is none.
* **float64 exactness**: on a float64 copy of the model and a few samples in odd-sized batches, fastdal's G,
  scores, squared norms and dot products against ``fastdal.reference`` (float64 per-sample autograd), as
  ``max |a - b| / max |b|``. Any error above EXACT_TOLERANCE fails the run (non-zero exit, README untouched):
  a speed table of wrong scores is worse than none. The exactness checks run before any timing.

Timing follows bench/peers/worker.py: the first call of each method is its warm-up (and gives the scores that
are compared); then rounds, each timing every method once, the order reversed from one round to the next. One
timing repeats the call until MIN_SECONDS have passed and takes the mean per call; a torch.func whose first call
took more than SLOW_FACTOR training steps is timed by that call alone. Each ratio is the median over rounds of
the ratio within a round, which cancels most of a shared machine's drift.

Results go to bench/results/models-cpu.json and README.md (between the models markers); ``--out`` writes the JSON
elsewhere and leaves the README alone. ``--quick`` shrinks every model to tiny sizes, one round and one thread (a
smoke run for CI, whose timings mean nothing), writes its JSON to a temporary file (or ``--out``) and never touches
the README.

    python bench/bench_models.py [--rounds 7] [--threads N] [--models bert lstm ...] [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from machine import cpu_name
from torch import Tensor, nn
from torch.utils._pytree import tree_map

import fastdal

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
README_START, README_END = "<!-- models:start -->", "<!-- models:end -->"

# ---- every size in one place ----------------------------------------------------------------------------------
# Realistic but small: one training step over a pool takes roughly 0.1-1 s on a 2-core CPU. ``batch`` samples a
# batch, ``batches`` batches in the pool, ``classes`` logits; the labeled set (for G) is one batch. Pools hold more
# than one batch because fastdal probes the model on the first batch of each score call (fastdal/layout.py), a
# cost a real pool of many batches shares out (about 0.04 s a call for BERT here); a one-batch pool would charge
# all of it to one batch.
FULL: dict[str, dict[str, Any]] = {
    "bert": dict(vocab=8000, hidden=256, layers=2, heads=4, ffn=1024, seq=64, batch=32, batches=4, classes=4),
    "distilbert": dict(vocab=8000, hidden=256, layers=2, heads=4, ffn=1024, seq=64, batch=32, batches=4, classes=4),
    "gpt2": dict(vocab=8000, hidden=256, layers=2, heads=4, seq=64, batch=32, batches=4, classes=4),
    "vit": dict(image=32, patch=4, hidden=192, layers=4, heads=4, ffn=768, batch=32, batches=4, classes=10),
    "convnext": dict(image=64, dims=(48, 96, 192), depths=(2, 2, 4), batch=32, batches=4, classes=10),
    "lstm": dict(vocab=10000, embed=128, hidden=256, seq=64, batch=32, batches=4, classes=4),
    "fasttext": dict(vocab=20000, dim=64, tokens=(30, 70), batch=64, batches=8, classes=4),
}
# The same architectures at tiny sizes: the whole --quick run, exactness checks included, in well under a minute.
QUICK: dict[str, dict[str, Any]] = {
    "bert": dict(vocab=50, hidden=16, layers=2, heads=2, ffn=24, seq=9, batch=4, batches=2, classes=3),
    "distilbert": dict(vocab=50, hidden=16, layers=2, heads=2, ffn=24, seq=9, batch=4, batches=2, classes=3),
    "gpt2": dict(vocab=50, hidden=16, layers=2, heads=2, seq=9, batch=4, batches=2, classes=3),
    "vit": dict(image=8, patch=4, hidden=16, layers=2, heads=2, ffn=24, batch=4, batches=2, classes=5),
    "convnext": dict(image=16, dims=(8, 16, 32), depths=(1, 1, 2), batch=4, batches=2, classes=5),
    "lstm": dict(vocab=50, embed=8, hidden=12, seq=7, batch=4, batches=2, classes=3),
    "fasttext": dict(vocab=200, dim=8, tokens=(3, 9), batch=4, batches=2, classes=3),
}
EXACT_POOL, EXACT_LABELED, EXACT_BATCH = 5, 4, 3  # float64 checks: samples and batch size (odd, a ragged last)
EXACT_TOLERANCE = 1e-9  # float64 relative error above which the run fails
AGREEMENT_TOLERANCE = 1e-3  # torch.func (float32) against fastdal (float32): scores and squared norms
FUNC_CHUNK_BYTES = 256 * 2**20  # bound on one torch.func chunk's per-sample gradients (float32)
MIN_SECONDS = 0.5  # one timing repeats a call until this much time has passed
SLOW_FACTOR = 10.0  # a torch.func slower than this many training steps is timed by its first call
TRAIN_STEP_TARGET = 1.3  # fastdal at most this many training steps
PEER_TARGET = 1.5  # fastdal at least this many times faster than torch.func, where it runs


# ---- the models -------------------------------------------------------------------------------------------------


class ConvNeXtBlock(nn.Module):
    """ConvNeXt's block: depthwise 7x7 conv, channels-last LayerNorm and MLP, layer scale, residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        # A bare parameter multiplied in by hand, as ConvNeXt writes its layer scale; not 1e-6 as in the paper's
        # init, so that the branches' gradients are not all but vanishing.
        self.gamma = nn.Parameter(0.1 * torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        h = self.dwconv(x).permute(0, 2, 3, 1)  # (N, H, W, C): LayerNorm and Linear act on the last dimension
        h = self.pwconv2(self.act(self.pwconv1(self.norm(h))))
        return x + (self.gamma * h).permute(0, 3, 1, 2)


class ChannelsLastNorm(nn.Module):
    """nn.LayerNorm over the channels of an (N, C, H, W) map, by permuting to channels-last and back."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """A small ConvNeXt: 4x4 stride-4 stem, stages of blocks with LayerNorm + 2x2 stride-2 downsampling between
    them, global average pool, LayerNorm, Linear head."""

    def __init__(self, dims: tuple[int, ...], depths: tuple[int, ...], classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), ChannelsLastNorm(dims[0]))
        stages: list[nn.Module] = []
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            down = [] if i == 0 else [ChannelsLastNorm(dims[i - 1]), nn.Conv2d(dims[i - 1], dim, 2, stride=2)]
            stages.append(nn.Sequential(*down, *[ConvNeXtBlock(dim) for _ in range(depth)]))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.stages(self.stem(x)).mean(dim=(2, 3))))


class LSTMClassifier(nn.Module):
    """Embedding -> 2-layer bidirectional LSTM -> mean over time -> Linear."""

    def __init__(self, vocab: int, embed: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, ids: Tensor) -> Tensor:
        out, _ = self.lstm(self.embedding(ids))
        return self.head(out.mean(dim=1))


class FastText(nn.Module):
    """torchtext's text classifier: the mean of a bag of token embeddings -> Linear, called ``model(text,
    offsets)`` on every text of the batch concatenated into one flat tensor."""

    def __init__(self, vocab: int, dim: int, classes: int) -> None:
        super().__init__()
        self.embedding = nn.EmbeddingBag(vocab, dim, mode="mean")
        self.fc = nn.Linear(dim, classes)

    def forward(self, text: Tensor, offsets: Tensor) -> Tensor:
        return self.fc(self.embedding(text, offsets))


def _bert(c: dict) -> nn.Module:
    import transformers

    config = transformers.BertConfig(
        vocab_size=c["vocab"],
        hidden_size=c["hidden"],
        num_hidden_layers=c["layers"],
        num_attention_heads=c["heads"],
        intermediate_size=c["ffn"],
        max_position_embeddings=c["seq"],
        num_labels=c["classes"],
        pad_token_id=0,
    )
    return transformers.BertForSequenceClassification(config)


def _distilbert(c: dict) -> nn.Module:
    import transformers

    config = transformers.DistilBertConfig(
        vocab_size=c["vocab"],
        dim=c["hidden"],
        n_layers=c["layers"],
        n_heads=c["heads"],
        hidden_dim=c["ffn"],
        max_position_embeddings=c["seq"],
        num_labels=c["classes"],
        pad_token_id=0,
    )
    return transformers.DistilBertForSequenceClassification(config)


def _gpt2(c: dict) -> nn.Module:
    import transformers

    config = transformers.GPT2Config(
        vocab_size=c["vocab"],
        n_embd=c["hidden"],
        n_layer=c["layers"],
        n_head=c["heads"],
        n_positions=c["seq"],
        num_labels=c["classes"],
        pad_token_id=0,  # GPT2ForSequenceClassification reads the logits at each text's last non-pad token
        bos_token_id=c["vocab"] - 1,  # GPT-2's own ids (50256) lie outside a small vocabulary
        eos_token_id=c["vocab"] - 1,
    )
    return transformers.GPT2ForSequenceClassification(config)


def _vit(c: dict) -> nn.Module:
    import transformers

    config = transformers.ViTConfig(
        image_size=c["image"],
        patch_size=c["patch"],
        num_channels=3,
        hidden_size=c["hidden"],
        num_hidden_layers=c["layers"],
        num_attention_heads=c["heads"],
        intermediate_size=c["ffn"],
        num_labels=c["classes"],
    )
    return transformers.ViTForImageClassification(config)


# ---- samples and batches ----------------------------------------------------------------------------------------
# A model's input for a batch ("x") is one of three kinds, which decide how fastdal, the training step and
# torch.func call the model:
#   "kwargs": a dict of (N, ...) tensors, the model called model(**x) (Hugging Face text models);
#   "tensor": one (N, ...) tensor, model(x);
#   "flat":   (text, offsets), every sample's tokens in one flat tensor, model(text, offsets) (torchtext).


def _token_sample(c: dict, g: torch.Generator) -> dict[str, Tensor]:
    """One padded text: random ids, a random length of at least half the sequence, pad id 0 after it."""
    length = int(torch.randint(c["seq"] // 2, c["seq"] + 1, (1,), generator=g))
    mask = (torch.arange(c["seq"]) < length).long()
    ids = torch.randint(1, c["vocab"], (c["seq"],), generator=g) * mask
    return {"input_ids": ids, "attention_mask": mask}


def _image_sample(c: dict, g: torch.Generator) -> Tensor:
    return torch.randn(3, c["image"], c["image"], generator=g)


def _ids_sample(c: dict, g: torch.Generator) -> Tensor:
    return torch.randint(0, c["vocab"], (c["seq"],), generator=g)


def _bag_sample(c: dict, g: torch.Generator) -> Tensor:
    low, high = c["tokens"]
    length = int(torch.randint(low, high + 1, (1,), generator=g))
    return torch.randint(0, c["vocab"], (length,), generator=g)


@dataclass(frozen=True)
class Case:
    """One model: how to build it, what one sample looks like, and which kind of input it takes."""

    key: str
    label: str
    kind: str  # "kwargs", "tensor" or "flat" (see above)
    build: Callable[[dict], nn.Module]
    sample: Callable[[dict, torch.Generator], Any]


CASES: dict[str, Case] = {
    c.key: c
    for c in [
        Case("bert", "BERT (Hugging Face)", "kwargs", _bert, _token_sample),
        Case("distilbert", "DistilBERT (Hugging Face)", "kwargs", _distilbert, _token_sample),
        Case("gpt2", "GPT-2 (Hugging Face)", "kwargs", _gpt2, _token_sample),
        Case("vit", "ViT (Hugging Face)", "tensor", _vit, _image_sample),
        Case(
            "convnext",
            "ConvNeXt-style CNN",
            "tensor",
            lambda c: ConvNeXt(c["dims"], c["depths"], c["classes"]),
            _image_sample,
        ),
        Case(
            "lstm",
            "2-layer bidirectional LSTM",
            "tensor",
            lambda c: LSTMClassifier(c["vocab"], c["embed"], c["hidden"], c["classes"]),
            _ids_sample,
        ),
        Case(
            "fasttext",
            "fastText (EmbeddingBag, flat)",
            "flat",
            lambda c: FastText(c["vocab"], c["dim"], c["classes"]),
            _bag_sample,
        ),
    ]
}


def _collate(kind: str, samples: list[Any]) -> Any:
    """A batch's model input from its samples, the way a DataLoader's collate_fn would build it."""
    if kind == "kwargs":
        return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    if kind == "tensor":
        return torch.stack(samples)
    lengths = torch.tensor([len(s) for s in samples])
    return torch.cat(samples), torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])


@dataclass
class Batch:
    x: Any  # the model's input (see the kinds above)
    y: Tensor  # labels: true ones for the labeled set, random ones (the training step's) for the pool


def _make_batches(case: Case, c: dict, n: int, batch: int, seed: int, dtype: torch.dtype) -> list[Batch]:
    """n fresh samples with labels, collated into batches of ``batch`` (the last one possibly smaller)."""
    g = torch.Generator().manual_seed(seed)
    samples = [case.sample(c, g) for _ in range(n)]
    samples = [s.to(dtype) if isinstance(s, Tensor) and s.is_floating_point() else s for s in samples]
    labels = torch.randint(0, c["classes"], (n,), generator=g)
    return [Batch(_collate(case.kind, samples[i : i + batch]), labels[i : i + batch]) for i in range(0, n, batch)]


def _loader(kind: str, batches: list[Batch], labeled: bool) -> list[Any]:
    """fastdal's view of the batches (a list of batches is a loader visiting them in order): dict batches as a
    tokenizer and DataLoader give them (with "labels" in the labeled set), (x,) or (x, y) tuples for a tensor, and
    torchtext's (text, offsets, labels) triples for the flat layout."""
    if kind == "kwargs":
        return [{**b.x, "labels": b.y} if labeled else dict(b.x) for b in batches]
    if kind == "tensor":
        return [(b.x, b.y) if labeled else (b.x,) for b in batches]
    return [(b.x[0], b.x[1], b.y) for b in batches]


def _one_sample_loader(batches: list[Batch]) -> list[Any]:
    """The flat layout's batches as batches of one text each (the reference cannot cut a flat batch: its tensors
    do not hold the samples along dimension 0), with the same collate: (text, offsets=[0], label)."""
    out = []
    for b in batches:
        text, offsets = b.x
        ends = torch.cat([offsets[1:], torch.tensor([len(text)])])
        for i, (start, end) in enumerate(zip(offsets.tolist(), ends.tolist())):
            out.append((text[start:end], torch.zeros(1, dtype=torch.long), b.y[i : i + 1]))
    return out


def _fastdal_kwargs(kind: str) -> tuple[dict, dict]:
    """Mapping arguments of fastdal.score and fastdal.labeled_grad: only the flat layout needs any."""
    if kind != "flat":
        return {}, {}
    inputs = lambda b: (b[0], b[1])  # noqa: E731
    return {"inputs": inputs}, {"inputs": inputs, "labels": lambda b: b[2]}


def _logits(model: nn.Module, kind: str, x: Any) -> Tensor:
    out = model(**x) if kind == "kwargs" else model(*x) if kind == "flat" else model(x)
    return out if isinstance(out, Tensor) else out.logits


# ---- the methods ------------------------------------------------------------------------------------------------


@dataclass
class Scores:
    sq_norm: Tensor
    dot: Tensor

    @property
    def score(self) -> Tensor:
        return self.sq_norm + 2 * self.dot


def _train_step(model: nn.Module, kind: str, pool: list[Batch]) -> Callable[[], None]:
    """One SGD step per pool batch on a copy of the model, left in eval mode (dropout off, as in fastdal's pass)."""
    work = copy.deepcopy(model).eval()
    optimizer = torch.optim.SGD(work.parameters(), lr=1e-4)

    def run() -> None:
        for b in pool:
            optimizer.zero_grad()
            F.cross_entropy(_logits(work, kind, b.x), b.y).backward()
            optimizer.step()
        optimizer.zero_grad()  # frees .grad: every call starts from the same state

    return run


def _fastdal(model: nn.Module, kind: str, pool: list[Batch], G: fastdal.LabeledGrad) -> Callable[[], Scores]:
    loader = _loader(kind, pool, labeled=False)
    score_kwargs, _ = _fastdal_kwargs(kind)

    def run() -> Scores:
        result = fastdal.score(model, loader, G, return_components=True, **score_kwargs)
        return Scores(result.sq_norm, result.dot)

    return run


def _torch_func(model: nn.Module, kind: str, pool: list[Batch], G: dict[str, Tensor]) -> Callable[[], Scores]:
    """``vmap(grad(per-sample loss))`` over ``functional_call`` of the parameters G covers, at each sample's argmax
    label, in chunks of samples; the components from the materialized per-sample gradients."""
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters() if n in G}
    fixed = {n: p.detach() for n, p in model.named_parameters() if n not in G}
    buffers = dict(model.named_buffers())

    def sample_loss(p: dict[str, Tensor], x: Any) -> Tensor:
        one = tree_map(lambda t: t.unsqueeze(0), x)  # the sample as a batch of one
        logits = _logits(lambda *a, **k: functional_call(model, (p, fixed, buffers), a, k), kind, one)
        return F.cross_entropy(logits, logits.argmax(1), reduction="sum")

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0))
    chunk = max(1, FUNC_CHUNK_BYTES // (4 * sum(p.numel() for p in params.values())))

    def run() -> Scores:
        sq, dot = [], []
        for b in pool:
            n = len(b.y)
            for start in range(0, n, chunk):
                # A flat batch goes whole: vmap maps dimension 0 of each tensor, which is not where its samples are,
                # and raises, as it would for anyone who tried.
                rows = slice(start, start + chunk)
                part = tree_map(lambda t, rows=rows: t[rows], b.x) if kind != "flat" else b.x
                grads = per_sample(params, part)
                sq.append(sum(g.reshape(g.shape[0], -1).square().sum(1) for g in grads.values()))
                dot.append(sum(grads[k].reshape(grads[k].shape[0], -1) @ G[k].reshape(-1) for k in grads))
                del grads
        return Scores(torch.cat(sq), torch.cat(dot))

    return run


# ---- measurement -------------------------------------------------------------------------------------------------


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}"[:300]


def _raised_at(err: BaseException) -> str | None:
    """The innermost frame outside torch the exception passed through: where the model (or this script's call)
    does what vmap cannot map, e.g. "masking_utils.py:354: ... padding_mask.all()" in transformers."""
    inside_torch = str(Path(torch.__file__).parent)
    frames = [f for f in traceback.extract_tb(err.__traceback__) if not f.filename.startswith(inside_torch)]
    if not frames:
        return None
    f = frames[-1]
    return f"{Path(f.filename).name}:{f.lineno}: {(f.line or '').strip()}"[:200]


def _rel_err(a: Tensor, b: Tensor) -> float:
    """max |a - b| / max |b|: relative to the largest entry, since single entries may be zero or near it."""
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def _fastdal_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    """fastdal's own warnings (its generic path), each once, in the order they came."""
    messages = [str(w.message) for w in caught if str(w.message).startswith("fastdal:")]
    return list(dict.fromkeys(messages))


def _timed(fn: Callable[[], Any], min_seconds: float) -> float:
    """Seconds per call, the call repeated until min_seconds have passed (so that a pass of a few milliseconds
    is not one sample of the scheduler's noise)."""
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / calls


def exactness(case: Case, c: dict, model: nn.Module) -> tuple[dict, list[str]]:
    """fastdal against fastdal.reference on a float64 copy of the model, a few samples in odd-sized batches."""
    work = copy.deepcopy(model).double().eval()
    pool = _make_batches(case, c, EXACT_POOL, EXACT_BATCH, seed=11, dtype=torch.float64)
    labeled = _make_batches(case, c, EXACT_LABELED, EXACT_BATCH, seed=12, dtype=torch.float64)
    score_kwargs, grad_kwargs = _fastdal_kwargs(case.kind)
    fast_pool, fast_labeled = _loader(case.kind, pool, False), _loader(case.kind, labeled, True)
    # The reference cuts a batch into samples along dimension 0; a flat batch it gets one text at a time.
    ref_pool = _one_sample_loader(pool) if case.kind == "flat" else fast_pool
    ref_labeled = _one_sample_loader(labeled) if case.kind == "flat" else fast_labeled
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        G = fastdal.labeled_grad(work, fast_labeled, layers="all", **grad_kwargs)
        got = fastdal.score(work, fast_pool, G, return_components=True, **score_kwargs)
    ref_G = fastdal.reference.labeled_grad(work, ref_labeled, layers="all", dtype=torch.float64, **grad_kwargs)
    ref = fastdal.reference.score(work, ref_pool, G, dtype=torch.float64, return_components=True, **score_kwargs)
    names = list(ref_G.names)
    record = {
        "pool_samples": EXACT_POOL,
        "labeled_samples": EXACT_LABELED,
        "batch": EXACT_BATCH,
        "same_parameters": list(G.names) == names,
        "labeled_grad": _rel_err(
            torch.cat([G[n].reshape(-1) for n in names]), torch.cat([ref_G[n].reshape(-1) for n in names])
        ),
        "score": _rel_err(got.score, ref.score),
        "sq_norm": _rel_err(got.sq_norm, ref.sq_norm),
        "dot": _rel_err(got.dot, ref.dot),
        "pseudo_labels_equal": bool(torch.equal(got.pseudo_label, ref.pseudo_label)),
    }
    record["worst"] = max(record[k] for k in ("labeled_grad", "score", "sq_norm", "dot"))
    record["passes"] = (
        record["worst"] <= EXACT_TOLERANCE and record["same_parameters"] and record["pseudo_labels_equal"]
    )
    return record, _fastdal_warnings(caught)


def measure(case: Case, c: dict, rounds: int, min_seconds: float) -> dict:
    """Exactness, then the interleaved timing of the training step, fastdal and torch.func on one model."""
    started = time.perf_counter()
    torch.manual_seed(0)
    model = case.build(c).eval()
    record: dict[str, Any] = {
        "model": case.key,
        "label": case.label,
        "config": c,
        "batch": c["batch"],
        "pool": c["batch"] * c["batches"],
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    record["exactness"], warned = exactness(case, c, model)
    print(f"  {case.key}: float64 exactness {record['exactness']['worst']:.1e}", flush=True)

    pool = _make_batches(case, c, record["pool"], c["batch"], seed=1, dtype=torch.float32)
    labeled = _make_batches(case, c, c["batch"], c["batch"], seed=2, dtype=torch.float32)
    _, grad_kwargs = _fastdal_kwargs(case.kind)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        G = fastdal.labeled_grad(model, _loader(case.kind, labeled, True), layers="all", **grad_kwargs)
        record["scored_parameters"] = sum(G[n].numel() for n in G.names)
        runs: dict[str, Callable[[], Any]] = {
            "train step": _train_step(model, case.kind, pool),
            "fastdal": _fastdal(model, case.kind, pool, G),
        }
        first: dict[str, float] = {}
        outputs: dict[str, Any] = {}
        for name, fn in runs.items():  # the warm-up, which also gives fastdal's scores
            start = time.perf_counter()
            outputs[name] = fn()
            first[name] = time.perf_counter() - start
    record["fastdal_warnings"] = list(dict.fromkeys(warned + _fastdal_warnings(caught)))

    func: dict[str, Any] = {"status": "ok"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.func's own performance warnings are not fastdal's
        try:
            fn = _torch_func(model, case.kind, pool, dict(G.grads))
            start = time.perf_counter()
            scores = fn()
            first["torch.func"] = time.perf_counter() - start
            runs["torch.func"] = fn
            ours = outputs["fastdal"]
            func["agreement"] = {
                "sq_norm": _rel_err(scores.sq_norm, ours.sq_norm),
                "dot": _rel_err(scores.dot, ours.dot),
                "score": _rel_err(scores.score, ours.score),
            }
            func["agrees"] = max(func["agreement"]["sq_norm"], func["agreement"]["score"]) < AGREEMENT_TOLERANCE
        except Exception as err:  # torch.func cannot map this model: the reason is the result
            func = {
                "status": "cannot run",
                "error": _reason(err),
                "raised_at": _raised_at(err),
                "traceback": traceback.format_exc(limit=-3),
            }
    record["torch_func"] = func
    print(
        f"  {case.key}: torch.func {func['status']}" + (f" ({_cut(func['error'], 100)})" if "error" in func else ""),
        flush=True,
    )

    # A torch.func far slower than a training step is timed by its first call: more calls would take most of
    # the benchmark's time, for a ratio far from any target.
    slow = "torch.func" in first and first["torch.func"] > SLOW_FACTOR * first["train step"]
    func["timed_by"] = "first call" if slow else None
    order = [k for k in runs if not (slow and k == "torch.func")]
    seconds: dict[str, list[float]] = {k: [] for k in runs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # recorded above, once
        for r in range(rounds):
            for k in order if r % 2 == 0 else order[::-1]:
                seconds[k].append(_timed(runs[k], min_seconds))
    if slow:
        seconds["torch.func"] = [first["torch.func"]] * rounds  # one value, repeated so that rounds pair up
    ratios: dict[str, list[float]] = {
        "fastdal_over_train_step": [f / t for f, t in zip(seconds["fastdal"], seconds["train step"])]
    }
    if "torch.func" in runs:
        ratios["torch_func_over_fastdal"] = [t / f for t, f in zip(seconds["torch.func"], seconds["fastdal"])]
    record["first_call_seconds"] = first
    record["seconds_all"] = seconds
    record["seconds_median"] = {k: statistics.median(v) for k, v in seconds.items()}
    record["ratios_all"] = ratios
    record["ratios"] = {k: statistics.median(v) for k, v in ratios.items()}
    record["targets"] = _targets(record)
    record["seconds"] = time.perf_counter() - started
    print(f"  {case.key}: done in {record['seconds']:.1f} s", flush=True)
    return record


def _targets(record: dict) -> dict[str, bool | None]:
    """Which target holds: fastdal within TRAIN_STEP_TARGET training steps, and PEER_TARGET times faster than an
    agreeing torch.func (None where torch.func cannot run or disagrees: there is nothing to compare with)."""
    q = record["ratios"]
    func = record["torch_func"]
    peer = q["torch_func_over_fastdal"] >= PEER_TARGET if func["status"] == "ok" and func["agrees"] else None
    return {"train_step": q["fastdal_over_train_step"] <= TRAIN_STEP_TARGET, "torch_func": peer}


# ---- report -----------------------------------------------------------------------------------------------------


def _verdict(holds: bool) -> str:
    return "holds" if holds else "**misses**"


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _abbreviated(message: str) -> str:
    """A fastdal warning's subject: "fastdal: module 'lstm' (LSTM) has no closed form for [...]; ..." -> "module
    'lstm' (LSTM) has no closed form", "fastdal: operation 'mul' reads ['gamma'] with no closed form; ..." ->
    "operation 'mul' reads ['gamma']"."""
    text = message.removeprefix("fastdal:").strip().split(";")[0].split(" for [")[0].split(" with no closed form")[0]
    return _cut(text, 80)


def table(records: list[dict]) -> str:
    lines = [
        f"| model | batch / pool | fastdal / train step (<= {TRAIN_STEP_TARGET}x) | torch.func / fastdal "
        f"(>= {PEER_TARGET}x) | float64 exactness | fastdal warnings |",
        "|---|---|---|---|---|---|",
    ]
    for r in records:
        q, func, t = r["ratios"], r["torch_func"], r["targets"]
        train = f"{q['fastdal_over_train_step']:.2f}x, {_verdict(t['train_step'])}"
        if func["status"] != "ok":
            where = f" (at {_cut(func['raised_at'], 70)})" if func["raised_at"] else ""
            peer = f"cannot run: {_cut(func['error'], 70)}{where}".replace("|", "/")
        else:
            peer = f"{q['torch_func_over_fastdal']:.2f}x" + (" (one call)" if func["timed_by"] else "")
            if func["agrees"]:
                peer += f", {_verdict(t['torch_func'])}"
            else:
                peer += f", **disagrees** (score {func['agreement']['score']:.0e})"
        warned = "; ".join(_abbreviated(w) for w in r["fastdal_warnings"]).replace("|", "/") or "none"
        lines.append(
            f"| {r['label']} | {r['batch']} / {r['pool']} | {train} | {peer} | {r['exactness']['worst']:.0e} "
            f"| {warned} |"
        )
    return "\n".join(lines)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def footer(report: dict) -> str:
    quick = "; quick: tiny sizes, the timings mean nothing" if report["quick"] else ""
    return (
        f"({report['machine']}, {_plural(report['threads'], 'thread')}, torch {report['torch']}, transformers "
        f"{report['transformers']}; median over {_plural(report['rounds'], 'interleaved round')}; the run took "
        f"{report['seconds'] / 60:.1f} min{quick}.)"
    )


def update_readme(text: str) -> bool:
    """Replace what is between the README's models markers; False when the markers are missing."""
    readme = ROOT / "README.md"
    content = readme.read_text()
    if README_START not in content or README_END not in content:
        return False
    head, rest = content.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_START}\n{text}\n{README_END}{tail}")
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's, all cores; 1 with --quick)"
    )
    parser.add_argument("--models", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round, one thread; README untouched")
    parser.add_argument("--out", type=Path, default=None, help="results file (default: bench/results/models-cpu.json)")
    args = parser.parse_args()
    # A quick run's tiny ops are all thread start-up: on a 2-core machine shared with other jobs two threads made
    # the smoke run 4-6x slower (30-55 s against 8 s), and its timings mean nothing anyway.
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    sizes = QUICK if args.quick else FULL
    rounds = 1 if args.quick else args.rounds
    min_seconds = 0.0 if args.quick else MIN_SECONDS
    started = time.perf_counter()
    report: dict[str, Any] = {
        "machine": cpu_name(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "fastdal": fastdal.__version__,
        "quick": args.quick,
        "rounds": rounds,
        "min_seconds_per_timing": min_seconds,
        "date": time.strftime("%Y-%m-%d"),
        "targets": {
            "fastdal_over_train_step_at_most": TRAIN_STEP_TARGET,
            "torch_func_over_fastdal_at_least": PEER_TARGET,
            "float64_relative_error_at_most": EXACT_TOLERANCE,
        },
    }
    print(
        f"{report['machine']}, {_plural(report['threads'], 'thread')}, torch {report['torch']}, transformers "
        f"{report['transformers']}, {_plural(rounds, 'round')}{' (quick)' if args.quick else ''}",
        flush=True,
    )
    records = [measure(CASES[k], sizes[k], rounds, min_seconds) for k in args.models]
    report["seconds"] = time.perf_counter() - started
    report["results"] = records

    text = f"{table(records)}\n\n{footer(report)}"
    print(f"\n{text}\n")
    print(
        f"targets: fastdal at most {TRAIN_STEP_TARGET}x a training step; at least {PEER_TARGET}x faster than "
        f"torch.func where it runs and agrees; float64 relative error at most {EXACT_TOLERANCE:.0e}"
    )
    wrong = [r["model"] for r in records if not r["exactness"]["passes"]]
    if wrong or args.quick:  # a run whose scores miss the reference never replaces the results in bench/results
        out = args.out or Path(tempfile.mkdtemp(prefix="models-")) / "models-cpu.json"
    else:
        out = args.out or HERE / "results" / "models-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written: {out}")
    if wrong:
        sys.exit(
            f"fastdal misses its float64 reference (> {EXACT_TOLERANCE:.0e}) on {', '.join(wrong)}: "
            "README.md not updated"
        )
    if not args.quick and args.out is None:  # the README's table goes with the results file in bench/results
        print("README.md updated" if update_readme(text) else "README.md has no models markers: not updated")


if __name__ == "__main__":
    main()
