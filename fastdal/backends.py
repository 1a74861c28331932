"""Backend registry: which implementations of fastdal's ops can run here, and which one a call uses.

* ``torch``: vectorized PyTorch (fastdal/torch_ops.py); every device and dtype.
* ``cpp``: the C++ CPU kernels of ``fastdal._C`` (OpenMP); CPU float32/float64 tensors.
* ``cuda``: the CUDA kernels of ``fastdal._C``; CUDA float32/float64 tensors.
* ``triton``: the Triton kernels of ``fastdal.kernels``; CUDA float32 tensors, and CPU tensors under
  ``TRITON_INTERPRET=1`` (Triton's interpreter, for tests only).
* ``reference``: the per-sample autograd loop (fastdal/reference.py), for ``fastdal.score`` only.

``"auto"`` takes the first backend of the device's preference list that serves the tensors
(CPU: cpp, torch; CUDA: cuda, triton, torch). A backend named in ``backend=`` or, when that is
``"auto"``, in the ``FASTDAL_BACKEND`` environment variable is forced for the ops it has kernels for
(the GPU backends have none for the CPU-only ops conv_sample_score, unfold and last_layer_score_logits:
for those the automatic choice stands, so ``FASTDAL_BACKEND=cuda`` still scores a convolution); if it
cannot serve the tensors of such an op, the error lists every reason.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from . import _ext

AUTO, TORCH, CPP, CUDA, TRITON, REFERENCE = "auto", "torch", "cpp", "cuda", "triton", "reference"
OP_BACKENDS = (TORCH, CPP, CUDA, TRITON)
ENV = "FASTDAL_BACKEND"
_PREFERENCE = {"cpu": (CPP, TORCH), "cuda": (CUDA, TRITON, TORCH)}
_KERNEL_DTYPES = {CPP: (torch.float32, torch.float64), CUDA: (torch.float32, torch.float64), TRITON: (torch.float32,)}
# The ops a GPU backend has kernels for (csrc/cuda, kernels/); cpp and torch have every op.
_GPU_OPS = frozenset({"last_layer_score", "linear_sample_score", "kron_project", "factored_min_distance"})


def has_op(name: str, op: str) -> bool:
    """Whether backend ``name`` has an implementation of ``op`` at all (whatever the tensors)."""
    return name not in (CUDA, TRITON) or op in _GPU_OPS


def available() -> dict[str, str | None]:
    """Every backend mapped to None if it can run on this machine, else the reason it cannot."""
    return {name: _machine_reason(name) for name in (*OP_BACKENDS, REFERENCE)}


def requested(backend: str) -> str:
    """The backend asked for: ``backend``, or ``FASTDAL_BACKEND`` when ``backend`` is "auto".

    Raises:
        TypeError/ValueError: for a backend that is not a known name.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    source = "backend"
    if backend == AUTO and os.environ.get(ENV):
        backend, source = os.environ[ENV], f"the {ENV} environment variable"
    if backend not in (AUTO, *OP_BACKENDS, REFERENCE):
        raise ValueError(f"{source} must be one of {[AUTO, *OP_BACKENDS, REFERENCE]}, got {backend!r}")
    return backend


def check_runs_here(backend: str) -> None:
    """Fail early, before any work, if a forced backend cannot run on this machine at all."""
    if backend != AUTO:
        reason = _machine_reason(backend)
        if reason is not None:
            raise ValueError(f"backend {backend!r} cannot run: {reason}")


def choose(op: str, backend: str, tensors: list[torch.Tensor]) -> str:
    """The backend that runs ``op`` on ``tensors`` (all on one device, one dtype checked by the op).

    Raises:
        ValueError: if a forced backend cannot serve the tensors, listing why.
    """
    backend = requested(backend)
    if backend == REFERENCE:
        raise ValueError(f"the reference backend computes fastdal.score only, not the op {op!r}")
    if backend != AUTO and has_op(backend, op):
        reasons = _reasons(backend, op, tensors)
        if reasons:
            raise ValueError(f"backend {backend!r} cannot run {op} on these tensors: " + "; ".join(reasons))
        return backend
    for name in _PREFERENCE.get(tensors[0].device.type, ()):
        if not _reasons(name, op, tensors):
            return name
    return TORCH


def _reasons(name: str, op: str, tensors: list[torch.Tensor]) -> list[str]:
    reasons = []
    machine = _machine_reason(name)
    if machine is not None:
        reasons.append(machine)
    if name == TORCH:
        return reasons
    if not has_op(name, op):
        reasons.append(f"{name} has no kernel for {op}")
    device = tensors[0].device.type
    wanted = {CPP: ("cpu",), CUDA: ("cuda",), TRITON: ("cuda", "cpu")}[name]
    if device not in wanted:
        reasons.append(f"{name} serves {' and '.join(wanted)} tensors, these are on {device}")
    if name == TRITON and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        reasons.append("triton runs on CPU tensors only under TRITON_INTERPRET=1 (its interpreter, for tests)")
    dtypes = {t.dtype for t in tensors}
    if not dtypes <= set(_KERNEL_DTYPES[name]) or len(dtypes) > 1:
        names = " and ".join(str(d).removeprefix("torch.") for d in _KERNEL_DTYPES[name])
        reasons.append(f"{name} serves tensors of one dtype among {names}, got {sorted(map(str, dtypes))}")
    if name in (CPP, CUDA) and machine is None and not _ext.has_kernel(op, "CPU" if name == CPP else "CUDA"):
        reasons.append(f"fastdal._C has no {name} kernel for {op}")
    return reasons


def _machine_reason(name: str) -> str | None:
    if name in (TORCH, REFERENCE):
        return None
    if name == CPP:
        return _ext.load()
    if name == CUDA:
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        missing = _ext.load()
        if missing is not None:
            return missing
        if not _ext.has_kernel("last_layer_score", "CUDA"):
            return "fastdal._C was built without CUDA (the torch it was built with is a CPU build, or nvcc was missing)"
        return None
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton needs a GPU; without one it runs only under TRITON_INTERPRET=1 (its interpreter, for tests)"
    return None
