"""Operation-level capture: every use of a covered parameter by an operation, whoever makes the call.

Module hooks see a parameter only when a module with a closed form owns it and uses it in its stock forward.
Parameters met anywhere else (a bare ``nn.Parameter`` added, multiplied, expanded or matrix-multiplied by a
custom module, HF's ``Conv1D`` calling ``addmm``, a position table looked up with indices shared by all samples,
the originals of a parametrization) are followed here instead, by a :class:`~torch.overrides.TorchFunctionMode`
active during the recorded forward:

* an operation whose tensor inputs are parameters, tensors made from them, or constants shared by all samples
  (a transpose, a view, a lookup with shared ids, ``weight_norm``'s arithmetic) makes a *derived* tensor, kept
  with its recipe (:class:`Node`) so that it can be recomputed from the parameters;
* the first operation that combines a derived tensor with a tensor that holds samples, or expands one along the
  samples, is a *use*: it is recorded as a :class:`UseCall` (its arguments and its output's gradient edge), and
  its closed form (fastdal/use_forms.py) gives each sample's gradient of the derived tensor.

Which tensors hold samples is found as for modules (fastdal/layout.py), by probing: on 2 and on 3 samples a
:class:`UseMode` without a plan follows every operation downstream of the watched parameters and records the
shapes; :func:`classify` compares them and decides, operation by operation, which are chain operations
(nothing in them holds samples), which are uses and which no gradient passes (``detach``, comparisons). The
recorded forward then follows the same sequence with that plan.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.graph import get_gradient_edge
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from .capture import Call
from .layout import MIXED, SampleDim, Shape, scaling_dim

# --------------------------------------------------------------------------------------------------
# The operations whose uses have a closed form, under one name per family (fastdal/use_forms.py)
# --------------------------------------------------------------------------------------------------

_TENSOR = torch._C.TensorBase
OPERATIONS: dict[Any, str] = {}


def _known(name: str, *funcs: Any) -> None:
    for func in funcs:
        OPERATIONS[func] = name


_known("linear", F.linear, torch._C._nn.linear)
_known("addmm", torch.addmm, _TENSOR.addmm)
_known("matmul", torch.matmul, torch.mm, _TENSOR.matmul, _TENSOR.mm)
_known("rmatmul", torch.Tensor.__rmatmul__)
_known("add", torch.add, _TENSOR.add, _TENSOR.add_)
_known("sub", torch.sub, torch.subtract, _TENSOR.sub, _TENSOR.sub_, _TENSOR.subtract)
_known("rsub", torch.rsub, torch.Tensor.__rsub__)
_known("mul", torch.mul, torch.multiply, _TENSOR.mul, _TENSOR.mul_, _TENSOR.multiply)
_known("div", torch.div, torch.divide, torch.true_divide, _TENSOR.div, _TENSOR.div_, _TENSOR.divide)
_known("rdiv", torch.Tensor.__rdiv__, torch.Tensor.__rtruediv__)
_known("expand", _TENSOR.expand, _TENSOR.expand_as, _TENSOR.broadcast_to, torch.broadcast_to)
_known("embedding", F.embedding)
_known("layer_norm", F.layer_norm)
_known("rms_norm", F.rms_norm)
_known("group_norm", F.group_norm)
_known("attention", F.scaled_dot_product_attention)

# In-place products write over the operand their gradient needs: it is copied before the operation runs.
_OVERWRITES_FACTOR = (_TENSOR.mul_, _TENSOR.div_)


def _same_function(a: Any, b: Any) -> bool:
    """Functions compared as the probe saw them; a property getter (``.T``) is a fresh wrapper on every access."""
    if a is b:
        return True
    return getattr(a, "__self__", None) is getattr(b, "__self__", object()) and getattr(a, "__name__", 1) == getattr(
        b, "__name__", 2
    )


# --------------------------------------------------------------------------------------------------
# Derived tensors
# --------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Node:
    """A derived tensor and its recipe: a covered parameter (``param`` set), or the ``index``-th tensor output of
    ``func`` called on ``leaves`` (the flattened arguments, with derived tensors replaced by their Nodes)."""

    tensor: Tensor
    param: str | None = None
    func: Any = None
    leaves: list = field(default_factory=list)
    spec: Any = None
    index: int = 0

    def params(self) -> list[str]:
        """The covered parameters this tensor is made from, in first-use order."""
        found: dict[str, None] = {}
        stack = [self]
        while stack:
            node = stack.pop()
            if node.param is not None:
                found[node.param] = None
            stack.extend(reversed([x for x in node.leaves if isinstance(x, Node)]))
        return list(found)

    def replay(self, values: dict[str, Tensor], cache: dict[int, Tensor] | None = None) -> Tensor:
        """This tensor recomputed with the parameters replaced by ``values`` (a pure function of them)."""
        cache = {} if cache is None else cache
        if id(self) in cache:
            return cache[id(self)]
        if self.param is not None:
            result = values[self.param]
        else:
            leaves = [x.replay(values, cache) if isinstance(x, Node) else x for x in self.leaves]
            args, kwargs = tree_unflatten(leaves, self.spec)
            result = [t for t in tree_flatten(self.func(*args, **kwargs))[0] if isinstance(t, Tensor)][self.index]
        cache[id(self)] = result
        return result


@dataclass(eq=False)
class UseCall(Call):
    """One recorded use: operation ``op`` (a name of :data:`OPERATIONS`) called with ``args``/``kwargs``.

    ``derived`` maps the position of an input tensor (in ``inputs``) to its recipe; ``row_bases`` gives, for an
    input whose samples are flattened together with positions into its rows (``x.view(-1, d)`` before an
    ``addmm``), the sample dimension of the tensor it is a flat view of, found by the probes. ``op`` is "" for an
    operation without a closed form, which the vmap of ``func`` itself covers (fastdal/use_forms.py)."""

    op: str = ""
    derived: dict[int, Node] = field(default_factory=dict)
    row_bases: list[SampleDim] = field(default_factory=list)
    func: Any = None

    def params(self) -> list[str]:
        found: dict[str, None] = {}
        for node in self.derived.values():
            found.update(dict.fromkeys(node.params()))
        return list(found)

    def node_of(self, value: Any) -> Node | None:
        """The recipe of ``value`` if it is one of this call's derived inputs."""
        for i, node in self.derived.items():
            if self.inputs[i] is value:
                return node
        return None


def flat_base(t: Tensor) -> Shape | None:
    """The shape of the tensor whose elements ``t`` lays out flat, row after row (``x.view(-1, d)``): ``t`` is
    contiguous and covers exactly the same block of memory as its base, which need not be contiguous itself
    (attention outputs are often a transposed base viewed back). None otherwise."""
    base = t._base
    if base is None or t.numel() != base.numel() or t.storage_offset() != base.storage_offset():
        return None
    if not t.is_contiguous() or any(s < 0 for s in base.stride()):
        return None
    span = 1 + sum((size - 1) * stride for size, stride in zip(base.shape, base.stride()))
    return tuple(base.shape) if span == base.numel() else None


# --------------------------------------------------------------------------------------------------
# Probing and the plan it gives
# --------------------------------------------------------------------------------------------------


@dataclass
class ProbedOp:
    """One operation downstream of a watched parameter, as a probe saw it."""

    func: Any
    inputs: list[tuple[Shape, Shape | None]]  # per input tensor: its shape and, for a flat view, its base's
    outputs: list[tuple[Shape, bool]]  # per output tensor: its shape and whether it requires grad
    sources: dict[int, tuple]  # input position -> ("param", name) or ("op", op index, output position)


@dataclass(frozen=True)
class Step:
    """What the recorded forward does at one operation that reads a derived tensor.

    ``role``: "chain" (its outputs are derived tensors), "use" (recorded as a UseCall) or "dead" (no gradient
    passes: ``detach``, comparisons, integer results)."""

    func: Any
    role: str
    derived: tuple[int, ...]
    ranks: tuple[int, ...]
    in_dims: tuple[SampleDim, ...]
    out_dims: tuple[SampleDim, ...]
    row_bases: tuple[SampleDim, ...]


def classify(small: list[ProbedOp], large: list[ProbedOp], watched: Iterable[str]) -> list[Step] | None:
    """The plan of a recorded forward that follows the ``watched`` parameters, from probes on 2 and 3 samples
    that followed these and maybe more; None if the two probes took different paths through the operations
    (then the parameters cannot be followed operation by operation)."""
    if len(small) != len(large):
        return None
    watched = set(watched)
    derived_outputs: set[tuple[int, int]] = set()
    steps: list[Step] = []
    for k, (a, b) in enumerate(zip(small, large)):
        if not _same_function(a.func, b.func) or len(a.inputs) != len(b.inputs) or len(a.outputs) != len(b.outputs):
            return None
        if a.sources != b.sources:
            return None
        derived = tuple(
            i
            for i, src in sorted(a.sources.items())
            if (src[0] == "param" and src[1] in watched) or (src[0] == "op" and (src[1], src[2]) in derived_outputs)
        )
        if not derived:
            continue  # downstream of a watched parameter only through tensors that hold samples
        in_dims = tuple(scaling_dim(sa, sb) for (sa, _), (sb, _) in zip(a.inputs, b.inputs))
        out_dims = tuple(scaling_dim(sa, sb) for (sa, _), (sb, _) in zip(a.outputs, b.outputs))
        row_bases = tuple(
            scaling_dim(ba, bb) if dim is MIXED and ba is not None and bb is not None else None
            for dim, (_, ba), (_, bb) in zip(in_dims, a.inputs, b.inputs)
        )
        grad_outputs = [j for j, (_, requires) in enumerate(a.outputs) if requires]
        shared = all(in_dims[i] is None for i in range(len(in_dims)) if i not in derived)
        if not grad_outputs:
            role = "dead"
        elif shared and all(out_dims[j] is None for j in grad_outputs):
            role = "chain"
            derived_outputs.update((k, j) for j in grad_outputs)
        else:
            role = "use"
        ranks = tuple(len(s) for s, _ in a.inputs)
        steps.append(Step(a.func, role, derived, ranks, in_dims, out_dims, row_bases))
    return steps


# --------------------------------------------------------------------------------------------------
# The mode
# --------------------------------------------------------------------------------------------------


class UseMode(TorchFunctionMode):
    """Follows the watched parameters through one forward.

    Without a ``plan`` (a probe) every operation reading a watched parameter, or a tensor made by such an
    operation, is recorded in ``probed``. With a plan (from :func:`classify`), only operations reading derived
    tensors are looked at; chain operations add derived tensors, uses become :class:`UseCall` objects in
    ``uses``. ``diverged`` is set when the forward leaves the plan (another branch taken, another rank of
    tensors): the caller probes again.
    """

    def __init__(self, watched: dict[str, Tensor], plan: list[Step] | None = None):
        super().__init__()
        self.plan = plan
        self.nodes: dict[int, Node] = {id(p): Node(p, param=name) for name, p in watched.items()}
        self.sources: dict[int, tuple] = {id(p): ("param", name) for name, p in watched.items()}
        self.keep: list[Tensor] = []  # tensors followed by id must live until the forward is over
        self.probed: list[ProbedOp] = []
        self.uses: list[UseCall] = []
        self.count = 0
        self.diverged = False

    def __exit__(self, *exc: object) -> None:
        # Ids mean nothing once the forward is over, and the tensors followed by id were kept alive only for
        # it: a probe's record is its shapes, a recorded forward's is its uses (which hold their own recipes).
        self.keep.clear()
        self.nodes.clear()
        self.sources.clear()
        super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        followed = self.sources if self.plan is None else self.nodes
        if self.diverged or not _reads_any(followed, args, kwargs):
            return func(*args, **kwargs)
        leaves, spec = tree_flatten((args, kwargs))
        positions = [i for i, x in enumerate(leaves) if isinstance(x, Tensor)]
        tensors = [leaves[i] for i in positions]
        if self.plan is None:
            out = func(*args, **kwargs)
            self._probe(func, tensors, out)
            return out
        step = self.plan[self.count] if self.count < len(self.plan) else None
        derived = {i: self.nodes[id(t)] for i, t in enumerate(tensors) if id(t) in self.nodes}
        before = None
        if step is not None and step.role == "use" and func in _OVERWRITES_FACTOR and 0 not in derived:
            # x.mul_(w): the gradient of w needs x as it was before the product overwrites it.
            before = tensors[0].detach().clone()
        out = func(*args, **kwargs)
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
        if not outs:
            return out  # sizes, strides, flags: not operations the gradient passes through (nor counted by probes)
        self.count += 1
        if step is None or not _matches(step, func, tensors, derived):
            self.diverged = True
            return out
        if before is not None:
            tensors = [before, *tensors[1:]]
            leaves = list(leaves)
            leaves[positions[0]] = before
            args, kwargs = tree_unflatten(leaves, spec)
        if step.role == "chain":
            node_leaves = [self.nodes.get(id(x), x) if isinstance(x, Tensor) else x for x in leaves]
            for j, o in enumerate(outs):
                if o.requires_grad and id(o) not in self.nodes:
                    self.nodes[id(o)] = Node(o, func=func, leaves=node_leaves, spec=spec, index=j)
                    self.keep.append(o)
        elif step.role == "use":
            self.uses.append(self._use(func, args, kwargs, tensors, outs, derived, step))
        return out

    def _probe(self, func: Any, tensors: list[Tensor], out: Any) -> None:
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
        if not outs:
            return
        sources = {i: self.sources[id(t)] for i, t in enumerate(tensors) if id(t) in self.sources}
        k = len(self.probed)
        self.probed.append(
            ProbedOp(
                func,
                [(tuple(t.shape), flat_base(t)) for t in tensors],
                [(tuple(o.shape), o.requires_grad) for o in outs],
                sources,
            )
        )
        for j, o in enumerate(outs):
            if o.requires_grad and id(o) not in self.sources:
                self.sources[id(o)] = ("op", k, j)
                self.keep.append(o)

    def _use(self, func, args, kwargs, tensors, outs, derived, step: Step) -> UseCall:
        edges = [get_gradient_edge(o) if o.grad_fn is not None else None for o in outs]
        row_bases = list(step.row_bases)
        for i, dim in enumerate(row_bases):
            if dim is not None and flat_base(tensors[i]) is None:
                row_bases[i] = None  # no longer a flat view: the closed form will find it unreadable
        return UseCall(
            args,
            kwargs,
            list(tensors),
            outs,
            [o._version for o in outs],
            edges,
            [None] * len(outs),
            in_dims=list(step.in_dims),
            out_dims=list(step.out_dims),
            own_edges=list(edges),
            op=OPERATIONS.get(func, ""),
            derived=derived,
            row_bases=row_bases,
            func=func,
        )


def _reads_any(followed: dict[int, Any], args: tuple, kwargs: dict) -> bool:
    """Whether any argument (or element of a list/tuple argument) is a followed tensor: the cheap test every
    operation of the forward pays."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            if id(value) in followed:
                return True
        elif isinstance(value, (list, tuple)):
            for x in value:
                if isinstance(x, Tensor) and id(x) in followed:
                    return True
    return False


def _matches(step: Step, func: Any, tensors: list[Tensor], derived: dict[int, Node]) -> bool:
    return (
        _same_function(step.func, func)
        and tuple(sorted(derived)) == step.derived
        and tuple(t.dim() for t in tensors) == step.ranks
    )


def uses_by_parameters(uses: Iterable[UseCall]) -> dict[tuple[str, ...], list[UseCall]]:
    """The recorded uses grouped by the parameters their derived inputs are made from."""
    groups: dict[tuple[str, ...], list[UseCall]] = {}
    for call in uses:
        groups.setdefault(tuple(call.params()), []).append(call)
    return groups


def watched_tensors(model: torch.nn.Module, names: Iterable[str]) -> dict[str, Tensor]:
    params = dict(model.named_parameters())
    return {name: params[name] for name in names}
