"""The models and synthetic pools the peer benchmark scores.

Each workload is a model in eval mode, a pool cut into batches (random inputs from a fixed seed), a small
labeled set for G, and which parameters the score covers ("all" or the last layer). Inputs are random: the
cost of a per-sample gradient does not depend on what the pixels or tokens are, and the agreement checks only
need the same numbers to reach every method.

The two ResNet-18 workloads use :class:`ResNet18` below instead of ``fastdal.models.resnet18``. It has the
same layers and shapes, but no in-place operations (``relu(inplace=True)``, ``out += shortcut``): BackPACK's
module hooks refuse in-place changes of a hooked module's output ("Output 0 of BackwardHookFunction is a view
and is being modified inplace"), and the point here is to see where BackPACK stands on the architecture, not
to trip it on a style choice that costs nothing to avoid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdal.models import MLP, VanillaCNN


class Block(nn.Module):
    """CIFAR ResNet basic block; ``norm(channels)`` builds the normalization (BatchNorm2d or Identity)."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: Callable[[int], nn.Module]):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = norm(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), norm(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18 (3x3 stem, no max-pool, stages of width 64..512), as ``fastdal.models.resnet18``."""

    def __init__(self, norm: Callable[[int], nn.Module], num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = norm(64)
        blocks, c_in = [], 64
        for i, c_out in enumerate((64, 128, 256, 512)):
            blocks += [Block(c_in, c_out, 2 if i else 1, norm), Block(c_out, c_out, 1, norm)]
            c_in = c_out
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _no_norm(channels: int) -> nn.Module:
    return nn.Identity()


class TextTransformer(nn.Module):
    """Token embedding, a stack of ``nn.TransformerEncoderLayer``, mean pooling over positions, linear head.

    Dropout is 0: the score runs in eval mode anyway, and Opacus only records activations in train mode,
    so with no dropout (and no BatchNorm) both modes compute the same function and every method scores
    the same model.
    """

    def __init__(self, vocab: int = 5000, d_model: int = 256, layers: int = 4, heads: int = 4, num_classes: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.encoder = nn.Sequential(
            *(nn.TransformerEncoderLayer(d_model, heads, batch_first=True, dropout=0.0) for _ in range(layers))
        )
        self.fc = nn.Linear(d_model, num_classes)

    def forward(self, tokens: Tensor) -> Tensor:  # tokens: (B, T) ids
        return self.fc(self.encoder(self.embed(tokens)).mean(dim=1))


class WideHead(nn.Module):
    """A small feature extractor and a K=10000-class last layer (``fc``: 512 -> 10000)."""

    def __init__(self, d_in: int = 64, d: int = 512, num_classes: int = 10_000):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(d_in, d), nn.ReLU())
        self.fc = nn.Linear(d, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


@dataclass
class Workload:
    """One model and its pool. ``layers`` is what the score covers: "all", or "last" (the head ``fc`` only)."""

    name: str
    label: str  # for tables and charts
    build: Callable[[], nn.Module]
    sample: Callable[[torch.Generator, int], Tensor]  # (generator, n) -> n model inputs
    num_classes: int
    batch: int
    batches: int
    layers: str = "all"
    notes: list[str] = field(default_factory=list)

    @property
    def pool_size(self) -> int:
        return self.batch * self.batches

    def make(self, seed: int = 0) -> tuple[nn.Module, list[Tensor], list[tuple[Tensor, Tensor]]]:
        """The model (eval mode), the pool's input batches and a labeled set of one batch with labels."""
        torch.manual_seed(seed)
        model = self.build().eval()
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            _trained_statistics(model)
        g = torch.Generator().manual_seed(seed + 1)
        pool = [self.sample(g, self.batch) for _ in range(self.batches)]
        labeled_x = self.sample(g, self.batch)
        labeled_y = torch.randint(0, self.num_classes, (self.batch,), generator=g)
        return model, pool, [(labeled_x, labeled_y)]


def _trained_statistics(model: nn.Module) -> None:
    """Give BatchNorm running statistics that are not the identity (as a trained model's are)."""
    g = torch.Generator().manual_seed(2)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))


def _images(g: torch.Generator, n: int) -> Tensor:
    return torch.randn(n, 3, 32, 32, generator=g)


def _tokens(g: torch.Generator, n: int) -> Tensor:
    return torch.randint(0, 5000, (n, 64), generator=g)


def _digits(g: torch.Generator, n: int) -> Tensor:
    return torch.randn(n, 784, generator=g)


def _features(g: torch.Generator, n: int) -> Tensor:
    return torch.randn(n, 64, generator=g)


# Pools of one batch for the models whose training step takes a good part of a second (run.py --batches N
# for more): every method's time grows linearly with the pool, and on 2 cores the slowest peers take 10-50
# training steps per batch, so more batches would stretch `make bench-peers` far past a quarter of an hour.
# One batch is the harder case for fastdal: its once-per-call work (the small probe forwards that find each
# tensor's sample dimension) is not spread over batches. The MLP and the head take milliseconds per batch,
# where that once-per-call work would weigh 10-20% of one batch, and score pools of four.
WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in [
        Workload("cnn", "vanilla CNN", lambda: VanillaCNN(3, 10), _images, 10, batch=128, batches=1),
        Workload(
            "resnet18-bn",
            "ResNet-18 (BatchNorm)",
            lambda: ResNet18(nn.BatchNorm2d),
            _images,
            10,
            batch=32,
            batches=1,
        ),
        Workload(
            "resnet18-nonorm",
            "ResNet-18 (no norm)",
            lambda: ResNet18(_no_norm),
            _images,
            10,
            batch=32,
            batches=1,
            notes=["BatchNorm replaced by nn.Identity (no normalization), every other layer as in ResNet-18"],
        ),
        Workload("transformer", "transformer (4 layers)", TextTransformer, _tokens, 4, batch=32, batches=1),
        Workload("mlp", "MLP 784-1024-1024-10", lambda: MLP(784, 10, hidden=1024), _digits, 10, batch=512, batches=4),
        Workload(
            "head10k",
            "K=10000 head (last layer)",
            WideHead,
            _features,
            10_000,
            batch=128,
            batches=4,
            layers="last",
        ),
    ]
}
