"""Per-module math: from a layer's recorded inputs ``a`` and output gradients ``delta``, the per-sample
``||g||^2`` and ``<g, G>`` of its parameters, without ever holding a batch x parameters tensor.

The formulas are those of DESIGN.md section 1 ("Whole model"). Everything is computed in the
accumulation dtype (float64 for float64 models, float32 otherwise). Weights used as ``W a_t`` over
positions (Linear, convolution) go through the op ``linear_sample_score`` on the chosen backend;
work that grows with the batch (unfolded inputs) is done in chunks of samples sized by
:data:`fastdal.torch_ops.CHUNK_ELEMENTS`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import attention, backends, bags, ops, recurrent
from .capture import Call, Target
from .pieces import group_rows
from .torch_ops import chunks, sq_and_dot, use_ghost_norm


def data_input(call: Call) -> Tensor:
    """The tensor a closed-form module was called on (its first tensor argument)."""
    return call.inputs[0]


def feature_dims(target: Target) -> int | None:
    """Trailing feature dimensions of a closed-form module's input and output (None: the module itself
    takes dimension 0 as the batch, as convolutions and BatchNorm/GroupNorm do)."""
    if target.kind in ("linear", "mha", "recurrent", "bag"):
        return 1
    if target.kind in ("layernorm", "rmsnorm"):
        return len(target.module.normalized_shape)
    if target.kind == "embedding":
        return 0
    return None


def readable(target: Target, call: Call, batch_size: int) -> bool:
    """Whether the module computes each sample on its own in this call: its input and its output hold the
    samples in the same dimension, and that dimension is one the module maps position by position."""
    if target.kind == "mha":
        return attention.readable(target, call, batch_size)
    if target.kind == "recurrent":
        return recurrent.readable(target, call, batch_size)
    if target.kind == "bag":
        return bags.readable(target, call, batch_size)
    if len(call.outputs) != 1 or not call.inputs:
        return False
    a, dim, out_dim = call.inputs[0], call.in_dims[0], call.out_dims[0]
    if not isinstance(dim, int) or dim != out_dim:
        return False
    trailing = feature_dims(target)
    if trailing is None:
        return dim == 0 and (target.kind != "conv" or a.dim() == target.module.weight.dim())
    return dim < a.dim() - trailing


def _inputs_and_deltas(target: Target, calls: list[Call], batch_size: int, dtype: torch.dtype):
    """(a, delta) per call, sample dimension first, in ``dtype``; calls whose output got no gradient skipped.

    Embedding ids keep their integer dtype.
    """
    pairs = []
    for call in calls:
        delta = call.deltas[0] if call.deltas else None
        if delta is None:
            continue
        a = call.inputs[0].movedim(call.in_dims[0], 0)
        delta = delta.movedim(call.out_dims[0], 0).to(dtype)
        pairs.append((a if target.kind == "embedding" else a.to(dtype), delta))
    return pairs


def _bias_terms(delta_sums: list[Tensor], grad: Tensor | None) -> tuple[Tensor, Tensor]:
    """Bias gradient of a sample is its output gradient summed over positions (and calls)."""
    return sq_and_dot(sum(delta_sums), grad)


# --------------------------------------------------------------------------------------------------
# Module families
# --------------------------------------------------------------------------------------------------


def linear_terms(target, calls, grads, batch_size, dtype, backend="auto"):
    m: nn.Linear = target.module
    pairs = [
        (a.reshape(batch_size, -1, m.in_features), d.reshape(batch_size, -1, m.out_features))
        for a, d in _inputs_and_deltas(target, calls, batch_size, dtype)
    ]
    terms = []
    if "weight" in target.params and pairs:
        # Several calls of one module add their positions: g = sum over all (t, call).
        a = pairs[0][0] if len(pairs) == 1 else torch.cat([a for a, _ in pairs], 1)
        delta = pairs[0][1] if len(pairs) == 1 else torch.cat([d for _, d in pairs], 1)
        w_grad = grads.get("weight")
        terms.append(
            ops.linear_sample_score(
                a,
                delta,
                None if w_grad is None else w_grad[None],
                ghost=use_ghost_norm(*a.shape[1:], delta.shape[2]),
                backend=backend,
            )
        )
    if "bias" in target.params and pairs:
        # One position (a plain (B, features) Linear): the sum over positions is a view, not a pass over delta.
        terms.append(_bias_terms([dd[:, 0] if dd.shape[1] == 1 else dd.sum(1) for _, dd in pairs], grads.get("bias")))
    if not terms:
        sq = torch.zeros(batch_size, dtype=dtype, device=m.weight.device)
        return sq, torch.zeros_like(sq)
    # Few small ops per module: under a competing process each parallel region waits for its slowest thread.
    sq, dot = terms[0]
    for s, d in terms[1:]:
        sq, dot = sq + s, dot + d
    return sq, dot


def conv_terms(target, calls, grads, batch_size, dtype, backend="auto"):
    """Conv1d/Conv2d: the input is padded explicitly (any padding mode) and the conv run unpadded.

    Direct norm on the torch backend: each sample's weight gradient comes from PyTorch's own
    convolution weight-gradient kernel on a batch of one (no im2col copy, which costs more than the
    convolution on CPU). Otherwise (ghost norm, or a native backend) ``linear_sample_score`` runs on
    the unfolded input.
    """
    m: nn.Conv1d | nn.Conv2d = target.module
    pairs = [(padded_input(m, a), delta) for a, delta in _inputs_and_deltas(target, calls, batch_size, dtype)]
    sq = torch.zeros(batch_size, dtype=dtype, device=m.weight.device)
    dot = torch.zeros_like(sq)
    if not pairs:
        return sq, dot
    if "weight" in target.params:
        d_in, d_out = m.weight[0].numel(), m.out_channels // m.groups
        positions = sum(d[0].numel() // m.out_channels for _, d in pairs)
        w_grad = grads.get("weight")
        ghost = use_ghost_norm(positions, d_in, d_out)
        if not ghost and _per_sample_conv_backward(backend, pairs[0][0]):
            s, d = _conv_direct_terms(m, pairs, w_grad, dtype, backend)
        else:
            s, d = _unfolded_conv_terms(m, pairs, w_grad, batch_size, ghost, backend)
        sq, dot = sq + s, dot + d
    if "bias" in target.params:
        s, d = _bias_terms([dd.reshape(batch_size, m.out_channels, -1).sum(-1) for _, dd in pairs], grads.get("bias"))
        sq, dot = sq + s, dot + d
    return sq, dot


def _per_sample_conv_backward(backend: str, x: Tensor) -> bool:
    """Whether a direct conv norm takes each sample's weight gradient one sample at a time (no unfold).

    On the CPU the unfold alone costs more than the convolution, so this beats any backend's
    ``linear_sample_score`` on unfolded inputs (the vanilla CNN's whole-model score is slower with the
    cpp op), and "auto" takes it there; a native backend named explicitly gets the unfolded input. On a GPU a
    loop over samples would launch kernels per sample: the unfolded input goes through batched GEMMs.
    """
    if x.device.type != "cpu":
        return False
    return backends.requested(backend) in (backends.AUTO, backends.TORCH)


def _unfolded_conv_terms(m, pairs, grad: Tensor | None, batch_size: int, ghost: bool, backend: str):
    """Conv weight terms by ``linear_sample_score`` on the unfolded input, a chunk of samples at a time.

    One row per (sample, group): ``a: (b * groups, T, d_in)`` and ``delta: (b * groups, T, d_out)``
    are strided views of the unfolded input and the output gradient (no copy).
    """
    groups = m.groups
    d_in, d_out = m.weight[0].numel(), m.out_channels // groups
    positions = sum(d[0].numel() // m.out_channels for _, d in pairs)
    w_grad = None if grad is None else grad.reshape(groups, d_out, d_in)
    sq, dot = [], []
    for samples in chunks(batch_size, groups * positions * (d_in + d_out)):
        cols, deltas = [], []
        for x, delta in pairs:
            a_part, delta_part = unfolded_rows(m, x, delta, samples, backend)
            cols.append(a_part)
            deltas.append(delta_part)
        a = cols[0] if len(cols) == 1 else torch.cat(cols, 1)
        delta = deltas[0] if len(deltas) == 1 else torch.cat(deltas, 1)
        s, d = ops.linear_sample_score(a, delta, w_grad, groups=groups, ghost=ghost, backend=backend)
        sq.append(s.view(-1, groups).sum(1))
        dot.append(d.view(-1, groups).sum(1))
    return torch.cat(sq), torch.cat(dot)


def unfolded_rows(m, x: Tensor, delta: Tensor, samples: slice, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """A convolution as a Linear over positions, for the samples in ``samples``.

    ``x`` is the explicitly padded input and ``delta`` the output gradient. Returns one row per
    (sample, group): ``a: (b * groups, T, d_in)`` and ``delta: (b * groups, T, d_out)``, strided views of
    the unfolded input and of the output gradient.
    """
    groups = m.groups
    d_in, d_out = m.weight[0].numel(), m.out_channels // groups
    x = x[samples]
    two_d = x.dim() == 4
    unfolded = ops.unfold(
        x if two_d else x.unsqueeze(2),
        m.kernel_size if two_d else (1, m.kernel_size[0]),
        m.stride if two_d else (1, m.stride[0]),
        m.dilation if two_d else (1, m.dilation[0]),
        # The unfold has a cpp kernel only; "torch" keeps every step in PyTorch.
        backend=backends.TORCH if backends.requested(backend) == backends.TORCH else backends.AUTO,
    )
    b = unfolded.shape[0]
    a = unfolded.view(b * groups, d_in, -1).transpose(1, 2)
    return a, delta[samples].reshape(b * groups, d_out, -1).transpose(1, 2)


def padded_input(m, x: Tensor) -> Tensor:
    """The input of a convolution with its padding applied explicitly (any padding mode)."""
    if not any(m._reversed_padding_repeated_twice):
        return x
    mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
    return F.pad(x, m._reversed_padding_repeated_twice, mode=mode)


def _conv_direct_terms(m, pairs, grad: Tensor | None, dtype: torch.dtype, backend: str) -> tuple[Tensor, Tensor]:
    """Each sample's conv weight gradient from PyTorch's convolution backward on a batch of one
    (:func:`fastdal.ops.conv_sample_score`: in one parallel loop over the samples where the extension is
    built, else in Python)."""
    weight = m.weight.detach().to(dtype)
    backend = backends.TORCH if backends.requested(backend) == backends.TORCH else backends.AUTO
    inputs, deltas = [x for x, _ in pairs], [delta for _, delta in pairs]
    grad = None if grad is None else grad.to(dtype)
    return ops.conv_sample_score(inputs, deltas, weight, m.stride, m.dilation, m.groups, grad, backend=backend)


def _sum_over(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    # Tensor.sum(dim=()) sums over every dimension; a per-sample sum over no dimension is x itself.
    return x.sum(dim=dims) if dims else x


def _affine_sums(target, pairs, normalize: Callable[[Tensor], Tensor], reduce_dims) -> dict[str, Tensor]:
    """Norm layers' per-sample gradients: weight ``sum_t delta_t * xhat_t``, bias ``sum_t delta_t``."""
    sums: dict[str, Tensor] = {}
    for a, delta in pairs:
        parts = {}
        if "weight" in target.params:
            parts["weight"] = _sum_over(delta * normalize(a), reduce_dims(a))
        if "bias" in target.params:
            parts["bias"] = _sum_over(delta, reduce_dims(a))
        for name, part in parts.items():
            sums[name] = part if name not in sums else sums[name] + part
    return sums


def norm_per_sample(target: Target, calls: list[Call], batch_size: int, dtype: torch.dtype) -> dict[str, Tensor]:
    """Per-sample gradients ``{local name: (B, *shape)}`` of a BatchNorm, LayerNorm, RMSNorm or GroupNorm.

    These parameters are vectors of the channel (or normalized-shape) size, so holding them per
    sample costs no more than the layer's output.
    """
    m = target.module
    pairs = _inputs_and_deltas(target, calls, batch_size, dtype)
    if target.kind == "batchnorm":

        def normalize(a: Tensor) -> Tensor:
            shape = (1, -1) + (1,) * (a.dim() - 2)
            mean = m.running_mean.to(dtype).view(shape)
            inv_std = torch.rsqrt(m.running_var.to(dtype) + m.eps).view(shape)
            return (a - mean) * inv_std

        return _affine_sums(target, pairs, normalize, lambda a: tuple(range(2, a.dim())))
    if target.kind == "groupnorm":

        def normalize(a: Tensor) -> Tensor:
            x = a.reshape(a.shape[0], m.num_groups, -1)
            var, mean = torch.var_mean(x, dim=-1, unbiased=False, keepdim=True)
            return ((x - mean) * torch.rsqrt(var + m.eps)).view_as(a)

        return _affine_sums(target, pairs, normalize, lambda a: tuple(range(2, a.dim())))
    n = len(m.normalized_shape)
    data_dtype = data_input(calls[0]).dtype if calls else dtype

    def normalize(a: Tensor) -> Tensor:
        dims = tuple(range(a.dim() - n, a.dim()))
        if target.kind == "rmsnorm":
            eps = m.eps if m.eps is not None else torch.finfo(data_dtype).eps
            return a * torch.rsqrt(a.square().mean(dim=dims, keepdim=True) + eps)
        var, mean = torch.var_mean(a, dim=dims, unbiased=False, keepdim=True)
        return (a - mean) * torch.rsqrt(var + m.eps)

    return _affine_sums(target, pairs, normalize, lambda a: tuple(range(1, a.dim() - n)))


def norm_terms(target, calls, grads, batch_size, dtype, backend="auto"):
    sq = torch.zeros(batch_size, dtype=dtype, device=next(target.module.parameters()).device)
    dot = torch.zeros_like(sq)
    for name, per_sample in norm_per_sample(target, calls, batch_size, dtype).items():
        s, d = sq_and_dot(per_sample, grads.get(name))
        sq, dot = sq + s, dot + d
    return sq, dot


def embedding_rows(target, calls, batch_size, dtype) -> tuple[Tensor, Tensor, Tensor] | None:
    """A sample's Embedding gradient, as rows: ``(owner, ids, rows)`` with ``rows[k]`` the gradient row
    of embedding ``ids[k]`` for sample ``owner[k]``, one per distinct (sample, id) plus zero rows to spare
    (owner 0, id 0: they add nothing); None without calls.

    Each row is the sample's output gradients summed over the positions holding that id, which is
    linear in the number of positions. Grouped by sorting, without ``unique`` or boolean masks, whose
    sizes depend on the values: on a GPU the host would wait for them every batch.
    """
    m: nn.Embedding = target.module
    pairs = _inputs_and_deltas(target, calls, batch_size, dtype)
    if not pairs:
        return None
    ids = torch.cat([i.reshape(batch_size, -1) for i, _ in pairs], 1)
    delta = torch.cat([d.reshape(batch_size, -1, m.embedding_dim) for _, d in pairs], 1).reshape(-1, m.embedding_dim)
    owner = torch.arange(batch_size, device=ids.device)[:, None].expand_as(ids).reshape(-1)
    ids = ids.reshape(-1).long()
    if m.padding_idx is not None:
        delta = delta * (ids != m.padding_idx).to(delta.dtype)[:, None]  # no gradient reaches the padding row
    slots, keys, rows = group_rows(owner * m.num_embeddings + ids, delta)
    if m.scale_grad_by_freq:
        # PyTorch divides each row by the id's count in the batch, which for one sample is this count.
        counts = torch.zeros(rows.shape[0], dtype=dtype, device=rows.device).index_add_(
            0, slots, torch.ones_like(slots, dtype=dtype)
        )
        rows = rows / counts.clamp_min(1)[:, None]
    return keys // m.num_embeddings, keys % m.num_embeddings, rows


def embedding_terms(target, calls, grads, batch_size, dtype, backend="auto"):
    """``||g||^2 = sum_{t,s} [i_t = i_s] delta_t . delta_s``, from the rows of :func:`embedding_rows`."""
    m: nn.Embedding = target.module
    sq = torch.zeros(batch_size, dtype=dtype, device=m.weight.device)
    dot = torch.zeros_like(sq)
    found = embedding_rows(target, calls, batch_size, dtype) if "weight" in target.params else None
    if found is None:
        return sq, dot
    owner, ids, rows = found
    sq.index_add_(0, owner, rows.square().sum(1))
    grad = grads.get("weight")
    if grad is not None:
        dot.index_add_(0, owner, (rows * grad[ids]).sum(1))
    return sq, dot


CLOSED_FORM = {
    "linear": linear_terms,
    "conv": conv_terms,
    "batchnorm": norm_terms,
    "layernorm": norm_terms,
    "rmsnorm": norm_terms,
    "groupnorm": norm_terms,
    "embedding": embedding_terms,
    "mha": attention.mha_terms,
    "recurrent": recurrent.recurrent_terms,
    "bag": bags.bag_terms,
}
