"""Triton kernel of ``kron_project``: per-row projection ``P_out g P_in^T`` of ``g = delta^T a``, never forming ``g``.

Row ``r`` has ``a[r]: (T, d_in)`` and ``delta[r]: (T, d_out)``; with ``P_in = p_in: (r_in, d_in)`` and
``P_out = p_out[r % groups]: (r_out, d_out)``

    out[r] = P_out delta[r]^T a[r] P_in^T = sum_t (P_out delta_t)(P_in a_t)^T: (r_out, r_in),

so per position only the two projected vectors are formed and the ``d_out x d_in`` gradient never is.

A program owns a (row, r_out tile, r_in tile) output tile and walks T in tiles of ``BLOCK_T``. For each it
builds, with ``tl.dot`` over tiles of d_in and of d_out,

    ap  = a_tile P_in^T:         (BLOCK_T, BLOCK_RI),
    dpT = P_out delta_tile^T:    (BLOCK_RO, BLOCK_T),

and accumulates ``acc += dpT @ ap``. Each program writes its own output tile, so there are no atomics and
the result is deterministic. ``a`` and ``delta`` are read through their strides (the unfolded input of a
convolution is a transposed view), and every tile is padded to the 16 that ``tl.dot`` needs with masked
loads, so T, d_in, d_out, r_in or r_out of 1 work.

Offsets. Every index is int64 before it is multiplied by a size or a stride (``r_in d_in`` or ``t * stride``
of a sequence-first tensor can pass 2^31, where int32 arithmetic would wrap to a wrong address), as in
kernels/linear_sample_score.py.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _kron_project_kernel(
    a_ptr,
    d_ptr,
    pin_ptr,
    pout_ptr,
    out_ptr,
    T,
    D_IN,
    D_OUT,
    R_IN,
    R_OUT,
    GROUPS,
    sa_n,
    sa_t,
    sa_i,
    sd_n,
    sd_t,
    sd_o,
    BLOCK_T: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_RI: tl.constexpr,
    BLOCK_RO: tl.constexpr,
    PRECISION: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    # Indices are int64 before any product with a size or stride (module docstring, "Offsets").
    ro = tl.program_id(1).to(tl.int64) * BLOCK_RO + tl.arange(0, BLOCK_RO)
    ri = tl.program_id(2).to(tl.int64) * BLOCK_RI + tl.arange(0, BLOCK_RI)
    ro_ok, ri_ok = ro < R_OUT, ri < R_IN
    a_row = a_ptr + row * sa_n
    d_row = d_ptr + row * sd_n
    p_out = pout_ptr + (row % GROUPS) * R_OUT * D_OUT
    pin_rows = ri[None, :] * D_IN
    pout_rows = ro[:, None] * D_OUT

    acc = tl.zeros((BLOCK_RO, BLOCK_RI), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        t_ok = t < T
        ap = tl.zeros((BLOCK_T, BLOCK_RI), dtype=tl.float32)  # the (t, r_in) tile of a P_in^T
        for i0 in range(0, D_IN, BLOCK_I):
            i = i0 + tl.arange(0, BLOCK_I).to(tl.int64)
            i_ok = i < D_IN
            a_tile = tl.load(
                a_row + t[:, None] * sa_t + i[None, :] * sa_i, mask=t_ok[:, None] & i_ok[None, :], other=0.0
            )
            # (BLOCK_I, BLOCK_RI) view of the row-major (r_in, d_in) P_in, so that a_tile @ it is (t, r_in).
            p_tile = tl.load(pin_ptr + pin_rows + i[:, None], mask=ri_ok[None, :] & i_ok[:, None], other=0.0)
            ap += tl.dot(a_tile, p_tile, input_precision=PRECISION)
        dpt = tl.zeros((BLOCK_RO, BLOCK_T), dtype=tl.float32)  # the (r_out, t) tile of P_out delta^T
        for o0 in range(0, D_OUT, BLOCK_O):
            o = o0 + tl.arange(0, BLOCK_O).to(tl.int64)
            o_ok = o < D_OUT
            p_tile = tl.load(p_out + pout_rows + o[None, :], mask=ro_ok[:, None] & o_ok[None, :], other=0.0)
            d_tile = tl.load(
                d_row + t[None, :] * sd_t + o[:, None] * sd_o, mask=t_ok[None, :] & o_ok[:, None], other=0.0
            )
            dpt += tl.dot(p_tile, d_tile, input_precision=PRECISION)
        acc += tl.dot(dpt, ap, input_precision=PRECISION)

    out = out_ptr + row * R_OUT * R_IN
    tl.store(out + ro[:, None] * R_IN + ri[None, :], acc, mask=ro_ok[:, None] & ri_ok[None, :])


def config(t: int, d_in: int, d_out: int, r_in: int, r_out: int) -> dict:
    """Block sizes, warps and stages for these sizes.

    ``tl.dot`` needs every block dim >= 16. The caps and warp counts keep the acc, ap, dpt and input
    tiles in a GPU program's registers: each choice below compiled for sm_90 without spills
    (``make gpu-compile`` checks every configuration the tests and benchmarks reach).
    """
    block_i, block_o = (min(32, max(16, triton.next_power_of_2(x))) for x in (d_in, d_out))
    block_ri, block_ro = (min(64, max(16, triton.next_power_of_2(x))) for x in (r_in, r_out))
    # rank tiles of 64 x 64 leave room for 16 positions a step only
    block_t = min(16 if block_ri * block_ro >= 64 * 64 else 32, max(16, triton.next_power_of_2(t)))
    # 8 warps share all but the smallest tiles (with 4, ptxas keeps 128 registers and spills; so does
    # a single stage on Triton 3.6)
    warps = 8 if block_t * max(block_i, block_o, block_ri, block_ro) >= 32 * 16 else 4
    return {
        "BLOCK_T": block_t,
        "BLOCK_I": block_i,
        "BLOCK_O": block_o,
        "BLOCK_RI": block_ri,
        "BLOCK_RO": block_ro,
        "num_warps": warps,
        "num_stages": 2,
    }


def kron_project(a: Tensor, delta: Tensor, p_in: Tensor, p_out: Tensor, precision: str = "tf32x3") -> Tensor:
    """Per-row ``P_out delta[r]^T a[r] P_in^T`` (math in the module docstring).

    Args:
        a: (N, T, d_in), any strides. delta: (N, T, d_out), any strides.
        p_in: (r_in, d_in) contiguous. p_out: (groups, r_out, d_out) contiguous, groups dividing N;
        row ``r`` uses ``p_out[r % groups]``.
        precision: how ``tl.dot`` multiplies: "tf32x3", "tf32" or "ieee" (fastdal/precision.py).
        All tensors float32 on one device (CUDA, or CPU under TRITON_INTERPRET=1).

    Returns:
        (N, r_out, r_in) float32.
    """
    n, t, d_in = a.shape
    d_out = delta.shape[2]
    groups, r_out, _ = p_out.shape
    r_in = p_in.shape[0]
    if n == 0 or t == 0 or d_in == 0 or d_out == 0 or r_in == 0 or r_out == 0:
        return torch.zeros(n, r_out, r_in, dtype=torch.float32, device=a.device)
    out = torch.empty(n, r_out, r_in, dtype=torch.float32, device=a.device)
    launch = config(t, d_in, d_out, r_in, r_out)
    with _on(a.device):
        _kron_project_kernel[(n, triton.cdiv(r_out, launch["BLOCK_RO"]), triton.cdiv(r_in, launch["BLOCK_RI"]))](
            a,
            delta,
            p_in,
            p_out,
            out,
            t,
            d_in,
            d_out,
            r_in,
            r_out,
            groups,
            *a.stride(),
            *delta.stride(),
            PRECISION=precision,
            **launch,
        )
    return out


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on the tensors' GPU rather than the current one (a no-op for the interpreter's CPU tensors)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
