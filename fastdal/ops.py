"""fastdal's ops: their math, their argument checks, and the backend that runs each call.

Every op has a ``torch`` implementation (fastdal/torch_ops.py), C++ CPU and CUDA kernels in the
extension ``fastdal._C`` (csrc/), and a Triton kernel (kernels/); fastdal/backends.py picks one.
The GEMM-shaped ops run their float32 GPU matmuls in the mode of fastdal/precision.py ("tf32x3" unless
asked otherwise); CPU and float64 computation is exact whatever the mode.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import numbers
from typing import NamedTuple

import torch
from torch import Tensor

from . import backends, precision, torch_ops
from .results import as_real_number


class LastLayerScore(NamedTuple):
    score: Tensor
    sq_norm: Tensor
    dot: Tensor
    pseudo_label: Tensor


def last_layer_score(
    h: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    weight_grad: Tensor | None = None,
    bias_grad: Tensor | None = None,
    gamma: float = 2.0,
    *,
    backend: str = "auto",
) -> LastLayerScore:
    """Dynamic-AL terms of a final ``nn.Linear`` from its input alone (DESIGN.md, "Last layer").

    Per row ``h_i``: ``z = W h_i + b``, ``yhat = argmax z`` (first maximum), ``p = softmax(z)``,
    ``e = p - onehot(yhat)``, ``c = G_W h_i + G_b``. The head's gradient at the pseudo label is
    ``(e h_i^T, e)``, so ``sq_norm = ||e||^2 (||h_i||^2 + 1)`` and ``dot = e . c``, where a parameter
    whose gradient is not given is left out (no ``||h||^2`` term without ``weight_grad``, no ``+1``
    without ``bias_grad``); ``score = sq_norm + gamma * dot``. A row with a non-finite logit gets NaN.

    The native kernels stream over tiles of K with an online softmax, keeping per row the running
    max ``m`` (at index ``yhat``, with ``c_yhat``), ``s' = sum_{k != yhat} exp(z_k - m)``,
    ``s2' = sum_{k != yhat} exp(2 (z_k - m))`` and ``sc' = sum_{k != yhat} exp(z_k - m) c_k``, so no
    ``N x K`` tensor exists. With ``s = 1 + s'``: ``||e||^2 = s2'/s^2 + (s'/s)^2`` and
    ``e . c = (sc' - c_yhat s') / s``, sums of positive terms that stay accurate for confident rows.

    Every backend sums in float64 for float64 ``h`` and in float32 otherwise: a half model's head (``h``,
    ``weight``, ``bias`` in float16 or bfloat16, its G in float32) runs on the GPU kernels with its half values
    converted to float32 as they are loaded, and on the torch backend upcast to float32 (fastdal/backends.py
    says which backend takes which dtypes).

    Args:
        h: (N, D) head inputs. weight: (K, D). bias: (K,) or None.
        weight_grad: (K, D) ``G_W`` or None. bias_grad: (K,) ``G_b`` or None (at least one given).
        gamma: weight of the dot-product term.
        backend: "auto", "torch", "cpp", "cuda" or "triton".

    Returns:
        ``score, sq_norm, dot`` (N,) in float64 for float64 ``h`` and float32 otherwise, and
        ``pseudo_label`` (N,) int64.
    """
    if not isinstance(h, Tensor) or h.dim() != 2 or not h.is_floating_point():
        raise ValueError(f"h must be a floating-point (N, D) tensor, got {_shape(h)}")
    d = h.shape[1]
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[1] != d:
        raise ValueError(f"weight must be (K, {d}) to match h, got {_shape(weight)}")
    k = weight.shape[0]
    if k < 1:
        raise ValueError("weight must have at least one row (one class), got K=0")
    _check_optional("bias", bias, (k,))
    _check_optional("weight_grad", weight_grad, (k, d))
    _check_optional("bias_grad", bias_grad, (k,))
    if weight_grad is None and bias_grad is None:
        raise ValueError("last_layer_score needs weight_grad, bias_grad or both")
    gamma = as_real_number(gamma)
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not math.isfinite(gamma):
        raise ValueError(f"gamma must be a finite number, got {gamma!r}")
    gamma = float(gamma)
    tensors = [t for t in (h, weight, bias) if t is not None]
    grads = [t for t in (weight_grad, bias_grad) if t is not None]
    _same_device(tensors + grads)
    name = backends.choose("last_layer_score", backend, tensors, grads)
    mode = precision.get_matmul_precision()
    if name == backends.TORCH:
        with _torch_matmuls(h, mode):
            out = torch_ops.last_layer_score(h, weight, bias, weight_grad, bias_grad, float(gamma))
    elif name == backends.TRITON:
        kernel = importlib.import_module("fastdal.kernels.last_layer_score")
        out = kernel.last_layer_score(
            *(_contiguous(t) for t in (h, weight, bias, weight_grad, bias_grad)), gamma, precision=mode
        )
    else:
        out = torch.ops.fastdal.last_layer_score(
            *(_contiguous(t) for t in (h, weight, bias, weight_grad, bias_grad)), float(gamma), mode
        )
    return LastLayerScore(*out)


def last_layer_score_logits(
    h: Tensor,
    logits: Tensor,
    weight_grad: Tensor | None = None,
    bias_grad: Tensor | None = None,
    gamma: float = 2.0,
    *,
    backend: str = "auto",
) -> LastLayerScore:
    """:func:`last_layer_score` from the logits ``z = W h + b`` a forward has already made (one GEMM,
    ``c = G_W h + G_b``, instead of two). The pseudo label is the argmax of these very logits.

    Args:
        h: (N, D) head inputs. logits: (N, K), same dtype. weight_grad: (K, D) or None. bias_grad: (K,) or
        None (at least one given). gamma: weight of the dot-product term. backend: "auto", "torch" or "cpp"
        (the GPU backends fuse ``z`` into :func:`last_layer_score` instead).
    """
    if not isinstance(h, Tensor) or h.dim() != 2 or not h.is_floating_point():
        raise ValueError(f"h must be a floating-point (N, D) tensor, got {_shape(h)}")
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != h.shape[0] or logits.dtype != h.dtype:
        raise ValueError(f"logits must be ({h.shape[0]}, K) of h's dtype {h.dtype}, got {_shape(logits)}")
    k, d = logits.shape[1], h.shape[1]
    if k < 1:
        raise ValueError("logits must have at least one column (one class), got K=0")
    _check_optional("weight_grad", weight_grad, (k, d))
    _check_optional("bias_grad", bias_grad, (k,))
    if weight_grad is None and bias_grad is None:
        raise ValueError("last_layer_score_logits needs weight_grad, bias_grad or both")
    gamma = as_real_number(gamma)
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not math.isfinite(gamma):
        raise ValueError(f"gamma must be a finite number, got {gamma!r}")
    tensors = [t for t in (h, logits, weight_grad, bias_grad) if t is not None]
    _same_device(tensors)
    name = _cpu_only("last_layer_score_logits", backend, tensors)
    if name == backends.TORCH:
        with _torch_matmuls(h, precision.get_matmul_precision()):
            sq, dot, pseudo = torch_ops.last_layer_terms_from_logits(h, logits, weight_grad, bias_grad)
        return LastLayerScore(sq + float(gamma) * dot, sq, dot, pseudo)
    out = torch.ops.fastdal.last_layer_score_logits(
        *(_contiguous(t) for t in (h, logits, weight_grad, bias_grad)), float(gamma), precision.get_matmul_precision()
    )
    return LastLayerScore(*out)


def linear_sample_score(
    a: Tensor,
    delta: Tensor,
    weight_grad: Tensor | None = None,
    *,
    groups: int = 1,
    ghost: bool | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Per-sample ``||g||^2`` and ``<g, G>`` of a weight used as ``out_t = W a_t`` over T positions.

    Row ``r`` has inputs ``a[r]: (T, d_in)`` and output gradients ``delta[r]: (T, d_out)``, and its
    weight gradient is ``g_r = delta[r]^T a[r]: (d_out, d_in)`` (a Linear applied at T positions, or
    one group of an unfolded convolution). Rows come in ``groups`` (a grouped convolution: row ``r``
    is group ``r % groups`` of sample ``r // groups``) and row ``r`` is compared with
    ``weight_grad[r % groups]``.

    * ghost: ``||g||^2 = sum_{t,s} (a_t . a_s)(delta_t . delta_s)`` over T x T tiles,
      ``<g, G> = sum_t delta_t . (G a_t)``; costs ``T^2 (d_in + d_out) + T d_in d_out``.
    * direct: ``g`` tile by tile over (d_out, d_in), each tile reduced into ``||g||^2`` and
      ``<g, G>`` at once; costs ``T d_in d_out`` plus writing ``d_in d_out`` elements.

    No per-sample gradient or T x T matrix exists outside the tile being worked on in the native
    kernels (the torch backend works in row chunks). ``ghost=None`` picks by cost
    (fastdal.torch_ops.use_ghost_norm).

    Args:
        a: (N, T, d_in). delta: (N, T, d_out), same dtype. weight_grad: (groups, d_out, d_in) or None
        (then ``dot`` is zero). groups: divides N. backend: "auto", "torch", "cpp", "cuda", "triton".

    Returns:
        ``sq_norm, dot`` (N,), float64 for float64 inputs and float32 otherwise.
    """
    if not isinstance(a, Tensor) or a.dim() != 3 or not a.is_floating_point():
        raise ValueError(f"a must be a floating-point (N, T, d_in) tensor, got {_shape(a)}")
    n, t, d_in = a.shape
    if not isinstance(delta, Tensor) or delta.dim() != 3 or delta.shape[:2] != (n, t):
        raise ValueError(f"delta must be ({n}, {t}, d_out) to match a, got {_shape(delta)}")
    if delta.dtype != a.dtype:
        raise ValueError(f"a and delta must share a dtype, got {a.dtype} and {delta.dtype}")
    d_out = delta.shape[2]
    groups = as_real_number(groups)
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups < 1 or n % groups:
        raise ValueError(f"groups must be a positive integer dividing N={n}, got {groups!r}")
    groups = int(groups)
    _check_optional("weight_grad", weight_grad, (groups, d_out, d_in))
    if ghost is None:
        ghost = torch_ops.use_ghost_norm(t, d_in, d_out)
    tensors = [x for x in (a, delta, weight_grad) if x is not None]
    _same_device(tensors)
    name = backends.choose("linear_sample_score", backend, tensors)
    mode = precision.get_matmul_precision()
    if name == backends.TORCH:
        with _torch_matmuls(a, mode):
            return torch_ops.linear_sample_score(a, delta, weight_grad, groups, bool(ghost))
    if name == backends.TRITON:
        kernel = importlib.import_module("fastdal.kernels.linear_sample_score")
        return kernel.linear_sample_score(a, delta, _contiguous(weight_grad), groups, bool(ghost), precision=mode)
    return tuple(torch.ops.fastdal.linear_sample_score(a, delta, _contiguous(weight_grad), groups, bool(ghost), mode))


def conv_sample_score(
    inputs: list[Tensor],
    deltas: list[Tensor],
    weight: Tensor,
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
    weight_grad: Tensor | None = None,
    *,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Per-sample ``||g||^2`` and ``<g, G>`` of a Conv1d/Conv2d weight, one convolution backward per sample.

    ``g_n`` is the sum over the module's calls ``c`` of the weight gradient of the *unpadded* convolution
    (padding applied to ``inputs`` beforehand) of ``inputs[c][n]`` with output gradient ``deltas[c][n]``,
    computed by PyTorch's own convolution backward on a batch of one: on CPU this beats unfolding the input
    (``linear_sample_score``), whose copy costs more than the convolution. The cpp backend runs the samples
    in one parallel loop over torch's threads; the torch backend loops over them in Python.

    Args:
        inputs, deltas: one (N, C, *spatial) input and one (N, K, *spatial_out) output gradient per call,
            all of the weight's dtype. weight: (K, C / groups, *kernel). stride, dilation: per spatial
            dimension. weight_grad: the weight's shape, or None (then ``dot`` is zero). backend: "auto",
            "torch" or "cpp" (the GPU backends have no kernel for it: "auto" takes torch there).

    Returns:
        ``sq_norm, dot`` (N,), in the weight's dtype.
    """
    if not isinstance(weight, Tensor) or weight.dim() not in (3, 4) or not weight.is_floating_point():
        raise ValueError(f"weight must be a floating-point Conv1d or Conv2d weight, got {_shape(weight)}")
    if not inputs or len(inputs) != len(deltas):
        raise ValueError(
            f"inputs and deltas must be non-empty lists of one length, got {len(inputs)} and {len(deltas)} tensors"
        )
    n = inputs[0].shape[0]
    for c, (x, delta) in enumerate(zip(inputs, deltas)):
        if x.dim() != weight.dim() or delta.dim() != weight.dim() or x.shape[0] != n or delta.shape[0] != n:
            raise ValueError(
                f"inputs[{c}] and deltas[{c}] must be {weight.dim()}-D with {n} samples, got {_shape(x)} and "
                f"{_shape(delta)}"
            )
        if x.dtype != weight.dtype or delta.dtype != weight.dtype:
            raise ValueError(f"inputs[{c}] and deltas[{c}] must have the weight's dtype {weight.dtype}")
    _check_optional("weight_grad", weight_grad, tuple(weight.shape))
    tensors = [weight, *inputs, *deltas] + ([] if weight_grad is None else [weight_grad])
    _same_device(tensors)
    name = _cpu_only("conv_sample_score", backend, tensors)
    args = (list(inputs), list(deltas), weight, list(stride), list(dilation), int(groups), weight_grad)
    if name == backends.TORCH:
        return torch_ops.conv_sample_score(*args)
    return tuple(torch.ops.fastdal.conv_sample_score(*args))


def unfold(
    x: Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    *,
    backend: str = "auto",
) -> Tensor:
    """``torch.nn.functional.unfold(x, kernel_size, dilation=dilation, stride=stride)`` of a 4-D ``x``, no padding.

    The cpp backend copies each sample in one parallel loop over torch's threads; ATen's im2col, which the torch
    backend calls, slowed down 20x when another process competed for a core (fastdal/passes' convolutions call
    this once per layer and batch). Returns (N, C kh kw, positions) in ``x``'s dtype.
    """
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point (N, C, H, W) tensor, got {_shape(x)}")
    name = _cpu_only("unfold", backend, [x])
    if name == backends.TORCH:
        return torch.nn.functional.unfold(x, kernel_size, dilation=dilation, stride=stride)
    return torch.ops.fastdal.unfold(x, list(kernel_size), list(stride), list(dilation))


def kron_project(a: Tensor, delta: Tensor, p_in: Tensor, p_out: Tensor, *, backend: str = "auto") -> Tensor:
    """Per-row random projection ``P_out g P_in^T`` of a weight gradient ``g = delta^T a``, never forming ``g``.

    Row ``r`` has inputs ``a[r]: (T, d_in)`` and output gradients ``delta[r]: (T, d_out)``; its
    projected gradient is ``sum_t (P_out delta_t)(P_in a_t)^T: (r_out, r_in)`` with
    ``P_in = p_in`` and ``P_out = p_out[r % groups]`` (rows come in groups as in
    :func:`linear_sample_score`). Costs ``T (d_in r_in + d_out r_out + r_in r_out)`` per row instead of
    the ``T d_in d_out`` of forming ``g``.

    Args:
        a: (N, T, d_in). delta: (N, T, d_out). p_in: (r_in, d_in). p_out: (groups, r_out, d_out),
        groups dividing N. All of one floating dtype. backend: "auto", "torch", "cpp", "cuda", "triton".

    Returns:
        (N, r_out, r_in), float64 for float64 inputs and float32 otherwise.
    """
    if not isinstance(a, Tensor) or a.dim() != 3 or not a.is_floating_point():
        raise ValueError(f"a must be a floating-point (N, T, d_in) tensor, got {_shape(a)}")
    n, t, d_in = a.shape
    if not isinstance(delta, Tensor) or delta.dim() != 3 or delta.shape[:2] != (n, t):
        raise ValueError(f"delta must be ({n}, {t}, d_out) to match a, got {_shape(delta)}")
    d_out = delta.shape[2]
    if not isinstance(p_in, Tensor) or p_in.dim() != 2 or p_in.shape[1] != d_in:
        raise ValueError(f"p_in must be (r_in, {d_in}) to match a, got {_shape(p_in)}")
    if not isinstance(p_out, Tensor) or p_out.dim() != 3 or p_out.shape[2] != d_out:
        raise ValueError(f"p_out must be (groups, r_out, {d_out}) to match delta, got {_shape(p_out)}")
    groups = p_out.shape[0]
    if groups < 1 or n % groups:
        raise ValueError(f"p_out's first dimension (groups) must divide N={n}, got {groups}")
    tensors = [a, delta, p_in, p_out]
    if len({x.dtype for x in tensors}) > 1:
        raise ValueError(f"a, delta, p_in and p_out must share a dtype, got {[str(x.dtype) for x in tensors]}")
    _same_device(tensors)
    name = backends.choose("kron_project", backend, tensors)
    mode = precision.get_matmul_precision()
    if name == backends.TORCH:
        with _torch_matmuls(a, mode):
            return torch_ops.kron_project(a, delta, p_in, p_out)
    if name == backends.TRITON:
        kernel = importlib.import_module("fastdal.kernels.kron_project")
        return kernel.kron_project(a, delta, p_in.contiguous(), p_out.contiguous(), precision=mode)
    return torch.ops.fastdal.kron_project(a, delta, p_in.contiguous(), p_out.contiguous(), mode)


def factored_min_distance(
    left: Tensor,
    right: Tensor,
    offset: float,
    sq_norm: Tensor,
    center: int,
    min_dist: Tensor,
    *,
    backend: str = "auto",
) -> Tensor:
    """One k-means++ distance update over factored gradients, without forming them.

    Row ``i`` stands for ``g_i = left_i (x) [right_i, sqrt(offset)]`` (a last-layer gradient: ``left``
    the softmax residual ``e``, ``right`` the head input ``h``, ``offset`` 1 with a bias and 0
    without), so ``<g_i, g_c> = (left_i . left_c)(right_i . right_c + offset)``. Returns
    ``min(min_dist_i, ||g_i - g_c||^2)`` with ``||g_i - g_c||^2 = sq_norm_i + sq_norm_c - 2 <g_i, g_c>``
    clamped at zero (rounding may make it slightly negative), for the centre ``c = center``.

    Args:
        left: (N, K). right: (N, D). offset: a finite number. sq_norm: (N,) ``||g_i||^2``.
        center: a row index. min_dist: (N,) current squared distances to the nearest centre.
        All tensors of one floating dtype. backend: "auto", "torch", "cpp", "cuda", "triton".

    Returns:
        (N,) updated squared distances, in the inputs' dtype.
    """
    if not isinstance(left, Tensor) or left.dim() != 2 or not left.is_floating_point():
        raise ValueError(f"left must be a floating-point (N, K) tensor, got {_shape(left)}")
    n = left.shape[0]
    if not isinstance(right, Tensor) or right.dim() != 2 or right.shape[0] != n:
        raise ValueError(f"right must be ({n}, D) to match left, got {_shape(right)}")
    for name, t in (("sq_norm", sq_norm), ("min_dist", min_dist)):
        if not isinstance(t, Tensor) or tuple(t.shape) != (n,):
            raise ValueError(f"{name} must be a tensor of shape ({n},), got {_shape(t)}")
    offset = as_real_number(offset)
    if isinstance(offset, bool) or not isinstance(offset, numbers.Real) or not math.isfinite(offset):
        raise ValueError(f"offset must be a finite number, got {offset!r}")
    offset = float(offset)
    center = as_real_number(center)
    if isinstance(center, bool) or not isinstance(center, numbers.Integral) or not 0 <= center < n:
        raise ValueError(f"center must be a row index in [0, {n}), got {center!r}")
    center = int(center)
    tensors = [left, right, sq_norm, min_dist]
    if len({x.dtype for x in tensors}) > 1:
        raise ValueError(f"left, right, sq_norm and min_dist must share a dtype, got {[str(x.dtype) for x in tensors]}")
    _same_device(tensors)
    name = backends.choose("factored_min_distance", backend, tensors)
    if name == backends.TORCH:
        return torch_ops.factored_min_distance(left, right, float(offset), sq_norm, center, min_dist)
    args = (left.contiguous(), right.contiguous(), float(offset), sq_norm.contiguous(), center, min_dist.contiguous())
    if name == backends.TRITON:
        return importlib.import_module("fastdal.kernels.factored_min_distance").factored_min_distance(*args)
    return torch.ops.fastdal.factored_min_distance(*args)


@precision.follows_mode
def last_layer_labeled_grad(h: Tensor, logits: Tensor, labels: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Closed-form summed gradient of a final ``nn.Linear`` at the true labels; no backward pass.

    With ``E = softmax(Z) - onehot(y)`` over the batch: ``G_W = E^T H`` and ``G_b = sum_i E_i``.

    Args:
        h: (B, D) input of the head; logits: (B, K) its output; labels: (B,) class indices.

    Returns:
        ``G_W (K, D)`` and ``G_b (K,)`` in ``dtype``.
    """
    e = torch_ops.residual(logits, labels, dtype)
    return e.T @ h.to(dtype), e.sum(dim=0)


def _cpu_only(op: str, backend: str, tensors: list[Tensor]) -> str:
    """The backend of an op with a cpp kernel and a torch version only: cpp where it serves the tensors, torch
    elsewhere (a GPU backend named stands for its own kernels only: fastdal/backends.py)."""
    return backends.choose(op, backend, tensors)


def _torch_matmuls(x: Tensor, mode: str) -> contextlib.AbstractContextManager:
    """The torch backend's CUDA matmuls in ``mode`` (TF32 pinned off unless "tf32"); CPU ones are left alone."""
    return precision.torch_cuda_matmuls(mode) if x.device.type == "cuda" else contextlib.nullcontext()


def _contiguous(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def _shape(x: object) -> str:
    return f"shape {tuple(x.shape)} ({x.dtype})" if isinstance(x, Tensor) else type(x).__name__


def _check_optional(name: str, t: Tensor | None, shape: tuple[int, ...]) -> None:
    if t is not None and (not isinstance(t, Tensor) or tuple(t.shape) != shape or not t.is_floating_point()):
        raise ValueError(f"{name} must be a floating-point tensor of shape {shape} or None, got {_shape(t)}")


def _same_device(tensors: list[Tensor]) -> None:
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
