"""Triton kernel of ``last_layer_score``: dynamic-AL terms of a final Linear, streamed over the classes.

Per row ``h`` of ``H: (N, D)``: ``z = W h + b``, ``yhat = argmax z`` (first maximum),
``e = softmax(z) - onehot(yhat)``, ``c = G_W h + G_b``, and

    sq_norm = ||e||^2 (||h||^2 [if G_W] + 1 [if G_b]),   dot = e . c,   score = sq_norm + gamma dot.

A program owns ``BLOCK_N`` rows and walks the K classes in tiles of ``BLOCK_K``; each ``z`` and ``c`` tile
is accumulated with ``tl.dot`` over tiles of ``BLOCK_D`` of D, so no ``N x K`` tensor ever exists. An
online softmax keeps per row the running maximum ``m`` (at ``yhat``, with ``c_yhat``) and

    s' = sum_{k != yhat} exp(z_k - m),  s2' = sum_{k != yhat} exp(2 (z_k - m)),  sc' = sum_{k != yhat} exp(z_k - m) c_k.

On a new strict maximum the sums are rescaled by ``exp(m_old - m_new)`` (squared for ``s2'``) and the old
maximum's own term ``(1, 1, c_old)`` joins them. At the end, with ``s = 1 + s'``,
``||e||^2 = s2'/s^2 + (s'/s)^2`` and ``e . c = (sc' - c_yhat s')/s``: sums of positive terms, where the
textbook ``s2/s^2 - 2/s + 1`` cancels to noise for confident rows. A row with a non-finite logit gets NaN
(its label is still an index in ``[0, K)``: NaN ranks as the maximum, as in ``torch.argmax``, except that
it only ties with a ``+inf`` before it).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _last_layer_score_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    gw_ptr,
    gb_ptr,
    score_ptr,
    sq_ptr,
    dot_ptr,
    label_ptr,
    gamma,
    N,
    K,
    D,
    HAS_BIAS: tl.constexpr,
    HAS_GW: tl.constexpr,
    HAS_GB: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols_d = tl.arange(0, BLOCK_D)
    cols_k = tl.arange(0, BLOCK_K)

    # ||h||^2 is summed from the h tiles of the first class tile: h is read from memory once when K fits
    # one tile (the bandwidth-bound case), and re-read per class tile (from L2) only when it does not.
    h_sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    yhat = tl.zeros((BLOCK_N,), dtype=tl.int32)
    c_yhat = tl.zeros((BLOCK_N,), dtype=tl.float32)
    s1 = tl.zeros((BLOCK_N,), dtype=tl.float32)  # s'
    s2 = tl.zeros((BLOCK_N,), dtype=tl.float32)  # s2'
    sc = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sc'
    bad = tl.zeros((BLOCK_N,), dtype=tl.int1)

    for k0 in range(0, K, BLOCK_K):
        k = k0 + cols_k
        k_ok = k < K
        k_rows = k.to(tl.int64) * D  # K * D can pass 2^31
        z = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        c = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + cols_d
            d_ok = d < D
            x = tl.load(h_ptr + rows[:, None] * D + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            # (BLOCK_D, BLOCK_K) views of the row-major (K, D) matrices, so that x @ tile is a (rows, classes) tile.
            tile = k_rows[None, :] + d[:, None]
            tile_ok = k_ok[None, :] & d_ok[:, None]
            z += tl.dot(x, tl.load(w_ptr + tile, mask=tile_ok, other=0.0), input_precision=PRECISION)
            if HAS_GW:
                c += tl.dot(x, tl.load(gw_ptr + tile, mask=tile_ok, other=0.0), input_precision=PRECISION)
                if k0 == 0:
                    h_sq += tl.sum(x * x, axis=1)
        if HAS_BIAS:
            z += tl.load(b_ptr + k, mask=k_ok, other=0.0)[None, :]
        if HAS_GB:
            c += tl.load(gb_ptr + k, mask=k_ok, other=0.0)[None, :]

        finite = (z == z) & (tl.abs(z) != float("inf"))
        bad |= tl.max((~finite & k_ok[None, :]).to(tl.int32), axis=1) > 0
        # NaN ranks as the maximum, as in torch.argmax, so a bad row still gets a label; padding never wins nor adds.
        z = tl.where(z != z, float("inf"), z)
        z = tl.where(k_ok[None, :], z, float("-inf"))

        tile_max = tl.max(z, axis=1)
        first = (z == tile_max[:, None]) & k_ok[None, :]
        tile_arg = tl.min(tl.where(first, k[None, :], K), axis=1).to(tl.int32)
        is_new = tile_max > m  # strict: an equal logit in a later tile never takes the label
        m_new = tl.maximum(m, tile_max)
        alpha = tl.where(is_new, tl.exp(m - m_new), 1.0)
        moved = tl.where(is_new, alpha, 0.0)  # the old maximum's own term exp(m_old - m_new), if it moves
        s1 = s1 * alpha + moved
        s2 = s2 * (alpha * alpha) + moved * moved
        sc = sc * alpha + moved * c_yhat
        c_new = tl.sum(tl.where(k[None, :] == tile_arg[:, None], c, 0.0), axis=1)
        c_yhat = tl.where(is_new, c_new, c_yhat)
        yhat = tl.where(is_new, tile_arg, yhat)
        m = m_new

        p = tl.exp(z - m[:, None])
        p = tl.where(k[None, :] == yhat[:, None], 0.0, p)  # yhat's own term is the 1 in s = 1 + s'
        s1 += tl.sum(p, axis=1)
        s2 += tl.sum(p * p, axis=1)
        sc += tl.sum(p * c, axis=1)

    s = 1.0 + s1
    e_sq = s2 / (s * s) + (s1 / s) * (s1 / s)
    scale = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HAS_GW:
        scale += h_sq
    if HAS_GB:
        scale += 1.0
    sq = tl.where(bad, float("nan"), e_sq * scale)
    dot = tl.where(bad, float("nan"), (sc - c_yhat * s1) / s)
    tl.store(sq_ptr + rows, sq, mask=row_ok)
    tl.store(dot_ptr + rows, dot, mask=row_ok)
    tl.store(score_ptr + rows, sq + gamma * dot, mask=row_ok)
    tl.store(label_ptr + rows, yhat.to(tl.int64), mask=row_ok)


def config(n: int, k: int, d: int) -> dict:
    """Block sizes, warps and pipeline stages the launcher picks for h (n, d) against K=k classes.

    ``tl.dot`` needs every block dim >= 16. A program keeps two (BLOCK_N, BLOCK_K) float32 accumulators
    (z and c) in registers next to the split operand tiles of "tf32x3". The shapes below are ones that
    compiled for sm_90 (Triton 3.7) without spills; some nearby ones do spill (64 x 64 with 32-wide D
    steps, 32 x 32, 16 x 16 with 32-wide D steps), so a class tile is 16 or the largest spill-free width.
    make gpu-compile checks every shape the tests and benchmarks reach.
    """
    block_n = min(64, max(16, triton.next_power_of_2(n)))
    block_k = 16 if k <= 16 else (32 if block_n == 16 else 64)
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "BLOCK_D": 16, "num_warps": 4, "num_stages": 2}


def last_layer_score(
    h: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    weight_grad: Tensor | None,
    bias_grad: Tensor | None,
    gamma: float,
    precision: str = "tf32x3",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Dynamic-AL terms of a final Linear, one streaming pass over the classes (math in the module docstring).

    Args:
        h: (N, D) head inputs. weight: (K, D). bias: (K,) or None.
        weight_grad: (K, D) or None. bias_grad: (K,) or None (at least one of the two given).
        gamma: weight of the dot-product term.
        precision: how ``tl.dot`` multiplies: "tf32x3", "tf32" or "ieee" (fastdal/precision.py).
        All tensors float32, contiguous, on one device (CUDA, or CPU under TRITON_INTERPRET=1).

    Returns:
        ``score, sq_norm, dot`` (N,) float32 and ``pseudo_label`` (N,) int64.
    """
    n, d = h.shape
    k = weight.shape[0]
    if k == 0:
        raise ValueError("last_layer_score needs at least one class (weight has K=0 rows)")
    score = torch.empty(n, dtype=torch.float32, device=h.device)
    sq, dot = torch.empty_like(score), torch.empty_like(score)
    label = torch.empty(n, dtype=torch.long, device=h.device)
    if n == 0:
        return score, sq, dot, label
    launch = config(n, k, d)
    with _on(h.device):
        _last_layer_score_kernel[(triton.cdiv(n, launch["BLOCK_N"]),)](
            h,
            weight,
            bias if bias is not None else h,  # unread placeholders: HAS_* compile the loads away
            weight_grad if weight_grad is not None else h,
            bias_grad if bias_grad is not None else h,
            score,
            sq,
            dot,
            label,
            float(gamma),
            n,
            k,
            d,
            HAS_BIAS=bias is not None,
            HAS_GW=weight_grad is not None,
            HAS_GB=bias_grad is not None,
            PRECISION=precision,
            **launch,
        )
    return score, sq, dot, label


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on the tensors' GPU rather than the current one (a no-op for the interpreter's CPU tensors)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
