"""Triton kernel of ``factored_min_distance``: a k-means++ distance update over factored gradients.

Row ``i`` stands for ``g_i = left_i (x) [right_i, sqrt(offset)]``, so with ``c`` the centre

    <g_i, g_c> = (left_i . left_c)(right_i . right_c + offset),
    out_i = min(min_dist_i, max(0, sq_norm_i + sq_norm_c - 2 <g_i, g_c>)),

and no gradient is ever formed. A program owns ``BLOCK_N`` rows and walks K in tiles of ``BLOCK_K`` and D
in tiles of ``BLOCK_D``, reducing each ``(BLOCK_N, tile)`` block against the matching tile of the centre's
row; these are matrix-vector products, so plain elementwise products and row sums do the work
(``tl.dot`` would pad the centre vector to 16 columns for nothing). Each row is written by exactly one
program: no atomics, deterministic. NaN propagates through the clamp and the minimum, as in torch.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit(do_not_specialize=["center"])  # center may be 1, which Triton would fold to a constant
def _factored_min_distance_kernel(
    left_ptr,
    right_ptr,
    sq_ptr,
    min_ptr,
    out_ptr,
    offset,
    center,
    N,
    K,
    D,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    center = center.to(tl.int64)

    left_dot = tl.zeros((BLOCK_N,), dtype=tl.float32)  # left_i . left_c
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        x = tl.load(left_ptr + rows[:, None] * K + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        xc = tl.load(left_ptr + center * K + k, mask=k_ok, other=0.0)
        left_dot += tl.sum(x * xc[None, :], axis=1)

    right_dot = tl.zeros((BLOCK_N,), dtype=tl.float32)  # right_i . right_c
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        y = tl.load(right_ptr + rows[:, None] * D + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        yc = tl.load(right_ptr + center * D + d, mask=d_ok, other=0.0)
        right_dot += tl.sum(y * yc[None, :], axis=1)

    sq = tl.load(sq_ptr + rows, mask=row_ok, other=0.0)
    sq_c = tl.load(sq_ptr + center)
    distance = sq + sq_c - 2.0 * (left_dot * (right_dot + offset))
    distance = tl.maximum(distance, 0.0, propagate_nan=tl.PropagateNan.ALL)
    current = tl.load(min_ptr + rows, mask=row_ok, other=0.0)
    tl.store(out_ptr + rows, tl.minimum(current, distance, propagate_nan=tl.PropagateNan.ALL), mask=row_ok)


def config(n: int, k: int, d: int) -> dict:
    """Block sizes, warps and stages. A memory-bound pass: 64 x 64 input tiles give each GPU program
    enough loads in flight without spilling."""
    return {
        "BLOCK_N": min(64, max(16, triton.next_power_of_2(n))),
        "BLOCK_K": min(64, max(16, triton.next_power_of_2(k))),
        "BLOCK_D": min(64, max(16, triton.next_power_of_2(d))),
        "num_warps": 4,
        "num_stages": 2,
    }


def factored_min_distance(
    left: Tensor, right: Tensor, offset: float, sq_norm: Tensor, center: int, min_dist: Tensor
) -> Tensor:
    """``min(min_dist, ||g_i - g_c||^2)`` over factored gradients (math in the module docstring).

    Args:
        left: (N, K). right: (N, D). offset: a finite number. sq_norm: (N,) ``||g_i||^2``.
        center: a row index in [0, N). min_dist: (N,) current squared distances.
        All tensors float32, contiguous, on one device (CUDA, or CPU under TRITON_INTERPRET=1).

    Returns:
        (N,) float32 updated squared distances.
    """
    n, k = left.shape
    d = right.shape[1]
    out = torch.empty(n, dtype=torch.float32, device=left.device)
    if n == 0:
        return out
    launch = config(n, k, d)
    with _on(left.device):
        _factored_min_distance_kernel[(triton.cdiv(n, launch["BLOCK_N"]),)](
            left,
            right,
            sq_norm,
            min_dist,
            out,
            float(offset),
            center,
            n,
            k,
            d,
            **launch,
        )
    return out


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on the tensors' GPU rather than the current one (a no-op for the interpreter's CPU tensors)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
