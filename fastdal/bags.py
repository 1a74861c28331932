"""Closed form for a stock ``nn.EmbeddingBag``: the per-sample gradient of its weight from the bags it read.

Each sample is one bag: a row of a 2-D input ``(B, L)``, or the slice ``input[offsets[b]:offsets[b + 1]]`` of a
1-D input (torchtext's layout: the texts of a batch concatenated, ``offsets`` where each one starts). Bag ``b``
with entries ``(id_i, c_i)`` and output gradient ``delta_b`` has the weight gradient

* mode "sum"/"mean": row ``r`` equals ``C_r delta_b`` with ``C_r = sum_{i: id_i = r} c_i``; ``c_i`` is the
  per-sample weight (or 1) for "sum" and ``1 / n_b`` for "mean" (``n_b`` the bag's entries other than
  ``padding_idx``); ``padding_idx`` entries get ``c_i = 0``. With ``scale_grad_by_freq`` each row is divided by
  its id's count in the bag (the documented rule, applied to a sample alone; PyTorch's CPU backward of torch 2.13
  divides some rows by the count of another id, pytorch/pytorch#190063, and CUDA's follows the rule).
  So ``||g_b||^2 = ||delta_b||^2 sum_r C_r^2`` and ``<g_b, G> = delta_b . sum_i c_i G[id_i]``: the second is the
  module's own forward run on ``G`` with the coefficients as per-sample weights.
* mode "max": column ``k`` of the output comes from row ``argmax_i W[id_i, k]`` alone, so ``g_b`` holds
  ``delta_b[k]`` at ``(argmax, k)``: ``||g_b||^2 = ||delta_b||^2`` and ``<g_b, G> = sum_k delta_b[k] G[argmax, k]``
  (empty bags, or bags of padding only, return zeros and get no gradient). The arg-max is recomputed by
  ``torch.embedding_bag`` on the weight as it is now: a ``max_norm`` forward rescaled the rows it read in place,
  before reading them, and a rescaled row is never rescaled again, so these are the rows the forward used.

``sum_r C_r^2`` needs the entries of one bag with the same id grouped: the keys ``bag * num_embeddings + id``
are sorted and a running count of key changes numbers the groups, so that nothing waits for the host (as
``torch.unique`` or a boolean mask would on a GPU). Several calls of the module add their gradients per sample;
the cross terms ``<delta_b^c, delta_b^c'> sum_r C_r^c C_r^c'`` between calls ``c, c'`` come from the same
grouping. Nothing of size batch x num_embeddings x dim is formed, except by :func:`per_sample_gradients`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .capture import Call, Target

_SIGNATURE = inspect.signature(nn.EmbeddingBag.forward)
_MODES = {"sum": 0, "mean": 1, "max": 2}


@dataclass
class _Bags:
    """One call's bags, flattened: entry ``i`` is row ``ids[i]`` of bag ``bag[i]`` with coefficient ``coef[i]``."""

    ids: Tensor  # (N,) long
    bag: Tensor  # (N,) long
    coef: Tensor  # (N,) accumulation dtype; zero for padding_idx entries
    starts: Tensor  # (B,) long: where each bag starts among the entries
    delta: Tensor  # (B, D) output gradient, accumulation dtype
    max_indices: Tensor | None = None  # (B, D) mode "max": the row each output entry came from
    filled: Tensor | None = None  # (B,) mode "max": whether the bag has an entry other than padding_idx


def _arguments(call: Call) -> tuple[Any, Any, Any]:
    """``(input, offsets, per_sample_weights)`` as the stock forward received them."""
    bound = _SIGNATURE.bind(None, *call.args, **call.kwargs)
    bound.apply_defaults()
    named = bound.arguments
    return named["input"], named["offsets"], named["per_sample_weights"]


def _sample_dim(call: Call, t: Tensor) -> Any:
    for x, dim in zip(call.inputs, call.in_dims or []):
        if x is t:
            return dim
    return None


def readable(target: Target, call: Call, batch_size: int) -> bool:
    """Whether the call's bags are the samples: its output holds them in dimension 0, and its input is either
    ``(B, L)`` with the samples in dimension 0 or 1-D with ``offsets`` cutting it into exactly ``batch_size`` bags
    (the flat input has no sample dimension of its own: the bags define the samples)."""
    m: nn.EmbeddingBag = target.module
    if m.mode not in _MODES or not call.out_dims or len(call.out_dims) != 1 or call.out_dims[0] != 0:
        return False
    if call.outputs and (call.outputs[0].dim() != 2 or call.outputs[0].shape[0] != batch_size):
        return False
    try:
        x, offsets, weights = _arguments(call)
    except TypeError:
        return False
    if not isinstance(x, Tensor) or x.is_nested or x.is_floating_point() or x.is_complex():
        return False
    if weights is not None and (not isinstance(weights, Tensor) or weights.shape != x.shape):
        return False
    if x.dim() == 2:
        return (
            offsets is None
            and x.shape[0] == batch_size
            and _sample_dim(call, x) == 0
            and (weights is None or _sample_dim(call, weights) == 0)
        )
    if x.dim() == 1:
        return (
            isinstance(offsets, Tensor)
            and offsets.dim() == 1
            and not offsets.is_floating_point()
            and offsets.shape[0] == batch_size + int(m.include_last_offset)
        )
    return False


def _flat(
    m: nn.EmbeddingBag, call: Call, batch_size: int
) -> tuple[Tensor, Tensor, Tensor | None, bool, Tensor, Tensor]:
    """``(ids, offsets, per_sample_weights, include_last_offset)`` as ``F.embedding_bag`` hands them to
    ``torch.embedding_bag`` (flat ids, one offset per bag), and ``(starts, bag)``: where each of the
    ``batch_size`` bags starts among the ids (long) and the bag of each id."""
    x, offsets, weights = _arguments(call)
    if weights is not None:
        weights = weights.detach().reshape(-1)
    if x.dim() == 2:
        length = x.shape[1]
        ids = x.reshape(-1)
        starts = torch.arange(batch_size, device=x.device) * length
        bag = torch.arange(ids.shape[0], device=x.device) // max(length, 1)
        return ids, starts.to(x.dtype), weights, False, starts, bag
    starts = offsets[:batch_size].long()
    # Bag b runs from its start to the next one; the last bag runs to the end of the input (what PyTorch's CPU
    # kernel reads also when include_last_offset's last offset stops short of it).
    bag = torch.searchsorted(starts, torch.arange(x.shape[0], device=x.device), right=True) - 1
    return x, offsets, weights, m.include_last_offset, starts, bag.clamp_(min=0)


def _group(keys: Tensor) -> tuple[Tensor, Tensor]:
    """``(order, group)``: the permutation sorting ``keys`` and, along it, the number of each run of equal keys
    (0, 1, ...). A sort and a cumsum: no host wait, unlike ``torch.unique``."""
    sorted_keys, order = torch.sort(keys)
    starts = torch.ones_like(sorted_keys)
    starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
    return order, starts.cumsum(0) - 1


def _bags(m: nn.EmbeddingBag, call: Call, batch_size: int, dtype: torch.dtype) -> _Bags | None:
    """The call's entries and coefficients (None when its output got no gradient)."""
    delta = call.deltas[0] if call.deltas else None
    if delta is None:
        return None
    delta = delta.movedim(call.out_dims[0], 0).to(dtype)
    x, offsets, weights, include_last, starts, bag = _flat(m, call, batch_size)
    ids = x.long()
    keep = torch.ones_like(ids, dtype=dtype) if m.padding_idx is None else (ids != m.padding_idx).to(dtype)
    if m.mode == "max":
        filled = keep.new_zeros(batch_size).index_add_(0, bag, keep) > 0
        # max_norm is left out: the weight already holds the rows the forward rescaled (and read).
        found = torch.embedding_bag(
            m.weight.detach(), x, offsets, False, _MODES["max"], False, None, include_last, m.padding_idx
        )
        # An empty bag's index is not a row (0 on CPU, maybe -1 elsewhere): clamped, then masked by ``filled``.
        return _Bags(ids, bag, keep, starts, delta, found[3].long().clamp(min=0), filled)
    if m.mode == "mean":
        counts = keep.new_zeros(batch_size).index_add_(0, bag, keep)
        coef = keep / counts.clamp(min=1)[bag]
    else:
        coef = keep if weights is None else keep * weights.to(dtype)
    if m.scale_grad_by_freq:
        # Each id's count in its bag (a padding entry's coefficient stays zero whatever it is divided by).
        order, group = _group(bag * m.num_embeddings + ids)
        counts = coef.new_zeros(ids.shape[0]).index_add_(0, group, coef.new_ones(ids.shape[0]))
        coef = coef / torch.empty_like(coef).scatter_(0, order, counts[group])
    return _Bags(ids, bag, coef, starts, delta)


def _all_bags(target: Target, calls: list[Call], batch_size: int, dtype: torch.dtype) -> list[_Bags]:
    found = (_bags(target.module, call, batch_size, dtype) for call in calls)
    return [b for b in found if b is not None]


def _dense(grad: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if grad is None:
        return None
    return (grad.to_dense() if grad.is_sparse else grad).to(dtype)


def _sum_mean_terms(
    m: nn.EmbeddingBag, parts: list[_Bags], grad: Tensor | None, batch_size: int
) -> tuple[Tensor, Tensor]:
    """Modes "sum" and "mean": ``||g_b||^2 = sum_{c,c'} <delta_b^c, delta_b^c'> sum_r C_r^c C_r^c'`` over the
    calls ``c``, with ``C_r^c`` the coefficients of row ``r`` in bag ``b`` of call ``c`` added up."""
    n = len(parts)
    ids = torch.cat([p.ids for p in parts])
    bag = torch.cat([p.bag for p in parts])
    coef = torch.cat([p.coef for p in parts])
    order, row = _group(bag * m.num_embeddings + ids)
    bag, coef = bag[order], coef[order]
    entries = ids.shape[0]
    if n == 1:
        rows = coef.new_zeros(entries).index_add_(0, row, coef)
        weight_sq = coef.new_zeros(batch_size).index_add_(0, bag, coef * rows[row])
        sq = weight_sq * parts[0].delta.square().sum(1)
    else:
        call = torch.cat([torch.full_like(p.ids, c) for c, p in enumerate(parts)])[order]
        rows = coef.new_zeros(entries * n).index_add_(0, row * n + call, coef).view(entries, n)
        # pairs[b, c, c'] = sum_r C_r^c C_r^c' as sum over entries i of call c: coef_i C_{row(i)}^c'
        pairs = coef.new_zeros(batch_size * n, n).index_add_(0, bag * n + call, coef[:, None] * rows[row])
        deltas = torch.stack([p.delta for p in parts], 1)  # (B, n, D)
        sq = (pairs.view(batch_size, n, n) * (deltas @ deltas.transpose(1, 2))).sum((1, 2))
    dot = torch.zeros_like(sq)
    if grad is not None:
        for p in parts:
            # sum_i c_i G[id_i] per bag: the bag's forward on G with the coefficients as per-sample weights.
            pulled = torch.embedding_bag(grad, p.ids, p.starts, False, _MODES["sum"], False, p.coef, False, None)[0]
            dot += (pulled * p.delta).sum(1)
    return sq, dot


def _max_terms(m: nn.EmbeddingBag, parts: list[_Bags], grad: Tensor | None, batch_size: int) -> tuple[Tensor, Tensor]:
    """Mode "max": sample b's gradient holds ``delta_b[k]`` at ``(max_indices[b, k], k)`` of each call."""
    values = [p.delta * p.filled[:, None] for p in parts]
    if len(parts) == 1:
        sq = values[0].square().sum(1)
    else:
        # Calls may pick the same (row, column) of one sample: group the entries by (sample, row, column).
        dim = m.embedding_dim
        sample = torch.arange(batch_size, device=values[0].device)[:, None]
        column = torch.arange(dim, device=values[0].device)
        keys = torch.cat([((sample * m.num_embeddings + p.max_indices) * dim + column).reshape(-1) for p in parts])
        owner = sample.expand(batch_size, dim).reshape(-1).repeat(len(parts))
        flat = torch.cat([v.reshape(-1) for v in values])
        order, group = _group(keys)
        flat, owner = flat[order], owner[order]
        sums = flat.new_zeros(flat.shape[0]).index_add_(0, group, flat)
        sq = flat.new_zeros(batch_size).index_add_(0, owner, flat * sums[group])
    dot = torch.zeros_like(sq)
    if grad is not None:
        for p, v in zip(parts, values):
            dot += (v * grad.gather(0, p.max_indices)).sum(1)
    return sq, dot


def bag_terms(
    target: Target,
    calls: list[Call],
    grads: dict[str, Tensor],
    batch_size: int,
    dtype: torch.dtype,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Per-sample ``||g||^2`` and ``<g, G>`` of a stock ``nn.EmbeddingBag``'s weight, each ``(batch_size,)``.

    The work is index arithmetic and one ``embedding_bag`` per call, the same on every backend (``backend`` is
    accepted for the common signature).
    """
    m: nn.EmbeddingBag = target.module
    parts = _all_bags(target, calls, batch_size, dtype) if "weight" in target.params else []
    if not parts:
        sq = torch.zeros(batch_size, dtype=dtype, device=m.weight.device)
        return sq, torch.zeros_like(sq)
    grad = _dense(grads.get("weight"), dtype)
    terms = _max_terms if m.mode == "max" else _sum_mean_terms
    return terms(m, parts, grad, batch_size)


def per_sample_gradients(target: Target, calls: list[Call], batch_size: int, dtype: torch.dtype) -> dict[str, Tensor]:
    """``{"weight": (batch_size, num_embeddings, embedding_dim)}``: each sample's weight gradient, dense (for
    projected features, which need each sample's gradient once; scores never form it)."""
    m: nn.EmbeddingBag = target.module
    if "weight" not in target.params:
        return {}
    rows, dim = m.num_embeddings, m.embedding_dim
    out = torch.zeros(batch_size * rows, dim, dtype=dtype, device=m.weight.device)
    for p in _all_bags(target, calls, batch_size, dtype):
        if m.mode == "max":
            sample = torch.arange(batch_size, device=out.device)[:, None]
            at = (sample * rows + p.max_indices) * dim + torch.arange(dim, device=out.device)
            out.view(-1).index_add_(0, at.reshape(-1), (p.delta * p.filled[:, None]).reshape(-1))
        else:
            out.index_add_(0, p.bag * rows + p.ids, p.coef[:, None] * p.delta[p.bag])
    return {"weight": out.view(batch_size, rows, dim)}
