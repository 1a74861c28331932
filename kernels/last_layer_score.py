"""Triton kernel of ``last_layer_score``: dynamic-AL terms of a final Linear, streamed over the classes.

Per row ``h`` of ``H: (N, D)``: ``z = W h + b``, ``yhat = argmax z`` (first maximum),
``e = softmax(z) - onehot(yhat)``, ``c = G_W h + G_b``, and

    sq_norm = ||e||^2 (||h||^2 [if G_W] + 1 [if G_b]),   dot = e . c,   score = sq_norm + gamma dot.

A program owns ``BLOCK_N`` rows and a range of the K classes, walked in tiles of ``BLOCK_K``; each ``z`` and
``c`` tile is accumulated with ``tl.dot`` over tiles of ``BLOCK_D`` of D, so no ``N x K`` tensor ever exists.

Online softmax. A state holds per row the maximum ``m`` (at ``yhat``, with ``c_yhat``) and, over the other
classes it covers,

    s' = sum_{k != yhat} exp(z_k - m),  s2' = sum_{k != yhat} exp(2 (z_k - m)),  sc' = sum_{k != yhat} exp(z_k - m) c_k.

Each class tile makes the state of its own classes (its first maximum, its sums relative to that) and
``_merge`` folds it into the running state: the earlier state keeps the label unless the later maximum is
strictly greater (the first-maximum rule of ``torch.argmax``), and the losing side's sums join scaled by
``r = exp(m_lose - m_win)`` (``r^2`` for ``s2'``) together with its maximum's own term ``(1, 1, c)``. At the
end, with ``s = 1 + s'``, ``||e||^2 = s2'/s^2 + (s'/s)^2`` and ``e . c = (sc' - c_yhat s')/s``: sums of
positive terms, where the textbook ``s2/s^2 - 2/s + 1`` cancels to noise for confident rows. A row with a
non-finite logit gets NaN (its label is still an index in ``[0, K)``: NaN ranks as the maximum, as in
``torch.argmax``, except that it only ties with a ``+inf`` before it).

Class split. Rows alone give ``N / BLOCK_N`` programs: 64 for N = 4096, half an H100's 132 SMs. Where they
are fewer than two an SM, ``config`` asks for a class split (``PARTIAL``): program ``(i, j)`` takes row block
``i`` and the ``j``-th of ``class_splits(...)`` contiguous ranges of whole class tiles, and writes its state
(with ``||h||^2`` and the non-finite flag) to a ``(splits, 8, N)`` float32 buffer; ``_merge_splits_kernel``
then folds each row's splits in class order with the same ``_merge``, so the first-maximum rule holds
across splits exactly as across tiles.

Dtypes. ``h``, ``W`` and ``b`` may be float32, float16 or bfloat16 (a half model's head); ``G_W`` and ``G_b``
are float32 (fastdal/backends.py states the rule). Every load is converted to float32 in registers, all
sums run in float32 and the outputs are float32. A half value is exact in TF32 (its 11 or 8 significant
bits fit TF32's 11), so for half ``h`` and ``W`` one TF32 pass of z's GEMM is exact: "tf32x3" runs it as one
pass, since its two correction passes would multiply zero low parts. ``c = G_W h`` keeps the requested
precision (``G_W`` is float32).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

# The SM count a launch plans for where no GPU says its own: under the interpreter, and in the sm_90
# compile check (bench/sm90_compile.py), which calls config(n, k, d). 132 is the H100 SXM's.
DEFAULT_SMS = 132
# gridDim.y of a CUDA launch is at most 65535: the class splits ride on it.
MAX_SPLITS = 65535
# Fields of a row's state in the class-split buffer: m, yhat (int32 bits), c_yhat, s', s2', sc', bad, ||h||^2.
STATE_FIELDS = 8
MERGE_BLOCK_N = 128  # rows a program of _merge_splits_kernel


@triton.jit
def _merge(m, yhat, c_yhat, s1, s2, sc, m_b, yhat_b, c_b, s1_b, s2_b, sc_b):
    """The online-softmax state ``(m, yhat, c_yhat, s', s2', sc')`` of some classes followed by the state
    ``*_b`` of later classes, merged. ``b`` takes the label only with a strictly greater maximum (first
    maximum). An empty state (m = -inf, sums 0) merges as nothing (r = 0), except against a maximum of
    -inf too, which only a row with a non-finite logit (NaN anyway) has."""
    b_wins = m_b > m
    m_win = tl.where(b_wins, m_b, m)
    r = tl.exp(tl.where(b_wins, m, m_b) - m_win)  # <= 1
    s1_new = tl.where(b_wins, s1_b, s1) + r * (1.0 + tl.where(b_wins, s1, s1_b))
    s2_new = tl.where(b_wins, s2_b, s2) + (r * r) * (1.0 + tl.where(b_wins, s2, s2_b))
    sc_new = tl.where(b_wins, sc_b, sc) + r * (tl.where(b_wins, c_yhat, c_b) + tl.where(b_wins, sc, sc_b))
    return m_win, tl.where(b_wins, yhat_b, yhat), tl.where(b_wins, c_b, c_yhat), s1_new, s2_new, sc_new


@triton.jit
def _finish(s1, s2, sc, c_yhat, h_sq, bad, HAS_GW: tl.constexpr, HAS_GB: tl.constexpr):
    """``sq_norm, dot`` of a row's final state, NaN where a logit was not finite."""
    s = 1.0 + s1
    e_sq = s2 / (s * s) + (s1 / s) * (s1 / s)
    scale = tl.zeros_like(s)
    if HAS_GW:
        scale += h_sq
    if HAS_GB:
        scale += 1.0
    sq = tl.where(bad, float("nan"), e_sq * scale)
    dot = tl.where(bad, float("nan"), (sc - c_yhat * s1) / s)
    return sq, dot


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
    part_ptr,
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
    PARTIAL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols_d = tl.arange(0, BLOCK_D)
    cols_k = tl.arange(0, BLOCK_K)
    if PARTIAL:
        # The program_id(1)-th of num_programs(1) ranges of whole class tiles; none is empty, since the
        # launcher asks for at most as many splits as there are tiles.
        tiles = tl.cdiv(K, BLOCK_K)
        split = tl.program_id(1).to(tl.int64)
        k_begin = (split * tiles // tl.num_programs(1) * BLOCK_K).to(tl.int32)
        k_end = tl.minimum((split + 1) * tiles // tl.num_programs(1) * BLOCK_K, K).to(tl.int32)
    else:
        k_begin = 0
        k_end = K
    # Half h and W hold at most TF32's 11 significant bits: one TF32 pass of z = W h is exact, and the two
    # correction passes of "tf32x3" would multiply zero low parts.
    if PRECISION == "tf32x3" and h_ptr.dtype.element_ty != tl.float32 and w_ptr.dtype.element_ty != tl.float32:
        z_precision: tl.constexpr = "tf32"
    else:
        z_precision: tl.constexpr = PRECISION

    # ||h||^2 is summed from the h tiles of the first class tile: h is read from memory once when K fits
    # one tile (the bandwidth-bound case), and re-read per class tile (from L2) only when it does not.
    h_sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    yhat = tl.zeros((BLOCK_N,), dtype=tl.int32) + k_begin  # the first class, should every logit be -inf
    c_yhat = tl.zeros((BLOCK_N,), dtype=tl.float32)
    s1 = tl.zeros((BLOCK_N,), dtype=tl.float32)  # s'
    s2 = tl.zeros((BLOCK_N,), dtype=tl.float32)  # s2'
    sc = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sc'
    bad = tl.zeros((BLOCK_N,), dtype=tl.int1)

    for k0 in range(k_begin, k_end, BLOCK_K):
        k = k0 + cols_k
        k_ok = k < K
        k_rows = k.to(tl.int64) * D  # K * D can pass 2^31
        z = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        c = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + cols_d
            d_ok = d < D
            x = tl.load(h_ptr + rows[:, None] * D + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            x = x.to(tl.float32)
            # (BLOCK_D, BLOCK_K) views of the row-major (K, D) matrices, so that x @ tile is a (rows, classes) tile.
            tile = k_rows[None, :] + d[:, None]
            tile_ok = k_ok[None, :] & d_ok[:, None]
            w = tl.load(w_ptr + tile, mask=tile_ok, other=0.0).to(tl.float32)
            z += tl.dot(x, w, input_precision=z_precision)
            if HAS_GW:
                gw = tl.load(gw_ptr + tile, mask=tile_ok, other=0.0).to(tl.float32)
                c += tl.dot(x, gw, input_precision=PRECISION)
                if k0 == k_begin:
                    h_sq += tl.sum(x * x, axis=1)
        if HAS_BIAS:
            z += tl.load(b_ptr + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_GB:
            c += tl.load(gb_ptr + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]

        finite = (z == z) & (tl.abs(z) != float("inf"))
        bad |= tl.max((~finite & k_ok[None, :]).to(tl.int32), axis=1) > 0
        # NaN ranks as the maximum, as in torch.argmax, so a bad row still gets a label; padding never wins nor adds.
        z = tl.where(z != z, float("inf"), z)
        z = tl.where(k_ok[None, :], z, float("-inf"))

        # The tile's own state: its first maximum, and its other classes' sums relative to it.
        tile_max = tl.max(z, axis=1)
        first = (z == tile_max[:, None]) & k_ok[None, :]
        tile_arg = tl.min(tl.where(first, k[None, :], K), axis=1).to(tl.int32)
        at_arg = k[None, :] == tile_arg[:, None]
        p = tl.where(at_arg, 0.0, tl.exp(z - tile_max[:, None]))  # the maximum's own term is the merge's 1
        m, yhat, c_yhat, s1, s2, sc = _merge(
            m,
            yhat,
            c_yhat,
            s1,
            s2,
            sc,
            tile_max,
            tile_arg,
            tl.sum(tl.where(at_arg, c, 0.0), axis=1),
            tl.sum(p, axis=1),
            tl.sum(p * p, axis=1),
            tl.sum(p * c, axis=1),
        )

    if PARTIAL:
        # Field f of split j at part_ptr + (8 j + f) N + row, in _load_state's order (8 = STATE_FIELDS); the
        # pointer steps by N, so no product can pass 2^31.
        at = part_ptr + tl.program_id(1).to(tl.int64) * 8 * N + rows
        tl.store(at, m, mask=row_ok)
        at += N
        tl.store(at, yhat.to(tl.float32, bitcast=True), mask=row_ok)
        at += N
        tl.store(at, c_yhat, mask=row_ok)
        at += N
        tl.store(at, s1, mask=row_ok)
        at += N
        tl.store(at, s2, mask=row_ok)
        at += N
        tl.store(at, sc, mask=row_ok)
        at += N
        tl.store(at, bad.to(tl.float32), mask=row_ok)
        at += N
        tl.store(at, h_sq, mask=row_ok)
    else:
        sq, dot = _finish(s1, s2, sc, c_yhat, h_sq, bad, HAS_GW, HAS_GB)
        tl.store(sq_ptr + rows, sq, mask=row_ok)
        tl.store(dot_ptr + rows, dot, mask=row_ok)
        tl.store(score_ptr + rows, sq + gamma * dot, mask=row_ok)
        tl.store(label_ptr + rows, yhat.to(tl.int64), mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    part_ptr,
    score_ptr,
    sq_ptr,
    dot_ptr,
    label_ptr,
    gamma,
    N,
    SPLITS,
    HAS_GW: tl.constexpr,
    HAS_GB: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Each row's class-split states (``_last_layer_score_kernel`` with PARTIAL) merged in class order."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    at = part_ptr + rows
    m, yhat, c_yhat, s1, s2, sc, bad, h_sq, at = _load_state(at, row_ok, N)
    for _ in range(1, SPLITS):
        m_b, yhat_b, c_b, s1_b, s2_b, sc_b, bad_b, _h, at = _load_state(at, row_ok, N)
        m, yhat, c_yhat, s1, s2, sc = _merge(m, yhat, c_yhat, s1, s2, sc, m_b, yhat_b, c_b, s1_b, s2_b, sc_b)
        bad |= bad_b
    sq, dot = _finish(s1, s2, sc, c_yhat, h_sq, bad, HAS_GW, HAS_GB)  # ||h||^2 from split 0
    tl.store(sq_ptr + rows, sq, mask=row_ok)
    tl.store(dot_ptr + rows, dot, mask=row_ok)
    tl.store(score_ptr + rows, sq + gamma * dot, mask=row_ok)
    tl.store(label_ptr + rows, yhat.to(tl.int64), mask=row_ok)


@triton.jit
def _load_state(at, row_ok, N):
    """One split's state of the rows at ``at`` (field order as stored), and the pointer to the next split's."""
    m = tl.load(at, mask=row_ok, other=0.0)
    at += N
    yhat = tl.load(at, mask=row_ok, other=0.0).to(tl.int32, bitcast=True)
    at += N
    c_yhat = tl.load(at, mask=row_ok, other=0.0)
    at += N
    s1 = tl.load(at, mask=row_ok, other=0.0)
    at += N
    s2 = tl.load(at, mask=row_ok, other=0.0)
    at += N
    sc = tl.load(at, mask=row_ok, other=0.0)
    at += N
    bad = tl.load(at, mask=row_ok, other=0.0) != 0.0
    at += N
    h_sq = tl.load(at, mask=row_ok, other=0.0)
    at += N
    return m, yhat, c_yhat, s1, s2, sc, bad, h_sq, at


def config(n: int, k: int, d: int, sms: int = DEFAULT_SMS) -> dict:
    """Block sizes, class split, warps and pipeline stages the launcher picks for h (n, d) against K=k classes
    on a GPU of ``sms`` SMs.

    ``tl.dot`` needs every block dim >= 16. A program keeps two (BLOCK_N, BLOCK_K) float32 accumulators
    (z and c) in registers next to the split operand tiles of "tf32x3". The shapes below are ones that
    compiled for sm_90 (Triton 3.7) without spills; some nearby ones do spill (64 x 64 with 32-wide D
    steps, 32 x 32, 16 x 16 with 32-wide D steps), so a class tile is 16 or the largest spill-free width.
    ``PARTIAL``: whether the class tiles are split over programs (:func:`class_splits`).
    make gpu-compile checks every shape the tests and benchmarks reach.
    """
    block_n = min(64, max(16, triton.next_power_of_2(n)))
    block_k = 16 if k <= 16 else (32 if block_n == 16 else 64)
    partial = class_splits(n, k, block_n, block_k, sms) > 1
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "BLOCK_D": 16, "PARTIAL": partial, "num_warps": 4, "num_stages": 2}


def class_splits(n: int, k: int, block_n: int, block_k: int, sms: int) -> int:
    """Into how many ranges of class tiles the programs of each row block split the K classes.

    1 where the row blocks alone give two programs an SM (one program an SM leaves no other to hide its
    memory waits behind); otherwise enough for two an SM, but never more ranges than tiles (no range is
    empty) nor than a CUDA grid's second dimension holds. Splitting adds no traffic: h is re-read per
    class tile anyway, and each program reads its share of W and G_W instead of all of them.
    """
    row_blocks, tiles = triton.cdiv(n, block_n), triton.cdiv(k, block_k)
    wanted = 2 * sms
    if row_blocks >= wanted:
        return 1
    return max(1, min(tiles, triton.cdiv(wanted, row_blocks), MAX_SPLITS))


def last_layer_score(
    h: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    weight_grad: Tensor | None,
    bias_grad: Tensor | None,
    gamma: float,
    precision: str = "tf32x3",
    *,
    sms: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Dynamic-AL terms of a final Linear, one streaming pass over the classes (math in the module docstring).

    Args:
        h: (N, D) head inputs. weight: (K, D). bias: (K,) or None: float32, float16 or bfloat16.
        weight_grad: (K, D) or None. bias_grad: (K,) or None (at least one of the two given): float32.
        gamma: weight of the dot-product term.
        precision: how ``tl.dot`` multiplies: "tf32x3", "tf32" or "ieee" (fastdal/precision.py).
        sms: the SM count the class split plans for; None: the device's (DEFAULT_SMS for CPU tensors).
        All tensors contiguous, on one device (CUDA, or CPU under TRITON_INTERPRET=1).

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
    if sms is None:
        sms = _sm_count(h.device)
    launch = config(n, k, d, sms)
    splits = class_splits(n, k, launch["BLOCK_N"], launch["BLOCK_K"], sms) if launch["PARTIAL"] else 1
    # The splits' states; without a split an unread placeholder (PARTIAL compiles the stores away).
    part = torch.empty(splits * STATE_FIELDS * n, dtype=torch.float32, device=h.device) if splits > 1 else score
    flags = {"HAS_GW": weight_grad is not None, "HAS_GB": bias_grad is not None}
    with _on(h.device):
        _last_layer_score_kernel[(triton.cdiv(n, launch["BLOCK_N"]), splits)](
            h,
            weight,
            bias if bias is not None else h,  # unread placeholders: HAS_* compile the loads away
            weight_grad if weight_grad is not None else h,
            bias_grad if bias_grad is not None else h,
            score,
            sq,
            dot,
            label,
            part,
            float(gamma),
            n,
            k,
            d,
            HAS_BIAS=bias is not None,
            PRECISION=precision,
            **flags,
            **launch,
        )
        if splits > 1:
            _merge_splits_kernel[(triton.cdiv(n, MERGE_BLOCK_N),)](
                part, score, sq, dot, label, float(gamma), n, splits, BLOCK_N=MERGE_BLOCK_N, **flags
            )
    return score, sq, dot, label


@functools.cache
def _sm_count(device: torch.device) -> int:
    """The SMs of a CUDA device; DEFAULT_SMS for the interpreter's CPU tensors, and for CUDA tensors that no GPU
    of torch.cuda describes (tests/fake_cuda's fake ones)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return DEFAULT_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on the tensors' GPU rather than the current one (a no-op for the interpreter's CPU tensors)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
