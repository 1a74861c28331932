"""Which of a model's parameters a ``layers=`` request covers, under the names the model knows them by."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

Layers = str | Sequence[str]


def canonical_names(model: nn.Module) -> dict[int, str]:
    """``id(parameter) -> name`` as ``model.named_parameters()`` gives it.

    A parameter shared by several modules (a head tied to an embedding) has one name in the model, the
    first path that reaches it; any other module holding it refers to that same name.
    """
    return {id(p): name for name, p in model.named_parameters()}


def covered_parameters(model: nn.Module, layers: Layers, head: Callable[[], Any]) -> tuple[list[str], Any]:
    """Parameter names for a ``layers`` request, and the request as stored in the LabeledGrad.

    ``head()`` gives the last layer (fastdal/head.py, Head: the parameters of the linear operation the logits
    are computed from); it is asked only for ``layers="last"``.
    """
    params = dict(model.named_parameters())
    names_of = canonical_names(model)
    if isinstance(layers, str) and layers == "all":
        names = [n for n, p in params.items() if p.requires_grad]
        if not names:
            raise ValueError("layers='all': the model has no trainable parameters (requires_grad=True)")
        return names, "all"
    if isinstance(layers, str) and layers == "last":
        return list(head().params), "last"
    if isinstance(layers, str):
        layers = [layers]
    if not isinstance(layers, Sequence) or not layers or not all(isinstance(x, str) for x in layers):
        raise ValueError(f"layers must be 'last', 'all' or a non-empty list of module names, got {layers!r}")
    modules = dict(model.named_modules())
    names: list[str] = []
    for module_name in layers:
        if module_name not in modules:
            some = ", ".join(repr(n) for n in list(modules)[1:9])
            raise ValueError(f"layers names {module_name!r}, which is not a module of the model (it has {some}, ...)")
        for p in modules[module_name].parameters():
            name = names_of[id(p)]
            if p.requires_grad and name not in names:
                names.append(name)
    if not names:
        raise ValueError(f"layers={list(layers)!r} holds no trainable parameters")
    return names, tuple(layers)
