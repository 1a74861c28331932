"""Which per-sample norm strategy is cheaper for each conv layer of ResNet-18 and the vanilla CNN.

For every layer shape it times, on the same tensors: the batched weight gradient (what a training
step pays), the direct norm (per-sample weight gradients from PyTorch's convolution backward on
batches of one), and the ghost norm (unfolded input, T x T Gram matrices, dot by GEMM). It prints
the ratio of each to the batched weight gradient and the strategy fastdal's cost model picks, so
the model's constant (fastdal.torch_ops.MATERIALIZE_COST) can be checked against measurements.

    python bench/bench_norm_choice.py
"""

from __future__ import annotations

import time
from functools import partial

import torch
from torch import nn

import fastdal.layers as L
import fastdal.torch_ops as T
from fastdal.capture import Call, Target


def _layer_shapes():
    # (name, batch, c_in, c_out, input size, stride)
    yield ("cnn.conv1", 128, 3, 32, 32, 1)
    yield ("cnn.conv2", 128, 32, 64, 32, 1)
    yield ("cnn.conv3", 128, 64, 128, 32, 1)
    yield ("resnet.stem", 32, 3, 64, 32, 1)
    yield ("resnet.layer1", 32, 64, 64, 32, 1)
    yield ("resnet.layer2.down", 32, 64, 128, 32, 2)
    yield ("resnet.layer2", 32, 128, 128, 16, 1)
    yield ("resnet.layer3.down", 32, 128, 256, 16, 2)
    yield ("resnet.layer3", 32, 256, 256, 8, 1)
    yield ("resnet.layer4.down", 32, 256, 512, 8, 2)
    yield ("resnet.layer4", 32, 512, 512, 4, 1)


def _time(fn, repeats=3):
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _batched_weight_gradient(conv: nn.Conv2d, x: torch.Tensor, delta: torch.Tensor):
    return torch.ops.aten.convolution_backward(
        delta, x, conv.weight, None, conv.stride, conv.padding, conv.dilation, False, [0, 0], 1, [False, True, False]
    )


def main() -> None:
    torch.manual_seed(0)
    print(f"{'layer':22s} {'T':>5s} {'d_in':>5s} {'d_out':>5s} {'wgrad ms':>9s} {'direct':>7s} {'ghost':>7s}  picks")
    for name, batch, c_in, c_out, size, stride in _layer_shapes():
        conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        x = torch.randn(batch, c_in, size, size)
        delta = torch.randn(batch, c_out, size // stride, size // stride)
        call = Call((x,), {}, [delta], [0], [None], [delta])
        target = Target(name, conv, "conv", {"weight": "weight"})
        grads = {"weight": torch.randn_like(conv.weight)}
        t_wgrad = _time(partial(_batched_weight_gradient, conv, x, delta))
        times = {}
        for strategy, cost in (("direct", 0), ("ghost", 10**12)):
            T.MATERIALIZE_COST, saved = cost, T.MATERIALIZE_COST
            try:
                times[strategy] = _time(partial(L.conv_terms, target, [call], grads, batch, torch.float32))
            finally:
                T.MATERIALIZE_COST = saved
        positions = (size // stride) ** 2
        picks = "ghost" if T.use_ghost_norm(positions, c_in * 9, c_out) else "direct"
        print(
            f"{name:22s} {positions:5d} {c_in * 9:5d} {c_out:5d} {t_wgrad * 1e3:9.1f} "
            f"{times['direct'] / t_wgrad:7.2f} {times['ghost'] / t_wgrad:7.2f}  {picks}"
        )


if __name__ == "__main__":
    main()
