"""A half model's head on the fused ``last_layer_score`` kernels: float16/bfloat16 ``h``, ``weight`` and ``bias``
with float32 ``weight_grad`` and ``bias_grad`` (a half model's G), summed in float32.

The reference is the float64 torch backend on the very half values upcast (so the inputs' own rounding is
no error of the kernel's), and the tolerance the chain of truth's (DESIGN.md): at most 2x the error of the
float32 torch backend on the same upcast values, plus a small allowance. Without a GPU, Triton runs under
its interpreter, which has float16 but no bfloat16; the CUDA kernels' half paths are compile-checked for
sm_90 (make gpu-compile) and run here only on a GPU (tests marked ``gpu``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.data import DataLoader, TensorDataset

import fastdal
from fastdal import _ext, backends, ops, torch_ops

from conftest import TRITON_INTERPRETED, relative_error

ALLOWANCE = 1e-6  # float32 sums, relative to the output's scale (as tests/test_ops.py)
HALF = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _cases() -> list:
    """(device, backend): the CPU backends that take a half head (torch; triton under its interpreter), and
    every backend on CUDA tensors (marked ``gpu``)."""
    cases = [pytest.param("cpu", "torch", id="cpu-torch")]
    if TRITON_INTERPRETED and backends.available()["triton"] is None:
        cases.append(pytest.param("cpu", "triton", id="cpu-triton"))
    cases += [
        pytest.param("cuda", n, id=f"cuda-{n}", marks=[pytest.mark.gpu, NO_GPU]) for n in ("torch", "cuda", "triton")
    ]
    return cases


def _half_head(n, d, k, dtype, device, *, bias=True, weight_grad=True, bias_grad=True):
    """h, weight, bias in ``dtype``; weight_grad, bias_grad in float32."""
    h = torch.randn(n, d, dtype=torch.float64)
    w = torch.randn(k, d, dtype=torch.float64) / d**0.5 * 3
    half = [h, w, torch.randn(k, dtype=torch.float64) if bias else None]
    grads = [torch.randn(k, d, dtype=torch.float64) if weight_grad else None]
    grads.append(torch.randn(k, dtype=torch.float64) if bias_grad else None)
    return [None if t is None else t.to(device=device, dtype=dtype) for t in half] + [
        None if t is None else t.to(device=device, dtype=torch.float32) for t in grads
    ]


def _check(result, inputs, gamma):
    """float32 outputs, labels exact and the terms within the chain of truth's bound."""
    expected = torch_ops.last_layer_score(*[None if t is None else t.double().cpu() for t in inputs], gamma)
    baseline = torch_ops.last_layer_score(*[None if t is None else t.float().cpu() for t in inputs], gamma)
    assert [t.dtype for t in result[:3]] == [torch.float32] * 3 and result.pseudo_label.dtype == torch.long
    assert torch.equal(result.pseudo_label.cpu(), expected[3])
    for got, want, base in zip(result[:3], expected[:3], baseline[:3]):
        error = relative_error(got, want)
        assert error <= 2 * relative_error(base, want) + ALLOWANCE, (error, relative_error(base, want))


# (N, D, K): one class tile, K not a multiple of the tiles, and enough classes for the Triton launcher to split
# them over programs (kernels/last_layer_score.py).
HALF_SHAPES = [(1, 7, 2), (9, 33, 10), (6, 20, 130)]


@pytest.mark.parametrize("n, d, k", HALF_SHAPES)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("device, backend", _cases())
def test_half_head(device, backend, dtype, n, d, k):
    if device == "cpu" and backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter has no bfloat16")
    inputs = _half_head(n, d, k, dtype, device)
    result = ops.last_layer_score(*inputs, gamma=2.0, backend=backend)
    _check(result, inputs, 2.0)


@pytest.mark.parametrize(
    "present", [(False, True, True), (True, True, False), (True, False, True)], ids=["no-bias", "no-G_b", "no-G_W"]
)
@pytest.mark.parametrize("device, backend", _cases())
def test_half_head_optional_parameters(device, backend, present):
    bias, weight_grad, bias_grad = present
    inputs = _half_head(7, 13, 40, torch.float16, device, bias=bias, weight_grad=weight_grad, bias_grad=bias_grad)
    _check(ops.last_layer_score(*inputs, gamma=0.5, backend=backend), inputs, 0.5)


@pytest.mark.parametrize("dtype", HALF)
def test_auto_takes_a_gpu_kernel_for_a_half_head(monkeypatch, dtype):
    """The dtype rule of fastdal/backends.py on (fake) CUDA tensors of a half head, with this machine taken to
    have a GPU and the CUDA kernels built."""
    monkeypatch.setattr(backends, "_machine_reason", lambda name, device=None: None)
    monkeypatch.setattr(_ext, "has_kernel", lambda op, key: True)
    with FakeTensorMode():
        h, w, b = (torch.empty(*shape, device="cuda", dtype=dtype) for shape in ((8, 16), (5, 16), (5,)))
        gw, gb = torch.empty(5, 16, device="cuda"), torch.empty(5, device="cuda")
        # A half G, a head of mixed dtypes, a float64 G of a float32 head: no kernel takes them, torch does.
        refused = [([h, w, b], [gw.to(dtype)]), ([h, w.float()], [gw]), ([h.float(), w.float()], [gw.double()])]
        a = torch.empty(1, 8, 16, device="cuda", dtype=dtype)
    assert backends.choose("last_layer_score", "auto", [h, w, b], [gw, gb]) == backends.CUDA
    assert backends.choose("last_layer_score", "triton", [h, w, b], [gw, gb]) == backends.TRITON
    assert backends.choose("last_layer_score", "auto", [h, w], [gb]) == backends.CUDA
    for inputs, grads in refused:
        assert backends.choose("last_layer_score", "auto", inputs, grads) == backends.TORCH
        with pytest.raises(ValueError, match="backend 'cuda' cannot run last_layer_score.*float32 gradients"):
            backends.choose("last_layer_score", "cuda", inputs, grads)
    # The other GPU ops take one dtype among float32 and float64: a half linear_sample_score is torch's.
    assert backends.choose("linear_sample_score", "auto", [a, a]) == backends.TORCH


def test_cpu_half_head_takes_torch():
    """The cpp kernels have no half path: "auto" takes torch on the CPU, and a forced cpp says why."""
    if backends.available()["cpp"] is not None:
        pytest.skip("fastdal._C is not built")
    h, w, b, gw, gb = _half_head(4, 6, 5, torch.float16, "cpu")
    assert backends.choose("last_layer_score", "auto", [h, w, b], [gw, gb]) == backends.TORCH
    with pytest.raises(ValueError, match="no float16/bfloat16 kernels"):
        ops.last_layer_score(h, w, b, gw, gb, backend="cpp")


class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 24), nn.ReLU())
        self.head = nn.Linear(24, 37)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.mark.skipif(not TRITON_INTERPRETED, reason="Triton on CPU tensors needs its interpreter")
def test_score_of_a_float16_model_on_triton():
    """fastdal.score of a whole float16 model with layers="last" and backend="triton": the head's half input
    reaches the fused kernel (not upcast), G stays float32, and the scores are those of the op's reference on
    the model's own half head input."""
    model = _Mlp().to(torch.float16).eval()
    x = torch.randn(23, 6).to(torch.float16)
    y = torch.randint(0, 37, (23,))
    labeled = DataLoader(TensorDataset(x[:10], y[:10]), batch_size=4)
    pool = DataLoader(TensorDataset(x[10:]), batch_size=5)
    g = fastdal.labeled_grad(model, labeled, layers="last")
    assert all(t.dtype == torch.float32 for t in g.grads.values())
    seen = []
    kernel = __import__("fastdal.kernels.last_layer_score", fromlist=["last_layer_score"])
    launch = kernel.last_layer_score

    def spy(h, *args, **kwargs):
        seen.append(h.dtype)
        return launch(h, *args, **kwargs)

    kernel.last_layer_score = spy
    try:
        result = fastdal.score(model, pool, g, backend="triton", return_components=True)
    finally:
        kernel.last_layer_score = launch
    assert seen and set(seen) == {torch.float16}
    with torch.no_grad():
        h = model.body(x[10:])
    inputs = [h, model.head.weight.detach(), model.head.bias.detach(), g["head.weight"], g["head.bias"]]
    _check(result, inputs, 2.0)
