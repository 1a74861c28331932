"""Reference architectures of the paper, used by the demo, the benchmarks and the active-learning loop.

``VanillaCNN`` is the paper's "vanilla CNN": three 3x3 convolutions at full resolution, global average
pooling and a linear head. ``resnet18`` is the CIFAR-style ResNet-18 (3x3 stem, no max-pool);
``small_resnet`` and ``SmallVGG`` are narrow versions of the paper's ResNet and VGG for small images,
and ``MLP`` a two-hidden-layer perceptron; all take ``(B, C, H, W)`` images.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class VanillaCNN(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 10, widths: tuple[int, int, int] = (32, 64, 128)):
        super().__init__()
        c1, c2, c3 = widths
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.fc = nn.Linear(c3, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class ResNet(nn.Module):
    def __init__(
        self, blocks: tuple[int, ...] = (2, 2, 2, 2), in_channels: int = 3, num_classes: int = 10, width: int = 64
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages = []
        c_in = width
        for i, n in enumerate(blocks):
            c_out = width * 2**i
            first_stride = 2 if i else 1
            stage = [BasicBlock(c_in if j == 0 else c_out, c_out, first_stride if j == 0 else 1) for j in range(n)]
            stages.append(nn.Sequential(*stage))
            c_in = c_out
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(F.relu(self.bn1(self.conv1(x)), inplace=True))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def resnet18(in_channels: int = 3, num_classes: int = 10) -> ResNet:
    return ResNet((2, 2, 2, 2), in_channels, num_classes)


def small_resnet(in_channels: int = 1, num_classes: int = 10) -> ResNet:
    """A ResNet with one basic block per stage and three stages of width 16, 32, 64."""
    return ResNet((1, 1, 1), in_channels, num_classes, width=16)


class SmallVGG(nn.Module):
    """VGG-style: pairs of 3x3 convolutions with BatchNorm and ReLU, max-pooling between pairs."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths: tuple[int, ...] = (16, 32, 64)):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for i, c in enumerate(widths):
            if i:
                layers.append(nn.MaxPool2d(2))
            for _ in range(2):
                layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
                c_in = c
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class MLP(nn.Module):
    def __init__(self, in_features: int, num_classes: int = 10, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.net(x))
