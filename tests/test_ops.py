"""Every op on every backend this machine has, against the float64 torch implementation.

Tolerance (DESIGN.md, chain of truth): a backend's error against the float64 reference may be at
most 2x the error of the float32 ``torch`` backend plus a small per-dtype allowance. On CPU machines
the Triton kernels run under TRITON_INTERPRET=1 (conftest.py) on the same small shapes; tests marked
``gpu`` run the CUDA device when one is present.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import fastdal.backends as backends
from fastdal import ops, torch_ops

from conftest import cpu_backends, relative_error

ALLOWANCE = {torch.float32: 1e-6, torch.float64: 1e-12}


def _backend_cases() -> list:
    """(device, backend) pairs: every backend that serves CPU tensors here (triton only under its
    interpreter, which conftest.py turns on without a GPU), and every CUDA-serving backend on CUDA
    tensors, marked ``gpu`` and skipped without a GPU."""
    cases = [pytest.param("cpu", n, id=f"cpu-{n}") for n in cpu_backends()]
    no_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
    cases += [
        pytest.param("cuda", n, id=f"cuda-{n}", marks=[pytest.mark.gpu, no_gpu]) for n in ("torch", "cuda", "triton")
    ]
    return cases


BACKEND_CASES = _backend_cases()
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")]
    ),
]


def _close(result, expected, float32_torch, dtype):
    """result within 2x the float32 torch backend's error of the float64 expectation, plus allowance."""
    for got, want, baseline in zip(result, expected, float32_torch):
        if not got.is_floating_point():
            assert torch.equal(got.cpu(), want.cpu())
            continue
        error = relative_error(got, want)
        bound = (2 * relative_error(baseline, want) if dtype == torch.float32 else 0.0) + ALLOWANCE[dtype]
        assert error <= bound, (error, bound)


# --------------------------------------------------------------------------------------------------
# last_layer_score
# --------------------------------------------------------------------------------------------------

# (N, D, K): one row, two classes, odd widths, K not a power of two, and Ks that need streaming (the CPU
# kernel walks tiles of 1024 classes: 2049 ends in a tile of one).
LAST_SHAPES = [(1, 7, 2), (9, 129, 10), (5, 33, 1001), (4, 20, 2049), (3, 16, 50000)]


def _last_inputs(n, d, k, dtype, device, *, bias=True, weight_grad=True, bias_grad=True):
    h = torch.randn(n, d, dtype=torch.float64)
    w = torch.randn(k, d, dtype=torch.float64) / d**0.5 * 3
    inputs = [
        h,
        w,
        torch.randn(k, dtype=torch.float64) if bias else None,
        torch.randn(k, d, dtype=torch.float64) if weight_grad else None,
        torch.randn(k, dtype=torch.float64) if bias_grad else None,
    ]
    return [None if t is None else t.to(device=device, dtype=dtype) for t in inputs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("n, d, k", LAST_SHAPES)
@pytest.mark.parametrize("device, backend", BACKEND_CASES)
def test_last_layer_score(device, backend, n, d, k, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels serve float32")
    inputs = _last_inputs(n, d, k, dtype, device)
    expected = torch_ops.last_layer_score(*[None if t is None else t.double() for t in inputs], 2.0)
    baseline = torch_ops.last_layer_score(*[None if t is None else t.float() for t in inputs], 2.0)
    result = ops.last_layer_score(*inputs, gamma=2.0, backend=backend)
    assert [t.dtype for t in result[:3]] == [torch.float64 if dtype == torch.float64 else torch.float32] * 3
    assert result.pseudo_label.dtype == torch.long and result.score.shape == (n,)
    _close(result, expected, baseline, dtype)


@pytest.mark.parametrize(
    "present", [(False, True, True), (True, True, False), (True, False, True)], ids=["no-bias", "no-G_b", "no-G_W"]
)
@pytest.mark.parametrize("device, backend", BACKEND_CASES)
def test_last_layer_score_optional_parameters(device, backend, present):
    bias, bias_grad, weight_grad = present[0], present[1], present[2]
    inputs = _last_inputs(7, 13, 11, torch.float32, device, bias=bias, weight_grad=weight_grad, bias_grad=bias_grad)
    expected = torch_ops.last_layer_score(*[None if t is None else t.double() for t in inputs], 0.5)
    result = ops.last_layer_score(*inputs, gamma=0.5, backend=backend)
    _close(result, expected, torch_ops.last_layer_score(*inputs, 0.5), torch.float32)


@pytest.mark.parametrize("device, backend", BACKEND_CASES)
def test_last_layer_score_confident_rows_keep_precision(device, backend):
    """||e||^2 of a row whose softmax is nearly one-hot is tiny; it must not cancel to noise."""
    h, w, b, gw, gb = _last_inputs(4, 8, 300, torch.float32, device)
    w = w * 40  # logits far apart: p_yhat within 1e-6 of 1
    expected = ops.LastLayerScore(
        *torch_ops.last_layer_score(h.double(), w.double(), b.double(), gw.double(), gb.double(), 2.0)
    )
    assert expected.sq_norm.max() < 1e-3
    result = ops.last_layer_score(h, w, b, gw, gb, gamma=2.0, backend=backend)
    assert relative_error(result.sq_norm, expected.sq_norm) < 1e-4


LOGITS_BACKENDS = [pytest.param(n, id=n) for n in cpu_backends(("torch", "cpp"))]


@pytest.mark.parametrize("present", [(True, True), (True, False), (False, True)], ids=["both", "no-G_b", "no-G_W"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("n, d, k", LAST_SHAPES)
@pytest.mark.parametrize("backend", LOGITS_BACKENDS)
def test_last_layer_score_from_logits(backend, n, d, k, dtype, present):
    """From the logits a forward made: the same terms as last_layer_score, the pseudo label their argmax."""
    weight_grad, bias_grad = present
    h, w, b, gw, gb = _last_inputs(n, d, k, dtype, "cpu", weight_grad=weight_grad, bias_grad=bias_grad)
    logits = torch.nn.functional.linear(h, w, b)
    expected = torch_ops.last_layer_score(*[None if t is None else t.double() for t in (h, w, b, gw, gb)], 2.0)
    baseline = torch_ops.last_layer_score(*[None if t is None else t.float() for t in (h, w, b, gw, gb)], 2.0)
    result = ops.last_layer_score_logits(h, logits, gw, gb, gamma=2.0, backend=backend)
    assert torch.equal(result.pseudo_label, logits.argmax(1))
    _close(result[:3], expected[:3], baseline[:3], dtype)


def test_last_layer_score_from_logits_checks_its_inputs():
    h, w, b, gw, gb = _last_inputs(4, 6, 5, torch.float32, "cpu")
    logits = torch.nn.functional.linear(h, w, b)
    with pytest.raises(ValueError, match="logits must be"):
        ops.last_layer_score_logits(h, logits[:3], gw, gb)
    with pytest.raises(ValueError, match="logits must be"):
        ops.last_layer_score_logits(h, logits.double(), gw, gb)
    with pytest.raises(ValueError, match="weight_grad"):
        ops.last_layer_score_logits(h, logits, gw[:, :2], gb)
    with pytest.raises(ValueError, match="needs weight_grad, bias_grad or both"):
        ops.last_layer_score_logits(h, logits)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in Triton's interpreter
@pytest.mark.parametrize("device, backend", BACKEND_CASES)
def test_last_layer_score_non_finite_rows_are_nan(device, backend):
    h, w, b, gw, gb = _last_inputs(5, 6, 9, torch.float32, device)
    h[1, 0] = float("inf")
    h[3, 2] = float("nan")
    result = ops.last_layer_score(h, w, b, gw, gb, gamma=2.0, backend=backend)
    bad = torch.tensor([False, True, False, True, False])
    assert torch.isnan(result.score.cpu()[bad]).all() and torch.isfinite(result.score.cpu()[~bad]).all()


TRITON_DEVICES = [
    pytest.param(c.values[0], marks=c.marks, id=c.values[0]) for c in BACKEND_CASES if c.values[1] == "triton"
]


def _triton_last_layer():
    import importlib

    return importlib.import_module("fastdal.kernels.last_layer_score")


@pytest.mark.parametrize(
    "n, k, sms",
    [(5, 1000, None), (5, 1000, 2), (100, 1000, 3), (9, 100, None), (70, 300, None), (70, 300, 1)],
    ids=["a-tile-a-split", "tiles-a-split", "two-row-blocks", "ragged-last-tile", "64-rows", "no-split"],
)
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_last_layer_score_class_split(device, n, k, sms):
    """Triton's class split (kernels/last_layer_score.py): programs over ranges of class tiles, their online-softmax
    states merged per row, against the float64 torch backend. ``sms`` is the GPU size the split plans for (None:
    132 without a GPU), so that these small sizes take it with one tile a split, several, or not at all."""
    kernel = _triton_last_layer()
    h, w, b, gw, gb = _last_inputs(n, 33, k, torch.float32, device)
    planned = sms or kernel.DEFAULT_SMS
    launch = kernel.config(n, k, 33, planned)
    splits = kernel.class_splits(n, k, launch["BLOCK_N"], launch["BLOCK_K"], planned)
    assert launch["PARTIAL"] == (splits > 1) == (sms != 1)
    expected = torch_ops.last_layer_score(h.double(), w.double(), b.double(), gw.double(), gb.double(), 2.0)
    baseline = torch_ops.last_layer_score(h, w, b, gw, gb, 2.0)
    _close(kernel.last_layer_score(h, w, b, gw, gb, 2.0, sms=sms), expected, baseline, torch.float32)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in Triton's interpreter
@pytest.mark.parametrize("sms", [None, 2, 1], ids=["a-tile-a-split", "tiles-a-split", "no-split"])
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_last_layer_score_class_split_ties_and_non_finite_rows(device, sms):
    """The first maximum keeps the label across class splits as within one (torch.argmax's rule), and a row with
    a non-finite logit gets NaN terms whichever split saw it. N = 70, K = 300: 2 row blocks of 64 and 5 tiles of
    64 classes, the last of 44; 5 splits of one tile, 2 splits (tiles 0-1, 2-4), or none."""
    kernel = _triton_last_layer()
    n, k = 70, 300
    h, w, b, gw, gb = _last_inputs(n, 20, k, torch.float32, device)
    # Equal maxima, exactly (a zero row of W and the largest bias: z = 100 for every finite row), in tiles 0, 1,
    # 2 and twice in 4.
    for c in (299, 290, 170, 75, 3):
        w[c] = 0.0
        b[c] = 100.0
    # Row 4's maximum is class 180 alone: feature 0 is zero in every other row.
    h[:, 0] = 0.0
    h[4] = 0.0
    h[4, 0] = 1.0
    w[180, 0] = 1e3
    h[1, 5] = float("inf")
    h[67, 3] = float("nan")  # in the second row block
    bad = torch.zeros(n, dtype=torch.bool)
    bad[[1, 67]] = True
    result = kernel.last_layer_score(h, w, b, gw, gb, 2.0, sms=sms)
    labels = result[3].cpu()
    assert torch.isnan(result[0].cpu()[bad]).all() and torch.isfinite(result[0].cpu()[~bad]).all()
    assert ((labels >= 0) & (labels < k)).all()
    assert labels[4] == 180 and (labels[~bad & (torch.arange(n) != 4)] == 3).all()
    expected = torch_ops.last_layer_score(*(t.double() for t in (h, w, b, gw, gb)), 2.0)
    baseline = torch_ops.last_layer_score(h, w, b, gw, gb, 2.0)
    _close(*([t.cpu()[~bad] for t in out] for out in (result, expected, baseline)), torch.float32)


def test_class_splits_fill_the_gpu_without_empty_ranges():
    """class_splits: one split where the row blocks already give two programs an SM; otherwise enough for two an
    SM, but never more than the class tiles (each split's range of tiles non-empty) or a grid's y-dimension."""
    kernel = _triton_last_layer()
    for sms in (1, 8, 132):
        for n in (1, 15, 100, 4096, 8192, 20000, 1 << 20):
            for k in (1, 10, 17, 100, 1000, 50000, 5_000_000):
                launch = kernel.config(n, k, 64, sms)
                block_n, block_k = launch["BLOCK_N"], launch["BLOCK_K"]
                rows, tiles = -(-n // block_n), -(-k // block_k)
                splits = kernel.class_splits(n, k, block_n, block_k, sms)
                assert launch["PARTIAL"] == (splits > 1)
                assert 1 <= splits <= min(tiles, kernel.MAX_SPLITS)
                if rows >= 2 * sms:
                    assert splits == 1
                elif splits < min(tiles, kernel.MAX_SPLITS):
                    assert rows * splits >= 2 * sms
                # the kernel's ranges: split j takes tiles [j tiles // splits, (j + 1) tiles // splits)
                assert all((j + 1) * tiles // splits > j * tiles // splits for j in range(splits))
    # N = 4096 on 132 SMs: 64 row blocks become 4 splits of the classes, 256 programs.
    assert kernel.class_splits(4096, 1000, 64, 64, 132) * 64 >= 264


# --------------------------------------------------------------------------------------------------
# linear_sample_score
# --------------------------------------------------------------------------------------------------

# (N, T, d_in, d_out, groups): one row, one position, T=49 (a 7x7 map), groups, wide layers.
LINEAR_SHAPES = [(1, 1, 7, 3, 1), (6, 49, 9, 5, 3), (4, 49, 129, 17, 1), (3, 1, 129, 1001, 1), (2, 7, 1, 1, 2)]


def _linear_inputs(n, t, d_in, d_out, groups, dtype, device, *, transposed=False):
    if transposed:  # as unfold gives them: (N, d, T) storage seen as (N, T, d)
        a = torch.randn(n, d_in, t, dtype=torch.float64).transpose(1, 2)
        delta = torch.randn(n, d_out, t, dtype=torch.float64).transpose(1, 2)
    else:
        a = torch.randn(n, t, d_in, dtype=torch.float64)
        delta = torch.randn(n, t, d_out, dtype=torch.float64)
    grad = torch.randn(groups, d_out, d_in, dtype=torch.float64)
    return a.to(device=device, dtype=dtype), delta.to(device=device, dtype=dtype), grad.to(device=device, dtype=dtype)


@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "unfold-layout"])
@pytest.mark.parametrize("ghost", [False, True], ids=["direct", "ghost"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("n, t, d_in, d_out, groups", LINEAR_SHAPES)
@pytest.mark.parametrize("device, backend", BACKEND_CASES)
def test_linear_sample_score(device, backend, n, t, d_in, d_out, groups, dtype, ghost, transposed):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels serve float32")
    a, delta, grad = _linear_inputs(n, t, d_in, d_out, groups, dtype, device, transposed=transposed)
    expected = torch_ops.linear_sample_score(a.double(), delta.double(), grad.double(), groups, ghost)
    baseline = torch_ops.linear_sample_score(a.float(), delta.float(), grad.float(), groups, ghost)
    result = ops.linear_sample_score(a, delta, grad, groups=groups, ghost=ghost, backend=backend)
    assert all(r.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) for r in result)
    _close(result, expected, baseline, dtype)


# Float32 rows in the unfold layout with T >= 8, which the cpp backend's direct norm forms in AVX2
# registers (csrc/cpu/direct_avx2.cpp) on CPUs without AVX-512: every remainder of its 4 x 3 register
# tile (d_out mod 4, d_in mod 3), position tails T mod 8 from 0 to 7, and T = 4100, where the rows of
# delta are walked in blocks of 12.
REGISTER_TILE_SHAPES = [
    (3, 8, 1, 1, 1),
    (2, 9, 2, 3, 1),
    (2, 15, 10, 6, 2),
    (4, 50, 3, 4, 2),
    (2, 11, 2, 3, 1),
    (1, 13, 4, 2, 1),
    (2, 30, 6, 9, 1),
    (2, 23, 11, 7, 1),
    (1, 4100, 5, 37, 1),
]


@pytest.mark.parametrize("n, t, d_in, d_out, groups", REGISTER_TILE_SHAPES)
@pytest.mark.parametrize("device, backend", BACKEND_CASES)
def test_linear_sample_score_direct_unfold_layout_float32(device, backend, n, t, d_in, d_out, groups):
    a, delta, grad = _linear_inputs(n, t, d_in, d_out, groups, torch.float32, device, transposed=True)
    # Also every other input channel of a wider map: the channels of a row are then 2T apart, not T.
    sliced = torch.randn(n, 2 * d_in, t, device=device)[:, ::2].transpose(1, 2)
    for x in (a, sliced):
        expected = torch_ops.linear_sample_score(x.double(), delta.double(), grad.double(), groups, False)
        baseline = torch_ops.linear_sample_score(x, delta, grad, groups, False)
        result = ops.linear_sample_score(x, delta, grad, groups=groups, ghost=False, backend=backend)
        _close(result, expected, baseline, torch.float32)


@pytest.mark.parametrize("ghost", [False, True], ids=["direct", "ghost"])
@pytest.mark.parametrize("device, backend", BACKEND_CASES)
def test_linear_sample_score_non_finite_stays_in_its_row(device, backend, ghost):
    a, delta, grad = _linear_inputs(4, 17, 7, 5, 1, torch.float32, device, transposed=True)
    a[1, 16, 0] = float("nan")  # in the last position, which the register kernel reads through a mask
    delta[2, 0, 3] = float("inf")
    bad = torch.tensor([False, True, True, False])
    for result in ops.linear_sample_score(a, delta, grad, ghost=ghost, backend=backend):
        assert not torch.isfinite(result.cpu()[bad]).any() and torch.isfinite(result.cpu()[~bad]).all()


@pytest.mark.parametrize("ghost", [False, True], ids=["direct", "ghost"])
@pytest.mark.parametrize("device, backend", BACKEND_CASES)
def test_linear_sample_score_without_weight_grad(device, backend, ghost):
    a, delta, _ = _linear_inputs(5, 9, 6, 4, 1, torch.float32, device)
    sq, dot = ops.linear_sample_score(a, delta, None, ghost=ghost, backend=backend)
    expected, _ = torch_ops.linear_sample_score(a.double(), delta.double(), None, 1, ghost)
    assert relative_error(sq, expected) < 1e-5
    assert torch.equal(dot.cpu(), torch.zeros(5))


def test_direct_and_ghost_agree_with_materialized_gradients():
    """The torch backend itself, against per-sample gradients formed explicitly in float64."""
    a, delta, grad = _linear_inputs(6, 11, 5, 4, 2, torch.float64, "cpu")
    g = delta.transpose(1, 2) @ a  # (N, d_out, d_in)
    expected_sq = g.square().sum(dim=(1, 2))
    expected_dot = (g * grad.repeat(3, 1, 1)).sum(dim=(1, 2))
    for ghost in (False, True):
        sq, dot = torch_ops.linear_sample_score(a, delta, grad, 2, ghost)
        assert relative_error(sq, expected_sq) < 1e-12 and relative_error(dot, expected_dot) < 1e-12


def test_last_layer_torch_backend_against_autograd():
    """The torch backend itself, against the gradient of the cross-entropy at the pseudo label."""
    h, w, b, gw, gb = _last_inputs(7, 5, 6, torch.float64, "cpu")
    result = ops.LastLayerScore(*torch_ops.last_layer_score(h, w, b, gw, gb, 2.0))
    for i in range(7):
        wi, bi = w.clone().requires_grad_(), b.clone().requires_grad_()
        z = h[i] @ wi.T + bi
        torch.nn.functional.cross_entropy(z[None], z.argmax()[None]).backward()
        sq = wi.grad.square().sum() + bi.grad.square().sum()
        dot = (wi.grad * gw).sum() + (bi.grad * gb).sum()
        assert torch.allclose(result.sq_norm[i], sq) and torch.allclose(result.dot[i], dot)


# --------------------------------------------------------------------------------------------------
# conv_sample_score
# --------------------------------------------------------------------------------------------------

# (module, input shape): stride, dilation, groups (depthwise too), a 1x1 kernel and a Conv1d.
CONV_CASES = [
    pytest.param(lambda: torch.nn.Conv2d(4, 6, 3), (5, 4, 9, 9), id="2d"),
    pytest.param(lambda: torch.nn.Conv2d(4, 6, 3, stride=2, dilation=2, groups=2), (3, 4, 11, 10), id="2d-strided"),
    pytest.param(lambda: torch.nn.Conv2d(6, 6, (3, 1), groups=6), (4, 6, 7, 5), id="2d-depthwise"),
    pytest.param(lambda: torch.nn.Conv2d(3, 5, 1), (2, 3, 4, 4), id="2d-1x1"),
    pytest.param(lambda: torch.nn.Conv1d(4, 8, 5, stride=3, groups=4), (6, 4, 23), id="1d"),
    # Wide enough that PyTorch's own convolution backward goes to oneDNN, whose weight gradient, called from a
    # thread of a parallel region, summed only that thread's share (half the gradient with two threads).
    pytest.param(lambda: torch.nn.Conv2d(32, 16, 3), (2, 32, 32, 32), id="2d-wide"),
]


def _conv_inputs(build, shape, calls, dtype):
    torch.manual_seed(0)
    m = build().double()
    inputs = [torch.randn(*shape, dtype=torch.float64) for _ in range(calls)]
    deltas = [torch.randn_like(m(x)) for x in inputs]
    grad = torch.randn_like(m.weight)
    return m, [x.to(dtype) for x in inputs], [d.to(dtype) for d in deltas], m.weight.detach().to(dtype), grad.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("calls", [1, 2], ids=["one-call", "two-calls"])
@pytest.mark.parametrize("build, shape", CONV_CASES)
@pytest.mark.parametrize("backend", [pytest.param(n, id=n) for n in cpu_backends(("torch", "cpp"))])
def test_conv_sample_score(backend, build, shape, calls, dtype):
    """Against per-sample gradients formed by autograd, one sample at a time, summed over the calls."""
    m, inputs, deltas, weight, grad = _conv_inputs(build, shape, calls, dtype)
    expected_sq, expected_dot = [], []
    for i in range(shape[0]):
        g = sum(
            torch.autograd.grad(m(x[i : i + 1].double()), m.weight, d[i : i + 1].double())[0]
            for x, d in zip(inputs, deltas)
        )
        expected_sq.append(g.square().sum())
        expected_dot.append((g * grad.double()).sum())
    expected = (torch.stack(expected_sq), torch.stack(expected_dot))
    baseline = torch_ops.conv_sample_score(
        [x.float() for x in inputs],
        [d.float() for d in deltas],
        weight.float(),
        m.stride,
        m.dilation,
        m.groups,
        grad.float(),
    )
    result = ops.conv_sample_score(inputs, deltas, weight, m.stride, m.dilation, m.groups, grad, backend=backend)
    assert all(r.dtype == dtype and r.shape == (shape[0],) for r in result)
    _close(result, expected, baseline, dtype)
    without_grad = ops.conv_sample_score(inputs, deltas, weight, m.stride, m.dilation, m.groups, backend=backend)
    assert torch.equal(without_grad[0], result[0]) and torch.equal(without_grad[1], torch.zeros_like(result[1]))


@pytest.mark.parametrize("backend", [pytest.param(n, id=n) for n in cpu_backends(("torch", "cpp"))])
def test_conv_sample_score_empty_batch_and_non_finite_rows(backend):
    m, inputs, deltas, weight, grad = _conv_inputs(CONV_CASES[0].values[0], (4, 4, 9, 9), 1, torch.float32)
    empty = ops.conv_sample_score(
        [inputs[0][:0]], [deltas[0][:0]], weight, m.stride, m.dilation, 1, grad, backend=backend
    )
    assert [t.shape for t in empty] == [(0,), (0,)]
    inputs[0][2, 1, 3, 3] = float("nan")
    sq, dot = ops.conv_sample_score(inputs, deltas, weight, m.stride, m.dilation, 1, grad, backend=backend)
    assert sq[2].isnan() and dot[2].isnan() and torch.isfinite(sq[[0, 1, 3]]).all()


def test_conv_sample_score_checks_its_inputs():
    m, inputs, deltas, weight, grad = _conv_inputs(CONV_CASES[0].values[0], (2, 4, 9, 9), 1, torch.float32)
    with pytest.raises(ValueError, match="non-empty lists of one length"):
        ops.conv_sample_score(inputs, deltas + deltas, weight, m.stride, m.dilation, 1, grad)
    with pytest.raises(ValueError, match="must be 4-D with 2 samples"):
        ops.conv_sample_score(inputs, [deltas[0][:1]], weight, m.stride, m.dilation, 1, grad)
    with pytest.raises(ValueError, match="weight's dtype"):
        ops.conv_sample_score([inputs[0].double()], deltas, weight, m.stride, m.dilation, 1, grad)
    with pytest.raises(ValueError, match="weight_grad"):
        ops.conv_sample_score(inputs, deltas, weight, m.stride, m.dilation, 1, grad[:1])


# --------------------------------------------------------------------------------------------------
# unfold
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(
    "shape, kernel, stride, dilation",
    [
        ((3, 4, 9, 9), (3, 3), (1, 1), (1, 1)),
        ((2, 5, 11, 10), (3, 2), (2, 3), (2, 1)),
        ((4, 3, 1, 23), (1, 5), (1, 3), (1, 2)),  # a Conv1d's input with a height of one
        ((0, 3, 5, 5), (3, 3), (1, 1), (1, 1)),
    ],
)
@pytest.mark.parametrize("backend", [pytest.param(n, id=n) for n in cpu_backends(("torch", "cpp"))])
def test_unfold_is_torch_unfold(backend, shape, kernel, stride, dilation, dtype):
    x = torch.randn(*shape, dtype=dtype)[:, :, :, :]
    expected = torch.nn.functional.unfold(x, kernel, dilation=dilation, stride=stride)
    for source in (x, x.transpose(2, 3).contiguous().transpose(2, 3)):  # another memory layout, same values
        assert torch.equal(ops.unfold(source, kernel, stride, dilation, backend=backend), expected)


def test_unfold_checks_its_inputs():
    with pytest.raises(ValueError, match="x must be a floating-point"):
        ops.unfold(torch.randn(3, 4, 5), (3, 3), (1, 1), (1, 1))


# --------------------------------------------------------------------------------------------------
# kron_project
# --------------------------------------------------------------------------------------------------

# (N, T, d_in, d_out, groups, r_in, r_out): one row and position, a 7x7 map, groups, wide layers,
# ranks above and below the widths.
KRON_SHAPES = [
    (1, 1, 7, 3, 1, 4, 2),
    (6, 49, 9, 5, 3, 8, 5),
    (4, 49, 129, 17, 1, 16, 16),
    (3, 1, 129, 1001, 1, 32, 24),
    (2, 7, 1, 1, 2, 1, 1),
]


def _kron_inputs(n, t, d_in, d_out, groups, r_in, r_out, dtype, device, transposed=False):
    a, delta, _ = _linear_inputs(n, t, d_in, d_out, groups, dtype, device, transposed=transposed)
    p_in = torch.randn(r_in, d_in, dtype=torch.float64).to(device=device, dtype=dtype)
    p_out = torch.randn(groups, r_out, d_out, dtype=torch.float64).to(device=device, dtype=dtype)
    return a, delta, p_in, p_out


@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "unfold-layout"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", KRON_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("device, backend", BACKEND_CASES)
def test_kron_project(device, backend, shape, dtype, transposed):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels serve float32")
    inputs = _kron_inputs(*shape, dtype, device, transposed=transposed)
    expected = torch_ops.kron_project(*(t.double() for t in inputs))
    baseline = torch_ops.kron_project(*(t.float() for t in inputs))
    result = ops.kron_project(*inputs, backend=backend)
    assert result.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _close([result], [expected], [baseline], dtype)


def test_kron_project_torch_backend_against_materialized_gradients():
    """The torch backend itself: P_out (delta^T a) P_in^T with the gradient formed explicitly."""
    a, delta, p_in, p_out = _kron_inputs(6, 11, 5, 4, 2, 3, 3, torch.float64, "cpu")
    g = delta.transpose(1, 2) @ a
    expected = p_out.repeat(3, 1, 1) @ g @ p_in.T
    assert relative_error(torch_ops.kron_project(a, delta, p_in, p_out), expected) < 1e-12


# --------------------------------------------------------------------------------------------------
# factored_min_distance
# --------------------------------------------------------------------------------------------------


def _distance_inputs(n, k, d, offset, dtype, device):
    left = torch.randn(n, k, dtype=torch.float64)
    right = torch.randn(n, d, dtype=torch.float64)
    sq_norm = left.square().sum(1) * (right.square().sum(1) + offset)
    min_dist = torch.rand(n, dtype=torch.float64) * sq_norm.max() * 2
    return [t.to(device=device, dtype=dtype) for t in (left, right, sq_norm, min_dist)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("n, k, d", [(2, 2, 1), (37, 10, 129), (300, 1001, 64)])
@pytest.mark.parametrize("device, backend", BACKEND_CASES)
def test_factored_min_distance(device, backend, n, k, d, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels serve float32")
    for center, offset in ((0, 1.0), (n - 1, 0.0), (n // 2, 1.0)):
        left, right, sq_norm, min_dist = _distance_inputs(n, k, d, offset, dtype, device)
        expected = torch_ops.factored_min_distance(
            left.double(), right.double(), offset, sq_norm.double(), center, min_dist.double()
        )
        baseline = torch_ops.factored_min_distance(
            left.float(), right.float(), offset, sq_norm.float(), center, min_dist.float()
        )
        result = ops.factored_min_distance(left, right, offset, sq_norm, center, min_dist, backend=backend)
        assert result.dtype == dtype and result.shape == (n,)
        _close([result], [expected], [baseline], dtype)


def test_factored_min_distance_torch_backend_against_materialized_gradients():
    left, right, _, _ = _distance_inputs(9, 4, 3, 1.0, torch.float64, "cpu")
    g = (left[:, :, None] * torch.cat([right, torch.ones(9, 1, dtype=torch.float64)], 1)[:, None]).flatten(1)
    sq_norm = g.square().sum(1)
    min_dist = torch.full((9,), float("inf"), dtype=torch.float64)
    result = torch_ops.factored_min_distance(left, right, 1.0, sq_norm, 4, min_dist)
    assert relative_error(result, (g - g[4]).square().sum(1)) < 1e-12


# --------------------------------------------------------------------------------------------------
# Index arithmetic of the Triton kernels
# --------------------------------------------------------------------------------------------------

# Compiles the kernels named in argv[1] for sm_90 (no GPU needed) and prints their Triton IR as JSON. It runs in a
# process of its own: here TRITON_INTERPRET=1 has replaced the kernels with the interpreter's stand-ins.
_TTIR_OF_KERNELS = r"""
import importlib, json, sys
import triton, triton.compiler
from triton.backends.compiler import GPUTarget

def ttir(module, name, constexprs):
    fn = getattr(importlib.import_module(f"fastdal.kernels.{module}"), name)
    options = {"num_warps": constexprs.pop("num_warps", 4), "num_stages": constexprs.pop("num_stages", 2)}
    signature = {}
    for arg, param in zip(fn.arg_names, fn.params):
        if param.is_constexpr or arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = "*i64" if arg == "label_ptr" else "*fp32"
        else:
            signature[arg] = "fp32" if arg in ("gamma", "offset") else "i32"  # sizes and strides below 2^31
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ttir"]

print(json.dumps([ttir(m, k, c) for m, k, c in json.loads(sys.argv[1])]))
"""


def _int32_products_of_arguments(ttir: str) -> list[str]:
    """The int32 multiplications of a kernel's Triton IR with an operand computed from an int32 argument (a size
    or a stride): each can wrap past 2^31 when the tensors are large, however the launcher typed the argument."""
    header = re.search(r"tt\.func public @\w+\((.*?)\)\s*attributes", ttir, re.S)
    assert header is not None, ttir[:2000]
    derived = set(re.findall(r"(%\w+): i32\b", header.group(1)))
    lines = ttir.splitlines()
    grew = True
    while grew:  # to a fixed point: loops carry values upwards
        grew = False
        for line in lines:
            m = re.match(r"\s*(%\w+)(?::\d+)? = (.*)", line)
            if m and m.group(1) not in derived and derived & set(re.findall(r"%\w+", m.group(2))):
                derived.add(m.group(1))
                grew = True
    products = []
    for line in lines:
        m = re.match(r"\s*%\w+ = arith\.muli (%\w+), (%\w+) : (\S+)", line)
        if m and (m.group(3) == "i32" or m.group(3).endswith("xi32>")) and derived & {m.group(1), m.group(2)}:
            products.append(line.strip())
    return products


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_index_in_int64():
    """No Triton kernel multiplies a size or a stride in int32 (a weight of d_out d_in >= 2^31 elements, a
    sequence-first tensor whose position stride times T passes 2^31, a (splits, 8, N) buffer): an index is int64
    before such a product. Checked on the kernels' Triton IR for sm_90, since a tensor that large (8 GiB) does
    not fit a test; the check finds the int32 products of the kernels before this rule."""
    from fastdal.kernels import factored_min_distance, kron_project, last_layer_score, linear_sample_score

    flags = {"HAS_BIAS": True, "HAS_GW": True, "HAS_GB": True, "PRECISION": "tf32x3"}
    jobs = [
        ["last_layer_score", "_last_layer_score_kernel", {**last_layer_score.config(5, 300, 33), **flags}],
        ["last_layer_score", "_last_layer_score_kernel", {**last_layer_score.config(5, 300, 33, 1), **flags}],
        ["last_layer_score", "_merge_splits_kernel", {"HAS_GW": True, "HAS_GB": True, "BLOCK_N": 128}],
        ["factored_min_distance", "_factored_min_distance_kernel", factored_min_distance.config(37, 10, 129)],
        ["kron_project", "_kron_project_kernel", {**kron_project.config(9, 33, 17, 8, 5), "PRECISION": "tf32x3"}],
    ]
    for kind, extra in (("direct", {"HAS_G": True}), ("ghost_sq", {}), ("ghost_dot", {})):
        launch = {**linear_sample_score.config(kind, 9, 33, 17), **extra, "PRECISION": "tf32x3"}
        jobs.append(["linear_sample_score", f"_{kind}_kernel", launch])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-c", _TTIR_OF_KERNELS, json.dumps(jobs)], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    found = [_int32_products_of_arguments(ttir) for ttir in json.loads(run.stdout)]
    assert len(found) == len(jobs)
    assert not any(found), {f"{m}.{k} {c}": products for (m, k, c), products in zip(jobs, found) if products}


# --------------------------------------------------------------------------------------------------
# Registration of the compiled ops
# --------------------------------------------------------------------------------------------------

needs_extension = pytest.mark.skipif(backends.available()["cpp"] is not None, reason="fastdal._C is not built")


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_last_layer_score(device):
    for bias in (True, False):
        inputs = _last_inputs(5, 9, 7, torch.float32, device, bias=bias)
        torch.library.opcheck(torch.ops.fastdal.last_layer_score.default, (*inputs, 2.0))
    if device == "cuda":  # a half head (float32 G and outputs): the CUDA kernel's only
        for dtype in (torch.float16, torch.bfloat16):
            h, w, b, gw, gb = _last_inputs(5, 9, 7, torch.float32, device)
            torch.library.opcheck(
                torch.ops.fastdal.last_layer_score.default, (h.to(dtype), w.to(dtype), b.to(dtype), gw, gb, 2.0)
            )


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_linear_sample_score(device):
    for ghost in (False, True):
        a, delta, grad = _linear_inputs(4, 5, 3, 2, 2, torch.float32, device)
        torch.library.opcheck(torch.ops.fastdal.linear_sample_score.default, (a, delta, grad, 2, ghost))
        torch.library.opcheck(torch.ops.fastdal.linear_sample_score.default, (a, delta, None, 2, ghost))


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_kron_project(device):
    inputs = _kron_inputs(4, 5, 3, 2, 2, 3, 2, torch.float32, device)
    torch.library.opcheck(torch.ops.fastdal.kron_project.default, inputs)


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_factored_min_distance(device):
    left, right, sq_norm, min_dist = _distance_inputs(6, 3, 4, 1.0, torch.float32, device)
    torch.library.opcheck(torch.ops.fastdal.factored_min_distance.default, (left, right, 1.0, sq_norm, 2, min_dist))
