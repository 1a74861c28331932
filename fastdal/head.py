"""``layers="last"``: the parameters of the linear operation the logits are computed from, proven on the graph.

The head is an ``nn.Linear``, or any linear operation with a parameter as its matrix: ``F.linear``,
``x @ self.W.T + self.b``, HF's ``Conv1D`` (``addmm``), a head tied to an embedding, a parametrized weight
(``weight_norm``, ``spectral_norm``). One forward, with every parameter requiring grad, runs under a
:class:`~torch.overrides.TorchFunctionMode` that follows the *samples*: a tensor computed from the batch is
data, anything else (parameters, buffers, what is made from them alone) is not. Every linear operation of a
data operand and a non-data matrix is a candidate; walking the autograd graph back from the logits, the first
candidates met are the head. Its parameters are those its matrix and bias are made from, and a parameter added
right onto its output on the way to the logits (``x @ W.T + b``). What follows the head (a learned temperature,
an affine map of the logits) is not part of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .batches import read_logits
from .capture import edges_feeding, module_kind, preserved_model_state
from .uses import OPERATIONS

_TENSOR = torch._C.TensorBase
# Linear operations and the argument positions of (data operand, matrix, bias); matmul's matrix may be either side.
_LINEAR: dict[Any, tuple[int, int, int | None]] = {F.linear: (0, 1, 2), torch._C._nn.linear: (0, 1, 2)}
_LINEAR.update({f: (1, 2, 0) for f in (torch.addmm, _TENSOR.addmm)})
_MATMUL = (torch.matmul, torch.mm, _TENSOR.matmul, _TENSOR.mm)


@dataclass(frozen=True)
class Head:
    """The last layer: the names of its parameters, and the ``nn.Linear`` module when the head is exactly one
    stock ``nn.Linear``'s own weight and bias (the closed forms without a backward pass need that)."""

    params: tuple[str, ...]
    module: str | None


class _Candidate:
    def __init__(self, output: Tensor, matrix: Tensor, bias: Tensor | None):
        self.edge = get_gradient_edge(output)
        self.operands = [t for t in (matrix, bias) if isinstance(t, Tensor) and t.requires_grad]


class _FollowSamples(TorchFunctionMode):
    """Marks every tensor computed from the batch as data, and records the linear operations of data with a
    non-data matrix."""

    def __init__(self, batch_tensors: list[Tensor]):
        super().__init__()
        self.data: set[int] = {id(t) for t in batch_tensors}
        self.keep: list[Tensor] = list(batch_tensors)
        self.candidates: list[_Candidate] = []
        self.made_by: dict[int, _Candidate] = {}  # id of a candidate's output -> the candidate
        self.bias_adds: list[tuple[Any, _Candidate, Tensor]] = []  # (add's graph node, candidate, bias)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
        if not any(id(t) in self.data for t in tensors):
            return out
        for o in outs:
            self.data.add(id(o))
            self.keep.append(o)
        if len(outs) == 1 and outs[0].grad_fn is not None:
            self._candidate(func, args, kwargs, outs[0])
            self._bias_add(func, args, outs[0])
        return out

    def _bias_add(self, func: Any, args: tuple, out: Tensor) -> None:
        """``(x @ W.T) + b``: a parameter added right onto a candidate's output is that operation's bias."""
        if OPERATIONS.get(func) != "add" or len(args) < 2:
            return
        for made, bias in ((args[0], args[1]), (args[1], args[0])):
            candidate = self.made_by.get(id(made)) if isinstance(made, Tensor) else None
            if candidate is not None and isinstance(bias, Tensor) and bias.requires_grad and id(bias) not in self.data:
                self.bias_adds.append((out.grad_fn, candidate, bias))

    def _candidate(self, func: Any, args: tuple, kwargs: dict, out: Tensor) -> None:
        if func in _LINEAR:
            data, matrix, bias = _LINEAR[func]
            names = ("input", "weight", "bias") if data == 0 else ("input", "mat1", "mat2")
            named = dict(zip(range(len(args)), args))
            for position, name in enumerate(names):
                if name in kwargs:
                    named[position] = kwargs[name]
            x, m, b = named.get(data), named.get(matrix), named.get(bias) if bias is not None else None
        elif func in _MATMUL and len(args) >= 2:
            x, m, b = args[0], args[1], None
            if isinstance(m, Tensor) and id(m) in self.data:
                x, m = m, x
        else:
            return
        if not (isinstance(x, Tensor) and id(x) in self.data and isinstance(m, Tensor) and id(m) not in self.data):
            return
        if m.dim() == 2 and m.requires_grad:
            candidate = _Candidate(out, m, b if isinstance(b, Tensor) and id(b) not in self.data else None)
            self.candidates.append(candidate)
            self.made_by[id(out)] = candidate


def logits_head(model: nn.Module, args: tuple, kwargs: dict, outputs: Callable | None) -> Head | None:
    """The head (:class:`Head`) the logits are computed from; None if no linear operation reaches them.

    Raises ValueError when the first linear operations met are several (an ensemble of heads, a skip
    connection around the head): there is no single last layer then.
    """
    params = list(model.parameters())
    with preserved_model_state(model, params), torch.enable_grad():
        follow = _FollowSamples([t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)])
        with follow:
            out = model(*args, **kwargs)
        logits = read_logits(out, outputs)
        if logits.grad_fn is None:
            return None
        by_edge = {(id(c.edge.node), c.edge.output_nr): c for c in follow.candidates}
        heads = [by_edge[key] for key in edges_feeding(logits, set(by_edge))]
        if not heads:
            return None
        matrices = {frozenset(id(p) for p in _node_parameters(h.edge.node, h.operands)) for h in heads}
        if len(matrices) > 1:
            described = sorted({_describe(model, _node_parameters(h.edge.node, h.operands)) for h in heads})
            raise ValueError(
                f"layers='last': the logits are computed from several linear operations ({', '.join(described)}) "
                "with no single last one; pass layers=[...] with the module names to cover"
            )
        found: dict[int, Tensor] = {}
        for h in heads:  # one head applied several times (to several positions, say) is still one head
            found.update((id(p), p) for p in _node_parameters(h.edge.node, h.operands))
            on_path = _nodes_above(logits.grad_fn, h.edge.node)
            for node, candidate, bias in follow.bias_adds:
                if candidate is h and id(node) in on_path:
                    found.update((id(p), p) for p in _parameters_below([get_gradient_edge(bias).node]))
    names = _names(model, list(found.values()))
    for name, m in model.named_modules():
        own = list(m.parameters(recurse=False))
        if module_kind(m) == "linear" and own and {id(p) for p in own} == set(found):
            return Head(tuple(names), name)
    return Head(tuple(names), None)


def _node_parameters(node: Any, operands: list[Tensor]) -> list[Tensor]:
    """The parameters the head's matrix and bias are made from."""
    del node  # the operands' own graphs, not the operation's (whose data input leads to every earlier layer)
    return _parameters_below([get_gradient_edge(t).node for t in operands if t.requires_grad])


def _parameters_below(nodes: list[Any]) -> list[Tensor]:
    found: dict[int, Tensor] = {}
    seen: set[int] = set()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if variable is not None:
            found[id(variable)] = variable
        stack.extend(child for child, _ in node.next_functions)
    return list(found.values())


def _nodes_above(root: Any, target: Any) -> dict[int, Any]:
    """The nodes on some path from ``root`` down to ``target`` (``target`` excluded), by one iterative
    depth-first walk that settles each node after its children."""
    reaches: dict[int, bool] = {}
    nodes: dict[int, Any] = {}
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if node is None:
            continue
        if children_done:
            reaches[id(node)] = any(
                child is target or reaches.get(id(child), False) for child, _ in node.next_functions
            )
            continue
        if id(node) in nodes or node is target:
            continue
        nodes[id(node)] = node
        stack.append((node, True))
        stack.extend((child, False) for child, _ in node.next_functions if child is not None)
    return {i: n for i, n in nodes.items() if reaches.get(i)}


def _describe(model: nn.Module, tensors: list[Tensor]) -> str:
    """The module the parameters belong to, or their names when they are not one module's."""
    names = _names(model, tensors)
    owners = {name.rpartition(".")[0] for name in names}
    return owners.pop() or "<model>" if len(owners) == 1 else " + ".join(names)


def _names(model: nn.Module, tensors: list[Tensor]) -> list[str]:
    """The model's names for ``tensors``, in the model's own order."""
    wanted = {id(t) for t in tensors}
    return [name for name, p in model.named_parameters() if id(p) in wanted]


def find_head(model: nn.Module, args: tuple, kwargs: dict, outputs: Callable | None) -> Head:
    """:func:`logits_head`, with a clear error when no linear operation reaches the logits."""
    head = logits_head(model, args, kwargs, outputs)
    if head is None:
        raise ValueError(
            "layers='last' needs a linear operation the logits are computed from (an nn.Linear, F.linear, or a "
            "matrix product with a parameter, such as x @ self.weight.T), but none reaches the logits; use "
            "layers='all' or a list of module names"
        )
    return head
