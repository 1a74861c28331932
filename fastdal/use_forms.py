"""Per-sample gradients of a derived tensor at the operation that uses it, one closed form per operation family.

A use (fastdal/uses.py, UseCall) combines a derived tensor ``S`` (a parameter, or made from parameters only)
with tensors that hold samples; fastdal's one backward gives the gradient ``delta`` at its output. Samples do
not meet inside these operations, so sample ``u``'s gradient of ``S`` is the operation's vector-Jacobian product
restricted to sample ``u``:

* ``linear``/``addmm``/``matmul`` with ``S`` as the matrix: a Linear map over the sample's rows (positions), the
  piece ``Linear(a, delta)`` of fastdal/pieces.py; a bias ``S``: ``delta`` summed over positions;
* elementwise ``add``/``sub``/``mul``/``div`` with broadcasting: ``delta`` times the partial derivative, summed
  over the dimensions ``S`` was broadcast along (the sample dimension excepted);
* ``expand`` of ``S`` along the samples (a class token): ``delta`` of the sample, summed over what was expanded;
* ``embedding`` of ids that hold samples: the rows of ``delta`` at the sample's ids;
* ``layer_norm``/``rms_norm``/``group_norm`` with ``S`` as weight or bias: ``delta * xhat`` (or ``delta``) summed
  over the sample's positions;
* ``scaled_dot_product_attention`` with ``S`` as its additive mask (a learned position bias): the gradient at the
  attention scores, recomputed from the recorded query, key and value, summed over what ``S`` was broadcast along;
* any other operation: the vector-Jacobian product of the operation itself, mapped over the samples with
  ``torch.func.vmap`` (exact; a chunk of samples at a time), with a warning naming it.

Everything is computed in the accumulation dtype. :func:`readable` says whether a recorded use fits these
forms (the samples where the form needs them); one that does not sends its parameters to the generic path.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from .layout import MIXED
from .pieces import Computed, Dense, Linear, Rows, group_rows, parameter_terms, parameter_value, to_parameters
from .uses import Node, UseCall

_ARGUMENTS = {
    "linear": ("input", "weight", "bias"),
    "addmm": ("input", "mat1", "mat2"),
    "matmul": ("input", "other"),
    "rmatmul": ("input", "other"),
    "add": ("input", "other"),
    "sub": ("input", "other"),
    "rsub": ("input", "other"),
    "mul": ("input", "other"),
    "div": ("input", "other"),
    "rdiv": ("input", "other"),
    "expand": ("input",),
    "embedding": ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
    "layer_norm": ("input", "normalized_shape", "weight", "bias", "eps"),
    "rms_norm": ("input", "normalized_shape", "weight", "eps"),
    "group_norm": ("input", "num_groups", "weight", "bias", "eps"),
    "attention": ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"),
}
_ELEMENTWISE = ("add", "sub", "rsub", "mul", "div", "rdiv")


def _named(call: UseCall) -> dict:
    named = dict(zip(_ARGUMENTS[call.op], call.args))
    named.update(call.kwargs)
    if "self" in named:  # Tensor methods called with self= as a keyword
        named.setdefault("input", named.pop("self"))
    return named


def _dim(call: UseCall, t: object):
    """The sample dimension the probes found for input tensor ``t`` (None if ``t`` is not a tensor input)."""
    for x, dim in zip(call.inputs, call.in_dims):
        if x is t:
            return dim
    return None


def _row_base(call: UseCall, t: object):
    for x, base in zip(call.inputs, call.row_bases):
        if x is t:
            return base
    return None


# --------------------------------------------------------------------------------------------------
# Readability
# --------------------------------------------------------------------------------------------------


def readable(call: UseCall, batch_size: int) -> bool:
    """Whether the recorded use has a closed form here (a known operation with its samples where that form reads
    them), or, for any other operation, whether its vmap over the samples is defined."""
    if len(call.outputs) != 1 or not isinstance(call.out_dims[0], (int, type(MIXED))):
        return False
    if call.op not in _ARGUMENTS:
        return _mapped_readable(call)
    named = _named(call)
    if call.op == "attention":
        return _attention_readable(call, named)
    if call.op in _ELEMENTWISE:
        return _elementwise_readable(call, named)
    if call.op == "expand":
        source = named["input"]
        return call.node_of(source) is not None and _broadcast_readable(call, source.shape)
    if call.op in ("linear", "addmm", "matmul", "rmatmul"):
        return _matrix_readable(call, named, batch_size)
    if call.op == "embedding":
        ids = named["input"]
        return (
            call.node_of(named["weight"]) is not None
            and call.node_of(ids) is None
            and isinstance(_dim(call, ids), int)
            and isinstance(call.out_dims[0], int)
        )
    return _norm_readable(call, named)


def _mapped_readable(call: UseCall) -> bool:
    """The output holds the samples in one dimension, every other input in one dimension or in none."""
    if not isinstance(call.out_dims[0], int) or any(call.outputs[0] is x for x in call.inputs):
        return False
    for i, dim in enumerate(call.in_dims):
        if i in call.derived:
            if dim is not None:
                return False
        elif not (dim is None or isinstance(dim, int)):
            return False
    return True


def _attention_readable(call: UseCall, named: dict) -> bool:
    """The mask alone is derived; query, key, value and output hold the samples in one leading dimension."""
    mask = named.get("attn_mask")
    if mask is None or call.node_of(mask) is None or named.get("dropout_p", 0.0) or named.get("is_causal"):
        return False
    if any(call.node_of(named[k]) is not None for k in ("query", "key", "value")):
        return False
    dim = call.out_dims[0]
    q = named["query"]
    if not isinstance(dim, int) or dim >= q.dim() - 2:
        return False
    if any(_dim(call, named[k]) != dim for k in ("query", "key", "value")):
        return False
    scores = (*call.outputs[0].shape[:-1], named["key"].shape[-2])
    padded = (1,) * (len(scores) - mask.dim()) + tuple(mask.shape)
    return mask.dim() <= len(scores) and padded[dim] == 1


def _broadcast_readable(call: UseCall, shape: torch.Size) -> bool:
    """``S`` of ``shape`` broadcast to the output: the output holds the samples in an int dimension along
    which ``S`` has size 1 (always, when ``S`` holds no samples; checked all the same)."""
    dim = call.out_dims[0]
    if not isinstance(dim, int):
        return False
    n = call.outputs[0].dim()
    if len(shape) > n:
        return False
    padded = (1,) * (n - len(shape)) + tuple(shape)
    return padded[dim] == 1


def _elementwise_readable(call: UseCall, named: dict) -> bool:
    x, y = named.get("input"), named.get("other")
    nodes = [call.node_of(x), call.node_of(y)]
    if sum(n is not None for n in nodes) != 1:
        return False
    derived = x if nodes[0] is not None else y
    other = y if nodes[0] is not None else x
    if derived is call.outputs[0]:
        return False  # written into in place: the derived tensor itself changed
    if isinstance(other, Tensor) and _dim(call, other) is MIXED:
        return False
    return _broadcast_readable(call, derived.shape)


def _norm_readable(call: UseCall, named: dict) -> bool:
    x = named["input"]
    dim = _dim(call, x)
    if call.node_of(x) is not None or not isinstance(dim, int) or call.out_dims[0] != dim:
        return False
    if call.op == "group_norm":
        return dim == 0
    return dim < x.dim() - len(tuple(named["normalized_shape"]))


def _matrix_readable(call: UseCall, named: dict, batch_size: int) -> bool:
    if call.op == "linear":
        x, weight, bias = named["input"], named["weight"], named.get("bias")
        if call.node_of(x) is not None or (call.node_of(weight) is None and call.node_of(bias) is None):
            return False
        return _rows_readable(call, x, batch_size) and (weight.dim() == 2 or call.node_of(weight) is None)
    if call.op == "addmm":
        bias, mat1, mat2 = named["input"], named["mat1"], named["mat2"]
        if call.node_of(mat1) is not None or (call.node_of(mat2) is None and call.node_of(bias) is None):
            return False
        if call.node_of(mat2) is None and not isinstance(_dim(call, mat2), type(None)):
            return False
        if call.node_of(bias) is not None and bias.numel() != mat2.shape[1]:
            return False
        return _rows_readable(call, mat1, batch_size)
    left, right = _matmul_operands(call, named)
    if call.node_of(right) is not None and call.node_of(left) is None and right.dim() == 2:
        return _rows_readable(call, left, batch_size)
    if call.node_of(left) is not None and call.node_of(right) is None and left.dim() == 2 and right.dim() >= 2:
        dim = _dim(call, right)
        return isinstance(dim, int) and dim != right.dim() - 2 and isinstance(call.out_dims[0], int)
    return False


def _rows_readable(call: UseCall, x: Tensor, batch_size: int) -> bool:
    """A data operand read as rows of features (its last dimension): the samples in another dimension, or
    flattened sample by sample into its rows (a flat view of a tensor holding them in dimension 0)."""
    dim = _dim(call, x)
    if isinstance(dim, int):
        return dim < x.dim() - 1 and (call.out_dims[0] == dim or x.dim() == call.outputs[0].dim() == 2)
    base_dim = _row_base(call, x)
    if dim is not MIXED or x.dim() != 2 or not isinstance(base_dim, int) or x._base is None:
        return False
    base = x._base
    # Rows are sample by sample when the samples are the outermost dimension of the base's memory.
    outermost = base.stride(base_dim) * base.shape[base_dim] == base.numel()
    return outermost and base.shape[base_dim] == batch_size and call.outputs[0].shape[0] == x.shape[0]


def _matmul_operands(call: UseCall, named: dict) -> tuple[Tensor, Tensor]:
    if call.op == "rmatmul":  # Tensor.__rmatmul__(self, other) computes other @ self
        return named["other"], named["input"]
    return named["input"], named["other"]


# --------------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------------


def use_pieces(call: UseCall, batch_size: int, dtype: torch.dtype) -> list[tuple[Node, object]]:
    """(derived input, its per-sample gradient piece) for each derived input of the use."""
    delta = call.deltas[0]
    if delta is None:
        return []
    if call.op not in _ARGUMENTS:
        return _mapped(call, delta, batch_size, dtype)
    named = _named(call)
    delta = delta.to(dtype)
    if call.op in _ELEMENTWISE:
        return _elementwise(call, named, delta, dtype)
    if call.op == "expand":
        source = named["input"]
        return [(call.node_of(source), Dense(reduce_to(delta, call.out_dims[0], source.shape)))]
    if call.op == "linear":
        return _linear(call, named, delta, batch_size, dtype)
    if call.op == "addmm":
        return _addmm(call, named, delta, batch_size, dtype)
    if call.op in ("matmul", "rmatmul"):
        return _matmul(call, named, delta, batch_size, dtype)
    if call.op == "embedding":
        return [(call.node_of(named["weight"]), _embedding_rows(call, named, delta, batch_size))]
    if call.op == "attention":
        return _attention(call, named, delta, dtype)
    return _norm(call, named, delta, dtype)


def reduce_to(p: Tensor, dim: int, shape: torch.Size) -> Tensor:
    """Per-sample sums of ``p`` (shaped like the output, samples in ``dim``) over the dimensions a tensor of
    ``shape`` was broadcast along: ``(B, *shape)``."""
    n = p.dim()
    padded = (1,) * (n - len(shape)) + tuple(shape)
    summed = [i for i in range(n) if i != dim and padded[i] == 1 and p.shape[i] != 1]
    if summed:
        p = p.sum(summed, keepdim=True)
    p = p.movedim(dim, 0)
    return p.reshape(p.shape[0], *shape)


def _elementwise(call: UseCall, named: dict, delta: Tensor, dtype) -> list:
    x, y = named.get("input"), named.get("other")
    alpha = named.get("alpha", 1)
    derived_is_input = call.node_of(x) is not None
    s, other = (x, y) if derived_is_input else (y, x)
    node = call.node_of(s)
    s_value = s.detach().to(dtype)
    o_value = other.detach().to(dtype) if isinstance(other, Tensor) else other
    # d(output)/dS, by operation and by which operand S is
    if call.op == "add":
        factor = 1 if derived_is_input else alpha
    elif call.op == "sub":
        factor = 1 if derived_is_input else -alpha
    elif call.op == "rsub":  # other - alpha * input
        factor = -alpha if derived_is_input else 1
    elif call.op == "mul":
        factor = o_value
    elif call.op == "div":  # input / other
        factor = 1 / o_value if derived_is_input else -o_value / s_value.square()
    else:  # rdiv: other / input
        factor = -o_value / s_value.square() if derived_is_input else 1 / o_value
    p = delta * factor if not (isinstance(factor, (int, float)) and factor == 1) else delta
    return [(node, Dense(reduce_to(p, call.out_dims[0], s.shape)))]


def _rows(call: UseCall, x: Tensor, batch_size: int, dtype) -> Tensor:
    """``x`` as ``(B, T, features)``: samples first, every other position in between."""
    dim = _dim(call, x)
    x = x.detach().to(dtype)
    if isinstance(dim, int):
        return x.movedim(dim, 0).reshape(batch_size, -1, x.shape[-1])
    return x.reshape(batch_size, -1, x.shape[-1])  # flattened sample by sample (_rows_readable)


def _delta_rows(call: UseCall, x: Tensor, delta: Tensor, batch_size: int) -> Tensor:
    """The output gradient with the same rows as the data operand ``x``."""
    dim = call.out_dims[0]
    if isinstance(dim, int):
        return delta.movedim(dim, 0).reshape(batch_size, -1, delta.shape[-1])
    return delta.reshape(batch_size, -1, delta.shape[-1])


def _linear(call: UseCall, named: dict, delta: Tensor, batch_size: int, dtype) -> list:
    x, weight, bias = named["input"], named["weight"], named.get("bias")
    a = _rows(call, x, batch_size, dtype)
    d = _delta_rows(call, x, delta, batch_size)
    found = []
    if call.node_of(weight) is not None:
        found.append((call.node_of(weight), Linear(a, d)))
    if bias is not None and call.node_of(bias) is not None:
        found.append((call.node_of(bias), Dense(d.sum(1).reshape(batch_size, *bias.shape))))
    return found


def _addmm(call: UseCall, named: dict, delta: Tensor, batch_size: int, dtype) -> list:
    bias, mat1, mat2 = named["input"], named["mat1"], named["mat2"]
    alpha, beta = named.get("alpha", 1), named.get("beta", 1)
    a = _rows(call, mat1, batch_size, dtype)
    d = _delta_rows(call, mat1, delta, batch_size)
    found = []
    if call.node_of(mat2) is not None:  # mat2 (d_in, d_out): g = sum_t a_t (alpha d_t)^T
        found.append((call.node_of(mat2), Linear(d * alpha if alpha != 1 else d, a)))
    if call.node_of(bias) is not None:
        summed = d.sum(1) * beta if beta != 1 else d.sum(1)
        found.append((call.node_of(bias), Dense(summed.reshape(batch_size, *bias.shape))))
    return found


def _matmul(call: UseCall, named: dict, delta: Tensor, batch_size: int, dtype) -> list:
    left, right = _matmul_operands(call, named)
    if call.node_of(right) is not None:  # rows @ S: S (d_in, d_out), g = sum_t a_t delta_t^T
        a = _rows(call, left, batch_size, dtype)
        d = _delta_rows(call, left, delta, batch_size)
        return [(call.node_of(right), Linear(d, a))]
    # S @ X: every column of X is a position, g = sum_n delta_n x_n^T (d_out, d_in)
    dim, out_dim = _dim(call, right), call.out_dims[0]
    x = right.detach().to(dtype).movedim(dim, 0)
    d = delta.movedim(out_dim, 0)
    if dim != right.dim() - 1:
        x, d = x.transpose(-1, -2), d.transpose(-1, -2)
    a = x.reshape(batch_size, -1, left.shape[1])
    return [(call.node_of(left), Linear(a, d.reshape(batch_size, -1, left.shape[0])))]


def _embedding_rows(call: UseCall, named: dict, delta: Tensor, batch_size: int) -> Rows:
    weight, ids = named["weight"], named["input"]
    num_rows = weight.shape[0]
    ids = ids.movedim(_dim(call, ids), 0).reshape(batch_size, -1)
    rows = delta.movedim(call.out_dims[0], 0).reshape(batch_size, -1, weight.shape[1])
    padding = named.get("padding_idx")
    flat_ids = ids.reshape(-1).long()
    rows = rows.reshape(-1, weight.shape[1])
    if padding is not None:
        padding = padding + num_rows if padding < 0 else padding
        rows = rows * (flat_ids != padding).to(rows.dtype)[:, None]
    owner = torch.arange(batch_size, device=rows.device).repeat_interleave(ids.shape[1])
    if named.get("scale_grad_by_freq"):
        # PyTorch divides each row's gradient by the id's count in the batch: for one sample, in the sample.
        keys = owner * num_rows + flat_ids
        slots, _, counts = group_rows(keys, torch.ones_like(rows[:, :1]))
        rows = rows / counts[slots]
    return Rows(owner, flat_ids, rows, num_rows)


def _attention(call: UseCall, named: dict, delta: Tensor, dtype) -> list:
    """``softmax(q k^T * scale + S) v``: the gradient at the scores, ``P * (dP - rowsum(dP * P))`` with
    ``dP = delta v^T``, recomputed batched (samples never meet inside attention)."""
    q, k, v, mask = (named[name].detach().to(dtype) for name in ("query", "key", "value", "attn_mask"))
    if named.get("enable_gqa") and k.shape[-3] != q.shape[-3]:
        repeat = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(repeat, -3), v.repeat_interleave(repeat, -3)
    scale = named.get("scale")
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    p = torch.softmax(q @ k.transpose(-2, -1) * scale + mask, dim=-1)
    dp = delta @ v.transpose(-2, -1)
    scores = p * (dp - (dp * p).sum(-1, keepdim=True))
    return [(call.node_of(named["attn_mask"]), Dense(reduce_to(scores, call.out_dims[0], named["attn_mask"].shape)))]


def _mapped(call: UseCall, delta: Tensor, batch_size: int, dtype) -> list:
    """Per-sample gradients of the derived inputs of an operation without a closed form: its vector-Jacobian
    product for one sample, mapped over the samples (a chunk at a time; one sample at a time where vmap cannot)."""
    leaves, spec = tree_flatten((call.args, call.kwargs))
    positions = [i for i, x in enumerate(leaves) if isinstance(x, Tensor)]
    derived = sorted(call.derived)
    batched = [
        (positions[i], dim) for i, dim in enumerate(call.in_dims) if i not in call.derived and isinstance(dim, int)
    ]
    out_dim = call.out_dims[0]
    values = [call.inputs[i].detach() for i in derived]
    delta = call.deltas[0]  # in the output's own dtype, as the vector-Jacobian product needs it

    def output(derived_values: tuple, xs: list) -> Tensor:
        filled = list(leaves)
        for i, value in zip(derived, derived_values):
            filled[positions[i]] = value
        for (slot, dim), x in zip(batched, xs):
            filled[slot] = x.unsqueeze(dim)  # one sample, as a batch of one
        args, kwargs = tree_unflatten(filled, spec)
        return next(t for t in tree_flatten(call.func(*args, **kwargs))[0] if isinstance(t, Tensor))

    def one_sample(xs: list, d: Tensor) -> tuple:
        _, back = torch.func.vjp(lambda *dv: output(dv, xs), *values)
        return back(d.unsqueeze(out_dim))

    def compute(samples: slice, which: int) -> Tensor:
        size = samples.stop - samples.start
        xs = [leaves[slot].detach().narrow(dim, samples.start, size) for slot, dim in batched]
        d = delta.narrow(out_dim, samples.start, size)
        try:
            grads = torch.func.vmap(one_sample, in_dims=([dim for _, dim in batched], out_dim))(xs, d)
        except (RuntimeError, NotImplementedError, ValueError):
            rows = [
                one_sample([x.select(dim, k) for x, (_, dim) in zip(xs, batched)], d.select(out_dim, k))
                for k in range(size)
            ]
            grads = [torch.stack([r[j] for r in rows]) for j in range(len(values))]
        return grads[which].to(dtype)

    return [
        (call.derived[i], Computed(lambda samples, j=j: compute(samples, j), delta.device))
        for j, i in enumerate(derived)
    ]


def _norm(call: UseCall, named: dict, delta: Tensor, dtype) -> list:
    x = named["input"]
    dim = _dim(call, x)
    x = x.detach().to(dtype).movedim(dim, 0)
    d = delta.movedim(call.out_dims[0], 0)
    weight, bias = named.get("weight"), named.get("bias")
    if call.op == "group_norm":
        groups = named["num_groups"]
        eps = named.get("eps", 1e-5)
        flat = x.reshape(x.shape[0], groups, -1)
        var, mean = torch.var_mean(flat, dim=-1, unbiased=False, keepdim=True)
        xhat = ((flat - mean) * torch.rsqrt(var + eps)).view_as(x)
        channels = tuple(range(2, x.dim()))
        weight_part = (d * xhat).sum(channels) if channels else d * xhat
        bias_part = d.sum(channels) if channels else d
    else:
        shape = (
            tuple(named["normalized_shape"])
            if not isinstance(named["normalized_shape"], int)
            else (named["normalized_shape"],)
        )
        dims = tuple(range(x.dim() - len(shape), x.dim()))
        if call.op == "rms_norm":
            eps = named.get("eps")
            eps = torch.finfo(named["input"].dtype).eps if eps is None else eps
            xhat = x * torch.rsqrt(x.square().mean(dim=dims, keepdim=True) + eps)
        else:
            eps = named.get("eps", 1e-5)
            var, mean = torch.var_mean(x, dim=dims, unbiased=False, keepdim=True)
            xhat = (x - mean) * torch.rsqrt(var + eps)
        positions = tuple(range(1, x.dim() - len(shape)))
        weight_part = (d * xhat).sum(positions) if positions else d * xhat
        bias_part = d.sum(positions) if positions else d
    found = []
    if weight is not None and call.node_of(weight) is not None:
        found.append((call.node_of(weight), Dense(weight_part)))
    if bias is not None and call.node_of(bias) is not None:
        found.append((call.node_of(bias), Dense(bias_part)))
    return found


# --------------------------------------------------------------------------------------------------
# A target's terms
# --------------------------------------------------------------------------------------------------


def _pieces_by_parameter(target, calls: list[UseCall], batch_size: int, dtype) -> tuple[dict, dict]:
    """Every use's pieces, taken back to the target's parameters: ({name: [piece, ...]}, {name: shape})."""
    found: dict[str, list] = {}
    shapes: dict[str, torch.Size] = {}
    for call in calls:
        for node, piece in use_pieces(call, batch_size, dtype):
            for name, part in to_parameters(node, piece, batch_size).items():
                if name in target.params:
                    found.setdefault(name, []).append(part)
                    shapes[name] = parameter_value(node, name).shape
    return found, shapes


def use_terms(target, calls: list[UseCall], grads: dict, batch_size: int, dtype, backend: str = "auto"):
    """``||g||^2`` and ``<g, G>`` per sample over a "uses" target's parameters, from all their recorded uses."""
    found, shapes = _pieces_by_parameter(target, calls, batch_size, dtype)
    device = next((c.deltas[0].device for c in calls if c.deltas and c.deltas[0] is not None), None)
    sq = torch.zeros(batch_size, dtype=dtype, device=device)
    dot = torch.zeros_like(sq)
    for name, parts in found.items():
        s, d = parameter_terms(parts, grads.get(name), shapes[name], batch_size, dtype, backend)
        sq, dot = sq + s, dot + d
    return sq, dot


def per_sample_gradients(target, calls: list[UseCall], batch_size: int, dtype) -> dict[str, Tensor]:
    """Dense per-sample gradients ``{name: (B, *shape)}`` of a "uses" target's parameters (for features)."""
    found, shapes = _pieces_by_parameter(target, calls, batch_size, dtype)
    every = slice(0, batch_size)
    return {
        name: sum(p.dense(every).to(dtype) for p in parts).reshape(batch_size, *shapes[name])
        for name, parts in found.items()
    }
