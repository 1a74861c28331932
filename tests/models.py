"""Small models covering every module family fastdal reads, each with a matching random-data maker.

Each factory returns ``(model, make_inputs)`` where ``make_inputs(n, dtype)`` draws ``n`` model inputs.
Sizes are odd on purpose (7, 13, 129...). BatchNorm statistics are randomized so that eval mode is
not the identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdal.models import BasicBlock  # conv, BatchNorm, in-place residual add and ReLU


def randomize_norm_statistics(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                if m.bias is not None:
                    m.bias.uniform_(-0.3, 0.3)
    return model


class MLP(nn.Module):
    def __init__(self, d_in=13, hidden=29, classes=7):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(self.net(x))


class ResCNN(nn.Module):
    """Conv + BatchNorm + residual blocks (one strided, with a projection shortcut)."""

    def __init__(self, classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.block1 = BasicBlock(6, 6, 1)
        self.block2 = BasicBlock(6, 10, 2)
        self.fc = nn.Linear(10, classes)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = self.block2(self.block1(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Conv1dGroupNet(nn.Module):
    """Conv1d with stride/dilation, GroupNorm, a depthwise conv (groups = channels) and a grouped conv."""

    def __init__(self, classes=4):
        super().__init__()
        self.conv = nn.Conv1d(3, 12, 5, stride=2, padding=2)
        self.gn = nn.GroupNorm(3, 12)
        self.depthwise = nn.Conv1d(12, 12, 3, padding=2, dilation=2, groups=12)
        self.grouped = nn.Conv1d(12, 8, 3, groups=4, padding="same", padding_mode="reflect")
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        x = F.gelu(self.gn(self.conv(x)))
        x = F.gelu(self.depthwise(x))
        x = F.gelu(self.grouped(x))
        return self.head(x.amax(dim=-1))


class Attention(nn.Module):
    """Multi-head self-attention built from nn.Linear layers."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (y.view(b, t, self.heads, d // self.heads).transpose(1, 2) for y in (self.q(x), self.k(x), self.v(x)))
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, -1)
        return self.o((att @ v).transpose(1, 2).reshape(b, t, d))


class TinyTransformer(nn.Module):
    """Token + position Embedding, pre-LayerNorm attention and MLP blocks, mean pooling, linear head."""

    def __init__(self, vocab=23, d=16, heads=2, seq=9, classes=6, layers=2):
        super().__init__()
        self.tok = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "ln1": nn.LayerNorm(d),
                    "att": Attention(d, heads),
                    "ln2": nn.LayerNorm(d),
                    "mlp": nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)),
                }
            )
            for _ in range(layers)
        )
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        x = self.tok(ids) + self.pos(positions)
        for blk in self.blocks:
            x = x + blk["att"](blk["ln1"](x))
            x = x + blk["mlp"](blk["ln2"](x))
        return self.head(self.ln(x).mean(1))


class WideHead(nn.Module):
    """A feature extractor and a K = 1000 linear head."""

    def __init__(self, d_in=11, d=37, classes=1000):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(d_in, d), nn.Tanh())
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.features(x))


class MHAModel(nn.Module):
    """nn.MultiheadAttention (its own closed form, fastdal/attention.py), sequence-first layout."""

    def __init__(self, d=8, classes=3):
        super().__init__()
        self.inp = nn.Linear(5, d)
        self.mha = nn.MultiheadAttention(d, 2)
        self.head = nn.Linear(d, classes)

    def forward(self, x):  # x: (B, T, 5)
        h = self.inp(x).transpose(0, 1)  # (T, B, d)
        a, _ = self.mha(h, h, h, need_weights=False)
        return self.head(a.mean(0))


class BroadcastPosition(nn.Module):
    """A learned position table added to every sample (no sample dimension) and a bare Parameter."""

    def __init__(self, d=6, seq=4, classes=3):
        super().__init__()
        self.proj = nn.Linear(3, d)
        self.pos = nn.Embedding(seq, d)
        self.scale = nn.Parameter(torch.rand(d) + 0.5)
        self.head = nn.Linear(d, classes)

    def forward(self, x):  # x: (B, seq, 3)
        h = self.proj(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        return self.head((torch.tanh(h) * self.scale).sum(1))


class TiedWeights(nn.Module):
    """A head that reuses the embedding table (one parameter used by two modules)."""

    def __init__(self, vocab=11, d=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.emb(ids).mean(1))))


class ReusedLayer(nn.Module):
    """The same Linear and Conv2d called twice per forward (gradients add over calls)."""

    def __init__(self, classes=4):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.lin = nn.Linear(6, 6)
        self.rms = nn.RMSNorm(6)
        self.head = nn.Linear(6, classes)

    def forward(self, x):  # x: (B, 2, 5, 5)
        x = torch.tanh(self.conv(torch.tanh(self.conv(x))))
        h = x.flatten(2)[..., :6]
        h = self.lin(torch.tanh(self.lin(h)))
        return self.head(self.rms(h).mean(1))


class SeqFirstLinear(nn.Module):
    """Linear and LayerNorm applied to sequence-first (T, B, C) tensors."""

    def __init__(self, classes=3):
        super().__init__()
        self.lin = nn.Linear(4, 5)
        self.ln = nn.LayerNorm(5)
        self.head = nn.Linear(5, classes)

    def forward(self, x):  # x: (B, T, 4)
        h = self.ln(self.lin(x.transpose(0, 1)))  # (T, B, 5)
        return self.head(torch.tanh(h).sum(0))


class HeadThenScale(nn.Module):
    """The final Linear is followed by a temperature: the closed form cannot use its output directly."""

    def __init__(self, classes=5):
        super().__init__()
        self.body = nn.Linear(7, 9)
        self.head = nn.Linear(9, classes)

    def forward(self, x):
        return self.head(torch.relu(self.body(x))) / 0.7


class UnusedBranch(nn.Module):
    """An auxiliary head that forward never calls (its gradient is zero) and a layer called by keyword."""

    def __init__(self, classes=4):
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.aux = nn.Linear(8, 3)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        return self.head(input=torch.tanh(self.body(input=x)))


def _float(shape):
    return lambda n, dtype: torch.randn(n, *shape, dtype=dtype)


def _ids(vocab, seq):
    return lambda n, dtype: torch.randint(0, vocab, (n, seq))


# name -> (factory, input maker, number of classes)
MODELS = {
    "mlp": (MLP, _float((13,)), 7),
    "rescnn": (ResCNN, _float((3, 8, 8)), 5),
    "conv1d_group": (Conv1dGroupNet, _float((3, 17)), 4),
    "transformer": (TinyTransformer, _ids(23, 9), 6),
    "wide_head": (WideHead, _float((11,)), 1000),
}

EXTRA_MODELS = {
    "mha": (MHAModel, _float((4, 5)), 3),
    "broadcast_position": (BroadcastPosition, _float((4, 3)), 3),
    "tied": (TiedWeights, _ids(11, 5), 11),
    "reused": (ReusedLayer, _float((2, 5, 5)), 4),
    "seq_first": (SeqFirstLinear, _float((6, 4)), 3),
    "head_then_scale": (HeadThenScale, _float((7,)), 5),
    "unused_branch": (UnusedBranch, _float((6,)), 4),
}


def build(name: str, dtype: torch.dtype = torch.float64):
    factory, make_inputs, classes = {**MODELS, **EXTRA_MODELS}[name]
    model = randomize_norm_statistics(factory()).to(dtype).eval()
    return model, make_inputs, classes
