"""Typed entry points of fastdal's ops: shapes and dtypes are checked here, the math lives in the backend.

For now every op runs on the ``torch`` backend; fastdal/backends.py names the others.
"""

from __future__ import annotations

import torch
from torch import Tensor


def last_layer_terms(
    h: Tensor, logits: Tensor, weight_grad: Tensor | None, bias_grad: Tensor | None, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """Closed-form terms of a final ``nn.Linear`` (DESIGN.md, "Last layer"); no backward pass.

    With ``z = W h + b``, ``p = softmax(z)``, ``yhat = argmax z``, ``e = p - onehot(yhat)`` and
    ``c = G_W h + G_b``, the head's gradient at the pseudo label is ``g = (e h^T, e)``, so
    ``||g||^2 = ||e||^2 (||h||^2 + 1)`` and ``<g, G> = e . c`` (terms of a parameter that ``G`` does not
    cover are left out).

    Args:
        h: (B, D) input of the head.
        logits: (B, K) output of the head (the model's output).
        weight_grad: (K, D) ``G_W`` or None; bias_grad: (K,) ``G_b`` or None.
        dtype: accumulation dtype.

    Returns:
        ``sq_norm (B,)``, ``dot (B,)`` in ``dtype`` and ``pseudo_label (B,)``.
    """
    if h.dim() != 2 or logits.dim() != 2 or h.shape[0] != logits.shape[0]:
        raise ValueError(f"h must be (B, D) and logits (B, K), got {tuple(h.shape)} and {tuple(logits.shape)}")
    pseudo = logits.argmax(dim=1)
    e = torch.softmax(logits.to(dtype), dim=1)
    rows = torch.arange(e.shape[0], device=e.device)
    e[rows, pseudo] -= 1
    e_sq = e.square().sum(dim=1)
    h = h.to(dtype)
    h_sq = torch.zeros_like(e_sq)
    c = torch.zeros_like(e)
    if weight_grad is not None:
        h_sq = h.square().sum(dim=1)
        c = c + h @ weight_grad.T
    if bias_grad is not None:
        h_sq = h_sq + 1
        c = c + bias_grad
    return e_sq * h_sq, (e * c).sum(dim=1), pseudo


def last_layer_labeled_grad(h: Tensor, logits: Tensor, labels: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Closed-form summed gradient of a final ``nn.Linear`` at the true labels; no backward pass.

    With ``E = softmax(Z) - onehot(y)`` over the batch: ``G_W = E^T H`` and ``G_b = sum_i E_i``.

    Args:
        h: (B, D) input of the head; logits: (B, K) its output; labels: (B,) class indices.

    Returns:
        ``G_W (K, D)`` and ``G_b (K,)`` in ``dtype``.
    """
    e = torch.softmax(logits.to(dtype), dim=1)
    e[torch.arange(e.shape[0], device=e.device), labels] -= 1
    return e.T @ h.to(dtype), e.sum(dim=0)
