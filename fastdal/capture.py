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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.utils._pytree import tree_flatten

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
)

# Parameters of a child module that a closed-form kind reads itself (fastdal/attention.py): the stock
# MultiheadAttention uses ``out_proj``'s weights directly and never calls it, so they are its own terms.
_CHILD_PARAMS: dict[str, tuple[str, ...]] = {"mha": ("out_proj.weight", "out_proj.bias")}


def _reads_itself(kind: str, local: str) -> bool:
    """Whether a module of ``kind`` computes the terms of the parameter at path ``local`` inside it."""
    return "." not in local or local in _CHILD_PARAMS.get(kind, ())


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
    overwrite the flags of submodules a user froze in eval mode on purpose). ``nn.Embedding`` with
    ``max_norm`` rescales rows of its weight in place on every forward; those weights are put back too.
    """
    training = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    renormed = [
        (m.weight, m.weight.detach().clone())
        for m in model.modules()
        if isinstance(m, nn.Embedding) and m.max_norm is not None
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
        yield home
        return
    target = _checked_device(device)
    if target == home:
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


class Plan:
    """The set of targets covering a set of named parameters, refined as the model is observed.

    Parameters are first given to the module that holds them, or to its parent where the parent's closed
    form reads them itself (``_CHILD_PARAMS``: the stock ``nn.MultiheadAttention`` and its ``out_proj``). A
    module that is never called (its parent uses its weights directly), or whose input has no sample
    dimension (a positional embedding looked up once and broadcast), hands its parameters up to its parent,
    which is then treated generically (unless, again, its closed form reads them); a parameter shared by several
    modules goes to their closest common ancestor. Parameters that do not reach the output at all
    have a zero gradient and are dropped.
    """

    def __init__(self, model: nn.Module, names: Iterable[str]):
        self.model = model
        self.modules = dict(model.named_modules())
        self.targets: dict[str, Target] = {}
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
            else:
                owner = _common_prefix([_split(p)[0] for p in paths])
                local = _relative(paths[0], owner)
            self._give(owner, local, name)

    def _give(self, module_name: str, local: str, full_name: str) -> None:
        target = self.targets.get(module_name)
        if target is None:
            module = self.modules[module_name]
            kind = module_kind(module)
            if not _reads_itself(kind, local):
                kind = "generic"  # a closed-form module only knows its own weight and bias
            target = self.targets[module_name] = Target(module_name, module, kind)
        elif not _reads_itself(target.kind, local):
            target.kind = "generic"
        target.params[local] = full_name

    def hand_up(self, target: Target) -> None:
        """Give ``target``'s parameters to its parent module, which handles them generically unless its
        closed form reads them itself (``_CHILD_PARAMS``)."""
        del self.targets[target.name]
        parent, leaf = _split(target.name) if target.name else ("", "")
        if not target.name:
            raise RuntimeError("fastdal: the model's own call could not be read per sample")
        for local, full_name in target.params.items():
            self._give(parent, _join(leaf, local), full_name)

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
    """

    def __init__(self, targets: Iterable[Target]):
        self.targets = list(targets)
        self.calls: dict[Target, list[Call]] = {t: [] for t in self.targets}
        self.order: list[Target] = []  # targets in the order their calls happened
        self.recording = False
        self._handles: list[Any] = []

    def __enter__(self) -> Recorder:
        try:
            for target in self.targets:
                self._handles.append(
                    target.module.register_forward_hook(self._hook(target), with_kwargs=True, prepend=True)
                )
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, target: Target):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if not self.recording:
                return None
            inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            tensors = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)]
            edges, views = [], []
            for t in tensors:
                source, view = _produced_value(t, inputs)
                edges.append(get_gradient_edge(source) if source.grad_fn is not None else None)
                views.append(view)
            own = [get_gradient_edge(t) if t.grad_fn is not None else None for t in tensors]
            versions = [t._version for t in tensors]
            self.calls[target].append(Call(args, kwargs, inputs, tensors, versions, edges, views, own_edges=own))
            self.order.append(target)
            return None

        return hook

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
