"""How fastdal's float32 GPU kernels multiply matrices: the accuracy contract and its opt-out.

The GEMM-shaped parts of ``last_layer_score``, ``linear_sample_score`` and ``kron_project`` (the logits
``h W^T`` and ``h G_W^T``, the per-sample gradient tiles ``delta^T a``, the Gram tiles, the projections)
run on tensor cores when the tensors are float32 on a GPU. The mode decides how:

* ``"tf32x3"`` (the default): each float32 operand is split into two TF32 numbers,
  ``x = hi + lo`` with ``hi = tf32(x)`` and ``lo = tf32(x - hi)``, and a product is
  ``a_hi b_hi + a_hi b_lo + a_lo b_hi`` accumulated in float32. Contract: the error of an op against the
  float64 reference is at most twice that of torch's float32 computation with TF32 off (checked on the
  CPU in tests/test_matmul_precision.py, which rounds to TF32 with a mantissa mask).
* ``"tf32"``: one TF32 product (10-bit mantissas), about 3x faster than ``"tf32x3"`` and about 1e-3
  relative error on logits and gradient norms: an opt-in for speed where rankings, not digits, matter.
* ``"ieee"``: plain float32 fused multiply-adds, no tensor cores (the slowest; bitwise the old path).

CPU backends and float64 tensors are exact whatever the mode. The ``torch`` backend's CUDA matmuls
follow the mode too: TF32 is pinned off for ``"tf32x3"`` and ``"ieee"`` (whatever the user's
``torch.backends.cuda.matmul`` setting, which is restored afterwards) and allowed for ``"tf32"``; so do
fastdal's own matmuls outside the ops (the labeled gradient of the head, the gradient features' projections
and inner products, k-center distances: the functions decorated with :func:`follows_mode`). The user's
model runs as the user set torch up.

The mode comes from :func:`matmul_precision` (a context manager), else the ``FASTDAL_MATMUL_PRECISION``
environment variable, else ``"tf32x3"``.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from contextvars import ContextVar

import torch

TF32X3, TF32, IEEE = "tf32x3", "tf32", "ieee"
MODES = (TF32X3, TF32, IEEE)
ENV = "FASTDAL_MATMUL_PRECISION"
_chosen: ContextVar[str | None] = ContextVar("fastdal_matmul_precision", default=None)


def check_mode(mode: object, source: str = "mode") -> str:
    """``mode`` if it is one of :data:`MODES`, else a ValueError naming ``source``."""
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"{source} must be one of {list(MODES)}, got {mode!r}")
    return mode


def get_matmul_precision() -> str:
    """The mode in force: the innermost :func:`matmul_precision`, else $FASTDAL_MATMUL_PRECISION, else "tf32x3"."""
    mode = _chosen.get()
    if mode is not None:
        return mode
    if os.environ.get(ENV):
        return check_mode(os.environ[ENV], f"the {ENV} environment variable")
    return TF32X3


@contextlib.contextmanager
def matmul_precision(mode: str) -> Iterator[str]:
    """Run the enclosed fastdal calls with float32 GPU matmuls in ``mode`` (see the module docstring).

    Example:
        with fastdal.matmul_precision("tf32"):
            scores = fastdal.score(model, pool_loader, G)
    """
    token = _chosen.set(check_mode(mode))
    try:
        yield mode
    finally:
        _chosen.reset(token)


@contextlib.contextmanager
def torch_cuda_matmuls(mode: str) -> Iterator[None]:
    """torch's CUDA float32 matmuls in ``mode``: TF32 only for "tf32"; the user's setting comes back after.

    torch >= 2.9 keeps two records of the same choice, the legacy one (``allow_tf32``, stored as the global
    ``float32_matmul_precision``) and the new ``fp32_precision`` per backend and operation, and refuses to
    read ``allow_tf32`` (torch < 2.9: refuses a cuBLAS matmul) when they disagree. So fastdal sets the choice
    through the legacy setter, which writes both records alike, and afterwards puts back every record it may
    have changed, exactly as read. Nothing is set when cuBLAS already does what ``mode`` needs; where the
    user's own records already disagree, only the new one is set (and restored).
    """
    allow = mode == TF32
    flags = torch.backends.cuda.matmul
    current = _readable(lambda: flags.allow_tf32)
    if current is allow:
        yield
        return
    if not hasattr(flags, "fp32_precision"):  # torch < 2.9: the legacy flag is the only record
        flags.allow_tf32 = allow
        try:
            yield
        finally:
            flags.allow_tf32 = current
        return
    legacy = _readable(torch.get_float32_matmul_precision)
    records = {key: torch._C._get_fp32_precision_getter(*key) for key in _FP32_PRECISION_RECORDS}
    if current is None or legacy is None:
        flags.fp32_precision = "tf32" if allow else "ieee"
    else:
        flags.allow_tf32 = allow
    try:
        yield
    finally:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy)  # rewrites some new records too: restored next
        for key, value in records.items():
            torch._C._set_fp32_precision_setter(*key, value)


# The new API's records that the legacy setters write (torch >= 2.9's fp32_precision backends and operations).
_FP32_PRECISION_RECORDS = (
    ("generic", "all"),
    ("mkldnn", "all"),
    ("mkldnn", "conv"),
    ("mkldnn", "rnn"),
    ("mkldnn", "matmul"),
    ("cuda", "all"),
    ("cuda", "conv"),
    ("cuda", "rnn"),
    ("cuda", "matmul"),
)


def _readable(read: Callable[[], object]) -> object | None:
    """``read()``, or None where torch refuses to read a setting made through both of its APIs."""
    try:
        return read()
    except RuntimeError:
        return None


def follows_mode(fn: Callable) -> Callable:
    """Decorator: ``fn``'s torch CUDA matmuls run in the mode in force (:func:`torch_cuda_matmuls`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch_cuda_matmuls(get_matmul_precision()):
            return fn(*args, **kwargs)

    return wrapper
