"""Closed form for the stock recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``): every weight a Linear over time.

The stock forward runs the whole recurrence inside one op, so no hook sees the gates. The recorded call gives
the module's input and initial states and, after fastdal's one backward, the gradient at its outputs (the output
sequence, ``h_n`` and, for an LSTM, ``c_n``). From them this file recomputes the recurrence batched, layer by
layer, with autograd:

* the input projections of all time steps and directions at once, ``p = x W_ih^T + b_ih`` (one GEMM per layer;
  for LSTM and RNN ``b_hh`` joins ``b_ih`` there, since the gates read ``p_t + q_t``);
* per step the hidden projection ``q_t = h_{t-1} W_hh^T (+ b_hh)`` and the cell as the stock forward computes it,
  the two directions in lockstep as a batch of two matrix products (half the small ops); for a PackedSequence a
  sample's state stops changing after its last step, and the reverse direction starts there;
* one ``torch.autograd.grad`` of the recomputed outputs with ``grad_outputs`` the recorded output gradients,
  asked for ``p`` of every covered layer (and, with ``proj_size``, for the projected state of every step).

Samples never meet inside the recurrence (eval mode: no dropout between layers), so the batched recomputation
is exact per sample. Each weight is then a Linear over time steps whose terms come from ``linear_sample_score``:

* ``W_ih`` from ``(x_t, dp_t)``; ``W_hh`` from ``(h_{t-1}, dq_t)``; the biases from ``sum_t dp_t`` and
  ``sum_t dq_t``. For LSTM and RNN ``dq = dp``, and ``W_ih`` and ``W_hh`` form one Linear over
  ``[x_t, h_{t-1}]`` (one Gram matrix of the deltas for both). For a GRU, ``n = tanh(p_n + r * q_n)``, so
  ``dq_n = r * dp_n``.
* ``W_hr`` (LSTM ``proj_size``) maps ``u_t = o_t * tanh(c_t)`` to the state ``h_t``: from ``(u_t, dh_t)``.

In fastdal's recorded forward the stock module runs without grad and :class:`Carrier` puts its outputs back into
the graph through a custom ``autograd.Function`` whose backward returns the input gradients of the same
recomputation: the recurrence is differentiated once, not through the module's own backward and then again here.
The pass thus costs the stock forward without grad, the recomputation's forward and backward (no weight
gradients) and the terms.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence
from torch.utils._pytree import tree_flatten

from . import ops
from .capture import Call, Target
from .torch_ops import sq_and_dot, use_ghost_norm

_LAYER = re.compile(r"_l(\d+)(_reverse)?$")


def _arguments(args: tuple, kwargs: dict) -> tuple[Any, Any]:
    """A call's ``input`` and ``hx`` as the stock forward received them."""
    x = args[0] if args else kwargs.get("input")
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    return x, hx


def _states(hx: Any) -> list[Any]:
    """The initial-state tensors given: none, ``h0``, or the LSTM's ``(h0, c0)``."""
    if hx is None:
        return []
    return list(hx) if isinstance(hx, (tuple, list)) else [hx]


def _state_count(m: nn.Module) -> int:
    """How many final states the module returns after its output sequence (``h_n``, and ``c_n`` for LSTM)."""
    return 2 if isinstance(m, nn.LSTM) else 1


def _sample_dim(call: Call, t: Any) -> Any:
    """The sample dimension the layout found for input tensor ``t``, or "absent" if ``t`` is not an input."""
    for x, dim in zip(call.inputs, call.in_dims or ()):
        if x is t:
            return dim
    return "absent"


def readable(target: Target, call: Call, batch_size: int) -> bool:
    """Whether the call runs each sample's sequence on its own, with the samples where the stock forward keeps them.

    A batched input holds the samples in the module's batch dimension (0 with ``batch_first``, else 1), as does
    the output sequence; a PackedSequence holds one sequence per sample (``batch_sizes[0]`` of them, its index
    tensors per sample); given initial states and the returned final states hold the samples in dimension 1. An
    unbatched (2-D) input is one sample alone, never a batch of them.
    """
    m = target.module
    if m.training and m.dropout > 0 and m.num_layers > 1:
        return False  # fastdal runs in eval mode; a module forced to train would drop between layers at random
    x, hx = _arguments(call.args, call.kwargs)
    n_states = _state_count(m)
    dims = call.out_dims or []
    if len(dims) < 1 + n_states or any(d != 1 for d in dims[-n_states:]):
        return False
    if isinstance(x, PackedSequence):
        if x.data.dim() != 2 or x.batch_sizes.numel() == 0 or int(x.batch_sizes[0]) != batch_size:
            return False
        if any(_sample_dim(call, i) != 0 for i in (x.sorted_indices, x.unsorted_indices) if i is not None):
            return False
    else:
        batch = 0 if m.batch_first else 1
        if not isinstance(x, Tensor) or x.dim() != 3 or _sample_dim(call, x) != batch or dims[0] != batch:
            return False
    states = _states(hx)
    return all(isinstance(s, Tensor) and s.dim() == 3 and _sample_dim(call, s) == 1 for s in states)


# --------------------------------------------------------------------------------------------------
# Recomputing one call
# --------------------------------------------------------------------------------------------------


@dataclass
class Direction:
    """Per-sample gradient factors of one layer and direction, batch first, over ``T`` time steps.

    Attributes:
        x: (N, T, d_in) the layer's input, read by ``W_ih``.
        h: (N, T, H_out) the state before each step, read by ``W_hh``.
        dp: (N, T, gates * H) gradient at ``x W_ih^T + b_ih``.
        dq: (N, T, gates * H) gradient at ``h W_hh^T + b_hh``; None where it equals ``dp`` (LSTM, RNN).
        u: (N, T, H) ``o * tanh(c)``, read by ``W_hr``; None without a covered ``weight_hr``.
        dr: (N, T, proj_size) gradient at the projected state ``u W_hr^T``; None with ``u``.
    """

    x: Tensor
    h: Tensor
    dp: Tensor
    dq: Tensor | None = None
    u: Tensor | None = None
    dr: Tensor | None = None

    def extend(self, other: Direction) -> Direction:
        """This call's time steps followed by another call's: a sample's gradient sums over both."""
        # Which fields are None depends on the module alone (its mode, proj_size and coverage): the same in each call.
        joined = {f.name: (getattr(self, f.name), getattr(other, f.name)) for f in fields(self)}
        return Direction(**{k: None if a is None else torch.cat([a, b], 1) for k, (a, b) in joined.items()})


def _names(m: nn.Module, layer: int, direction: int) -> dict[str, str]:
    suffix = f"_l{layer}" + ("_reverse" if direction else "")
    names = {role: role + suffix for role in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")}
    return {role: name for role, name in names.items() if name in m._flat_weights_names}


def _covered(target: Target) -> set[tuple[int, int]]:
    """The (layer, direction) pairs with a covered parameter."""
    found = set()
    for local in target.params:
        match = _LAYER.search(local)
        if match is not None:
            found.add((int(match.group(1)), 1 if match.group(2) else 0))
    return found


def _in_step_order(x: Tensor) -> Tensor:
    """``(D, N, T, ...)`` by time index -> by step: the reverse direction (index 1) reads time backwards."""
    return x if x.shape[0] == 1 else torch.stack([x[0], x[1].flip(1)])


def _run_layer(
    mode: str,
    p: Tensor,
    h: Tensor,
    c: Tensor | None,
    w_hh: Tensor,
    b_hh: Tensor | None,
    w_hr: Tensor | None,
    mask: Tensor | None,
) -> dict[str, Any]:
    """The recurrence of one layer, its ``D`` directions in lockstep as a batch of ``D`` matrix products.

    Args:
        p: (D, N, T, gates * H) the input projections by time index. For LSTM and RNN they also hold ``b_hh``
            (the gates read ``p_t + q_t``, so the bias may sit on either side), and ``b_hh`` is then None.
        h: (D, N, H_out) and c: (D, N, H) or None, the initial states. w_hh: (D, gates * H, H_out).
        b_hh: (D, gates * H) or None. w_hr: (D, H_out, H) or None. mask: (N, T) each sample's valid steps
            (a PackedSequence) or None: elsewhere its state stays as it was, so the forward direction ends at the
            sample's last step and the reverse one starts there.

    Returns:
        ``out`` (D, N, T, H_out) the states by time index, ``h`` and ``c`` the final states, ``before``
        (D, N, T, H_out) the state each step starts from, ``u`` (D, N, T, H) the projection's input and
        ``projected`` its output per step (in step order), ``r`` (D, N, T, H) the GRU's reset gate.

    The steps are ``unbind``: indexing ``p[:, :, t]`` instead would give each step a backward that writes a zero
    tensor the size of ``p`` (quadratic in T).
    """
    p_steps = _in_step_order(p).unbind(2)
    keep_steps = None if mask is None else _in_step_order(mask.expand(p.shape[0], -1, -1)[..., None]).unbind(2)
    w_t = w_hh.transpose(1, 2)
    hidden = w_hh.shape[2]  # the GRU's H
    before, outs, us, projected, resets = [], [], [], [], []
    for step, p_t in enumerate(p_steps):
        before.append(h)
        c_new = None
        if mode == "LSTM":
            i, f, g, o = torch.baddbmm(p_t, h, w_t).chunk(4, 2)
            c_new = torch.addcmul(torch.sigmoid(f) * c, torch.sigmoid(i), torch.tanh(g))
            new = torch.sigmoid(o) * torch.tanh(c_new)
            if w_hr is not None:
                us.append(new)
                new = new.bmm(w_hr.transpose(1, 2))
                projected.append(new)
        elif mode == "GRU":
            q = h.bmm(w_t) if b_hh is None else torch.baddbmm(b_hh[:, None], h, w_t)
            r, z = torch.sigmoid(p_t[..., : 2 * hidden] + q[..., : 2 * hidden]).chunk(2, 2)
            n = torch.tanh(torch.addcmul(p_t[..., 2 * hidden :], r, q[..., 2 * hidden :]))
            new = n + z * (h - n)
            resets.append(r)
        else:
            pre = torch.baddbmm(p_t, h, w_t)
            new = torch.tanh(pre) if mode == "RNN_TANH" else torch.relu(pre)
        if keep_steps is None:
            h, c = new, c_new
        else:
            keep = keep_steps[step]
            h = torch.where(keep, new, h)
            c = None if c is None else torch.where(keep, c_new, c)
        outs.append(h)
    found = {"out": _in_step_order(torch.stack(outs, 2)), "h": h, "c": c, "projected": projected}
    with torch.no_grad():  # read by the terms, never differentiated
        found["before"] = _in_step_order(torch.stack(before, 2))
        found["u"] = _in_step_order(torch.stack(us, 2)) if us else None
        found["r"] = _in_step_order(torch.stack(resets, 2)) if resets else None
    return found


def _batch_first_input(m: nn.Module, x: Any, out_delta: Tensor | None, dtype: torch.dtype, leaves: dict[int, Tensor]):
    """The input sequence ``(N, T, d_in)``, the output gradient ``(N, T, D * H_out)`` (or None) and the valid-step
    mask ``(N, T)`` (None: every step valid), samples in their original order. ``leaves`` maps an input tensor to
    the leaf standing for it where its gradient is wanted; the others are detached."""
    if isinstance(x, PackedSequence):
        data = leaves.get(id(x.data), x.data.detach())
        packed = PackedSequence(data, x.batch_sizes, x.sorted_indices, x.unsorted_indices)
        seq, lengths = pad_packed_sequence(packed, batch_first=True)
        steps = x.batch_sizes.numel()
        if out_delta is not None:
            packed = PackedSequence(out_delta, x.batch_sizes, x.sorted_indices, x.unsorted_indices)
            out_delta = pad_packed_sequence(packed, batch_first=True, total_length=steps)[0]
        mask = (torch.arange(steps)[None] < lengths[:, None]).to(seq.device)
        return seq.to(dtype), None if out_delta is None else out_delta.to(dtype), mask
    x = leaves.get(id(x), x.detach())
    seq = x if m.batch_first else x.transpose(0, 1)
    if out_delta is not None and not m.batch_first:
        out_delta = out_delta.transpose(0, 1)
    return seq.to(dtype), None if out_delta is None else out_delta.to(dtype), None


def _layer_weights(m: nn.Module, layer: int, dtype: torch.dtype) -> dict[str, Any]:
    """One layer's weights for the recomputation: every direction's input projection in one GEMM (``w_ih``,
    ``b_in``), the hidden-side weights stacked over directions. LSTM and RNN add ``b_hh`` on the input side."""
    folds = m.mode != "GRU"
    rows: dict[str, list[Tensor]] = {}
    for direction in range(2 if m.bidirectional else 1):
        for role, name in _names(m, layer, direction).items():
            rows.setdefault(role, []).append(m.get_parameter(name).detach().to(dtype))
    b_in = None
    if "bias_ih" in rows:
        b_in = torch.cat([b + b_hh for b, b_hh in zip(rows["bias_ih"], rows["bias_hh"])] if folds else rows["bias_ih"])
    return {
        "w_ih": torch.cat(rows["weight_ih"]),
        "b_in": b_in,
        "w_hh": torch.stack(rows["weight_hh"]),
        "b_hh": torch.stack(rows["bias_hh"]) if "bias_hh" in rows and not folds else None,
        "w_hr": torch.stack(rows["weight_hr"]) if "weight_hr" in rows else None,
    }


def call_factors(target: Target, call: Call, dtype: torch.dtype) -> dict[tuple[int, int], Direction]:
    """Per-sample gradient factors of the covered layers and directions for one recorded call (of a module run
    without grad, the recomputation its carrier shares with the backward: :class:`Carrier`)."""
    if isinstance(call.carried, Carried):
        return call.carried.factors(call.deltas)
    return recompute(target, call.args, call.kwargs, list(call.deltas or []), dtype, [])[0]


def recompute(
    target: Target, args: tuple, kwargs: dict, deltas: list[Tensor | None], dtype: torch.dtype, inputs: list[Tensor]
) -> tuple[dict[tuple[int, int], Direction], list[Tensor | None]]:
    """The recurrence recomputed from a call's arguments and one ``autograd.grad`` from its output gradients
    ``deltas`` (one per tensor output, None where none reached it): the covered layers' factors, and the gradients
    of the call's input tensors ``inputs`` (its sequence or packed data, given initial states)."""
    n_states = _state_count(target.module)
    if len(deltas) < 1 + n_states:
        return {}, [None] * len(inputs)
    out_delta, state_deltas = deltas[0], deltas[-n_states:]
    if out_delta is None and all(d is None for d in state_deltas):
        return {}, [None] * len(inputs)  # the call's outputs did not reach the loss
    # The backward of the carrying node runs this with grad off: the graph from the inputs' leaves (transposed,
    # padded from a packed sequence) must be recorded all the same.
    with torch.enable_grad():
        return _recompute(target, args, kwargs, out_delta, state_deltas, dtype, inputs)


def _recompute(
    target: Target,
    args: tuple,
    kwargs: dict,
    out_delta: Tensor | None,
    state_deltas: list[Tensor | None],
    dtype: torch.dtype,
    inputs: list[Tensor],
) -> tuple[dict[tuple[int, int], Direction], list[Tensor | None]]:
    m = target.module
    covered = _covered(target)
    n_states = _state_count(m)
    leaves = {id(t): t.detach().to(dtype).requires_grad_(True) for t in inputs}
    x, hx = _arguments(args, kwargs)
    seq, out_delta, mask = _batch_first_input(m, x, out_delta, dtype, leaves)
    n = seq.shape[0]
    directions = 2 if m.bidirectional else 1
    h_size = m.proj_size if m.proj_size > 0 else m.hidden_size
    given = _states(hx)
    if given:
        h0 = leaves.get(id(given[0]), given[0].detach()).to(dtype)
        c0 = leaves.get(id(given[1]), given[1].detach()).to(dtype) if n_states == 2 else None
    else:
        h0 = seq.new_zeros(m.num_layers * directions, n, h_size)
        c0 = seq.new_zeros(m.num_layers * directions, n, m.hidden_size) if n_states == 2 else None
    # Layers below the lowest covered one need a graph only when the inputs' gradients are wanted.
    lowest = 0 if inputs else min((layer for layer, _ in covered), default=m.num_layers)
    projections: dict[int, Tensor] = {}  # p of every direction of each covered layer, (N, T, D * gates * H)
    runs: dict[int, dict[str, Any]] = {}
    layer_inputs: dict[int, Tensor] = {}
    finals_h, finals_c = [], []
    layer_in = seq
    with torch.enable_grad():
        for layer in range(m.num_layers):
            layer_inputs[layer] = layer_in
            w = _layer_weights(m, layer, dtype)
            with torch.set_grad_enabled(layer >= lowest):
                p = F.linear(layer_in, w["w_ih"], w["b_in"])
                if layer >= lowest and not p.requires_grad:
                    p.requires_grad_(True)  # the lowest covered layer: its p is where the graph starts
                if any((layer, d) in covered for d in range(directions)):
                    projections[layer] = p
                states = slice(layer * directions, (layer + 1) * directions)
                run = runs[layer] = _run_layer(
                    m.mode,
                    p.view(n, -1, directions, p.shape[2] // directions).permute(2, 0, 1, 3),
                    h0[states],
                    None if c0 is None else c0[states],
                    w["w_hh"],
                    w["b_hh"],
                    w["w_hr"],
                    mask,
                )
            finals_h.append(run["h"])
            finals_c.append(run["c"])
            layer_in = run["out"][0] if directions == 1 else torch.cat(run["out"].unbind(0), 2)
        outputs, seeds = [], []
        if out_delta is not None:
            outputs.append(layer_in)
            seeds.append(out_delta)
        finals = [torch.cat(finals_h), torch.cat(finals_c) if n_states == 2 else None]
        for final, delta in zip(finals, state_deltas):
            if delta is not None:
                outputs.append(final)
                seeds.append(delta.to(dtype))
        layers = list(projections)
        wanted = [projections[layer] for layer in layers]
        # W_hr's terms need the gradient at the projected state of each step: of the layers where it is covered.
        hr_layers = [
            layer
            for layer in layers
            if runs[layer]["projected"]
            and any(f"weight_hr{_suffix((layer, d))}" in target.params for d in range(directions))
        ]
        for layer in hr_layers:
            wanted.extend(runs[layer]["projected"])
        wanted_inputs = [leaves[id(t)] for t in inputs]
        found_grads = torch.autograd.grad(outputs, wanted + wanted_inputs, seeds, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(wanted, found_grads)]
    input_grads = [
        None if g is None else g.to(t.dtype) for t, g in zip(inputs, found_grads[len(wanted) :])
    ]
    found: dict[tuple[int, int], Direction] = {}
    for layer, dp_layer in zip(layers, grads):
        run = runs[layer]
        for direction, dp in enumerate(dp_layer.chunk(directions, 2)):
            if (layer, direction) not in covered:
                continue
            dq = None
            if m.mode == "GRU":
                dp_r, dp_z, dp_n = dp.chunk(3, 2)
                dq = torch.cat([dp_r, dp_z, run["r"][direction] * dp_n], 2)
            found[(layer, direction)] = Direction(layer_inputs[layer].detach(), run["before"][direction], dp, dq)
    step = len(layers)
    for layer in hr_layers:
        count = len(runs[layer]["projected"])
        dr = _in_step_order(torch.stack(grads[step : step + count], 2))
        step += count
        for direction in range(directions):
            if (layer, direction) in found:
                found[(layer, direction)].u = runs[layer]["u"][direction]
                found[(layer, direction)].dr = dr[direction]
    return found, input_grads


# --------------------------------------------------------------------------------------------------
# The recorded forward without the module's own backward
# --------------------------------------------------------------------------------------------------


class Carried:
    """One call of a recurrent module that ran without grad, its outputs carried by :class:`_Carry`.

    The terms need the recomputed recurrence's gradients, and the backward through the module (to the layers
    below it) needs its input gradients: both come from the same :func:`recompute`, run once, by whichever asks
    first (the pass reads a call's output gradients just before the backward reaches the carrying node)."""

    def __init__(self, target: Target, args: tuple, kwargs: dict, inputs: list[Tensor], dtype: torch.dtype):
        self.target, self.args, self.kwargs, self.inputs, self.dtype = target, args, kwargs, inputs, dtype
        self.done: tuple[dict, list] | None = None

    def _run(self, deltas: list[Tensor | None]) -> tuple[dict, list]:
        if self.done is None:
            self.done = recompute(self.target, self.args, self.kwargs, deltas, self.dtype, self.inputs)
            self.args, self.kwargs = (), {}  # the inputs' values live on in the factors where needed
        return self.done

    def factors(self, deltas: list[Tensor | None] | None) -> dict[tuple[int, int], Direction]:
        return self._run(list(deltas or []))[0]

    def input_grads(self, deltas: list[Tensor | None]) -> list[Tensor | None]:
        grads = self._run(deltas)[1]
        self.inputs = []
        return grads


class _Carry(torch.autograd.Function):
    """Puts a recurrent module's outputs, computed without grad, back into the graph: its backward returns the
    gradients of the module's inputs from the recomputation the terms share."""

    @staticmethod
    def forward(ctx, carried: Carried, slots: list[int], count: int, outputs: list[Tensor], anchor: Tensor, *inputs):
        # The outputs come in a list, not as arguments: autograd then gives these very tensors this node as their
        # grad_fn (returned arguments would come back as new aliases, which the model never sees).
        ctx.carried, ctx.slots, ctx.count = carried, slots, count
        ctx.set_materialize_grads(False)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        deltas: list[Tensor | None] = [None] * ctx.count
        for slot, grad in zip(ctx.slots, grad_outputs):
            deltas[slot] = grad
        return (None, None, None, None, None, *ctx.carried.input_grads(deltas))


class Carrier:
    """The Recorder's carrier for "recurrent" targets: their stock forward runs without grad, and :class:`_Carry`
    carries the outputs, so that fastdal's backward runs the recurrence once, in the closed form's recomputation,
    instead of through the module's own backward and then again here."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def carry(self, target: Target, args: tuple, kwargs: dict, output: Any) -> tuple[Any, Carried]:
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor) and t.requires_grad]
        leaves = [t for t in tree_flatten(output)[0] if isinstance(t, Tensor)]
        slots = [i for i, t in enumerate(leaves) if t.is_floating_point()]
        carried = Carried(target, args, kwargs, inputs, self.dtype)
        # An anchor needing grad makes the outputs need it even when no input does (the module reads the data).
        anchor = torch.empty(0, device=leaves[0].device, requires_grad=True)
        _Carry.apply(carried, slots, len(leaves), [leaves[i] for i in slots], anchor, *inputs)
        return output, carried


def _suffix(key: tuple[int, int]) -> str:
    return f"_l{key[0]}" + ("_reverse" if key[1] else "")


def factors(target: Target, calls: list[Call], dtype: torch.dtype) -> dict[tuple[int, int], Direction]:
    """Per-sample gradient factors of the covered layers and directions, over all the module's calls."""
    total: dict[tuple[int, int], Direction] = {}
    for call in calls:
        for key, found in call_factors(target, call, dtype).items():
            total[key] = found if key not in total else total[key].extend(found)
    return total


# --------------------------------------------------------------------------------------------------
# Terms
# --------------------------------------------------------------------------------------------------


def _linears(target: Target, key: tuple[int, int], f: Direction, grads: dict[str, Tensor], dtype: torch.dtype):
    """The covered weights of one layer and direction as ``(a, delta, G or None)`` Linear maps over time.

    With ``dq = dp`` (LSTM, RNN) a covered ``W_ih`` and ``W_hh`` are one Linear over ``[x_t, h_{t-1}]``: their
    squared norms and dot products add, and the deltas' Gram matrix is formed once.
    """
    names = _names(target.module, *key)
    covered = {role: name for role, name in names.items() if name in target.params}
    ih, hh = covered.get("weight_ih"), covered.get("weight_hh")
    pieces = []
    if ih is not None and hh is not None and f.dq is None:
        g_ih, g_hh = grads.get(ih), grads.get(hh)
        g = None
        if g_ih is not None or g_hh is not None:
            w_ih, w_hh = (target.module.get_parameter(names[r]) for r in ("weight_ih", "weight_hh"))
            g_ih = torch.zeros(w_ih.shape, dtype=dtype, device=f.x.device) if g_ih is None else g_ih.to(dtype)
            g_hh = torch.zeros(w_hh.shape, dtype=dtype, device=f.x.device) if g_hh is None else g_hh.to(dtype)
            g = torch.cat([g_ih, g_hh], 1)
        pieces.append((torch.cat([f.x, f.h], 2), f.dp, g))
    else:
        if ih is not None:
            pieces.append((f.x, f.dp, grads.get(ih)))
        if hh is not None:
            pieces.append((f.h, f.dp if f.dq is None else f.dq, grads.get(hh)))
    hr = covered.get("weight_hr")
    if hr is not None and f.u is not None:
        pieces.append((f.u, f.dr, grads.get(hr)))
    return pieces


def recurrent_terms(
    target: Target,
    calls: list[Call],
    grads: dict[str, Tensor],
    batch_size: int,
    dtype: torch.dtype,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """``||g||^2`` and ``<g, G>`` of the covered parameters of a stock ``nn.LSTM``, ``nn.GRU`` or ``nn.RNN``."""
    m = target.module
    sq = torch.zeros(batch_size, dtype=dtype, device=m._flat_weights[0].device)
    dot = torch.zeros_like(sq)
    for key, f in factors(target, calls, dtype).items():
        for a, delta, g in _linears(target, key, f, grads, dtype):
            s, d = ops.linear_sample_score(
                a,
                delta,
                None if g is None else g.to(dtype)[None],
                ghost=use_ghost_norm(*a.shape[1:], delta.shape[2]),
                backend=backend,
            )
            sq, dot = sq + s, dot + d
        names = _names(m, *key)
        dp_sum = f.dp.sum(1)
        for role, delta_sum in (("bias_ih", dp_sum), ("bias_hh", dp_sum if f.dq is None else f.dq.sum(1))):
            name = names.get(role)
            if name in target.params:
                grad = grads.get(name)
                s, d = sq_and_dot(delta_sum, None if grad is None else grad.to(dtype))
                sq, dot = sq + s, dot + d
    return sq, dot


def _sample_gradient(role: str, f: Direction) -> Tensor | None:
    """``(N, *shape)`` gradients of the parameter playing ``role`` in one layer and direction."""
    dq = f.dp if f.dq is None else f.dq
    if role == "weight_ih":
        return f.dp.transpose(1, 2) @ f.x
    if role == "weight_hh":
        return dq.transpose(1, 2) @ f.h
    if role == "bias_ih":
        return f.dp.sum(1)
    if role == "bias_hh":
        return dq.sum(1)
    return None if f.u is None else f.dr.transpose(1, 2) @ f.u


def per_sample_gradients(target: Target, calls: list[Call], batch_size: int, dtype: torch.dtype) -> dict[str, Tensor]:
    """Per-sample gradients ``{local name: (N, *shape)}`` of the covered parameters (for projected features,
    which need each sample's gradient once; scores never form them)."""
    result: dict[str, Tensor] = {}
    for key, f in factors(target, calls, dtype).items():
        for role, name in _names(target.module, *key).items():
            if name in target.params:
                value = _sample_gradient(role, f)
                if value is not None:
                    result[name] = value
    return result
