"""Closed form for a stock ``nn.MultiheadAttention``: its projections as Linear maps over positions.

The module's forward never calls ``out_proj`` and projects with ``in_proj_weight`` (or ``q/k/v_proj_weight``)
inside ``F.multi_head_attention_forward``, so no hook sees the projections' inputs or output gradients. The
recorded call gives the module's inputs and, after fastdal's one backward, the gradient at its outputs; from
them this file recomputes, batched, what the per-sample terms need:

* ``q = query W_q^T + b_q`` (likewise ``k``, ``v``; ``bias_k``/``bias_v`` appended as one more key/value
  position), as leaves of a small autograd graph;
* the attention core from ``q, k, v`` with every option of the stock forward (masks, ``is_causal``,
  ``add_zero_attn``, weights averaged or per head), giving the out projection's input ``o``;
* one ``torch.autograd.grad`` of ``o`` (and of the attention weights, when the model uses them) with
  ``grad_outputs`` the recorded output gradient pulled back through ``out_proj`` (``delta W_o``) gives
  ``dq, dk, dv`` at every position.

Samples never meet inside attention (masks are per sample or shared, dropout is off in eval mode), so the
batched recomputation is exact per sample. Each projection is then a Linear over positions, whose terms come
from the op ``linear_sample_score``: ``W_o`` from ``(o, delta)``, ``W_q`` from ``(query, dq)``, and so on. The
packed ``in_proj_weight = [W_q; W_k; W_v]`` is three row blocks whose norms and dot products add up; where
blocks share their input tensor (self-attention) they form one block with the output gradients side by side.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .capture import Call, Target
from .torch_ops import sq_and_dot, use_ghost_norm

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)

# Parameters of the packed or separate input projections, and the appended key/value biases: the ones whose
# terms need the recomputed gradients at q, k and v.
_INPUT_SIDE = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias", "bias_k", "bias_v")


def arguments(call: Call) -> dict[str, Any]:
    """The call's arguments by name, defaults filled in, as the stock forward received them."""
    bound = _SIGNATURE.bind(None, *call.args, **call.kwargs)
    bound.apply_defaults()
    named = dict(bound.arguments)
    del named["self"]
    return named


def _sample_dim(call: Call, t: Tensor) -> Any:
    """The sample dimension the layout found for input tensor ``t`` (the same object may appear several times,
    as query, key and value of self-attention, always with the same dimension)."""
    for x, dim in zip(call.inputs, call.in_dims):
        if x is t:
            return dim
    return None


def readable(target: Target, call: Call, batch_size: int) -> bool:
    """Whether the call attends within each sample, with the samples where the stock forward keeps its batch.

    Query, key, value and output must hold the samples in the module's batch dimension (else attention runs
    across samples), a key padding mask per sample, and an attention mask shared by all samples; a 3-D mask
    ``(samples * heads, L, S)`` interleaves samples and heads, which the layout reads as a sample dimension only
    with one head. Anything else goes to the parent module, as any unreadable call does.
    """
    m: nn.MultiheadAttention = target.module
    named = arguments(call)
    query, key, value = named["query"], named["key"], named["value"]
    if query.dim() != 3 or any(t.is_nested for t in (query, key, value)):
        return False
    if m.training and m.dropout > 0:
        return False  # fastdal runs in eval mode; a module forced to train would drop weights at random
    batch = 0 if m.batch_first else 1
    if any(_sample_dim(call, t) != batch for t in (query, key, value)) or call.out_dims[0] != batch:
        return False
    if len(call.outputs) > 1 and (call.out_dims[1] != 0 or call.views[1] is not None):
        # The attention weights, (N, L, S) or (N, heads, L, S). Per head they are a view of the softmax; one the
        # model wrote into is read through the softmax's edge (fastdal/capture.py, Call), whose gradient also
        # holds the one through the values: not the weights' own.
        return False
    padding = named["key_padding_mask"]
    if padding is not None and _sample_dim(call, padding) != 0:
        return False
    mask = named["attn_mask"]
    if mask is not None:
        dim = _sample_dim(call, mask)
        if mask.dim() == 2 and dim is not None:
            return False
        if mask.dim() == 3 and not (dim == 0 and m.num_heads == 1):
            return False
    return True


# --------------------------------------------------------------------------------------------------
# Recomputing one call
# --------------------------------------------------------------------------------------------------


@dataclass
class Factors:
    """Per-sample gradient factors of one or more calls.

    ``weights[name]`` lists ``(rows, a, delta)``: the rows ``rows`` of weight ``name`` get, per sample, the
    gradient ``delta^T a`` with ``a: (N, T, d_in)`` and ``delta: (N, T, len(rows))``. ``vectors[name]`` holds
    the per-sample gradients ``(N, *shape)`` of the biases, small enough to hold outright.
    """

    weights: dict[str, list[tuple[slice, Tensor, Tensor]]] = field(default_factory=dict)
    vectors: dict[str, Tensor] = field(default_factory=dict)

    def add(self, other: Factors) -> None:
        """Sum another call's gradients into these: a weight's positions are concatenated, vectors added."""
        for name, pieces in other.weights.items():
            mine = self.weights.setdefault(name, [])
            for rows, a, delta in pieces:
                for i, (r, a0, d0) in enumerate(mine):
                    if r == rows:
                        mine[i] = (r, torch.cat([a0, a], 1), torch.cat([d0, delta], 1))
                        break
                else:
                    mine.append((rows, a, delta))
        for name, v in other.vectors.items():
            self.vectors[name] = v if name not in self.vectors else self.vectors[name] + v


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A mask as the stock forward uses it: boolean ``True`` (masked) becomes ``-inf``, float masks are added."""
    if mask is None:
        return None
    mask = mask.detach()  # a mask computed from parameters (a learned bias) is an input here, as q, k and v are
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


def _one_more_key(mask: Tensor | None) -> Tensor | None:
    # An appended key (bias_k, or the zero key of add_zero_attn) is attended to by every query.
    return None if mask is None else F.pad(mask, (0, 1))


def attend(
    m: nn.MultiheadAttention, q: Tensor, k: Tensor, v: Tensor, named: dict[str, Any]
) -> tuple[Tensor, Tensor | None]:
    """The stock attention core after the input projections, batch first.

    Args:
        q: (N, L, E) projected queries. k, v: (N, S, E) projected keys and values, ``bias_k``/``bias_v``
            already appended. named: the call's arguments (masks, ``need_weights``, ...).

    Returns:
        The out projection's input ``(N, L, E)`` and the attention weights as the module returns them
        (``(N, L, S')``, or ``(N, heads, L, S')`` unaveraged) or None without ``need_weights``.

    Follows ``F.multi_head_attention_forward`` step by step, so that every option means what it means there:
    with ``is_causal`` and no padding mask the fused kernel gets the causal flag instead of the mask, and
    ``need_weights`` takes the explicit softmax path whose weights the module returns.
    """
    n, length, e = q.shape
    heads = m.num_heads
    need_weights, is_causal = named["need_weights"], named["is_causal"]
    padding = _additive(named["key_padding_mask"], q.dtype)
    mask = _additive(named["attn_mask"], q.dtype)
    if is_causal and padding is None and not need_weights:
        mask = None
    elif padding is not None:
        is_causal = False  # the padding is merged into the mask, which is then no longer causal
    if mask is not None:
        # (L, S) shared by every sample and head, or (N * heads, L, S) with the heads of a sample adjacent.
        mask = mask[None, None] if mask.dim() == 2 else mask.view(n, heads, *mask.shape[1:])
    if m.bias_k is not None:
        mask, padding = _one_more_key(mask), _one_more_key(padding)
    if m.add_zero_attn:
        zeros = k.new_zeros(n, 1, e)
        k, v = torch.cat([k, zeros], 1), torch.cat([v, zeros], 1)
        mask, padding = _one_more_key(mask), _one_more_key(padding)
    if padding is not None:
        padding = padding[:, None, None, :]  # (N, 1, 1, S): the same keys masked for every head and query
        mask = padding if mask is None else mask + padding

    def split(x: Tensor) -> Tensor:  # (N, T, E) -> (N, heads, T, E / heads)
        return x.view(n, x.shape[1], heads, e // heads).transpose(1, 2)

    q, k, v = split(q), split(k), split(v)
    weights = None
    if need_weights:
        scores = (q * math.sqrt(1.0 / q.shape[-1])) @ k.transpose(-2, -1)
        if mask is not None:
            scores = scores + mask
        probabilities = torch.softmax(scores, dim=-1)
        out = probabilities @ v
        weights = probabilities.mean(1) if named["average_attn_weights"] else probabilities
    else:
        out = F.scaled_dot_product_attention(q, k, v, mask, 0.0, is_causal)
    return out.transpose(1, 2).reshape(n, length, e), weights


def _projections(m: nn.MultiheadAttention, sharing: str) -> list[tuple[str, slice, int, int]]:
    """The input projections as ``(weight name, its rows, first, last)``: rows ``rows`` of the weight map input
    ``first`` (0 query, 1 key, 2 value) to the projected ``first..last`` side by side.

    Projections that read one tensor (``sharing``: "qkv" in self-attention, "kv" when key is value) share one
    GEMM and, for the packed ``in_proj_weight``, one row block: one Linear with a wider output.
    """
    if not m._qkv_same_embed_dim:
        return [(name, slice(None), i, i) for i, name in enumerate(("q_proj_weight", "k_proj_weight", "v_proj_weight"))]
    e = m.embed_dim
    spans = {"qkv": [(0, 2)], "kv": [(0, 0), (1, 2)]}.get(sharing, [(0, 0), (1, 1), (2, 2)])
    return [("in_proj_weight", slice(first * e, (last + 1) * e), first, last) for first, last in spans]


def _batch_first(m: nn.MultiheadAttention, x: Tensor) -> Tensor:
    return x if m.batch_first else x.transpose(0, 1)


def call_factors(target: Target, call: Call, sharing: str, dtype: torch.dtype) -> Factors:
    """Per-sample gradient factors of the covered parameters for one recorded call.

    ``sharing`` says which projections read one tensor in every call of the module (:func:`shared_inputs`).
    """
    m: nn.MultiheadAttention = target.module
    covered = target.params
    found = Factors()
    # Gradients at the output and, when the module returns them, at the attention weights.
    out_delta, weights_delta = [*(call.deltas or []), None, None][:2]
    if out_delta is None and weights_delta is None:
        return found  # the call's outputs did not reach the loss
    named = arguments(call)
    inputs = [_batch_first(m, named[k].detach()).to(dtype) for k in ("query", "key", "value")]
    n = inputs[0].shape[0]
    out_delta = None if out_delta is None else _batch_first(m, out_delta).to(dtype)
    weights_delta = None if weights_delta is None else weights_delta.to(dtype)
    bias = None if m.in_proj_bias is None else m.in_proj_bias.detach().to(dtype)
    backward = any(name in covered for name in _INPUT_SIDE)
    with torch.set_grad_enabled(backward):
        # Leaves of the recomputation: each projection's output, and the appended key and value rows.
        projections = _projections(m, sharing)
        leaves = []
        for name, rows, first, last in projections:
            weight = m.get_parameter(name).detach().to(dtype)[rows]
            span = slice(first * m.embed_dim, (last + 1) * m.embed_dim)  # the biases are packed in every case
            leaves.append(F.linear(inputs[first], weight, None if bias is None else bias[span]))
        appended = []
        if m.bias_k is not None:
            appended = [p.detach().to(dtype).expand(n, 1, -1).clone() for p in (m.bias_k, m.bias_v)]
        for x in leaves + appended:
            x.requires_grad_(backward)
        q, k, v = (part for leaf in leaves for part in leaf.split(m.embed_dim, -1))
        if appended:
            k, v = torch.cat([k, appended[0]], 1), torch.cat([v, appended[1]], 1)
        o, weights = attend(m, q, k, v, named)
        if backward:
            outputs, seeds = [], []
            if out_delta is not None:
                outputs.append(o)
                seeds.append(out_delta @ m.out_proj.weight.detach().to(dtype))
            if weights_delta is not None:
                outputs.append(weights)
                seeds.append(weights_delta)
            grads = torch.autograd.grad(outputs, leaves + appended, seeds, allow_unused=True)
            grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves + appended, grads)]
            for (name, rows, first, _), g in zip(projections, grads):
                if name in covered:
                    found.weights.setdefault(name, []).append((rows, inputs[first], g))
            if "in_proj_bias" in covered:
                found.vectors["in_proj_bias"] = torch.cat([g.sum(1) for g in grads[: len(leaves)]], 1)
            for name, g in zip(("bias_k", "bias_v"), grads[len(leaves) :]):
                if name in covered:
                    found.vectors[name] = g.reshape(n, *m.get_parameter(name).shape)
    if out_delta is not None:
        if "out_proj.weight" in covered:
            found.weights["out_proj.weight"] = [(slice(None), o.detach(), out_delta)]
        if "out_proj.bias" in covered:
            found.vectors["out_proj.bias"] = out_delta.sum(1)
    return found


def shared_inputs(calls: list[Call]) -> str:
    """Which projections read the same tensor in every call: "qkv", "kv" or ""."""
    named = [arguments(call) for call in calls]
    if all(a["query"] is a["key"] is a["value"] for a in named):
        return "qkv"
    if all(a["key"] is a["value"] for a in named):
        return "kv"
    return ""


def factors(target: Target, calls: list[Call], dtype: torch.dtype) -> Factors:
    """Per-sample gradient factors of the covered parameters, summed over the module's calls."""
    total = Factors()
    sharing = shared_inputs(calls)
    for call in calls:
        total.add(call_factors(target, call, sharing, dtype))
    return total


# --------------------------------------------------------------------------------------------------
# Terms
# --------------------------------------------------------------------------------------------------


def mha_terms(
    target: Target,
    calls: list[Call],
    grads: dict[str, Tensor],
    batch_size: int,
    dtype: torch.dtype,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """``||g||^2`` and ``<g, G>`` of the covered parameters of a stock ``nn.MultiheadAttention``."""
    m = target.module
    sq = torch.zeros(batch_size, dtype=dtype, device=m.out_proj.weight.device)
    dot = torch.zeros_like(sq)
    found = factors(target, calls, dtype)
    for name, pieces in found.weights.items():
        grad = grads.get(name)
        for rows, a, delta in pieces:
            s, d = ops.linear_sample_score(
                a,
                delta,
                None if grad is None else grad[rows][None],
                ghost=use_ghost_norm(*a.shape[1:], delta.shape[2]),
                backend=backend,
            )
            sq, dot = sq + s, dot + d
    for name, per_sample in found.vectors.items():
        s, d = sq_and_dot(per_sample, grads.get(name))
        sq, dot = sq + s, dot + d
    return sq, dot


def per_sample_gradients(target: Target, calls: list[Call], batch_size: int, dtype: torch.dtype) -> dict[str, Tensor]:
    """Per-sample gradients ``{local name: (N, *shape)}`` of the covered parameters (for projected features,
    which need each sample's gradient once; scores never form them)."""
    m = target.module
    found = factors(target, calls, dtype)
    result = dict(found.vectors)
    for name, pieces in found.weights.items():
        g = torch.zeros(batch_size, *m.get_parameter(name).shape, dtype=dtype, device=m.out_proj.weight.device)
        for rows, a, delta in pieces:
            g[:, rows] += delta.transpose(1, 2) @ a
        result[name] = g
    return result
