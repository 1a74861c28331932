"""Per-module math: from a layer's recorded inputs ``a`` and output gradients ``delta``, the per-sample
``||g||^2`` and ``<g, G>`` of its parameters, without ever holding a batch x parameters tensor.

The formulas are those of DESIGN.md section 1 ("Whole model"). Everything is computed in the
accumulation dtype (float64 for float64 models, float32 otherwise). Work that grows with the batch
(unfolded inputs, per-sample weight gradients, T x T ghost matrices) is done in chunks of samples
sized by :data:`CHUNK_ELEMENTS`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .capture import Call, Target, batch_dim

# Upper bound, in elements, on the per-chunk temporaries of one layer (64 MiB in float32).
CHUNK_ELEMENTS = 1 << 24

# Cost, in multiply-adds, charged per element of a materialized per-sample weight gradient by the
# norm-strategy choice below. Fitted to bench/bench_norm_choice.py on CPU: the ghost norm wins for
# ResNet-18's 8x8 and 4x4 stages, the direct norm from 16x16 up (any value in about 18..570 agrees).
MATERIALIZE_COST = 64


def data_input(call: Call) -> Tensor:
    """The tensor a closed-form module was called on (its first argument)."""
    if call.args:
        return call.args[0]
    return next(iter(call.kwargs.values()))


# Trailing feature dimensions of (input, output) per kind; None means the sample dimension must be 0.
def _feature_dims(target: Target) -> tuple[int | None, int | None]:
    m = target.module
    if target.kind == "linear":
        return 1, 1
    if target.kind in ("layernorm", "rmsnorm"):
        n = len(m.normalized_shape)
        return n, n
    if target.kind == "embedding":
        return 0, 1
    return None, None


def readable(target: Target, call: Call, batch_size: int) -> bool:
    """Whether this call's input and output both carry the sample dimension (closed-form kinds)."""
    fin, fout = _feature_dims(target)
    if len(call.outputs) != 1:
        return False
    a = data_input(call)
    return batch_dim(a, batch_size, fin) is not None and batch_dim(call.outputs[0], batch_size, fout) is not None


def _batch_first(t: Tensor, batch_size: int, feature_dims: int | None, dtype: torch.dtype | None) -> Tensor:
    dim = batch_dim(t, batch_size, feature_dims)
    assert dim is not None  # checked by readable() before any math runs
    t = t.movedim(dim, 0) if dim else t
    return t.to(dtype) if dtype is not None else t


def _inputs_and_deltas(target: Target, calls: list[Call], batch_size: int, dtype: torch.dtype):
    """(a, delta) per call, sample dimension first, in ``dtype``; calls whose output got no gradient skipped."""
    fin, fout = _feature_dims(target)
    pairs = []
    for call in calls:
        delta = call.deltas[0] if call.deltas else None
        if delta is None:
            continue
        a = data_input(call)
        keep_ids = target.kind == "embedding"
        pairs.append(
            (
                _batch_first(a, batch_size, fin, None if keep_ids else dtype),
                _batch_first(delta, batch_size, fout, dtype),
            )
        )
    return pairs


def _chunks(batch_size: int, per_sample: int) -> Iterator[slice]:
    step = max(1, CHUNK_ELEMENTS // max(1, per_sample))
    for start in range(0, batch_size, step):
        yield slice(start, min(start + step, batch_size))


def _sq_and_dot(per_sample: Tensor, grad: Tensor | None) -> tuple[Tensor, Tensor]:
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


def _ghost_terms(
    batch_size: int,
    blocks: Callable[[slice], list[tuple[Tensor, Tensor]]],
    work_per_sample: int,
    grad: Tensor | None,
    like: Tensor,
) -> tuple[Tensor, Tensor]:
    """Ghost-norm terms of a weight used as ``out_t = W a_t`` over T positions, in chunks of samples.

    ``blocks(samples)`` gives, for every call, ``a: (b, G, d_in, T)`` and ``delta: (b, G, d_out, T)``
    for G groups of channels; ``grad: (G, d_out, d_in)``. With ``g = sum_t delta_t a_t^T``:
    ``||g||^2 = <a^T a, delta^T delta>`` and ``<g, G> = <delta, G a>``, summed over groups.
    """
    sq = like.new_zeros(batch_size)
    dot = like.new_zeros(batch_size)
    for samples in _chunks(batch_size, work_per_sample):
        pairs = blocks(samples)
        # Several calls of one module add their positions: g = sum over all (t, call).
        a = pairs[0][0] if len(pairs) == 1 else torch.cat([a for a, _ in pairs], -1)
        delta = pairs[0][1] if len(pairs) == 1 else torch.cat([d for _, d in pairs], -1)
        if a.shape[-1] == 1:
            sq[samples] = (a.square().sum(2) * delta.square().sum(2)).sum(dim=(1, 2))
        else:
            sq[samples] = ((a.transpose(-1, -2) @ a) * (delta.transpose(-1, -2) @ delta)).sum(dim=(1, 2, 3))
        if grad is not None:
            # einsum turns this into one GEMM per group with (sample, position) as rows.
            dot[samples] = (delta * torch.einsum("bgit,goi->bgot", a, grad)).sum(dim=(1, 2, 3))
    return sq, dot


def _direct_terms(
    batch_size: int,
    gradients: Callable[[slice], Tensor],
    work_per_sample: int,
    grad: Tensor | None,
    like: Tensor,
) -> tuple[Tensor, Tensor]:
    """Terms from materialized per-sample weight gradients ``gradients(samples): (b, *weight.shape)``,
    one chunk of samples at a time."""
    sq = like.new_zeros(batch_size)
    dot = like.new_zeros(batch_size)
    for samples in _chunks(batch_size, work_per_sample):
        sq[samples], dot[samples] = _sq_and_dot(gradients(samples), grad)
    return sq, dot


def _bias_terms(delta_sums: list[Tensor], grad: Tensor | None) -> tuple[Tensor, Tensor]:
    """Bias gradient of a sample is its output gradient summed over positions (and calls)."""
    return _sq_and_dot(sum(delta_sums), grad)


# --------------------------------------------------------------------------------------------------
# Module families
# --------------------------------------------------------------------------------------------------


def linear_terms(target, calls, grads, batch_size, dtype):
    m: nn.Linear = target.module
    pairs = [
        (a.reshape(batch_size, -1, m.in_features), d.reshape(batch_size, -1, m.out_features))
        for a, d in _inputs_and_deltas(target, calls, batch_size, dtype)
    ]
    sq = torch.zeros(batch_size, dtype=dtype, device=m.weight.device)
    dot = torch.zeros_like(sq)
    if not pairs:
        return sq, dot
    if "weight" in target.params:
        positions = sum(a.shape[1] for a, _ in pairs)
        d_in, d_out = m.in_features, m.out_features
        w_grad = grads.get("weight")
        if use_ghost_norm(positions, d_in, d_out):
            s, d = _ghost_terms(
                batch_size,
                lambda sl: [(a[sl].transpose(1, 2)[:, None], dd[sl].transpose(1, 2)[:, None]) for a, dd in pairs],
                2 * positions * positions + d_out * positions,
                None if w_grad is None else w_grad[None],
                sq,
            )
        else:
            s, d = _direct_terms(
                batch_size, lambda sl: sum(dd[sl].transpose(1, 2) @ a[sl] for a, dd in pairs), d_out * d_in, w_grad, sq
            )
        sq, dot = sq + s, dot + d
    if "bias" in target.params:
        s, d = _bias_terms([dd.sum(1) for _, dd in pairs], grads.get("bias"))
        sq, dot = sq + s, dot + d
    return sq, dot


def conv_terms(target, calls, grads, batch_size, dtype):
    """Conv1d/Conv2d: the input is padded explicitly (any padding mode) and the conv run unpadded.

    Direct norm: each sample's weight gradient comes from PyTorch's own convolution weight-gradient
    kernel on a batch of one (no im2col copy, which costs more than the convolution on CPU). Ghost
    norm (few output positions): the unfolded input gives the T x T Gram matrices.
    """
    m: nn.Conv1d | nn.Conv2d = target.module
    pairs = [
        (
            F.pad(
                a, m._reversed_padding_repeated_twice, mode="constant" if m.padding_mode == "zeros" else m.padding_mode
            )
            if any(m._reversed_padding_repeated_twice)
            else a,
            delta,
        )
        for a, delta in _inputs_and_deltas(target, calls, batch_size, dtype)
    ]
    sq = torch.zeros(batch_size, dtype=dtype, device=m.weight.device)
    dot = torch.zeros_like(sq)
    if not pairs:
        return sq, dot
    if "weight" in target.params:
        groups = m.groups
        d_in = m.weight[0].numel()
        d_out = m.out_channels // groups
        positions = sum(d[0].numel() // m.out_channels for _, d in pairs)
        w_grad = grads.get("weight")
        if use_ghost_norm(positions, d_in, d_out):

            def blocks(sl: slice) -> list[tuple[Tensor, Tensor]]:
                out = []
                for x, delta in pairs:
                    x = x[sl]
                    two_d = x.dim() == 4
                    cols = F.unfold(
                        x if two_d else x.unsqueeze(2),
                        m.kernel_size if two_d else (1, m.kernel_size[0]),
                        dilation=m.dilation if two_d else (1, m.dilation[0]),
                        stride=m.stride if two_d else (1, m.stride[0]),
                    )
                    b = cols.shape[0]
                    out.append((cols.view(b, groups, d_in, -1), delta[sl].reshape(b, groups, d_out, -1)))
                return out

            s, d = _ghost_terms(
                batch_size,
                blocks,
                groups * (2 * positions * positions + d_out * positions + d_in * positions),
                None if w_grad is None else w_grad.reshape(groups, d_out, d_in),
                sq,
            )
        else:
            s, d = _conv_direct_terms(m, pairs, w_grad, batch_size, dtype)
        sq, dot = sq + s, dot + d
    if "bias" in target.params:
        s, d = _bias_terms([dd.reshape(batch_size, m.out_channels, -1).sum(-1) for _, dd in pairs], grads.get("bias"))
        sq, dot = sq + s, dot + d
    return sq, dot


def _conv_direct_terms(m, pairs, grad: Tensor | None, batch_size: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Each sample's conv weight gradient from PyTorch's convolution backward on a batch of one.

    The gradient of one sample (one layer's weight) is reduced to its norm and dot product while it
    is still in cache, so nothing larger than one weight is ever allocated.
    """
    weight = m.weight.detach().to(dtype)
    no_padding = [0] * (weight.dim() - 2)
    flat_grad = None if grad is None else grad.reshape(-1)
    sq, dot = [], []
    for i in range(batch_size):
        g = None
        for x, delta in pairs:
            part = torch.ops.aten.convolution_backward(
                delta[i : i + 1],
                x[i : i + 1],
                weight,
                None,
                m.stride,
                no_padding,
                m.dilation,
                False,
                no_padding,
                m.groups,
                [False, True, False],
            )[1]
            g = part if g is None else g + part
        g = g.reshape(-1)
        sq.append(torch.linalg.vector_norm(g).square())
        dot.append(g @ flat_grad if flat_grad is not None else torch.zeros_like(sq[-1]))
    return torch.stack(sq), torch.stack(dot)


def _affine_terms(target, pairs, normalize: Callable[[Tensor], Tensor], reduce_dims, grads, batch_size, dtype):
    """Norm layers: weight gradient ``sum_t delta_t * xhat_t``, bias gradient ``sum_t delta_t``."""
    w_sum = b_sum = None
    for a, delta in pairs:
        if "weight" in target.params:
            part = (delta * normalize(a)).sum(dim=reduce_dims(a))
            w_sum = part if w_sum is None else w_sum + part
        if "bias" in target.params:
            part = delta.sum(dim=reduce_dims(a))
            b_sum = part if b_sum is None else b_sum + part
    sq = torch.zeros(batch_size, dtype=dtype, device=next(target.module.parameters()).device)
    dot = torch.zeros_like(sq)
    for total, name in ((w_sum, "weight"), (b_sum, "bias")):
        if total is not None:
            s, d = _sq_and_dot(total, grads.get(name))
            sq, dot = sq + s, dot + d
    return sq, dot


def batchnorm_terms(target, calls, grads, batch_size, dtype):
    m: nn.modules.batchnorm._BatchNorm = target.module

    def normalize(a: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (a.dim() - 2)
        mean = m.running_mean.to(dtype).view(shape)
        inv_std = torch.rsqrt(m.running_var.to(dtype) + m.eps).view(shape)
        return (a - mean) * inv_std

    pairs = _inputs_and_deltas(target, calls, batch_size, dtype)
    return _affine_terms(target, pairs, normalize, lambda a: tuple(range(2, a.dim())), grads, batch_size, dtype)


def layernorm_terms(target, calls, grads, batch_size, dtype):
    m = target.module
    n = len(m.normalized_shape)
    rms = target.kind == "rmsnorm"

    def normalize(a: Tensor) -> Tensor:
        dims = tuple(range(a.dim() - n, a.dim()))
        if rms:
            eps = m.eps if m.eps is not None else torch.finfo(data_dtype).eps
            return a * torch.rsqrt(a.square().mean(dim=dims, keepdim=True) + eps)
        var, mean = torch.var_mean(a, dim=dims, unbiased=False, keepdim=True)
        return (a - mean) * torch.rsqrt(var + m.eps)

    data_dtype = data_input(calls[0]).dtype if calls else dtype
    pairs = _inputs_and_deltas(target, calls, batch_size, dtype)
    return _affine_terms(target, pairs, normalize, lambda a: tuple(range(1, a.dim() - n)), grads, batch_size, dtype)


def groupnorm_terms(target, calls, grads, batch_size, dtype):
    m: nn.GroupNorm = target.module

    def normalize(a: Tensor) -> Tensor:
        x = a.reshape(a.shape[0], m.num_groups, -1)
        var, mean = torch.var_mean(x, dim=-1, unbiased=False, keepdim=True)
        return ((x - mean) * torch.rsqrt(var + m.eps)).view_as(a)

    pairs = _inputs_and_deltas(target, calls, batch_size, dtype)
    return _affine_terms(target, pairs, normalize, lambda a: tuple(range(2, a.dim())), grads, batch_size, dtype)


def embedding_terms(target, calls, grads, batch_size, dtype):
    """Rows of a sample's gradient are its output gradients summed over positions with the same id.

    ``||g||^2 = sum_{t,s} [i_t = i_s] delta_t . delta_s`` is computed by summing rows per distinct
    (sample, id) pair, which is linear in the number of positions.
    """
    m: nn.Embedding = target.module
    pairs = _inputs_and_deltas(target, calls, batch_size, dtype)
    sq = torch.zeros(batch_size, dtype=dtype, device=m.weight.device)
    dot = torch.zeros_like(sq)
    if not pairs or "weight" not in target.params:
        return sq, dot
    ids = torch.cat([i.reshape(batch_size, -1) for i, _ in pairs], 1)
    delta = torch.cat([d.reshape(batch_size, -1, m.embedding_dim) for _, d in pairs], 1)
    sample = torch.arange(batch_size, device=ids.device)[:, None].expand_as(ids)
    keep = torch.ones_like(ids, dtype=torch.bool) if m.padding_idx is None else ids != m.padding_idx
    ids, sample, delta = ids[keep], sample[keep], delta[keep]
    keys, slot = torch.unique(sample * m.num_embeddings + ids, return_inverse=True)
    rows = delta.new_zeros(keys.shape[0], m.embedding_dim).index_add_(0, slot, delta)
    if m.scale_grad_by_freq:
        # PyTorch divides each row by the id's count in the batch, which for one sample is this count.
        rows /= torch.bincount(slot, minlength=keys.shape[0]).to(dtype)[:, None]
    owner = keys // m.num_embeddings
    sq.index_add_(0, owner, rows.square().sum(1))
    grad = grads.get("weight")
    if grad is not None:
        dot.index_add_(0, owner, (rows * grad[keys % m.num_embeddings]).sum(1))
    return sq, dot


CLOSED_FORM = {
    "linear": linear_terms,
    "conv": conv_terms,
    "batchnorm": batchnorm_terms,
    "layernorm": layernorm_terms,
    "rmsnorm": layernorm_terms,
    "groupnorm": groupnorm_terms,
    "embedding": embedding_terms,
}
