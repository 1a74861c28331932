"""A parameter's per-sample gradient, from the pieces its uses give, to ``||g||^2`` and ``<g, G>``.

Each use of a tensor ``S`` by an operation (fastdal/use_forms.py) gives every sample's gradient of ``S`` in the
cheapest form that operation allows:

* :class:`Linear` ``(a, delta)``: ``S`` is a matrix applied to a sample's rows, ``g = sum_t delta_t a_t^T``,
  never formed (the ghost or direct norm of DESIGN.md section 1 applies);
* :class:`Dense` ``g``: the gradient itself, ``(B, *S.shape)``, for tensors no larger than the activations they
  meet (scales, shifts, biases, position tables, tokens expanded along the batch);
* :class:`Rows` ``(owner, ids, rows)``: rows of a table looked up per sample (``rows[k]`` is sample
  ``owner[k]``'s gradient of row ``ids[k]``; the same row may come several times and is summed);
* :class:`Computed`: a dense gradient made one chunk of samples at a time (an operation without a closed form).

``S`` is a parameter, or a tensor made from parameters (``W.T``, a lookup with shared ids, a parametrization's
``weight``; fastdal/uses.py, Node): :func:`to_parameters` takes the piece back to the parameters, keeping its
form where the way ``S`` was made allows it. A parameter used several times sums its pieces before the norm
(:func:`parameter_terms`): Linear pieces side by side over positions, rows of one table together, and any mix
one chunk of samples at a time as dense gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import vjp, vmap
from torch.utils._pytree import tree_unflatten

from . import ops
from .torch_ops import chunks, sq_and_dot, use_ghost_norm
from .uses import Node


@dataclass
class Linear:
    """``g = sum_t delta_t a_t^T`` per sample: ``a: (B, T, d_in)``, ``delta: (B, T, d_out)``, ``g: (d_out, d_in)``."""

    a: Tensor
    delta: Tensor

    def transposed(self) -> Linear:
        return Linear(self.delta, self.a)

    def dense(self, samples: slice) -> Tensor:
        return torch.bmm(self.delta[samples].transpose(1, 2), self.a[samples])


@dataclass
class Dense:
    g: Tensor  # (B, *shape)

    def dense(self, samples: slice) -> Tensor:
        return self.g[samples]


@dataclass
class Rows:
    """Rows of a ``(num_rows, dim)`` table: ``rows[k]`` of row ``ids[k]`` for sample ``owner[k]``."""

    owner: Tensor
    ids: Tensor
    rows: Tensor
    num_rows: int

    def dense(self, samples: slice) -> Tensor:
        start, stop = samples.start or 0, samples.stop
        dim = self.rows.shape[1]
        out = self.rows.new_zeros((stop - start) * self.num_rows + 1, dim)
        # Rows of samples outside the chunk go to the one spare row at the end, which is dropped.
        inside = (self.owner >= start) & (self.owner < stop)
        index = torch.where(inside, (self.owner - start) * self.num_rows + self.ids, out.shape[0] - 1)
        out.index_add_(0, index, self.rows)
        return out[:-1].view(stop - start, self.num_rows, dim)


@dataclass
class Computed:
    """A dense gradient ``(B, *shape)`` computed one chunk of samples at a time by ``compute(samples)`` (the vmap of
    an operation without a closed form: never held for the whole batch)."""

    compute: Callable[[slice], Tensor]
    device: torch.device

    def dense(self, samples: slice) -> Tensor:
        return self.compute(samples)


Piece = Linear | Dense | Rows | Computed


# --------------------------------------------------------------------------------------------------
# From the tensor an operation read back to the parameters
# --------------------------------------------------------------------------------------------------


def to_parameters(node: Node, piece: Piece, batch_size: int) -> dict[str, Piece | Mapped]:
    """``piece`` (a per-sample gradient of ``node.tensor``) as per-sample gradients of the parameters it is made
    from: as it is for the parameter itself or a view with the same layout, transposed for ``W.T``, as rows for
    a lookup of a parameter table with ids shared by all samples, and otherwise as :class:`Mapped` dense
    gradients through the recipe's vector-Jacobian product."""
    if node.param is not None:
        return {node.param: piece}
    leaf = _viewed_parameter(node)
    if leaf is not None:
        param, transposed = leaf
        if not transposed:
            return {param.param: piece}
        if isinstance(piece, Linear):
            return {param.param: piece.transposed()}
        if isinstance(piece, Dense) and piece.g.dim() == 3:
            return {param.param: Dense(piece.g.transpose(1, 2))}
    lookup = _shared_lookup(node)
    if lookup is not None and isinstance(piece, Dense):
        return {lookup[0].param: _shared_rows(node, lookup, piece, batch_size)}
    return {name: Mapped(node, piece, name) for name in node.params()}


def _viewed_parameter(node: Node) -> tuple[Node, bool] | None:
    """(the parameter's Node, transposed?) when ``node.tensor`` is a view of one parameter with the same
    layout, or its transpose (a 2-D parameter read as ``W.T``, ``W.t()``, ``W.mT``, ``W.permute(1, 0)``)."""
    params = [x for x in _leaves(node) if x.param is not None]
    if len(params) != 1:
        return None
    p, t = params[0].tensor, node.tensor
    if t._base is not p or t.storage_offset() != p.storage_offset():
        return None
    if t.shape == p.shape and t.stride() == p.stride():
        return params[0], False
    if p.dim() == 2 and t.dim() == 2 and t.shape == p.shape[::-1] and t.stride() == p.stride()[::-1]:
        return params[0], True
    return None


def _leaves(node: Node) -> list[Node]:
    found, stack = [], [node]
    while stack:
        n = stack.pop()
        found.append(n)
        stack.extend(x for x in n.leaves if isinstance(x, Node))
    return found


def _shared_lookup(node: Node) -> tuple[Node, Node, Tensor, int | None] | None:
    """(the table's Node, the lookup's Node, ids, padding index) when ``node`` is made from one ``F.embedding`` of a
    parameter table by ids shared by all samples, followed by operations of one derived input each."""
    current = node
    while current.param is None:
        derived = [x for x in current.leaves if isinstance(x, Node)]
        if len(derived) != 1:
            return None
        if current.func is torch.nn.functional.embedding:
            args = _arguments(current)
            weight = derived[0]
            if weight.param is None or args.get("weight") is not weight.tensor:
                return None
            if args.get("max_norm") is not None or args.get("scale_grad_by_freq"):
                return None
            padding = args.get("padding_idx")
            if padding is not None and padding < 0:
                padding += weight.tensor.shape[0]
            return weight, current, args["input"], padding
        current = derived[0]
    return None


_EMBEDDING_ARGS = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")


def _arguments(node: Node) -> dict:
    """The arguments of the ``F.embedding`` call ``node`` records, by name."""
    leaves = [x.tensor if isinstance(x, Node) else x for x in node.leaves]
    args, kwargs = tree_unflatten(leaves, node.spec)
    named = dict(zip(_EMBEDDING_ARGS, args))
    named.update(kwargs)
    return named


def _shared_rows(node: Node, lookup: tuple[Node, Node, Tensor, int | None], piece: Dense, batch_size: int) -> Rows:
    """A position table's rows: the gradient of the looked-up rows, back through the operations after the
    lookup (views, permutes, slices: their vector-Jacobian product is cheap), summed per id by
    :func:`rows_terms`."""
    table, looked_up, ids, padding = lookup
    if looked_up is node:
        g = piece.g
    else:
        start = looked_up.tensor.detach()
        _, back = vjp(lambda e: node.replay({}, {id(looked_up): e}), start)
        g = vmap(back)(piece.g)[0]
    dim = g.shape[-1]
    rows = g.reshape(batch_size, -1, dim)
    flat_ids = ids.reshape(-1).to(rows.device)
    if padding is not None:
        rows = rows * (flat_ids != padding).to(rows.dtype)[None, :, None]
    owner = torch.arange(batch_size, device=rows.device).repeat_interleave(flat_ids.shape[0])
    return Rows(owner, flat_ids.repeat(batch_size), rows.reshape(-1, dim), table.tensor.shape[0])


@dataclass
class Mapped:
    """A dense per-sample gradient of parameter ``name`` through the recipe of ``node``: the vector-Jacobian
    product of the recipe, mapped over the samples (exact for any recipe; the gradient of ``node.tensor`` is
    formed one chunk of samples at a time)."""

    node: Node
    piece: Piece
    name: str

    def dense(self, samples: slice) -> Tensor:
        names = self.node.params()
        values = [parameter_value(self.node, n) for n in names]
        _, back = vjp(lambda *v: self.node.replay(dict(zip(names, v))), *values)
        g = self.piece.dense(samples).to(values[names.index(self.name)].dtype)
        return vmap(back)(g)[names.index(self.name)]


def parameter_value(node: Node, name: str) -> Tensor:
    for leaf in _leaves(node):
        if leaf.param == name:
            return leaf.tensor.detach()
    raise KeyError(name)


# --------------------------------------------------------------------------------------------------
# A parameter's terms
# --------------------------------------------------------------------------------------------------


def parameter_terms(
    pieces: list[Piece | Mapped], grad: Tensor | None, shape: torch.Size, batch_size: int, dtype, backend: str
) -> tuple[Tensor, Tensor]:
    """``||g||^2`` and ``<g, G>`` per sample of one parameter whose gradient is the sum of ``pieces``."""
    kinds = {type(p) for p in pieces}
    if kinds == {Linear} and len(shape) == 2:
        a = torch.cat([p.a.to(dtype) for p in pieces], 1) if len(pieces) > 1 else pieces[0].a.to(dtype)
        delta = torch.cat([p.delta.to(dtype) for p in pieces], 1) if len(pieces) > 1 else pieces[0].delta.to(dtype)
        positions, d_in, d_out = a.shape[1], a.shape[2], delta.shape[2]
        g = None if grad is None else grad.to(dtype)[None]
        return ops.linear_sample_score(a, delta, g, ghost=use_ghost_norm(positions, d_in, d_out), backend=backend)
    if kinds == {Dense}:
        total = pieces[0].g.to(dtype)
        for p in pieces[1:]:
            total = total + p.g.to(dtype)
        return sq_and_dot(total.reshape(batch_size, *shape), grad)
    if kinds == {Rows}:
        return rows_terms(pieces, grad, batch_size, dtype)
    device = grad.device if grad is not None else _device(pieces[0])
    sq = torch.zeros(batch_size, dtype=dtype, device=device)
    dot = torch.zeros_like(sq)
    for samples in chunks(batch_size, shape.numel()):
        total = sum(p.dense(samples).to(dtype) for p in pieces)
        s, d = sq_and_dot(total.reshape(-1, *shape), grad)
        sq[samples], dot[samples] = s, d
    return sq, dot


def _device(piece: Piece | Mapped) -> torch.device:
    if isinstance(piece, Mapped):
        return _device(piece.piece)
    if isinstance(piece, Computed):
        return piece.device
    return (piece.a if isinstance(piece, Linear) else piece.g if isinstance(piece, Dense) else piece.rows).device


def rows_terms(pieces: list[Rows], grad: Tensor | None, batch_size: int, dtype) -> tuple[Tensor, Tensor]:
    """Norms and dot products of table rows, the rows of one (sample, id) summed first.

    Grouped by sorting ``owner * num_rows + id`` and numbering where a new key starts, into a buffer as long as
    the number of rows: no ``unique``, ``nonzero`` or boolean indexing, so a GPU never waits for the host here.
    Unused slots stay zero and add nothing.
    """
    num_rows = pieces[0].num_rows
    owner = torch.cat([p.owner for p in pieces])
    ids = torch.cat([p.ids for p in pieces])
    rows = torch.cat([p.rows.to(dtype) for p in pieces])
    sq = torch.zeros(batch_size, dtype=dtype, device=rows.device)
    dot = torch.zeros_like(sq)
    if rows.shape[0] == 0:
        return sq, dot
    _, keys, grouped = group_rows(owner * num_rows + ids, rows)
    slot_owner, slot_id = keys // num_rows, keys % num_rows
    sq.index_add_(0, slot_owner, grouped.square().sum(1))
    if grad is not None:
        dot.index_add_(0, slot_owner, (grouped * grad.to(dtype)[slot_id]).sum(1))
    return sq, dot


def group_rows(keys: Tensor, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sum the ``rows`` of equal ``keys``: (slot of each row, key of each slot, summed rows per slot), with as many
    slots as rows (the unused ones hold key 0 and zero rows)."""
    order = torch.argsort(keys, stable=True)
    sorted_keys = keys[order]
    starts = torch.ones_like(sorted_keys, dtype=torch.long)
    starts[1:] = (sorted_keys[1:] != sorted_keys[:-1]).long()
    slot_sorted = torch.cumsum(starts, 0) - 1
    slots = torch.empty_like(slot_sorted).scatter_(0, order, slot_sorted)
    grouped = rows.new_zeros(rows.shape).index_add_(0, slots, rows)
    slot_keys = torch.zeros_like(keys).scatter_(0, slot_sorted, sorted_keys)
    return slots, slot_keys, grouped
