"""Find the layers a gradient covers, record their inputs and outputs, and give the model back as it came.

Every pass over a model runs inside :func:`preserved_model_state`, which puts the model in eval mode
and restores each module's train/eval flag and each parameter's ``requires_grad`` afterwards, also
when an exception escapes. Hooks are only ever added through :class:`Recorder`, which removes them
on exit, so the user's hook lists come back unchanged. ``.grad`` is never touched: gradients are
taken with ``torch.autograd.grad``.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.utils._pytree import tree_flatten, tree_unflatten

# Module types whose per-sample gradient terms fastdal computes in closed form (fastdal/layers.py).
# A subclass that overrides ``forward`` computes something else, so it falls to the generic path.
_KINDS: tuple[tuple[type[nn.Module], str, Any], ...] = (
    (nn.Linear, "linear", nn.Linear.forward),
    (nn.Conv1d, "conv", nn.Conv1d.forward),
    (nn.Conv2d, "conv", nn.Conv2d.forward),
    (nn.modules.batchnorm._BatchNorm, "batchnorm", nn.modules.batchnorm._BatchNorm.forward),
    (nn.LayerNorm, "layernorm", nn.LayerNorm.forward),
    (nn.GroupNorm, "groupnorm", nn.GroupNorm.forward),
    (nn.RMSNorm, "rmsnorm", nn.RMSNorm.forward),
    (nn.Embedding, "embedding", nn.Embedding.forward),
    (nn.MultiheadAttention, "mha", nn.MultiheadAttention.forward),
    (nn.LSTM, "recurrent", nn.LSTM.forward),
    (nn.GRU, "recurrent", nn.GRU.forward),
    (nn.RNN, "recurrent", nn.RNN.forward),
    (nn.EmbeddingBag, "bag", nn.EmbeddingBag.forward),
)

# Parameters of a child module that a closed-form kind reads itself (fastdal/attention.py): the stock
# MultiheadAttention uses ``out_proj``'s weights directly and never calls it, so they are its own terms.
_CHILD_PARAMS: dict[str, tuple[str, ...]] = {"mha": ("out_proj.weight", "out_proj.bias")}


# The parameters each closed form knows by their local names; any other parameter of such a module (say the
# ``weight_g``/``weight_v`` of the old hook-based weight norm, which the module never reads as such) is not its own.
_OWN_PARAMS: dict[str, tuple[str, ...]] = {
    "mha": ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight", "bias_k", "bias_v"),
}


def _reads_itself(kind: str, module: nn.Module, local: str) -> bool:
    """Whether a module of ``kind`` computes the terms of the parameter at path ``local`` inside it."""
    if local in _CHILD_PARAMS.get(kind, ()):
        return True
    if kind == "recurrent":
        return local in module._flat_weights_names
    return local in _OWN_PARAMS.get(kind, ("weight", "bias"))


def module_kind(module: nn.Module) -> str:
    """The closed-form family of ``module`` ('linear', 'conv', ...), or 'generic'."""
    for cls, kind, forward in _KINDS:
        if isinstance(module, cls) and type(module).forward is forward:
            return kind
    return "generic"


# --------------------------------------------------------------------------------------------------
# Model state
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def preserved_model_state(model: nn.Module, needs_grad: Iterable[nn.Parameter] = ()) -> Iterator[None]:
    """Run the body with ``model`` in eval mode and ``needs_grad`` requiring grad; restore both after.

    Each module's own ``training`` flag is saved and written back (``model.train(flag)`` would
    overwrite the flags of submodules a user froze in eval mode on purpose). ``nn.Embedding`` and
    ``nn.EmbeddingBag`` with ``max_norm`` rescale rows of their weight in place on every forward; those weights
    are put back too.
    """
    training = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    renormed = [
        (m.weight, m.weight.detach().clone())
        for m in model.modules()
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None
    ]
    try:
        model.eval()
        for p in needs_grad:
            p.requires_grad_(True)
        yield
    finally:
        for m, was_training in training:
            m.training = was_training
        for p, flag in flags:
            p.requires_grad_(flag)
        with torch.no_grad():
            for weight, saved in renormed:
                weight.copy_(saved)


@contextlib.contextmanager
def model_on_device(model: nn.Module, device: torch.device | str | None) -> Iterator[torch.device]:
    """Yield the device to compute on; if ``device`` differs from the model's, move it there and back.

    ``Module.to`` swaps ``param.data`` in place, so parameter objects (and optimizers holding them)
    stay valid, and moving back restores the original device, also when the move itself fails half-way.
    Devices a model cannot come back from ("meta" holds no values) and models spread over several
    devices are refused before anything moves.
    """
    home = model_device(model)
    if device is None:
        _check_on_one_device(model)
        yield home
        return
    target = _checked_device(device)
    if target == home:
        _check_on_one_device(model)
        yield home
        return
    devices = {t.device for t in itertools.chain(model.parameters(), model.buffers())}
    if len(devices) > 1:
        raise ValueError(
            f"device={device!r}: the model is spread over {sorted(map(str, devices))}; moving it to one device and "
            "back would not restore that placement. Pass device=None to compute where the model is"
        )
    try:
        model.to(target)
        yield target
    finally:
        model.to(home)


def _check_on_one_device(model: nn.Module) -> None:
    """Refuse a model whose parameters are split over devices (pipeline-style over GPUs) before any work: its
    terms would be computed where each layer lives, and fastdal sums them on one device."""
    devices = {p.device for p in model.parameters()}
    if len(devices) > 1:
        raise ValueError(
            f"model: its parameters are spread over {sorted(map(str, devices))}; fastdal computes a model's "
            "scores on one device. Put the model on one device for the call (e.g. model.to('cuda:0'))"
        )


def _checked_device(device: torch.device | str) -> torch.device:
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"device must be a torch.device or a device string such as 'cpu' or 'cuda:0', got {device!r}"
        ) from err
    if target.type == "meta":
        raise ValueError(
            "device='meta': a model moved to the meta device loses its weights and cannot be moved back; "
            "pass a device that holds values (e.g. 'cpu' or 'cuda')"
        )
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}, but CUDA is not available on this machine")
    return target


def unwrapped(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile``d model wraps (``_orig_mod``): fastdal's hooks and operation capture read
    the eager model, whose function the compiled one computes, under the same parameter names."""
    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    if dynamo is not None and isinstance(model, dynamo.OptimizedModule):
        return model._orig_mod
    return model


def model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# Which modules compute which parameters' terms
# --------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Target:
    """One module whose recorded calls give the per-sample gradient terms of some parameters.

    ``params`` maps the parameter's path inside ``module`` (``"weight"``, ``"out_proj.bias"``) to its
    name in the model (the key of the labeled gradient).
    """

    name: str
    module: nn.Module
    kind: str
    params: dict[str, str] = field(default_factory=dict)


@dataclass(eq=False)
class Call:
    """One recorded call of a target module: its inputs, its tensor outputs and their gradients.

    ``edges`` are the outputs' places in the autograd graph taken when the module returned: if the
    model later writes into an output (``out += identity``, ``relu_``), the gradient asked of the edge
    is still the one of the value the module produced. An output that is a view of a tensor the module
    made (``nn.Linear`` on 3-D inputs returns a view of its 2-D product) and that the model then writes
    into is asked through that tensor's edge, since an in-place write into the view re-roots the view's
    own history and leaves its old edge off the path to the loss; ``views`` then says how to read the
    output's gradient out of it. A view the model leaves alone keeps its own edge (``settle``): the edge
    of the tensor it views also carries the gradient of any other use of that tensor inside the call
    (``nn.MultiheadAttention``'s per-head weights are a view of the softmax that also weighs the values).
    ``inputs`` are the tensors among the arguments, in ``tree_flatten((args, kwargs))`` order; ``in_dims``
    and ``out_dims`` say which dimension of each input and output tensor holds the samples
    (fastdal/layout.py), once the call has been read.
    """

    args: tuple
    kwargs: dict
    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]
    versions: list[int]
    edges: list[GradientEdge | None]
    views: list[tuple | None] = field(default_factory=list)
    deltas: list[torch.Tensor | None] | None = None
    in_dims: list | None = None
    out_dims: list | None = None
    own_edges: list[GradientEdge | None] = field(default_factory=list)  # each output's own edge
    carried: Any = None  # what a carrier made of the call (Recorder: a recurrent module run without grad)

    def modified_in_place(self) -> bool:
        return any(t._version != v for t, v in zip(self.outputs, self.versions))

    def release(self) -> None:
        """Drop every tensor the record holds (its terms are computed): the memory goes back at once."""
        self.args, self.kwargs, self.inputs, self.outputs, self.deltas = (), {}, [], [], None

    def settle(self) -> None:
        """Once the forward is over: every view output the model did not write into is asked through its
        own edge instead of its base's."""
        for i, (t, version, own) in enumerate(zip(self.outputs, self.versions, self.own_edges)):
            if self.views[i] is not None and t._version == version and own is not None:
                self.edges[i], self.views[i] = own, None


# The kind of a target whose parameters are read at the operations that use them (fastdal/uses.py).
USES = "uses"


class Plan:
    """The set of targets covering a set of named parameters, refined as the model is observed.

    Each parameter is read by the first of three routes that works for it:

    1. the closed form of the module that holds it, when its stock forward reads it (or of its parent, where the
       parent's closed form reads it: ``_CHILD_PARAMS``, the stock ``nn.MultiheadAttention`` and its
       ``out_proj``), and every call of the module holds the samples where that form reads them;
    2. the operations that use it (kind ``"uses"``, fastdal/uses.py): a bare ``nn.Parameter``, a parameter of a
       module without a closed form, of a module called on tensors without samples (a position table looked up
       with shared ids) or never called (its parent reads its weights), or held by several modules;
    3. the generic vmap path of the module that holds it, handed up to its ancestors while a module's calls
       cannot be read per sample: where (2) cannot follow it (an operation without a closed form, a forward
       whose operations the probes could not line up).

    Parameters that do not reach the output at all have a zero gradient and are dropped.
    """

    def __init__(self, model: nn.Module, names: Iterable[str]):
        self.model = model
        self.modules = dict(model.named_modules())
        self.targets: dict[tuple[str, str], Target] = {}
        self.home: dict[str, tuple[str, str]] = {}  # parameter -> (holding module, path in it): route 3 starts there
        self.not_by_use: set[str] = set()  # parameters route 2 could not follow
        params = dict(model.named_parameters())
        holders: dict[int, list[str]] = {}
        for module_name, module in self.modules.items():
            for local, p in module.named_parameters(recurse=False):
                holders.setdefault(id(p), []).append(_join(module_name, local))
        for name in names:
            paths = holders[id(params[name])]
            if len(paths) == 1:
                owner, local = _split(paths[0])
                if owner:
                    # A child whose parent's closed form reads the parameter (never calling the child) would
                    # only hand it up after the first batch, at the cost of running that batch again.
                    parent, leaf = _split(owner)
                    if _join(leaf, local) in _CHILD_PARAMS.get(module_kind(self.modules[parent]), ()):
                        owner, local = parent, _join(leaf, local)
                self.home[name] = (owner, local)
                self._give(owner, local, name)
            else:
                # Held by several modules (tied weights): no one module's calls see every use.
                owner = _common_prefix([_split(p)[0] for p in paths])
                self.home[name] = (owner, _relative(paths[0], owner))
                self._use(owner, name)

    def _give(self, module_name: str, local: str, full_name: str) -> None:
        """Route 1 where the module's closed form reads the parameter, else route 2 (route 3 once 2 failed)."""
        module = self.modules[module_name]
        kind = module_kind(module)
        if full_name not in self.not_by_use and (kind == "generic" or not _reads_itself(kind, module, local)):
            self._use(module_name, full_name)
        else:
            self._give_module(module_name, local, full_name)

    def _give_module(self, module_name: str, local: str, full_name: str) -> None:
        """To the module's own target: its closed form if it reads the parameter, else the generic path."""
        target = self.targets.get((module_name, "module"))
        if target is None:
            module = self.modules[module_name]
            kind = module_kind(module)
            if not _reads_itself(kind, module, local):
                kind = "generic"  # a closed-form module only knows its own weight and bias
            target = self.targets[(module_name, "module")] = Target(module_name, module, kind)
        elif not _reads_itself(target.kind, target.module, local):
            target.kind = "generic"
        target.params[local] = full_name

    def _use(self, module_name: str, full_name: str) -> None:
        """Route 2, in a target named after the module holding the parameter. Its ``module`` is the whole model and
        its parameters go by their names in the model (one use may read parameters of several modules)."""
        key = (module_name, USES)
        if key not in self.targets:
            self.targets[key] = Target(module_name, self.model, USES)
        self.targets[key].params[full_name] = full_name

    @staticmethod
    def _key(target: Target) -> tuple[str, str]:
        return (target.name, USES if target.kind == USES else "module")

    def hand_up(self, target: Target) -> None:
        """A module target whose calls cannot be read per sample, that is never called, or whose parameters are
        used outside its calls: a closed form's parameters go to route 2 (or to the parent's closed form that
        reads them), a generic target's to its parent module."""
        del self.targets[self._key(target)]
        parent, leaf = _split(target.name)
        for local, full_name in target.params.items():
            if target.name and _join(leaf, local) in _CHILD_PARAMS.get(module_kind(self.modules[parent]), ()):
                self._give_module(parent, _join(leaf, local), full_name)
            elif target.kind != "generic" and full_name not in self.not_by_use:
                self._use(target.name, full_name)
            elif not target.name:
                raise RuntimeError("fastdal: the model's own call could not be read per sample")
            else:
                self._give_module(parent, _join(leaf, local), full_name)

    def abandon(self, target: Target) -> None:
        """Route 2 could not follow ``target``'s parameters: route 3, from the module holding each."""
        del self.targets[self._key(target)]
        for full_name in target.params:
            self.not_by_use.add(full_name)
            module_name, local = self.home[full_name]
            self._give_module(module_name, local, full_name)

    def merge(self, targets: list[Target]) -> None:
        """One "uses" target for parameters that a use reads together (``weight_norm``'s ``g`` and ``v``)."""
        first = targets[0]
        for other in targets[1:]:
            del self.targets[self._key(other)]
            first.params.update(other.params)

    def by_use(self) -> dict[str, Target]:
        """Parameter name -> the "uses" target covering it."""
        return {full: t for t in self.targets.values() if t.kind == USES for full in t.params}

    def describe(self) -> str:
        return ", ".join(f"{t.name or '<model>'} ({t.kind})" for t in self.targets.values())


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _split(path: str) -> tuple[str, str]:
    head, _, tail = path.rpartition(".")
    return head, tail


def _common_prefix(module_names: list[str]) -> str:
    parts = [n.split(".") if n else [] for n in module_names]
    common: list[str] = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def _relative(path: str, ancestor: str) -> str:
    return path[len(ancestor) + 1 :] if ancestor else path


# --------------------------------------------------------------------------------------------------
# Recording calls
# --------------------------------------------------------------------------------------------------


class Recorder:
    """Forward hooks on a plan's modules that record each call while ``recording`` is true.

    The hooks are prepended, so they see what the module itself returned, before any hook of the
    user's changes it. Used as a context manager; the hooks are removed on exit.

    ``carriers`` maps a target kind to an object whose ``carry(target, args, kwargs, output)`` returns
    ``(output, carried)``: the module of such a target runs without grad (a pre-hook pauses it, the forward hook,
    called even when the module raises, resumes it), and the carrier puts the output back into the graph, for
    instance through a custom ``autograd.Function`` whose backward reuses the closed form's own recomputation
    (fastdal/recurrent.py), so that the module's backward is not run twice. ``carried`` is kept on the Call.
    """

    def __init__(self, targets: Iterable[Target], carriers: dict[str, Any] | None = None):
        self.targets = list(targets)
        self.calls: dict[Target, list[Call]] = {t: [] for t in self.targets}
        self.order: list[Target] = []  # targets in the order their calls happened
        self.recording = False
        self.carriers = carriers or {}
        self._paused: list[Target] = []  # carried targets whose call runs now, grad paused
        self._handles: list[Any] = []

    def __enter__(self) -> Recorder:
        try:
            for target in self.targets:
                carried = target.kind in self.carriers
                if carried:
                    self._handles.append(target.module.register_forward_pre_hook(self._pause(target), prepend=True))
                self._handles.append(
                    target.module.register_forward_hook(
                        self._hook(target), with_kwargs=True, prepend=True, always_call=carried
                    )
                )
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _pause(self, target: Target):
        def pre_hook(module: nn.Module, args: tuple) -> None:
            if self.recording and torch.is_grad_enabled():
                self._paused.append(target)
                torch._C._set_grad_enabled(False)

        return pre_hook

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, target: Target):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            carried = None
            if self._paused and self._paused[-1] is target:
                self._paused.pop()
                torch._C._set_grad_enabled(True)
                if output is None:  # the module raised: grad is back on, the error goes on up
                    return None
                output, carried = self.carriers[target.kind].carry(target, args, kwargs, output)
            if not self.recording:
                return None
            # fastdal's own bookkeeping is not part of the model: operation-level capture must not see it.
            with torch._C.DisableTorchFunction():
                replaced = self._record(target, args, kwargs, output)
            self.calls[target][-1].carried = carried
            return output if replaced is None and carried is not None else replaced

        return hook

    def _record(self, target: Target, args: tuple, kwargs: dict, output: Any) -> Any:
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        leaves, spec = tree_flatten(output)
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        replaced = None
        if target.kind == "generic":
            inner = used_inside(tensors, inputs)
            if inner:
                # The gradient at such an output's own edge also holds what flows back through the call's own use
                # of it, which the generic path differentiates again: hand the model a copy, whose edge carries
                # only the uses outside the call.
                tensors = [t.clone() if i in inner else t for i, t in enumerate(tensors)]
                swap = iter(tensors)
                replaced = tree_unflatten([next(swap) if isinstance(x, torch.Tensor) else x for x in leaves], spec)
        edges, views = [], []
        for t in tensors:
            source, view = _produced_value(t, inputs)
            edges.append(get_gradient_edge(source) if source.grad_fn is not None else None)
            views.append(view)
        own = [get_gradient_edge(t) if t.grad_fn is not None else None for t in tensors]
        versions = [t._version for t in tensors]
        self.calls[target].append(Call(args, kwargs, inputs, tensors, versions, edges, views, own_edges=own))
        self.order.append(target)
        return replaced

    @contextlib.contextmanager
    def record(self) -> Iterator[dict[Target, list[Call]]]:
        for calls in self.calls.values():
            calls.clear()
        self.order.clear()
        self.recording = True
        try:
            yield self.calls
        finally:
            self.recording = False
        for calls in self.calls.values():
            for call in calls:
                call.settle()


def used_inside(outputs: list[torch.Tensor], inputs: list[torch.Tensor]) -> set[int]:
    """Positions of the ``outputs`` of one call that the call itself used to make its other outputs: the graph
    below each output, down to the call's inputs, is searched for the others' nodes."""
    nodes = {id(t.grad_fn): i for i, t in enumerate(outputs) if t.grad_fn is not None}
    if len(nodes) < 2:
        return set()
    stops = {id(t.grad_fn) for t in inputs if t.grad_fn is not None}
    used: set[int] = set()
    for i, t in enumerate(outputs):
        if t.grad_fn is None:
            continue
        seen: set[int] = set()
        stack = [child for child, _ in t.grad_fn.next_functions]
        while stack:
            node = stack.pop()
            if node is None or id(node) in seen or id(node) in stops:
                continue
            seen.add(id(node))
            if nodes.get(id(node), i) != i:
                used.add(nodes[id(node)])
            stack.extend(child for child, _ in node.next_functions)
    return used


def reachable_parameters(root: torch.Tensor) -> set[int]:
    """ids of the parameters (autograd leaves) that ``root`` depends on, by walking its graph."""
    found: set[int] = set()
    seen: set[Any] = set()
    stack = [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            found.add(id(variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def _produced_value(t: torch.Tensor, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, tuple | None]:
    """The tensor whose gradient edge stands for output ``t``, and how ``t`` sits in it.

    ``t`` itself, unless it is a view covering the whole of a contiguous tensor made inside the call
    (not one of the call's inputs, which other parts of the model may use too): then that tensor, and
    ``(size, stride, offset)`` of ``t`` within it.
    """
    base = t._base
    if base is None or base.grad_fn is None or base.numel() != t.numel() or not base.is_contiguous():
        return t, None
    if any(base is x or base is x._base for x in inputs):
        return t, None
    return base, (t.size(), t.stride(), t.storage_offset() - base.storage_offset())


def used_elsewhere(logits: torch.Tensor, calls: dict[Target, list[Call]], covered: dict[int, Target]) -> list[Target]:
    """The targets with a parameter that the logits reach by a path around the target's recorded calls.

    ``covered`` maps ``id(parameter)`` to the target covering it. A parameter is accounted for when every path
    from the logits down to it passes through an output of its target's recorded calls, or, for a use of a
    derived tensor (fastdal/uses.py), reaches it from inside that operation (``F.linear`` on 3-D inputs and
    attention are several graph nodes) through the derived operand. One pass over the graph, children before
    parents, gives each node the targets whose parameters it reaches that way *around* their calls: the
    targets left at the logits are the ones to change.
    """
    outputs: dict[int, set[int]] = {}  # node -> targets this node is a recorded output of
    blocked: dict[int, dict[int, set[int]]] = {}  # node -> child -> targets whose derived operand the child is
    by_index = {id(t): t for t in calls}
    for target, record in calls.items():
        for call in record:
            derived = getattr(call, "derived", None)
            for edge in [*call.edges, *call.own_edges]:
                if edge is None:
                    continue
                outputs.setdefault(id(edge.node), set()).add(id(target))
                if derived is None:
                    continue
                operands = {i: get_gradient_edge(t).node for i, t in enumerate(call.inputs) if t.requires_grad}
                inside = {id(n) for i, n in operands.items() if i in derived}
                for node in _nodes_down_to(edge.node, {id(n) for n in operands.values()}):
                    for child in inside:
                        blocked.setdefault(id(node), {}).setdefault(child, set()).add(id(target))
    around: dict[int, frozenset[int]] = {}
    stack: list[tuple[Any, bool]] = [(logits.grad_fn, False)]
    while stack:
        node, children_done = stack.pop()
        if node is None or (not children_done and id(node) in around):
            continue
        if not children_done:
            around[id(node)] = frozenset()  # provisional while its children are visited (a DAG: never read)
            stack.append((node, True))
            stack.extend((child, False) for child, _ in node.next_functions if child is not None)
            continue
        found: set[int] = set()
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in covered:
            found.add(id(covered[id(variable)]))
        skip = blocked.get(id(node), {})
        for child, _ in node.next_functions:
            if child is not None:
                found.update(around[id(child)] - skip.get(id(child), set()))
        around[id(node)] = frozenset(found - outputs.get(id(node), set()))
    return [by_index[i] for i in around.get(id(logits.grad_fn), ())]


def _nodes_down_to(root: Any, stops: set[int]) -> list[Any]:
    """``root`` and the graph nodes below it down to (not including) the nodes in ``stops``: one operation's
    own nodes, between its output and its inputs."""
    found, seen, stack = [], set(), [root]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        found.append(node)
        if node is not root and id(node) in stops:
            found.pop()
            continue
        stack.extend(child for child, _ in node.next_functions)
    return found


def edges_feeding(root: torch.Tensor, stops: set[tuple[int, int]]) -> set[tuple[int, int]]:
    """The edges of ``stops`` (``(id(node), output_nr)``) that ``root`` is computed from through no other
    edge of ``stops``: a walk of the autograd graph from ``root`` that does not go past a stop."""
    if root.grad_fn is None:
        return set()
    found: set[tuple[int, int]] = set()
    seen: set[int] = set()
    stack = [(root.grad_fn, root.output_nr)]
    while stack:
        node, nr = stack.pop()
        if node is None:
            continue
        if (id(node), nr) in stops:
            found.add((id(node), nr))
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.extend(node.next_functions)
    return found
