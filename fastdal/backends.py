"""Backend registry: which implementations of fastdal's ops can run here, and which one a call uses.

* ``torch``: vectorized PyTorch (fastdal/torch_ops.py); every device and dtype.
* ``cpp``: the C++ CPU kernels of ``fastdal._C`` (OpenMP); CPU float32/float64 tensors.
* ``cuda``: the CUDA kernels of ``fastdal._C``; CUDA float32/float64 tensors, and for ``last_layer_score`` a
  half head too (below).
* ``triton``: the Triton kernels of ``fastdal.kernels``; CUDA float32 tensors (and a half head for
  ``last_layer_score``), and CPU tensors under ``TRITON_INTERPRET=1`` (Triton's interpreter, for tests only).
* ``reference``: the per-sample autograd loop (fastdal/reference.py), for ``fastdal.score`` only.

Dtypes: a kernel takes tensors of one dtype, except that the GPU backends' ``last_layer_score`` also takes a
half model's head: ``h``, ``weight`` and ``bias`` in float16 or bfloat16 with ``weight_grad`` and ``bias_grad``
in float32 (the accumulation dtype of a half model's G), summing in float32 and returning float32.

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
# The dtypes of a backend's kernels, all tensors of a call in one of them (torch takes any).
_KERNEL_DTYPES = {CPP: (torch.float32, torch.float64), CUDA: (torch.float32, torch.float64), TRITON: (torch.float32,)}
# And a half head: the ops whose GPU kernels also take inputs in these dtypes with float32 gradients ``grads``
# (load, convert to float32 in registers, sum in float32). The cpp kernels have no half path: on the CPU a half
# model's head takes the torch backend, which upcasts to float32.
_HALF_DTYPES = (torch.float16, torch.bfloat16)
_HALF_HEAD = {CUDA: frozenset({"last_layer_score"}), TRITON: frozenset({"last_layer_score"})}
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


def choose(op: str, backend: str, tensors: list[torch.Tensor], grads: list[torch.Tensor] = ()) -> str:
    """The backend that runs ``op`` on ``tensors`` and ``grads`` (all on one device, checked by the op).

    ``grads`` are the op's accumulated gradients where their dtype may differ from the other tensors' (the
    ``weight_grad`` and ``bias_grad`` of ``last_layer_score``: float32 next to a half head); every other
    tensor goes in ``tensors``, the first of them on the op's device.

    Raises:
        ValueError: if a forced backend cannot serve the tensors, listing why.
    """
    backend = requested(backend)
    if backend == REFERENCE:
        raise ValueError(f"the reference backend computes fastdal.score only, not the op {op!r}")
    if backend != AUTO and has_op(backend, op):
        reasons = _reasons(backend, op, tensors, grads)
        if reasons:
            raise ValueError(f"backend {backend!r} cannot run {op} on these tensors: " + "; ".join(reasons))
        return backend
    for name in _PREFERENCE.get(tensors[0].device.type, ()):
        if not _reasons(name, op, tensors, grads):
            return name
    return TORCH


def _reasons(name: str, op: str, tensors: list[torch.Tensor], grads: list[torch.Tensor] = ()) -> list[str]:
    reasons = []
    machine = _machine_reason(name, tensors[0].device)
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
    dtype = _dtype_reason(name, op, tensors, grads)
    if dtype is not None:
        reasons.append(dtype)
    if name in (CPP, CUDA) and machine is None and not _ext.has_kernel(op, "CPU" if name == CPP else "CUDA"):
        reasons.append(f"fastdal._C has no {name} kernel for {op}")
    return reasons


def _dtype_reason(name: str, op: str, tensors: list[torch.Tensor], grads: list[torch.Tensor]) -> str | None:
    """None if backend ``name``'s kernel of ``op`` takes these dtypes (module docstring, "Dtypes"), else why not."""
    inputs, given = {t.dtype for t in tensors}, {t.dtype for t in grads}
    half = op in _HALF_HEAD.get(name, ())
    if len(inputs) == 1:
        (dtype,) = inputs
        if dtype in _KERNEL_DTYPES[name] and given <= {dtype}:
            return None
        if half and dtype in _HALF_DTYPES and given <= {torch.float32}:
            return None
    served = f"tensors of one dtype among {_names(_KERNEL_DTYPES[name])}"
    if half:
        served += f", or {op}'s inputs in {_names(_HALF_DTYPES)} with float32 gradients"
    elif name == CPP:
        served += " (no float16/bfloat16 kernels: on the CPU a half model's tensors take the torch backend)"
    got = sorted(map(str, inputs | given))
    if grads:
        got = f"inputs {sorted(map(str, inputs))} and gradients {sorted(map(str, given))}"
    return f"{name} serves {served}, got {got}"


def _names(dtypes: tuple[torch.dtype, ...]) -> str:
    return " and ".join(str(d).removeprefix("torch.") for d in dtypes)


def _machine_reason(name: str, device: torch.device | None = None) -> str | None:
    """Why backend ``name`` cannot run here at all, or on ``device`` (default: the current CUDA device)."""
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
        return _kernel_image_reason(device if device is not None and device.type == "cuda" else None)
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton needs a GPU; without one it runs only under TRITON_INTERPRET=1 (its interpreter, for tests)"
    return None


_IMAGE_REASONS: dict[int, str | None] = {}


def _kernel_image_reason(device: torch.device | None) -> str | None:
    """Why fastdal._C's CUDA kernels cannot run on ``device`` (default: the current one): a build without device
    code for its architecture (e.g. a Turing or Volta GPU and a build for newer ones). Asked once per device."""
    index = torch.cuda.current_device() if device is None or device.index is None else device.index
    if index not in _IMAGE_REASONS:
        image = torch.ops.fastdal.cuda_kernel_image(torch.empty(0, device=f"cuda:{index}"))
        if image:
            _IMAGE_REASONS[index] = None
        else:
            major, minor = torch.cuda.get_device_capability(index)
            _IMAGE_REASONS[index] = (
                f"fastdal._C holds no device code for cuda:{index} ({torch.cuda.get_device_name(index)}, compute "
                f"capability {major}.{minor}); rebuild it with TORCH_CUDA_ARCH_LIST=\"{major}.{minor}\" "
                "(see the README's GPU section)"
            )
    return _IMAGE_REASONS[index]
