"""The whole-model pass's one backward, handing each covered module its output gradients as the backward
reaches them.

Asking ``torch.autograd.grad`` for every recorded output at once keeps all their gradients until it
returns; with the modules' inputs, which the closed forms need too, the pass then held about twice a
training step's activations at its peak. Here ``autograd.grad`` is asked only for the *terminal* outputs,
those that no other recorded output lies below in the graph (usually the first layer's); every other
output's gradient is read by a pre-hook on its node, which the backward runs on its way down to the
terminal ones, just before the node itself runs. As soon as every call of a target has its gradients,
``on_ready(target, calls)`` runs: the caller can reduce them to per-sample terms and let the tensors go,
as a training step lets a layer's saved activations go once its backward has run.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from .capture import Call, Target

Key = tuple[int, int]  # (id of the graph node, output number): one output's place in the graph


def backward_to_outputs(
    calls: dict[Target, list[Call]],
    logits: Tensor,
    seed: Tensor,
    on_ready: Callable[[Target, list[Call]], None] | None = None,
) -> None:
    """Fill every call's ``deltas`` with the gradient of ``(logits * seed).sum()`` at its outputs (None
    where the output does not reach the logits), calling ``on_ready`` once per target as soon as its calls
    are complete (targets the backward never reaches: at the end)."""
    edges: dict[Key, GradientEdge] = {}
    users: dict[Key, list[tuple[Target, Call, int]]] = {}
    pending: dict[Target, set[Key]] = {}
    for target, record in calls.items():
        pending[target] = set()
        for call in record:
            call.deltas = [None] * len(call.edges)
            for i, edge in enumerate(call.edges):
                if edge is not None:
                    key = (id(edge.node), edge.output_nr)
                    edges.setdefault(key, edge)
                    users.setdefault(key, []).append((target, call, i))
                    pending[target].add(key)
    finished: set[Target] = set()

    def finish(target: Target) -> None:
        if target not in finished:
            finished.add(target)
            if on_ready is not None:
                on_ready(target, calls[target])

    def deliver(key: Key, grad: Tensor | None) -> None:
        for target, call, i in users.pop(key, ()):
            view = call.views[i] if call.views else None
            # A view output's part of its base's gradient.
            call.deltas[i] = grad.contiguous().as_strided(*view) if grad is not None and view is not None else grad
            pending[target].discard(key)
            if not pending[target]:
                finish(target)

    for target, keys in pending.items():
        if not keys:
            finish(target)  # no output in the graph: no gradient
    if edges and logits.requires_grad:
        terminal = _terminal(set(edges), logits)
        hooked: dict[int, list[int]] = {}
        for node_id, nr in edges:
            if (node_id, nr) not in terminal:
                hooked.setdefault(node_id, []).append(nr)
        handles = []
        try:
            for node_id, numbers in hooked.items():
                node = edges[(node_id, numbers[0])].node
                handles.append(node.register_prehook(_reader(node_id, numbers, deliver)))
            order = list(terminal)
            grads = torch.autograd.grad(
                logits, [edges[k] for k in order], grad_outputs=seed.to(logits.dtype), allow_unused=True
            )
        finally:
            for handle in handles:
                handle.remove()
        for key, grad in zip(order, grads):
            deliver(key, grad)
    for key in list(users):
        deliver(key, None)  # outputs the backward never reached
    for target in calls:
        finish(target)


def _reader(node_id: int, numbers: list[int], deliver: Callable[[Key, Tensor | None], None]) -> Callable:
    def prehook(grad_outputs: tuple[Tensor | None, ...]) -> None:
        for nr in numbers:
            deliver((node_id, nr), grad_outputs[nr])

    return prehook


def _terminal(stops: set[Key], logits: Tensor) -> set[Key]:
    """The stops whose node has no other stop below it in the graph under ``logits``.

    Every other stop's node lies on a path from the logits down to a terminal stop, so a backward asked for
    the terminal ones runs it (and its pre-hook). One iterative depth-first walk, children before parents.
    """
    below: dict[int, bool] = {}  # id(node) -> whether a stop lies strictly below it
    started: set[int] = set()
    stack: list[tuple[object, bool]] = [(logits.grad_fn, False)]
    while stack:
        node, children_done = stack.pop()
        if node is None:
            continue
        nid = id(node)
        if children_done:
            below[nid] = any(
                child is not None and ((id(child), nr) in stops or below.get(id(child), False))
                for child, nr in node.next_functions
            )
            continue
        if nid in started:
            continue
        started.add(nid)
        stack.append((node, True))
        stack.extend((child, False) for child, _ in node.next_functions if child is not None)
    return {key for key in stops if not below.get(key[0], False)}
