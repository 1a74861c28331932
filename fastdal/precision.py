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

    Uses ``torch.backends.cuda.matmul.fp32_precision`` (the setting torch reads for cuBLAS) and restores
    the value it read, so a setting made through either torch API reads back as it was (``allow_tf32``
    on a torch too old to have the former).
    """
    flags = torch.backends.cuda.matmul
    name, on, off = (
        ("fp32_precision", "tf32", "ieee") if hasattr(flags, "fp32_precision") else ("allow_tf32", True, False)
    )
    before = getattr(flags, name)
    setattr(flags, name, on if mode == TF32 else off)
    try:
        yield
    finally:
        setattr(flags, name, before)


def follows_mode(fn: Callable) -> Callable:
    """Decorator: ``fn``'s torch CUDA matmuls run in the mode in force (:func:`torch_cuda_matmuls`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch_cuda_matmuls(get_matmul_precision()):
            return fn(*args, **kwargs)

    return wrapper
