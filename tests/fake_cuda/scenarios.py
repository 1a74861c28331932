"""fastdal's public functions on CUDA-resident models, on fake CUDA tensors (tests/fake_cuda/harness.py).

Run in a process of its own (fake CUDA must be loaded before torch):

    python tests/fake_cuda/scenarios.py OUT.json [--plant cpu-term|host-wait] [--only NAME ...]

Each scenario builds a model on the CPU, puts it on fake ``cuda:0`` and runs ``labeled_grad``, ``score``,
``features``, ``select`` and ``query`` on it, for ``layers`` "last", "all" and a module list, on the backends
auto, torch, cuda and triton (and through ``FASTDAL_BACKEND``), for float32, bfloat16 and float64 models. Every
pool is scored twice, in batches of two sizes, so that a launch count per batch that grows with the batch size
shows. OUT.json lists, per scenario: the error if one was raised (a device mismatch among them), every host wait
with the fastdal frames that asked for it, the launches per batch, and Triton's launch problems.

``--plant`` puts a fault in on purpose, for the test that the suite catches it: ``cpu-term`` makes one per-layer
term a CPU tensor, ``host-wait`` adds an ``.item()`` to the per-batch path.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import boot

boot.boot()

import harness as H  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import fastdal  # noqa: E402

# --------------------------------------------------------------------------------------------------
# Models of every family fastdal has a closed form for
# --------------------------------------------------------------------------------------------------


class CNN(nn.Module):
    """BatchNorm; grouped, strided and dilated convolutions; a reflect-padded Conv1d with GroupNorm."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, stride=2, groups=4, dilation=1)
        self.wide = nn.Conv2d(8, 16, 1)
        self.conv1d = nn.Conv1d(16, 8, 3, padding=1, padding_mode="reflect")
        self.gn = nn.GroupNorm(2, 8)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        h = torch.relu(self.wide(self.grouped(h)))
        h = self.gn(self.conv1d(h.flatten(2)))
        return self.head(h.mean(-1))


class Transformer(nn.Module):
    """A padded Embedding, a broadcast position parameter, a TransformerEncoderLayer, a sequence-first
    MultiheadAttention with kdim/vdim and a key padding mask, LayerNorm and RMSNorm, a bare layer scale."""

    def __init__(self, vocab: int = 20, d: int = 8, t: int = 6, classes: int = 3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(1, t, d) * 0.1)
        self.enc = nn.TransformerEncoderLayer(d, 2, dim_feedforward=16, batch_first=True)
        self.mha = nn.MultiheadAttention(d, 2, kdim=6, vdim=5)
        self.k, self.v = nn.Linear(d, 6), nn.Linear(d, 5)
        self.ln, self.rms = nn.LayerNorm(d), nn.RMSNorm(d)
        self.gamma = nn.Parameter(torch.ones(d))
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        h = self.enc(self.emb(ids) + self.pos)
        q = h.transpose(0, 1)
        out, _ = self.mha(q, self.k(q), self.v(q), key_padding_mask=ids == 0)
        h = self.rms(self.ln(out.transpose(0, 1))) * self.gamma
        return self.head(h.mean(1))


class Recurrent(nn.Module):
    def __init__(self, vocab: int = 20, d: int = 8, classes: int = 3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.rnn = nn.LSTM(d, 6, batch_first=True, bidirectional=True)
        self.head = nn.Linear(12, classes)

    def forward(self, ids):
        return self.head(self.rnn(self.emb(ids))[0].mean(1))


class Bags(nn.Module):
    def __init__(self, vocab: int = 20, d: int = 8, classes: int = 3):
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab, d, mode="mean")
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        return self.head(self.bag(ids))


MODELS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)),
            lambda n: torch.randn(n, 6), ["0", "2"]),
    "cnn": (CNN, lambda n: torch.randn(n, 3, 8, 8), ["conv", "bn", "conv1d"]),
    "transformer": (Transformer, lambda n: torch.randint(0, 20, (n, 6)), ["emb", "mha", "enc"]),
    "recurrent": (Recurrent, lambda n: torch.randint(0, 20, (n, 7)), ["rnn"]),
    "bags": (Bags, lambda n: torch.randint(0, 20, (n, 5)), ["bag"]),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


# --------------------------------------------------------------------------------------------------
# Running one scenario
# --------------------------------------------------------------------------------------------------


def run(name: str, dtype: str, backend: str, layers, plant: str | None) -> dict:
    build, inputs, modules = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    mode = H.new_mode()
    H.fake_cuda_model(model, mode, DTYPES[dtype])
    check = H.LaunchCheck()
    report: dict = {"model": name, "dtype": dtype, "backend": backend, "layers": layers, "error": None}
    request = modules if layers == "modules" else layers
    x = inputs(24)
    if x.is_floating_point():
        x = x.to(DTYPES[dtype])
    y = torch.randint(0, 3, (24,))
    env = backend.startswith("env:")
    if env:
        os.environ["FASTDAL_BACKEND"] = backend[4:]
    try:
        with H.gpu_backends(check), H.fake_cuda_run(mode) as watch, _planted(plant):
            labeled = list(DataLoader(TensorDataset(x[:8], y[:8]), batch_size=4))
            G = fastdal.labeled_grad(model, labeled, layers=request)
            report["waits_labeled_grad"] = _waits(watch)
            per_batch = {}
            for size in (3, 6):
                pool = H.CountedLoader(list(DataLoader(TensorDataset(x[8:20]), batch_size=size)), watch)
                watch.waits.clear()
                fastdal.score(model, pool, G, backend="auto" if env else backend)
                report[f"waits_score_{size}"] = _waits(watch)
                per_batch[size] = pool.per_batch()
            report["launches_per_batch"] = per_batch
            watch.waits.clear()
            features = fastdal.features(model, DataLoader(TensorDataset(x[8:20]), batch_size=4), layers=request,
                                        rank=None if layers == "last" else 4)
            fastdal.select(features, 3, method="badge")
            fastdal.select(features, 3, method="greedy", labeled_grad=G)
            report["waits_features_select"] = _waits(watch)
            watch.waits.clear()
            fastdal.query(model, DataLoader(TensorDataset(x[8:20]), batch_size=4), labeled, 3, layers=request)
            report["waits_query"] = _waits(watch)
    except Exception as err:  # the report says what went wrong; the test decides
        report["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
        report["traceback"] = traceback.format_exc(limit=-8)
    finally:
        if env:
            del os.environ["FASTDAL_BACKEND"]
    report["launch_problems"] = check.problems
    return report


def split_model() -> dict:
    """A model split over two GPUs (pipeline style): refused before any work, with the documented error."""
    mode = H.new_mode()
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    H.fake_cuda_model(model, mode)
    with mode:
        model[2].weight = nn.Parameter(model[2].weight.to("cuda:1"))
        model[2].bias = nn.Parameter(model[2].bias.to("cuda:1"))
    report: dict = {"model": "split", "dtype": "float32", "backend": "auto", "layers": "all", "error": None}
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    try:
        with H.gpu_backends(H.LaunchCheck()), H.fake_cuda_run(mode):
            fastdal.labeled_grad(model, DataLoader(TensorDataset(x, y), batch_size=4))
    except Exception as err:
        report["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
    return report


def copies() -> dict:
    """fastdal's batch moves both ways: to the device asynchronously, to the host blocking."""
    mode = H.new_mode()
    report: dict = {"model": "copies", "dtype": "float32", "backend": "auto", "layers": "none", "error": None}
    from fastdal.batches import to_device

    with H.fake_cuda_run(mode) as watch:
        on_device = to_device((torch.randn(4, 3), {"y": torch.arange(4)}), torch.device("cuda"))
        to_device(on_device, torch.device("cpu"))
        report["waits_copies"] = _waits(watch)
    return report


def _waits(watch: H.Watch) -> list[dict]:
    return [{"kind": w.kind, "op": w.op, "frames": list(w.frames[-4:])} for w in watch.waits]


class _planted:
    """A fault put in on purpose (--plant), to show that the suite catches it."""

    def __init__(self, plant: str | None):
        self.plant, self.saved = plant, None

    def __enter__(self):
        import fastdal.layers as layers

        if self.plant is None:
            return self
        self.saved = dict(layers.CLOSED_FORM)
        linear = layers.CLOSED_FORM["linear"]

        def planted(target, calls, grads, batch_size, dtype, backend="auto"):
            sq, dot = linear(target, calls, grads, batch_size, dtype, backend)
            if self.plant == "cpu-term":
                return sq.cpu(), dot
            float(dot.sum())  # a host wait in the per-batch path
            return sq, dot

        layers.CLOSED_FORM["linear"] = planted
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            import fastdal.layers as layers

            layers.CLOSED_FORM.clear()
            layers.CLOSED_FORM.update(self.saved)


def scenarios(only: list[str] | None) -> list[tuple]:
    found = []
    for name in MODELS:
        if only and name not in only:
            continue
        for backend in ("auto", "torch", "cuda", "triton", "env:cuda", "env:triton"):
            for layers in ("last", "all", "modules"):
                found.append((name, "float32", backend, layers))
        for dtype in ("bfloat16", "float64"):
            found.append((name, dtype, "auto", "all"))
            found.append((name, dtype, "auto", "last"))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--plant", choices=("cpu-term", "host-wait"))
    parser.add_argument("--only", nargs="*")
    args = parser.parse_args()
    reports = [run(*s, plant=args.plant) for s in scenarios(args.only)]
    if not args.only:
        reports += [split_model(), copies()]
    Path(args.out).write_text(json.dumps(reports, indent=1))


if __name__ == "__main__":
    main()
