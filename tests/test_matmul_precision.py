"""The matmul-precision contract of fastdal/precision.py, checked on the CPU.

Tensor cores cannot run here, but their arithmetic can: rounding float32 to TF32 is a mantissa mask, so
the "tf32x3" split (hi = tf32(x), lo = tf32(x - hi); a_hi b_hi + a_hi b_lo + a_lo b_hi in float32) is
emulated exactly in its inputs. The logits and ``c = G_W h`` of ``last_layer_score`` are formed that
way and the score is finished in float64; its error against the float64 reference must be at most
twice that of the float32 torch backend (DESIGN.md's chain of truth). Plain "tf32" must fail the same
bound, so the check can tell the two apart.
"""

import importlib
import subprocess
import sys

import pytest
import torch

import fastdal
from fastdal import precision, torch_ops

from conftest import relative_error


def tf32(x: torch.Tensor, truncate: bool = False) -> torch.Tensor:
    """float32 rounded to TF32's 10 mantissa bits: to nearest, ties away (cvt.rna), or truncated."""
    bits = x.contiguous().view(torch.int32)
    return ((bits if truncate else bits + 0x1000) & ~0x1FFF).view(torch.float32)


def tensor_core_mm(a: torch.Tensor, b: torch.Tensor, mode: str) -> torch.Tensor:
    """``a @ b`` in float32 as the tensor cores compute it in ``mode``."""
    if mode == "tf32":
        return tf32(a, truncate=True) @ tf32(b, truncate=True)
    a_hi, b_hi = tf32(a), tf32(b)
    a_lo, b_lo = tf32(a - a_hi), tf32(b - b_hi)
    return (a_hi @ b_lo + a_lo @ b_hi) + a_hi @ b_hi


def finish(z: torch.Tensor, c: torch.Tensor, h: torch.Tensor, gamma: float) -> torch.Tensor:
    """The score from logits z and c = G_W h, in float64 (the softmax part of last_layer_score)."""
    z, c = z.double(), c.double()
    p = torch.softmax(z, dim=1)
    e = p - torch.nn.functional.one_hot(z.argmax(1), z.shape[1]).double()
    return (e * e).sum(1) * (h.double() ** 2).sum(1) + gamma * (e * c).sum(1)


@pytest.mark.parametrize("n, d, k", [(37, 129, 10), (300, 64, 1001), (16, 4096, 1000), (8, 4096, 50000)])
def test_tf32x3_within_twice_float32_error(n, d, k):
    h = torch.randn(n, d)
    w = torch.randn(k, d) / d**0.5
    gw = torch.randn(k, d) / d**0.5
    gamma = 2.0
    expected = finish(h.double() @ w.double().T, h.double() @ gw.double().T, h, gamma)
    float32 = torch_ops.last_layer_score(h, w, None, gw, None, gamma)[0]
    allowed = 2 * relative_error(float32, expected) + 1e-7
    split = finish(tensor_core_mm(h, w.T, "tf32x3"), tensor_core_mm(h, gw.T, "tf32x3"), h, gamma)
    assert relative_error(split, expected) <= allowed
    plain = finish(tensor_core_mm(h, w.T, "tf32"), tensor_core_mm(h, gw.T, "tf32"), h, gamma)
    assert relative_error(plain, expected) > allowed  # the bound tells the modes apart


def test_mode_comes_from_context_then_environment(monkeypatch):
    monkeypatch.delenv(precision.ENV, raising=False)
    assert fastdal.get_matmul_precision() == "tf32x3"
    monkeypatch.setenv(precision.ENV, "ieee")
    assert fastdal.get_matmul_precision() == "ieee"
    with fastdal.matmul_precision("tf32"):
        assert fastdal.get_matmul_precision() == "tf32"
    assert fastdal.get_matmul_precision() == "ieee"
    monkeypatch.setenv(precision.ENV, "fast")
    with pytest.raises(ValueError, match=precision.ENV):
        fastdal.get_matmul_precision()
    with pytest.raises(ValueError, match="mode must be one of"):
        with fastdal.matmul_precision("bf16"):
            pass


@pytest.mark.parametrize("mode", precision.MODES)
def test_torch_cuda_matmul_setting_comes_back(mode):
    flags = torch.backends.cuda.matmul
    before = flags.fp32_precision
    flags.fp32_precision = "tf32"
    try:
        with precision.torch_cuda_matmuls(mode):
            assert flags.fp32_precision == ("tf32" if mode == "tf32" else "ieee")
        assert flags.fp32_precision == "tf32"
    finally:
        flags.fp32_precision = before


# How a user may have set TF32 before calling fastdal, through either of torch's APIs or both.
_USER_TF32_SETTINGS = {
    "untouched": "",
    "legacy on": "flags.allow_tf32 = True",
    "legacy off": "flags.allow_tf32 = False",
    "new tf32": "flags.fp32_precision = 'tf32'",
    "new ieee": "flags.fp32_precision = 'ieee'",
    "global high": "torch.set_float32_matmul_precision('high')",
    "global medium": "torch.set_float32_matmul_precision('medium')",
    "generic tf32": "torch.backends.fp32_precision = 'tf32'",
    "both, disagreeing": "flags.allow_tf32 = True; flags.fp32_precision = 'ieee'",
}

_TF32_CHECK = """
import torch
from fastdal import precision
flags = torch.backends.cuda.matmul

def read(get):
    try:
        return get()
    except RuntimeError:
        return "refused"

def settings():
    return {
        "allow_tf32": read(lambda: flags.allow_tf32),
        "cuda matmul": read(lambda: flags.fp32_precision),
        "global": read(torch.get_float32_matmul_precision),
        "generic": read(lambda: torch.backends.fp32_precision),
        "mkldnn matmul": read(lambda: torch.backends.mkldnn.matmul.fp32_precision),
        "cudnn": read(lambda: torch.backends.cudnn.fp32_precision),
    }

SETTING
before = settings()
for mode in precision.MODES:
    with precision.torch_cuda_matmuls(mode):
        inside = read(lambda: flags.allow_tf32)
        if before["allow_tf32"] != "refused":
            assert inside == (mode == "tf32"), (mode, inside)
    assert settings() == before, (mode, before, settings())
print("ok")
"""


@pytest.mark.parametrize("setting", list(_USER_TF32_SETTINGS))
def test_tf32_records_agree_inside_and_come_back_exactly(setting):
    """Inside fastdal's context the legacy ``allow_tf32`` reads as the mode needs (torch refuses to read it,
    and torch < 2.9 refuses a cuBLAS matmul, when the legacy and new records disagree), and every record of
    both APIs reads as before afterwards. A fresh process per setting: the records are process-wide."""
    script = _TF32_CHECK.replace("SETTING", _USER_TF32_SETTINGS[setting])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_fastdals_own_matmuls_follow_the_mode():
    """The labeled head gradient, the features' projections and inner products and the k-center distances
    run their GEMMs under the mode, whatever the user set; the user's setting comes back afterwards."""
    # fastdal.features is also the name of a function in fastdal's namespace: import the module by path
    features = importlib.import_module("fastdal.features")
    ops = importlib.import_module("fastdal.ops")
    strategies = importlib.import_module("fastdal.al.strategies")

    seen = []

    @precision.follows_mode
    def probe():
        seen.append(torch.backends.cuda.matmul.fp32_precision)

    flags = torch.backends.cuda.matmul
    before = flags.fp32_precision
    flags.fp32_precision = "tf32"
    try:
        probe()
        with fastdal.matmul_precision("tf32"):
            probe()
        with fastdal.matmul_precision("ieee"):
            probe()
        assert seen == ["ieee", "tf32", "ieee"]
        assert flags.fp32_precision == "tf32"
    finally:
        flags.fp32_precision = before
    decorated = [
        ops.last_layer_labeled_grad,
        features._apply,
        features.FactoredBlock.inner,
        features.FactoredBlock.dot,
        features.ProjectedBlock.inner,
        features.ProjectedBlock.dot,
        strategies.k_center_greedy,
    ]
    for fn in decorated:
        assert getattr(fn, "__wrapped__", None) is not None and fn.__code__ is probe.__code__, fn.__qualname__
