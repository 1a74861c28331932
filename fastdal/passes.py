"""One batch through the model: the closed-form last-layer pass and the one-backward whole-model pass.

Both return, per sample, ``||g||^2``, ``<g, G>`` and the pseudo label, for the parameters that ``G``
covers. The whole-model pass runs one forward with grad and **one** backward from the logits (seeded
with ``softmax(z) - onehot(yhat)``) to the output of every covered module; it asks autograd for those
outputs only, so no weight gradient is ever formed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from . import backends, generic, layers
from .backward import backward_to_outputs
from .batches import batch_length, check_finite, check_labels, read_logits, split_batch
from .capture import (
    Call,
    Plan,
    Recorder,
    Target,
    edges_feeding,
    module_kind,
    preserved_model_state,
    reachable_parameters,
)
from .layout import SampleLayout
from .ops import last_layer_score, last_layer_score_logits
from .torch_ops import residual

# The first batch may reveal that the plan needs changing (a module never called, or called on a
# tensor without a sample dimension); each change hands parameters one level up and re-runs the batch.
_MAX_REFINEMENTS = 64


class BatchTerms(NamedTuple):
    sq_norm: Tensor
    dot: Tensor
    pseudo_label: Tensor


def check_batchnorm_statistics(model: nn.Module) -> None:
    """Refuse BatchNorm without running statistics: in eval mode it still mixes the samples of a batch."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None:
            raise ValueError(
                f"BatchNorm {name!r} has track_running_stats=False, so even in eval mode it normalizes with "
                "the statistics of the batch and samples depend on each other; per-sample gradients are not "
                "defined for such a model"
            )


def forward_recorded(
    model: nn.Module, targets: list[Target], args: tuple, kwargs: dict, outputs: Callable | None, grad: bool
) -> tuple[dict[Target, list[Call]], list[Target], Tensor]:
    """Run the model once with the targets' calls recorded; returns (calls, call order, logits)."""
    with Recorder(targets) as recorder, recorder.record() as calls, torch.set_grad_enabled(grad):
        out = model(*args, **kwargs)
        logits = read_logits(out, outputs)
    return calls, list(recorder.order), logits


CPU_BACKENDS = (backends.TORCH, backends.CPP)  # where the head's terms come from the forward's logits


class LastLayerPass:
    """Closed form for a covered final ``nn.Linear``: one no-grad forward, no backward.

    The forward has made the logits already; where the terms run on the torch or cpp backend they are
    computed from those logits (:func:`fastdal.ops.last_layer_score_logits`), with one GEMM (``G_W h``)
    instead of the op's two (``W h`` again and ``G_W h``), and the pseudo label is the argmax of the very
    logits the model returned. The GPU backends keep the fused op, which streams ``W`` and ``G_W`` once
    without an N x K tensor.
    """

    def __init__(self, model: nn.Module, target: Target, grads: dict[str, Tensor], backend: str):
        self.model, self.target, self.backend = model, target, backend
        self.weight_grad = grads.get(target.params.get("weight", ""))
        self.bias_grad = grads.get(target.params.get("bias", ""))

    def __call__(
        self, batch: Any, inputs: Callable | None, outputs: Callable | None, first_index: int
    ) -> BatchTerms | None:
        """Terms for the batch, or None when the head's output is not the model's output unchanged."""
        args, kwargs = split_batch(batch, inputs)
        found = head_input_and_logits(self.model, self.target, args, kwargs, outputs)
        if found is None:
            return None
        h, logits = found
        check_finite(logits, first_index, "pool")
        weight, bias = (None if p is None else p.detach() for p in (self.target.module.weight, self.target.module.bias))
        given = [t for t in (h, weight, bias, self.weight_grad, self.bias_grad) if t is not None]
        if logits.dtype == h.dtype and backends.choose("last_layer_score", self.backend, given) in CPU_BACKENDS:
            terms = last_layer_score_logits(h, logits, self.weight_grad, self.bias_grad, 0.0, backend=self.backend)
            return BatchTerms(terms.sq_norm, terms.dot, terms.pseudo_label)
        terms = last_layer_score(h, weight, bias, self.weight_grad, self.bias_grad, gamma=0.0, backend=self.backend)
        return BatchTerms(terms.sq_norm, terms.dot, terms.pseudo_label)


def head_input_and_logits(
    model: nn.Module, head: Target, args: tuple, kwargs: dict, outputs: Callable | None
) -> tuple[Tensor, Tensor] | None:
    """One no-grad forward; the head's input and the logits if the model returns the head's output
    unchanged (the closed forms need exactly that), else None.

    A Linear maps rows to rows, so when its output is the ``(B, K)`` logits, row ``i`` of its 2-D input
    is sample ``i``'s: no probe of the layout is needed here.
    """
    calls, _, logits = forward_recorded(model, [head], args, kwargs, outputs, grad=False)
    record = calls[head]
    if len(record) != 1 or record[0].outputs[0] is not logits or record[0].modified_in_place():
        return None
    h = layers.data_input(record[0])
    return (h, logits) if h.dim() == 2 else None


class BackwardPass:
    """Any set of covered parameters: one forward with grad and one backward per batch."""

    def __init__(self, model: nn.Module, grads: dict[str, Tensor], dtype: torch.dtype, backend: str):
        self.model, self.grads, self.dtype, self.backend = model, grads, dtype, backend
        self.plan = Plan(model, grads)
        self.layout: SampleLayout | None = None
        self.warned: set[str] = set()

    def __call__(self, batch: Any, inputs: Callable | None, outputs: Callable | None, first_index: int) -> BatchTerms:
        # Whole batches, as the loader collated them: cutting them into cache-sized pieces on the CPU was
        # 20% faster on a quiet machine for a CNN, but each piece's many small parallel regions made the
        # pass slow down 1.4-1.7x more than a training step when another process competed for the cores.
        return self._run(batch, inputs, outputs, first_index)

    def _layout(self, batch: Any, inputs: Callable | None, outputs: Callable | None) -> SampleLayout:
        """The sample layout, probed on the first batch and kept for the rest of the pass."""
        if self.layout is None:
            self.layout = SampleLayout(self.model, batch, inputs, outputs)
        return self.layout

    def _run(self, batch: Any, inputs: Callable | None, outputs: Callable | None, first_index: int) -> BatchTerms:
        totals: list[Tensor] = []  # sq_norm and dot, made once the forward has told the batch size

        def add_terms(target: Target, record: list[Call], logits: Tensor) -> None:
            """A target's terms as soon as the backward has reached all its calls; then its recorded tensors
            go, as a training step's saved activations go once their layer's backward has run."""
            batch_size = logits.shape[0]
            if not totals:
                totals.extend(torch.zeros(batch_size, dtype=self.dtype, device=logits.device) for _ in range(2))
            if record:
                local_grads = {local: self.grads[full] for local, full in target.params.items()}
                terms = generic.generic_terms if target.kind == "generic" else layers.CLOSED_FORM[target.kind]
                # The recorded inputs are part of the forward's graph: no result may keep it alive.
                with torch.no_grad():
                    s, d = terms(target, record, local_grads, batch_size, self.dtype, backend=self.backend)
                    totals[0] += s
                    totals[1] += d
            for call in record:
                call.release()

        _, logits, pseudo = self.capture(batch, inputs, outputs, first_index, on_ready=add_terms)
        if not totals:  # no covered module was recorded
            totals.extend(torch.zeros(logits.shape[0], dtype=self.dtype, device=logits.device) for _ in range(2))
        return BatchTerms(totals[0], totals[1], pseudo.detach())

    def capture(
        self,
        batch: Any,
        inputs: Callable | None,
        outputs: Callable | None,
        first_index: int,
        labels: Tensor | None = None,
        on_ready: Callable[[Target, list[Call], Tensor], None] | None = None,
    ) -> tuple[dict[Target, list[Call]], Tensor, Tensor]:
        """One forward and one backward of the cross-entropy at ``labels`` (default: the pseudo labels).

        Returns every target's recorded calls, their sample dimensions and ``deltas`` filled, the logits
        and the labels used. ``on_ready(target, calls, logits)`` runs for each target as soon as the
        backward has filled its calls (fastdal/backward.py).
        """
        layout = self._layout(batch, inputs, outputs)
        args, kwargs = split_batch(batch, inputs)
        for _ in range(_MAX_REFINEMENTS):
            targets = list(self.plan.targets.values())
            calls, _, logits = forward_recorded(self.model, targets, args, kwargs, outputs, grad=True)
            _check_rows(layout, batch, logits, first_index)
            layout.annotate(calls, batch, logits.shape[0], _feature_dims)
            if not self._refine(calls, logits):
                break
        else:
            raise RuntimeError(f"fastdal: could not settle which modules to read ({self.plan.describe()})")
        self._warn_generic()
        if labels is None:
            check_finite(logits, first_index, "pool")
            labels = logits.argmax(dim=1)
        else:
            labels = check_labels(labels, logits.shape[0], logits.shape[1], first_index)
            check_finite(logits, first_index, "labeled")
        ready = None
        if on_ready is not None:
            ready = lambda target, record: on_ready(target, record, logits)  # noqa: E731
            for record in calls.values():
                for call in record:
                    # The terms read inputs and output gradients only. A module's output is often kept by
                    # nothing else (a conv before its ReLU: the backward saves the ReLU's result): let it go.
                    call.outputs = []
        backward_to_outputs(calls, logits, residual(logits, labels, self.dtype), ready)
        return calls, logits, labels

    def _refine(self, calls: dict[Target, list[Call]], logits: Tensor) -> bool:
        """Adjust the plan to what this batch showed; True if the batch must run again."""
        batch_size = logits.shape[0]
        changed = False
        reachable: set[int] | None = None
        for target, record in calls.items():
            if not record:
                # Never called, yet its parameters may still shape the output (a parent using the
                # weights directly): then the parent must handle them.
                if reachable is None:
                    reachable = reachable_parameters(logits) if logits.requires_grad else set()
                if any(id(target.module.get_parameter(p)) in reachable for p in target.params):
                    self.plan.hand_up(target)
                    changed = True
                continue
            is_readable = generic.readable if target.kind == "generic" else layers.readable
            if not all(is_readable(target, call, batch_size) for call in record):
                self.plan.hand_up(target)
                changed = True
        return changed

    def _warn_generic(self) -> None:
        for target in self.plan.targets.values():
            if target.kind == "generic" and target.name not in self.warned:
                self.warned.add(target.name)
                warnings.warn(
                    f"fastdal: module {target.name or '<model>'!r} ({type(target.module).__name__}) has no closed "
                    f"form for {sorted(target.params)}; its per-sample gradients come from torch.func.vmap "
                    "(exact, slower)",
                    stacklevel=4,
                )


def _feature_dims(target: Target) -> int | None:
    # A generic module's tensors are taken to end in one feature dimension when sizes must decide.
    return 1 if target.kind == "generic" else layers.feature_dims(target)


def _check_rows(layout: SampleLayout, batch: Any, logits: Tensor, first_index: int) -> None:
    """A batch that can be cut into samples must give one logits row per sample: anything else would
    misalign scores and pool indices."""
    length = batch_length(batch)
    if layout.splittable and logits.shape[0] != length:
        raise ValueError(
            f"the model returned {logits.shape[0]} logits rows for a batch of {length} samples (starting at index "
            f"{first_index}); fastdal needs one row per sample"
        )


def logits_head(model: nn.Module, args: tuple, kwargs: dict, outputs: Callable | None) -> str | None:
    """Name of the ``nn.Linear`` the logits are computed from, proven from their autograd graph.

    One forward with grad (the Linear weights temporarily require it, so that the graph exists) records
    every Linear call; the walk back from the logits stops at the first Linear outputs it meets. Exactly
    one module there is the head; none gives None; several (an ensemble of heads, a skip connection
    around the head) have no single last layer and raise.
    """
    linears = [Target(name, m, "linear") for name, m in model.named_modules() if module_kind(m) == "linear"]
    if not linears:
        return None
    weights = [p for t in linears for p in t.module.parameters(recurse=False)]
    with preserved_model_state(model, weights):
        calls, _, logits = forward_recorded(model, linears, args, kwargs, outputs, grad=True)
        owner = {
            (id(call.edges[0].node), call.edges[0].output_nr): target
            for target in linears
            for call in calls[target]
            if call.edges and call.edges[0] is not None
        }
        heads = sorted({owner[edge].name for edge in edges_feeding(logits, set(owner))})
    if len(heads) > 1:
        raise ValueError(
            f"layers='last': the logits are computed from several nn.Linear modules ({', '.join(heads)}) with no "
            "single last one; pass layers=[...] with the module names to cover"
        )
    return heads[0] if heads else None


def find_head(model: nn.Module, args: tuple, kwargs: dict, outputs: Callable | None) -> str:
    """Name of the model's final ``nn.Linear`` (:func:`logits_head`); a clear error when there is none."""
    name = logits_head(model, args, kwargs, outputs)
    if name is None:
        has_linear = any(module_kind(m) == "linear" for m in model.modules())
        raise ValueError(
            "layers='last' needs a final nn.Linear whose output the logits are computed from, but "
            f"{'no nn.Linear of the model reaches the logits' if has_linear else 'the model has no nn.Linear'}; "
            "use layers='all' or a list of module names"
        )
    return name


def labeled_batch_grads(
    model: nn.Module,
    names: list[str],
    args: tuple,
    kwargs: dict,
    labels: Tensor,
    outputs: Callable | None,
    first_index: int,
) -> dict[str, Tensor]:
    """Summed cross-entropy gradient of a labeled batch at its true labels: one batched backward."""
    params = dict(model.named_parameters())
    with torch.enable_grad():
        logits = read_logits(model(*args, **kwargs), outputs)
        labels = check_labels(labels, logits.shape[0], logits.shape[1], first_index)
        check_finite(logits, first_index, "labeled")
        # Low-precision logits go through the loss in float32, as the accumulation is float32.
        z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        loss = torch.nn.functional.cross_entropy(z, labels, reduction="sum")
        grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    return {n: torch.zeros_like(params[n]) if g is None else g.to_dense() for n, g in zip(names, grads)}
