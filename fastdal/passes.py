"""One batch through the model: the closed-form last-layer pass and the one-backward whole-model pass.

Both return, per sample, ``||g||^2``, ``<g, G>`` and the pseudo label, for the parameters that ``G``
covers. The whole-model pass runs one forward with grad and **one** backward from the logits (seeded
with ``softmax(z) - onehot(yhat)``) to the output of every covered module; it asks autograd for those
outputs only, so no weight gradient is ever formed.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from . import backends, generic, layers, recurrent, use_forms
from .backward import backward_to_outputs
from .batches import batch_length, read_logits, split_batch
from .capture import USES, Call, Plan, Recorder, Target, reachable_parameters, used_elsewhere
from .checks import PassChecks
from .layout import SampleLayout
from .ops import last_layer_score, last_layer_score_logits
from .torch_ops import residual
from .uses import UseMode, classify

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


class Recorded(NamedTuple):
    """One recorded forward: every target's calls (a "uses" target's are its UseCalls), the logits, the groups
    of "uses" targets one use reads together, and whether the forward left the operation plan."""

    calls: dict[Target, list[Call]]
    logits: Tensor
    straddling: list[list[Target]]
    diverged: bool


def forward_recorded(
    model: nn.Module,
    targets: list[Target],
    args: tuple,
    kwargs: dict,
    outputs: Callable | None,
    grad: bool,
    steps: list | None = None,
    carriers: dict[str, Any] | None = None,
) -> Recorded:
    """Run the model once with the targets' calls recorded: module targets by hooks (``carriers``: see Recorder),
    "uses" targets by following their parameters operation by operation along ``steps`` (fastdal/uses.py)."""
    module_targets = [t for t in targets if t.kind != USES]
    owners = {name: t for t in targets if t.kind == USES for name in t.params}
    mode = None
    if owners:
        params = dict(model.named_parameters())
        mode = UseMode({name: params[name] for name in owners}, steps)
    with Recorder(module_targets, carriers) as recorder, recorder.record() as calls, torch.set_grad_enabled(grad):
        with mode if mode is not None else contextlib.nullcontext():
            out = model(*args, **kwargs)
        logits = read_logits(out, outputs)
    calls = dict(calls)
    straddling: list[list[Target]] = []
    if mode is not None:
        calls.update({t: [] for t in owners.values()})
        for use in mode.uses:
            readers = list(dict.fromkeys(owners[name] for name in use.params()))
            if len(readers) == 1:
                calls[readers[0]].append(use)
            else:
                straddling.append(readers)
    return Recorded(calls, logits, straddling, mode is not None and mode.diverged)


CPU_BACKENDS = (backends.TORCH, backends.CPP)  # where the head's terms come from the forward's logits


class LastLayerPass:
    """Closed form for a covered final ``nn.Linear``: one no-grad forward, no backward.

    The forward has made the logits already; where the terms run on the torch or cpp backend they are
    computed from those logits (:func:`fastdal.ops.last_layer_score_logits`), with one GEMM (``G_W h``)
    instead of the op's two (``W h`` again and ``G_W h``), and the pseudo label is the argmax of the very
    logits the model returned. The GPU backends keep the fused op, which streams ``W`` and ``G_W`` once
    without an N x K tensor.
    """

    def __init__(
        self, model: nn.Module, target: Target, grads: dict[str, Tensor], backend: str, checks: PassChecks
    ):
        self.model, self.target, self.backend, self.checks = model, target, backend, checks
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
        self.checks.logits(logits, first_index, "pool")
        weight, bias = (None if p is None else p.detach() for p in (self.target.module.weight, self.target.module.bias))
        inputs = [t for t in (h, weight, bias) if t is not None]
        grads = [t for t in (self.weight_grad, self.bias_grad) if t is not None]
        if logits.dtype == h.dtype and backends.choose("last_layer_score", self.backend, inputs, grads) in CPU_BACKENDS:
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
    calls, logits, _, _ = forward_recorded(model, [head], args, kwargs, outputs, grad=False)
    record = calls[head]
    if len(record) != 1 or record[0].outputs[0] is not logits or record[0].modified_in_place():
        return None
    h = layers.data_input(record[0])
    return (h, logits) if h.dim() == 2 else None


class BackwardPass:
    """Any set of covered parameters: one forward with grad and one backward per batch."""

    def __init__(
        self,
        model: nn.Module,
        grads: dict[str, Tensor],
        dtype: torch.dtype,
        backend: str,
        checks: PassChecks | None = None,
    ):
        self.model, self.grads, self.dtype, self.backend = model, grads, dtype, backend
        self.checks = PassChecks() if checks is None else checks
        self.plan = Plan(model, grads)
        self.layout: SampleLayout | None = None
        self.warned: set[str] = set()
        self.steps: list | None = None  # the operation plan (fastdal/uses.py) for the "uses" targets
        self.planned: tuple[int, frozenset[str]] = (-1, frozenset())  # (probe generation, parameters) of steps
        self.reprobed: Any = None  # the batch probed again because the forward left the operation plan
        self.checked = False  # whether the plan has been checked for uses outside the recorded calls

    def __call__(self, batch: Any, inputs: Callable | None, outputs: Callable | None, first_index: int) -> BatchTerms:
        # Whole batches, as the loader collated them: cutting them into cache-sized pieces on the CPU was
        # 20% faster on a quiet machine for a CNN, but each piece's many small parallel regions made the
        # pass slow down 1.4-1.7x more than a training step when another process competed for the cores.
        return self._run(batch, inputs, outputs, first_index)

    def _follow(self) -> UseMode:
        """What the probes run around the forward: a UseMode following every covered parameter, so that the
        operation plan of whichever of them end up read by operation comes from the same two probes."""
        params = dict(self.model.named_parameters())
        return UseMode({name: params[name] for name in self.grads})

    def _layout(self, batch: Any, inputs: Callable | None, outputs: Callable | None) -> SampleLayout:
        """The sample layout, probed on the first batch and kept for the rest of the pass. The probes follow the
        parameters operation by operation only when some take that route (it costs Python work on every
        operation of the probes' forwards); :meth:`_settle_uses` probes again if one does later."""
        if self.layout is None:
            follow = self._follow if self.plan.by_use() else None
            self.layout = SampleLayout(self.model, batch, inputs, outputs, also=follow)
            self._shared_calls()
        return self.layout

    def _shared_calls(self) -> None:
        """A module whose every probed call holds no samples at all (a position table looked up with ids shared
        by all samples) cannot be read per sample: its parameters take the operation route before the first
        batch runs, instead of after it (when the batch would run again)."""
        for target in [t for t in self.plan.targets.values() if t.kind not in ("generic", USES)]:
            probed = [v for (name, _), v in self.layout.calls.items() if name == target.name]
            if probed and all(d is None for call in probed for d in (*call.inputs, *call.outputs)):
                self.plan.hand_up(target)

    def _settle_uses(self, layout: SampleLayout, batch: Any) -> None:
        """The operation plan for the current "uses" targets, from the probes. Where the probes cannot run
        (batches that cannot be cut into samples) or took different paths through the operations, those
        parameters go to the generic path."""
        names = frozenset(self.plan.by_use())
        if not names:
            self.steps = None
            return
        if layout.also is None and layout.splittable:
            layout.also = self._follow
            layout.reprobe(batch)
        if self.planned != (layout.generation, names):
            seen = layout.also_seen
            steps = None
            if layout.splittable and len(seen) == 2:
                steps = classify(seen[0].probed, seen[1].probed, names)
            self.steps, self.planned = steps, (layout.generation, names)
        if self.steps is None:
            for target in [t for t in self.plan.targets.values() if t.kind == USES]:
                self.plan.abandon(target)
            self.checked = False

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
                terms = _TERMS.get(target.kind) or layers.CLOSED_FORM[target.kind]
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
            self._settle_uses(layout, batch)
            targets = list(self.plan.targets.values())
            carriers = {"recurrent": recurrent.Carrier(self.dtype)}
            recorded = forward_recorded(self.model, targets, args, kwargs, outputs, True, self.steps, carriers)
            calls, logits = recorded.calls, recorded.logits
            _check_rows(layout, batch, logits, first_index)
            if recorded.diverged:
                self._diverged(layout, batch)
                continue
            generation = layout.generation
            layout.annotate({t: c for t, c in calls.items() if t.kind != USES}, batch, logits.shape[0], _feature_dims)
            if layout.generation != generation and self.plan.by_use():
                continue  # probed again: the operation plan comes from the new probes
            if not self._refine(recorded):
                break
        else:
            raise RuntimeError(f"fastdal: could not settle which modules to read ({self.plan.describe()})")
        self._warn_generic(calls)
        if labels is None:
            self.checks.logits(logits, first_index, "pool")
            labels = logits.argmax(dim=1)
        else:
            labels = self.checks.labels(labels, logits.shape[0], logits.shape[1], first_index)
            self.checks.logits(logits, first_index, "labeled")
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

    def _diverged(self, layout: SampleLayout, batch: Any) -> None:
        """The forward left the operation plan (another branch, other shapes): probe again on this batch, once;
        if it leaves the new plan too, the "uses" parameters go to the generic path."""
        if batch is not self.reprobed:
            self.reprobed = batch
            layout.reprobe(batch)
            return
        for target in [t for t in self.plan.targets.values() if t.kind == USES]:
            self.plan.abandon(target)
        self.checked = False

    def _refine(self, recorded: Recorded) -> bool:
        """Adjust the plan to what this batch showed; True if the batch must run again."""
        calls, logits = recorded.calls, recorded.logits
        batch_size = logits.shape[0]
        for group in recorded.straddling:
            self.plan.merge(group)
        changed = bool(recorded.straddling)
        reachable: set[int] | None = None
        params = dict(self.model.named_parameters())
        for target, record in calls.items():
            if target.kind == USES:
                if record and not all(use_forms.readable(call, batch_size) for call in record):
                    self.plan.abandon(target)
                    changed = True
                continue
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
        if changed:
            self.checked = False
            return True
        if not self.checked and logits.requires_grad:
            # Every path from the logits to a covered parameter must pass through its target's recorded calls;
            # one that does not (a module's weight also read by its parent, a use the operation capture did not
            # see) would be missing from the terms.
            covered = {
                id(params[full]): target for target in calls for full in target.params.values() if full in params
            }
            for target in used_elsewhere(logits, calls, covered):
                if target.kind == USES:
                    self.plan.abandon(target)
                else:
                    self.plan.hand_up(target)
                changed = True
            self.checked = not changed
        return changed

    def _warn_generic(self, calls: dict[Target, list[Call]]) -> None:
        for target, record in calls.items():
            if target.kind != USES:
                continue
            for call in record:
                name = getattr(call.func, "__name__", str(call.func))
                if not call.op and (target.name, name) not in self.warned:
                    self.warned.add((target.name, name))
                    warnings.warn(
                        f"fastdal: operation {name!r} reads {sorted(call.params())} with no closed form; its "
                        "per-sample gradients come from torch.func.vmap of that operation (exact, slower)",
                        stacklevel=4,
                    )
        for target in self.plan.targets.values():
            if target.kind == "generic" and target.name not in self.warned:
                self.warned.add(target.name)
                warnings.warn(
                    f"fastdal: module {target.name or '<model>'!r} ({type(target.module).__name__}) has no closed "
                    f"form for {sorted(target.params)}; its per-sample gradients come from torch.func.vmap "
                    "(exact, slower)",
                    stacklevel=4,
                )


_TERMS = {"generic": generic.generic_terms, USES: use_forms.use_terms}


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


def labeled_batch_grads(
    model: nn.Module,
    names: list[str],
    args: tuple,
    kwargs: dict,
    labels: Tensor,
    outputs: Callable | None,
    first_index: int,
    checks: PassChecks,
) -> dict[str, Tensor]:
    """Summed cross-entropy gradient of a labeled batch at its true labels: one batched backward."""
    params = dict(model.named_parameters())
    with torch.enable_grad():
        logits = read_logits(model(*args, **kwargs), outputs)
        labels = checks.labels(labels, logits.shape[0], logits.shape[1], first_index)
        checks.logits(logits, first_index, "labeled")
        # Low-precision logits go through the loss in float32, as the accumulation is float32.
        z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        loss = torch.nn.functional.cross_entropy(z, labels, reduction="sum")
        grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    return {n: torch.zeros_like(params[n]) if g is None else g.to_dense() for n, g in zip(names, grads)}
