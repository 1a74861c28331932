"""Backend registry: which implementations of fastdal's ops exist, and which one a call uses.

``"torch"`` (vectorized PyTorch) serves every device and dtype. ``"reference"`` (the per-sample
autograd loop of fastdal/reference.py) is never chosen automatically. The native backends
(``"cpp"``, ``"cuda"``, ``"triton"``) are named here so that asking for one gives a clear reason
instead of an unknown-name error.
"""

from __future__ import annotations

AUTO = "auto"
TORCH = "torch"
REFERENCE = "reference"

_UNAVAILABLE = {
    "cpp": "the C++ extension fastdal._C is not part of this build yet",
    "cuda": "the CUDA extension fastdal._C is not part of this build yet",
    "triton": "the Triton kernels are not part of this build yet",
}


def available() -> dict[str, str | None]:
    """Every backend name mapped to None if it can run here, else the reason it cannot."""
    return {TORCH: None, REFERENCE: None, **_UNAVAILABLE}


def resolve(backend: str) -> str:
    """The backend a call runs on: ``"auto"`` picks the first that can run, a name forces that one.

    Raises:
        ValueError: for an unknown name, or a known backend that cannot run here (with the reason).
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == AUTO:
        return TORCH
    reasons = available()
    if backend not in reasons:
        raise ValueError(f"backend must be one of {[AUTO, *reasons]}, got {backend!r}")
    if reasons[backend] is not None:
        raise ValueError(f"backend {backend!r} cannot run: {reasons[backend]}")
    return backend
