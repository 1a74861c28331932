"""fastdal's ops: their math, their argument checks, and the backend that runs each call.

Every op has a ``torch`` implementation (fastdal/torch_ops.py), C++ CPU and CUDA kernels in the
extension ``fastdal._C`` (csrc/), and a Triton kernel (kernels/); fastdal/backends.py picks one.
"""

from __future__ import annotations

import importlib
import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import backends, torch_ops


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
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma):
        raise ValueError(f"gamma must be a finite number, got {gamma!r}")
    tensors = [t for t in (h, weight, bias, weight_grad, bias_grad) if t is not None]
    _same_device(tensors)
    name = backends.choose("last_layer_score", backend, tensors)
    if name == backends.TORCH:
        out = torch_ops.last_layer_score(h, weight, bias, weight_grad, bias_grad, float(gamma))
    elif name == backends.TRITON:
        kernel = importlib.import_module("fastdal.kernels.last_layer_score")
        out = kernel.last_layer_score(*(_contiguous(t) for t in (h, weight, bias, weight_grad, bias_grad)), gamma)
    else:
        out = torch.ops.fastdal.last_layer_score(
            *(_contiguous(t) for t in (h, weight, bias, weight_grad, bias_grad)), float(gamma)
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
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or n % groups:
        raise ValueError(f"groups must be a positive integer dividing N={n}, got {groups!r}")
    _check_optional("weight_grad", weight_grad, (groups, d_out, d_in))
    if ghost is None:
        ghost = torch_ops.use_ghost_norm(t, d_in, d_out)
    tensors = [x for x in (a, delta, weight_grad) if x is not None]
    _same_device(tensors)
    name = backends.choose("linear_sample_score", backend, tensors)
    if name == backends.TORCH:
        return torch_ops.linear_sample_score(a, delta, weight_grad, groups, bool(ghost))
    if name == backends.TRITON:
        kernel = importlib.import_module("fastdal.kernels.linear_sample_score")
        return kernel.linear_sample_score(a, delta, _contiguous(weight_grad), groups, bool(ghost))
    return tuple(torch.ops.fastdal.linear_sample_score(a, delta, _contiguous(weight_grad), groups, bool(ghost)))


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
