"""The ``torch`` backend of fastdal's ops: vectorized PyTorch, every device and dtype.

The math of each op is stated in fastdal/ops.py. Work is chunked over rows so that temporaries stay
under :data:`CHUNK_ELEMENTS` (the ``N x K`` softmax of a large head, the ``T x T`` Gram matrices and
the per-sample weight gradients exist one chunk at a time).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from .batches import all_finite

# Upper bound, in elements, on the per-chunk temporaries of one op or layer (64 MiB in float32).
CHUNK_ELEMENTS = 1 << 24

# Cost, in multiply-adds, charged per element of a materialized per-sample weight gradient by the
# choice between ghost and direct norm (use_ghost_norm). Fitted to bench/bench_norm_choice.py on CPU:
# the ghost norm wins for ResNet-18's 8x8 and 4x4 stages, the direct norm from 16x16 up (any value
# in about 18..570 agrees).
MATERIALIZE_COST = 64


def chunks(rows: int, per_row: int) -> Iterator[slice]:
    """Slices of ``rows`` whose temporaries (``per_row`` elements each) fit in CHUNK_ELEMENTS."""
    step = max(1, CHUNK_ELEMENTS // max(1, per_row))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def sq_and_dot(per_sample: Tensor, grad: Tensor | None) -> tuple[Tensor, Tensor]:
    """``||g_i||^2`` and ``<g_i, G>`` for per-sample gradients ``per_sample: (B, *shape)``."""
    flat = per_sample.reshape(per_sample.shape[0], -1)
    sq = torch.linalg.vector_norm(flat, dim=1).square()
    dot = flat @ grad.reshape(-1) if grad is not None else torch.zeros_like(sq)
    return sq, dot


def use_ghost_norm(positions: int, d_in: int, d_out: int) -> bool:
    """Ghost norm (T x T Gram matrices) or direct norm (materialized d_out x d_in gradient), by cost.

    Both pay about T d_in d_out multiply-adds (the dot-product GEMM for ghost, the per-sample gradient
    for direct); on top, ghost pays T^2 (d_in + d_out) for the Gram matrices and direct pays for
    writing and reducing d_in d_out elements per sample.
    """
    return positions * positions * (d_in + d_out) < MATERIALIZE_COST * d_in * d_out


def residual(logits: Tensor, labels: Tensor, dtype: torch.dtype) -> Tensor:
    """``e = softmax(z) - onehot(y)``: the gradient of the cross-entropy at ``y`` with respect to ``z``.

    ``e_y`` is formed as ``-sum_{k != y} p_k`` rather than ``p_y - 1``: for a confident row ``p_y`` is
    within a few ulps of 1 and the subtraction would keep only rounding noise of the tiny ``e_y``.
    """
    p = torch.softmax(logits.detach().to(dtype), dim=1)
    rows = torch.arange(p.shape[0], device=p.device)
    p[rows, labels] = 0
    p[rows, labels] = -p.sum(dim=1)
    return p


def accumulation_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@torch.no_grad()
def last_layer_score(
    h: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    weight_grad: Tensor | None,
    bias_grad: Tensor | None,
    gamma: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dtype = accumulation_dtype(h)
    n, k = h.shape[0], weight.shape[0]
    score = torch.empty(n, dtype=dtype, device=h.device)
    sq = torch.empty_like(score)
    dot = torch.empty_like(score)
    pseudo = torch.empty(n, dtype=torch.long, device=h.device)
    w = weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    gw = None if weight_grad is None else weight_grad.to(dtype)
    gb = None if bias_grad is None else bias_grad.to(dtype)
    for rows in chunks(n, 3 * k):
        x = h[rows].to(dtype)
        z = torch.nn.functional.linear(x, w, b)
        pseudo[rows] = z.argmax(dim=1)
        e = residual(z, pseudo[rows], dtype)
        scale = torch.zeros(x.shape[0], dtype=dtype, device=h.device)
        c = torch.zeros_like(z)
        if gw is not None:
            scale = scale + x.square().sum(dim=1)
            c = c + x @ gw.T
        if gb is not None:
            scale = scale + 1
            c = c + gb
        sq[rows] = e.square().sum(dim=1) * scale
        dot[rows] = (e * c).sum(dim=1)
        _nan_where_not_finite(z, sq, dot, rows)
    torch.add(sq, dot, alpha=gamma, out=score)
    return score, sq, dot, pseudo


@torch.no_grad()
def last_layer_terms_from_logits(
    h: Tensor, logits: Tensor, weight_grad: Tensor | None, bias_grad: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """``sq_norm, dot, pseudo_label`` of a final Linear from its input ``h`` and the logits its forward made:
    the math of :func:`last_layer_score` without recomputing ``z`` (one GEMM, ``c = G_W h + G_b``, instead
    of two)."""
    dtype = accumulation_dtype(h)
    n, k = logits.shape
    sq = torch.empty(n, dtype=dtype, device=h.device)
    dot = torch.empty_like(sq)
    pseudo = logits.argmax(dim=1)
    gw = None if weight_grad is None else weight_grad.to(dtype)
    gb = None if bias_grad is None else bias_grad.to(dtype)
    for rows in chunks(n, 3 * k):
        x = h[rows].to(dtype)
        e = residual(logits[rows], pseudo[rows], dtype)
        scale = torch.zeros(x.shape[0], dtype=dtype, device=h.device)
        c = torch.zeros_like(e)
        if gw is not None:
            scale = scale + x.square().sum(dim=1)
            c = c + x @ gw.T
        if gb is not None:
            scale = scale + 1
            c = c + gb
        sq[rows] = e.square().sum(dim=1) * scale
        dot[rows] = (e * c).sum(dim=1)
        _nan_where_not_finite(logits[rows], sq, dot, rows)
    return sq, dot, pseudo


def _nan_where_not_finite(z: Tensor, sq: Tensor, dot: Tensor, rows: slice) -> None:
    """NaN terms for rows whose logits are not finite. On the CPU one sum answers for the usual all-finite case;
    on a GPU reading it would make the host wait for every chunk, so the rows are masked unconditionally."""
    if z.device.type == "cpu" and all_finite(z):
        return
    finite = torch.isfinite(z).all(dim=1)
    sq[rows] = torch.where(finite, sq[rows], torch.nan)
    dot[rows] = torch.where(finite, dot[rows], torch.nan)


@torch.no_grad()
def conv_sample_score(
    inputs: list[Tensor],
    deltas: list[Tensor],
    weight: Tensor,
    stride: list[int],
    dilation: list[int],
    groups: int,
    weight_grad: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Each sample's conv weight gradient from PyTorch's convolution backward on a batch of one.

    The gradient of one sample (one layer's weight) is reduced to its norm and dot product while it
    is still in cache, so nothing larger than one weight is ever allocated.
    """
    no_padding = [0] * (weight.dim() - 2)
    flat_grad = None if weight_grad is None else weight_grad.reshape(-1)
    sq, dot = [], []
    for i in range(inputs[0].shape[0]):
        g = None
        for x, delta in zip(inputs, deltas):
            part = torch.ops.aten.convolution_backward(
                delta[i : i + 1],
                x[i : i + 1],
                weight,
                None,
                stride,
                no_padding,
                dilation,
                False,
                no_padding,
                groups,
                [False, True, False],
            )[1]
            g = part if g is None else g + part
        g = g.reshape(-1)
        sq.append(torch.linalg.vector_norm(g).square())
        dot.append(g @ flat_grad if flat_grad is not None else torch.zeros_like(sq[-1]))
    if not sq:
        return weight.new_zeros(0), weight.new_zeros(0)
    return torch.stack(sq), torch.stack(dot)


@torch.no_grad()
def linear_sample_score(
    a: Tensor, delta: Tensor, weight_grad: Tensor | None, groups: int, ghost: bool
) -> tuple[Tensor, Tensor]:
    dtype = accumulation_dtype(a)
    n, t, d_in = a.shape
    d_out = delta.shape[2]
    sq = torch.zeros(n, dtype=dtype, device=a.device)
    dot = torch.zeros_like(sq)
    if sq.numel() == 0 or t == 0:
        return sq, dot  # no positions: the gradient is zero
    grad = None if weight_grad is None else weight_grad.to(dtype)
    # Rows come in whole groups (row r uses weight_grad[r % groups]), so chunks start at a group edge.
    per_row = 2 * t * t + d_out * t if ghost else d_out * d_in
    step = max(groups, (max(1, CHUNK_ELEMENTS // max(1, per_row)) // groups) * groups)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        x = a[rows].to(dtype)
        d = delta[rows].to(dtype)
        if ghost:
            if t == 1:
                sq[rows] = x.square().sum(dim=(1, 2)) * d.square().sum(dim=(1, 2))
            else:
                sq[rows] = ((x @ x.transpose(1, 2)) * (d @ d.transpose(1, 2))).sum(dim=(1, 2))
            if grad is not None:
                # <g, G> = <delta, a G^T>; einsum makes it one GEMM per group over all (row, position).
                projected = torch.einsum("rgti,goi->rgto", x.reshape(-1, groups, t, d_in), grad)
                dot[rows] = (d * projected.reshape(-1, t, d_out)).sum(dim=(1, 2))
        else:
            g = (d.transpose(1, 2) @ x).reshape(-1, groups, d_out * d_in)
            sq[rows] = torch.linalg.vector_norm(g, dim=2).square().view(-1)
            if grad is not None:
                dot[rows] = (g * grad.view(groups, -1)).sum(dim=2).view(-1)
    return sq, dot


@torch.no_grad()
def kron_project(a: Tensor, delta: Tensor, p_in: Tensor, p_out: Tensor) -> Tensor:
    dtype = accumulation_dtype(a)
    n, t, _ = a.shape
    groups, r_out, _ = p_out.shape
    r_in = p_in.shape[0]
    out = torch.zeros(n, r_out, r_in, dtype=dtype, device=a.device)
    if n == 0 or t == 0:
        return out
    pi, po = p_in.to(dtype), p_out.to(dtype)
    # Rows come in whole groups (row r uses p_out[r % groups]), so chunks start at a group edge.
    per_row = t * (r_in + r_out) + r_in * r_out
    step = max(groups, (max(1, CHUNK_ELEMENTS // max(1, per_row)) // groups) * groups)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        projected_in = a[rows].to(dtype) @ pi.T  # (b, T, r_in)
        d = delta[rows].to(dtype).reshape(projected_in.shape[0] // groups, groups, t, delta.shape[2])
        projected_out = torch.einsum("bgto,gro->bgtr", d, po).reshape(-1, t, r_out)
        out[rows] = projected_out.transpose(1, 2) @ projected_in
    return out


@torch.no_grad()
def factored_min_distance(
    left: Tensor, right: Tensor, offset: float, sq_norm: Tensor, center: int, min_dist: Tensor
) -> Tensor:
    inner = (left @ left[center]) * (right @ right[center] + offset)
    distance = (sq_norm + sq_norm[center] - 2 * inner).clamp_min_(0)
    return torch.minimum(min_dist, distance)
