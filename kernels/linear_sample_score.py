"""Triton kernels of ``linear_sample_score``: per-sample ``||g||^2`` and ``<g, G>`` of a weight used at T positions.

Row ``r`` has ``a[r]: (T, d_in)`` and ``delta[r]: (T, d_out)``; its weight gradient is
``g_r = delta[r]^T a[r]: (d_out, d_in)``, compared with ``G = weight_grad[r % groups]``:
``sq_norm_r = ||g_r||^2`` and ``dot_r = <g_r, G>``. Neither ``g_r`` nor a ``T x T`` matrix is ever
stored; each program reduces the tile it computes to one partial sum per output, and the partials
of a row (a handful per row, in a small ``(N, programs per row)`` buffer) are summed afterwards, which
keeps the result deterministic, unlike atomics.

* direct: a program per (row, d_out tile, d_in tile) accumulates its ``g`` tile with ``tl.dot`` over
  tiles of T and reduces it into ``||tile||^2`` and ``<tile, G tile>``.
* ghost: ``||g||^2 = sum_{t,s} (a_t . a_s)(delta_t . delta_s)``. A program per (row, T tile i) loops
  over the T tiles ``j >= i`` (the sum is symmetric, so off-diagonal tile pairs count twice), builds
  the two Gram tiles with ``tl.dot`` over tiles of d_in and d_out and sums their elementwise product.
  ``<g, G> = sum_t delta_t . (G a_t)``: a program per (row, T tile, d_out tile) forms ``a G^T`` for its
  tile with ``tl.dot`` over tiles of d_in and reduces it against the matching ``delta`` tile.

``a`` and ``delta`` are read through their strides (the unfolded input of a convolution is a
transposed view), and every tile is padded to the 16 that ``tl.dot`` needs with masked loads, so
T, d_in or d_out of 1 work.

Offsets. Every index is int64 before it is multiplied by a size or a stride: ``o * d_in`` passes 2^31 for a
weight of 2^31 elements, and ``t * stride`` for a sequence-first tensor (position stride ``N d``) of 2^31
elements, where int32 arithmetic would wrap to a wrong address (tests/test_ops.py checks the kernels'
Triton IR for int32 products of sizes or strides).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _direct_kernel(
    a_ptr,
    d_ptr,
    g_ptr,
    sq_part_ptr,
    dot_part_ptr,
    T,
    D_IN,
    D_OUT,
    GROUPS,
    sa_n,
    sa_t,
    sa_i,
    sd_n,
    sd_t,
    sd_o,
    HAS_G: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    PRECISION: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    # Indices are int64 before any product with a size or stride (module docstring, "Offsets").
    o = tl.program_id(1).to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O)
    i = tl.program_id(2).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    o_ok, i_ok = o < D_OUT, i < D_IN
    a_row = a_ptr + row * sa_n
    d_row = d_ptr + row * sd_n
    d_cols = o[:, None] * sd_o
    a_cols = i[None, :] * sa_i

    g = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        t_ok = t < T
        d_tile = tl.load(d_row + t[None, :] * sd_t + d_cols, mask=t_ok[None, :] & o_ok[:, None], other=0.0)
        a_tile = tl.load(a_row + t[:, None] * sa_t + a_cols, mask=t_ok[:, None] & i_ok[None, :], other=0.0)
        g += tl.dot(d_tile, a_tile, input_precision=PRECISION)

    part = row * (tl.num_programs(1) * tl.num_programs(2)) + tl.program_id(1) * tl.num_programs(2) + tl.program_id(2)
    tl.store(sq_part_ptr + part, tl.sum(g * g))
    if HAS_G:
        grad = g_ptr + (row % GROUPS) * D_OUT * D_IN
        ref = tl.load(grad + o[:, None] * D_IN + i[None, :], mask=o_ok[:, None] & i_ok[None, :], other=0.0)
        tl.store(dot_part_ptr + part, tl.sum(g * ref))


@triton.jit
def _ghost_sq_kernel(
    a_ptr,
    d_ptr,
    sq_part_ptr,
    T,
    D_IN,
    D_OUT,
    sa_n,
    sa_t,
    sa_i,
    sd_n,
    sd_t,
    sd_o,
    BLOCK_T: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    PRECISION: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    first = tl.program_id(1) * BLOCK_T
    a_row = a_ptr + row * sa_n
    d_row = d_ptr + row * sd_n
    # Indices are int64 before any product with a size or stride (module docstring, "Offsets"); each product is
    # formed once, as a vector, and broadcast into the tiles. Both operands of a Gram tile are read as
    # (positions, features) tiles, one transposed for tl.dot: one pattern of addresses for both, which keeps the
    # 16 x 32 x 32 configuration from spilling with int64 offsets (it did with the second read as (features, s)).
    t = first + tl.arange(0, BLOCK_T).to(tl.int64)
    t_ok = t < T
    t_a, t_d = t * sa_t, t * sd_t

    total = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for s0 in range(first, T, BLOCK_T):
        s = s0 + tl.arange(0, BLOCK_T).to(tl.int64)
        s_ok = s < T
        gram_a = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
        s_a = s * sa_t
        for i0 in range(0, D_IN, BLOCK_I):
            i = i0 + tl.arange(0, BLOCK_I).to(tl.int64)
            i_ok = i < D_IN
            f = i * sa_i
            a_t = tl.load(a_row + t_a[:, None] + f[None, :], mask=t_ok[:, None] & i_ok[None, :], other=0.0)
            a_s = tl.load(a_row + s_a[:, None] + f[None, :], mask=s_ok[:, None] & i_ok[None, :], other=0.0)
            gram_a += tl.dot(a_t, tl.trans(a_s), input_precision=PRECISION)
        gram_d = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
        s_d = s * sd_t
        for o0 in range(0, D_OUT, BLOCK_O):
            o = o0 + tl.arange(0, BLOCK_O).to(tl.int64)
            o_ok = o < D_OUT
            f = o * sd_o
            d_t = tl.load(d_row + t_d[:, None] + f[None, :], mask=t_ok[:, None] & o_ok[None, :], other=0.0)
            d_s = tl.load(d_row + s_d[:, None] + f[None, :], mask=s_ok[:, None] & o_ok[None, :], other=0.0)
            gram_d += tl.dot(d_t, tl.trans(d_s), input_precision=PRECISION)
        # The (i, j) and (j, i) tile pairs are equal; only j >= i is visited.
        weight = tl.where(s0 == first, 1.0, 2.0)
        total += weight * tl.sum(gram_a * gram_d, axis=1)

    tl.store(sq_part_ptr + row * tl.num_programs(1) + tl.program_id(1), tl.sum(total))


@triton.jit
def _ghost_dot_kernel(
    a_ptr,
    d_ptr,
    g_ptr,
    dot_part_ptr,
    T,
    D_IN,
    D_OUT,
    GROUPS,
    sa_n,
    sa_t,
    sa_i,
    sd_n,
    sd_t,
    sd_o,
    BLOCK_T: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    PRECISION: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    # Indices are int64 before any product with a size or stride (module docstring, "Offsets").
    t = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    o = tl.program_id(2).to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O)
    t_ok, o_ok = t < T, o < D_OUT
    a_row = a_ptr + row * sa_n
    a_rows = t[:, None] * sa_t
    grad = g_ptr + (row % GROUPS) * D_OUT * D_IN
    g_rows = o[None, :] * D_IN

    projected = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)  # the (t, o) tile of a G^T
    for i0 in range(0, D_IN, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I).to(tl.int64)
        i_ok = i < D_IN
        a_tile = tl.load(a_row + a_rows + i[None, :] * sa_i, mask=t_ok[:, None] & i_ok[None, :], other=0.0)
        g_tile = tl.load(grad + g_rows + i[:, None], mask=o_ok[None, :] & i_ok[:, None], other=0.0)
        projected += tl.dot(a_tile, g_tile, input_precision=PRECISION)
    d_tile = tl.load(
        d_ptr + row * sd_n + t[:, None] * sd_t + o[None, :] * sd_o, mask=t_ok[:, None] & o_ok[None, :], other=0.0
    )

    part = row * (tl.num_programs(1) * tl.num_programs(2)) + tl.program_id(1) * tl.num_programs(2) + tl.program_id(2)
    tl.store(dot_part_ptr + part, tl.sum(projected * d_tile))


def config(kind: str, t: int, d_in: int, d_out: int) -> dict:
    """Block sizes, warps and stages of kernel ``kind`` ("direct", "ghost_sq", "ghost_dot") for these sizes.

    ``tl.dot`` needs every block dim >= 16. The caps keep the float32 tiles in a GPU program's
    registers: each choice compiled for sm_90 (3xTF32, the default precision, holds each operand
    twice) without spills, and ``make gpu-compile`` checks every configuration the tests and
    benchmarks reach. The dimension a kernel reduces over is capped lower than the ones it keeps.
    """
    if kind not in ("direct", "ghost_sq", "ghost_dot"):
        raise ValueError(f"kind must be 'direct', 'ghost_sq' or 'ghost_dot', got {kind!r}")

    def block(x: int, cap: int) -> int:
        return min(cap, max(16, triton.next_power_of_2(x)))

    if kind == "direct":  # a (d_out x d_in) tile of g, reduced over T
        block_t, block_o, block_i = block(t, 32), block(d_out, 64), block(d_in, 64)
        warps = 8 if block_o * block_i >= 64 * 64 else 4
    elif kind == "ghost_sq":  # two (T x T) Gram tiles, reduced over d_in and d_out
        block_t = block(t, 64)
        cap = 16 if block_t == 64 else 32  # two T x T tiles of 64 leave room for 16-wide steps only
        block_o, block_i = block(d_out, cap), block(d_in, cap)
        warps = 8 if block_t * max(block_o, block_i) >= 32 * 32 else 4
    else:  # a (T x d_out) tile of a G^T, reduced over d_in
        block_t, block_o, block_i = block(t, 64), block(d_out, 64), block(d_in, 32)
        warps = 8 if block_t * block_o >= 64 * 64 else 4
    return {"BLOCK_T": block_t, "BLOCK_O": block_o, "BLOCK_I": block_i, "num_warps": warps, "num_stages": 2}


def linear_sample_score(
    a: Tensor, delta: Tensor, weight_grad: Tensor | None, groups: int, ghost: bool, precision: str = "tf32x3"
) -> tuple[Tensor, Tensor]:
    """Per-sample ``||g||^2`` and ``<g, G>`` of ``g_r = delta[r]^T a[r]`` (math in the module docstring).

    Args:
        a: (N, T, d_in), any strides. delta: (N, T, d_out), any strides.
        weight_grad: (groups, d_out, d_in) contiguous, or None (then ``dot`` is zero).
        groups: row ``r`` is compared with ``weight_grad[r % groups]``.
        ghost: Gram-matrix (ghost) norm if True, tile-by-tile direct norm otherwise.
        precision: how ``tl.dot`` multiplies: "tf32x3", "tf32" or "ieee" (fastdal/precision.py).
        All tensors float32 on one device (CUDA, or CPU under TRITON_INTERPRET=1).

    Returns:
        ``sq_norm, dot``, each (N,) float32.
    """
    n, t, d_in = a.shape
    d_out = delta.shape[2]
    if n == 0 or t == 0 or d_in == 0 or d_out == 0:
        zeros = torch.zeros(n, dtype=torch.float32, device=a.device)
        return zeros, zeros.clone()
    strides = (*a.stride(), *delta.stride())
    dot = None
    with _on(a.device):
        if not ghost:
            blocks = {**config("direct", t, d_in, d_out), "PRECISION": precision}
            n_o, n_i = triton.cdiv(d_out, blocks["BLOCK_O"]), triton.cdiv(d_in, blocks["BLOCK_I"])
            sq_part = torch.empty(n, n_o * n_i, dtype=torch.float32, device=a.device)
            dot_part = torch.empty_like(sq_part) if weight_grad is not None else sq_part
            _direct_kernel[(n, n_o, n_i)](
                a,
                delta,
                weight_grad if weight_grad is not None else a,  # unread placeholder without HAS_G
                sq_part,
                dot_part,
                t,
                d_in,
                d_out,
                groups,
                *strides,
                HAS_G=weight_grad is not None,
                **blocks,
            )
            if weight_grad is not None:
                dot = dot_part.sum(dim=1)
        else:
            blocks = {**config("ghost_sq", t, d_in, d_out), "PRECISION": precision}
            n_t = triton.cdiv(t, blocks["BLOCK_T"])
            sq_part = torch.empty(n, n_t, dtype=torch.float32, device=a.device)
            _ghost_sq_kernel[(n, n_t)](a, delta, sq_part, t, d_in, d_out, *strides, **blocks)
            if weight_grad is not None:
                blocks = {**config("ghost_dot", t, d_in, d_out), "PRECISION": precision}
                n_t, n_o = triton.cdiv(t, blocks["BLOCK_T"]), triton.cdiv(d_out, blocks["BLOCK_O"])
                dot_part = torch.empty(n, n_t * n_o, dtype=torch.float32, device=a.device)
                _ghost_dot_kernel[(n, n_t, n_o)](
                    a, delta, weight_grad, dot_part, t, d_in, d_out, groups, *strides, **blocks
                )
                dot = dot_part.sum(dim=1)
    sq = sq_part.sum(dim=1)
    return sq, dot if dot is not None else torch.zeros_like(sq)


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on the tensors' GPU rather than the current one (a no-op for the interpreter's CPU tensors)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
