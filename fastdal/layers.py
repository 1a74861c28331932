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

# Relative cost, in multiply-adds, of writing and reducing one element of a materialized per-sample
# weight gradient; a ghost norm avoids that traffic but needs a separate GEMM for the dot product.
# Measured on CPU with bench/bench_norm_choice.py.
MATERIALIZE_COST = 16


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

    ghost:  T^2 (d_in + d_out) for the norm, plus T d_in d_out for the dot-product GEMM;
    direct: T d_in d_out for the per-sample gradient, whose d_in d_out elements are then written and
            reduced (each counted as MATERIALIZE_COST multiply-adds), giving norm and dot together.
    """
    ghost = positions * positions * (d_in + d_out)
    return ghost < MATERIALIZE_COST * d_in * d_out


def _weight_block(a: Tensor, delta: Tensor, grad: Tensor | None, ghost: bool) -> tuple[Tensor, Tensor]:
    """Terms of a weight used as ``out_t = W a_t`` over T positions, for G groups of channels.

    a: (b, G, d_in, T), delta: (b, G, d_out, T), grad: (G, d_out, d_in); per-sample gradient
    ``g = sum_t delta_t a_t^T``.
    """
    if ghost:
        # ||g||^2 = <a^T a, delta^T delta>, summed over groups; <g, G> = <delta, G a>.
        if a.shape[-1] == 1:
            sq = (a.square().sum(2) * delta.square().sum(2)).sum(dim=(1, 2))
        else:
            gram_a = a.transpose(-1, -2) @ a
            gram_d = delta.transpose(-1, -2) @ delta
            sq = (gram_a * gram_d).sum(dim=(1, 2, 3))
        if grad is None:
            return sq, torch.zeros_like(sq)
        # einsum turns this into one GEMM per group with (sample, position) as rows.
        dot = (delta * torch.einsum("bgit,goi->bgot", a, grad)).sum(dim=(1, 2, 3))
        return sq, dot
    return _sq_and_dot(delta @ a.transpose(-1, -2), grad)


def _weight_terms(
    batch_size: int,
    blocks: Callable[[slice], list[tuple[Tensor, Tensor]]],
    groups: int,
    d_in: int,
    d_out: int,
    positions: int,
    prepared_per_sample: int,
    grad: Tensor | None,
    like: Tensor,
) -> tuple[Tensor, Tensor]:
    """Chunked weight terms; ``blocks(samples)`` gives the (a, delta) pairs of every call for a chunk."""
    ghost = use_ghost_norm(positions, d_in, d_out)
    work = groups * (2 * positions * positions + d_out * positions if ghost else d_out * d_in)
    sq = like.new_zeros(batch_size)
    dot = like.new_zeros(batch_size)
    for samples in _chunks(batch_size, work + prepared_per_sample):
        pairs = blocks(samples)
        if ghost and len(pairs) > 1:
            # Several calls of one module add their positions: g = sum over all (t, call).
            pairs = [(torch.cat([a for a, _ in pairs], -1), torch.cat([d for _, d in pairs], -1))]
        if ghost:
            for a, delta in pairs:
                s, d = _weight_block(a, delta, grad, ghost=True)
                sq[samples] += s
                dot[samples] += d
        else:
            g = sum(delta @ a.transpose(-1, -2) for a, delta in pairs)
            sq[samples], dot[samples] = _sq_and_dot(g, grad)
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
        w_grad = grads.get("weight")
        s, d = _weight_terms(
            batch_size,
            lambda sl: [(a[sl].transpose(1, 2)[:, None], dd[sl].transpose(1, 2)[:, None]) for a, dd in pairs],
            1,
            m.in_features,
            m.out_features,
            positions,
            0,
            None if w_grad is None else w_grad[None],
            sq,
        )
        sq, dot = sq + s, dot + d
    if "bias" in target.params:
        s, d = _bias_terms([dd.sum(1) for _, dd in pairs], grads.get("bias"))
        sq, dot = sq + s, dot + d
    return sq, dot


def _conv_geometry(m: nn.Conv1d | nn.Conv2d):
    """kernel, stride, dilation as 2-D tuples and the explicit padding (F.pad order) of a conv."""
    two_d = isinstance(m, nn.Conv2d)
    kernel = tuple(m.kernel_size) if two_d else (1, m.kernel_size[0])
    stride = tuple(m.stride) if two_d else (1, m.stride[0])
    dilation = tuple(m.dilation) if two_d else (1, m.dilation[0])
    pad = list(m._reversed_padding_repeated_twice)
    mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
    return kernel, stride, dilation, pad, mode


def conv_terms(target, calls, grads, batch_size, dtype):
    m: nn.Conv1d | nn.Conv2d = target.module
    kernel, stride, dilation, pad, mode = _conv_geometry(m)
    groups = m.groups
    d_in = m.in_channels // groups * kernel[0] * kernel[1]
    d_out = m.out_channels // groups
    pairs = _inputs_and_deltas(target, calls, batch_size, dtype)
    sq = torch.zeros(batch_size, dtype=dtype, device=m.weight.device)
    dot = torch.zeros_like(sq)
    if not pairs:
        return sq, dot
    if "weight" in target.params:
        positions = sum(d[0].numel() // m.out_channels for _, d in pairs)

        def blocks(sl: slice) -> list[tuple[Tensor, Tensor]]:
            out = []
            for a, delta in pairs:
                x = F.pad(a[sl], pad, mode=mode) if any(pad) else a[sl]
                if x.dim() == 3:  # Conv1d: (b, C, L) -> (b, C, 1, L)
                    x = x.unsqueeze(2)
                cols = F.unfold(x, kernel, dilation=dilation, stride=stride)
                b = cols.shape[0]
                out.append((cols.view(b, groups, d_in, -1), delta[sl].reshape(b, groups, d_out, -1)))
            return out

        w_grad = grads.get("weight")
        s, d = _weight_terms(
            batch_size,
            blocks,
            groups,
            d_in,
            d_out,
            positions,
            groups * d_in * positions,
            None if w_grad is None else w_grad.reshape(groups, d_out, d_in),
            sq,
        )
        sq, dot = sq + s, dot + d
    if "bias" in target.params:
        s, d = _bias_terms([dd.reshape(batch_size, m.out_channels, -1).sum(-1) for _, dd in pairs], grads.get("bias"))
        sq, dot = sq + s, dot + d
    return sq, dot


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
    return _affine_terms(
        target, pairs, normalize, lambda a: tuple(range(2, a.dim())), grads, batch_size, dtype
    )


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
