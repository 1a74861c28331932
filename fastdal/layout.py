"""Which dimension of each tensor a module reads or returns holds the samples: found by probing, not by sizes.

A tensor of shape ``(4, 4, 8)`` in a batch of 4 samples may hold the samples in dimension 0 or 1 (a
sequence-first layer with as many positions as samples), and a position table of shape ``(4, 8)`` may
hold none at all. Sizes cannot tell these apart; the model can. :class:`SampleLayout` runs the model
once on 2 and once on 3 samples cut from the first batch (forward only) and records the shape of every
tensor every module reads and returns: a dimension of size 2 in the first probe and 3 in the second
scales with the number of samples, and is that tensor's sample dimension. Every later batch is read
with those dimensions, after checking that its tensors still have them at its own batch size.

The probes need a batch that can be cut into samples along dimension 0 (DataLoader's collation) and a
model that then returns one logits row per sample. When that does not hold, the layout falls back to
sizes, and a tensor with more than one dimension of the batch size is refused with an error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from .batches import batch_length, read_logits, split_batch, take_samples, tensors_in
from .capture import Call, Target


class Mixed:
    """Sample dimension of a tensor whose shape depends on the number of samples in some other way (two
    dimensions that grow with it, or samples flattened together with positions): not readable per sample."""

    def __repr__(self) -> str:
        return "MIXED"


MIXED = Mixed()
SampleDim = int | None | Mixed  # the dimension, None for a tensor shared by all samples, or MIXED

# Sizes of the two probe batches; any two different sizes work.
PROBE_SIZES = (2, 3)

Shape = tuple[int, ...]


def tensor_inputs(args: tuple, kwargs: dict) -> list[Tensor]:
    """The tensors among a module call's arguments, in the order fastdal reads them."""
    return [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]


def tensor_outputs(output: Any) -> list[Tensor]:
    return [t for t in tree_flatten(output)[0] if isinstance(t, Tensor)]


@dataclass(frozen=True)
class CallLayout:
    """Shapes (at the first probe size) and sample dimensions of one call's input and output tensors."""

    input_shapes: tuple[Shape, ...]
    output_shapes: tuple[Shape, ...]
    inputs: tuple[SampleDim, ...]
    outputs: tuple[SampleDim, ...]


class LayoutError(ValueError):
    """The samples of a tensor cannot be located: raised with what to change."""


class SampleLayout:
    """Sample dimensions of every module call of a model, for the batches of one loader.

    Attributes:
        splittable: whether the loader's batches can be cut into samples along dimension 0 (the probes
            returned one logits row per sample); only then are batches micro-batched or probed.
    """

    def __init__(
        self,
        model: nn.Module,
        batch: Any,
        inputs: Callable | None,
        outputs: Callable | None,
        also: Callable[[], contextlib.AbstractContextManager] | None = None,
    ):
        self.model, self.inputs, self.outputs = model, inputs, outputs
        self.reason = ""
        self.calls: dict[tuple[str, int], CallLayout] = {}
        self._reprobed: Any = None
        # ``also()`` gives a context that runs around each probe's forward (fastdal/uses.py follows parameters
        # operation by operation in it); ``also_seen`` holds what each entered, for the two probe sizes.
        self.also = also
        self.also_seen: list[Any] = []
        self.generation = 0  # counts the probes: a caller's conclusions from ``also_seen`` are of one generation
        self.splittable = self._probe(batch)

    def reprobe(self, batch: Any) -> None:
        """Probe again on ``batch`` (it takes a path through the model's operations the probes did not see)."""
        if self.splittable:
            self._probe(batch)

    def annotate(
        self,
        calls: dict[Target, list[Call]],
        batch: Any,
        batch_size: int,
        feature_dims: Callable[[Target], int | None],
    ) -> None:
        """Fill ``in_dims`` and ``out_dims`` of every call recorded on ``batch``.

        ``feature_dims`` gives a target's number of trailing feature dimensions (None: samples in
        dimension 0 only); it is used only when the batches cannot be probed.
        """
        if not self.splittable:
            self._annotate_from_sizes(calls, batch_size, feature_dims)
            return
        if not self._annotate_probed(calls, batch_size) and batch is not self._reprobed:
            # This batch calls a module in a way the probes did not see (another branch, another rank):
            # probe again, once, on this batch. A call still unknown is not read per sample (its
            # parameters go to the parent module).
            self._reprobed = batch
            self._probe(batch)
            self._annotate_probed(calls, batch_size)

    def _annotate_probed(self, calls: dict[Target, list[Call]], batch_size: int) -> bool:
        """Dimensions from the probes; False if some call was not seen by them (marked MIXED)."""
        complete = True
        for target, record in calls.items():
            for index, call in enumerate(record):
                found = self.dims(target.name, index, call.inputs, call.outputs, batch_size)
                if found is None:
                    complete = False
                    found = [MIXED] * len(call.inputs), [MIXED] * len(call.outputs)
                call.in_dims, call.out_dims = found
        return complete

    def _annotate_from_sizes(
        self, calls: dict[Target, list[Call]], batch_size: int, feature_dims: Callable[[Target], int | None]
    ) -> None:
        for target, record in calls.items():
            trailing = feature_dims(target)
            for call in record:
                call.in_dims, call.out_dims = (
                    [dims_from_sizes(t, batch_size, trailing, target.name, self.reason) for t in tensors]
                    for tensors in (call.inputs, call.outputs)
                )
                _check_samples_found(target, call, self.reason)

    def _probe(self, batch: Any) -> bool:
        """Run the probes on ``batch``; adds what they show to ``calls``. False if the batch cannot be cut."""
        inputs, outputs = self.inputs, self.outputs
        length = batch_length(batch)
        if length is None:
            self.reason = "its batches hold no tensor to cut into samples"
            return False
        shapes = []
        seen = []
        self.generation += 1
        for size in PROBE_SIZES:
            rows = torch.arange(size) % length
            piece = take_samples(batch, rows, length)
            try:
                with self.also() if self.also is not None else contextlib.nullcontext() as extra:
                    recorded, logits_rows = _record_shapes(self.model, piece, inputs, outputs)
            except Exception as err:
                if all(t.dim() >= 1 and t.shape[0] == length for t in tensors_in(batch)):
                    raise  # every tensor was cut alike: the model's own error, not the cut's
                # Some tensors were kept whole (offsets into a flat tensor of every sample's tokens): the model
                # cannot run on the cut batch, whose samples do not lie along dimension 0 alone.
                self.reason = (
                    f"cut along dimension 0 to {size} samples, a batch made the model raise {type(err).__name__}: "
                    f"{str(err).splitlines()[0][:200] if str(err) else ''}"
                )
                return False
            seen.append(extra)
            if logits_rows != size:
                self.reason = (
                    f"cut along dimension 0 to {size} samples, a batch gave {logits_rows} logits rows, so its "
                    "samples do not lie along dimension 0"
                )
                return False
            shapes.append(recorded)
        self.also_seen = seen
        small, large = shapes
        for key, (in_small, out_small) in small.items():
            if key not in large:
                continue
            in_large, out_large = large[key]
            if [len(s) for s in in_small] != [len(s) for s in in_large] or len(out_small) != len(out_large):
                continue
            if [len(s) for s in out_small] != [len(s) for s in out_large]:
                continue
            self.calls[key] = CallLayout(
                tuple(in_small),
                tuple(out_small),
                tuple(scaling_dim(a, b) for a, b in zip(in_small, in_large)),
                tuple(scaling_dim(a, b) for a, b in zip(out_small, out_large)),
            )
        return True

    def dims(
        self, name: str, index: int, inputs: list[Tensor], outputs: list[Tensor], batch_size: int
    ) -> tuple[list[SampleDim], list[SampleDim]] | None:
        """Sample dimensions of call ``index`` of module ``name`` on a batch of ``batch_size`` samples, or
        None if the probes did not see that call with tensors of the same ranks and sample dimensions."""
        known = self.calls.get((name, index))
        if known is None or len(known.inputs) != len(inputs) or len(known.outputs) != len(outputs):
            return None
        for tensors, shapes, dims in (
            (inputs, known.input_shapes, known.inputs),
            (outputs, known.output_shapes, known.outputs),
        ):
            for t, shape, dim in zip(tensors, shapes, dims):
                if not _fits(t, shape, dim, batch_size):
                    return None
        return list(known.inputs), list(known.outputs)


def _fits(t: Tensor, probe_shape: Shape, dim: SampleDim, batch_size: int) -> bool:
    """Whether ``t`` has the probed rank and, if it holds samples, ``batch_size`` of them in its sample
    dimension (other sizes, such as a sequence length padded per batch, may change)."""
    if t.dim() != len(probe_shape):
        return False
    return t.shape[dim] == batch_size if isinstance(dim, int) else True


def scaling_dim(small: Shape, large: Shape) -> SampleDim:
    """The sample dimension from the shapes of one tensor at the two probe sizes."""
    grows = [d for d, (a, b) in enumerate(zip(small, large)) if (a, b) == PROBE_SIZES]
    changed = [d for d, (a, b) in enumerate(zip(small, large)) if a != b]
    if not changed:
        return None
    if len(grows) == 1 and changed == grows:
        return grows[0]
    return MIXED


def _record_shapes(model: nn.Module, batch: Any, inputs: Callable | None, outputs: Callable | None):
    """One forward (with grad, as the real pass runs it: some layers take another path without) recording
    the tensor shapes of every module call; returns ``({(name, index): (input shapes, output shapes)}, rows)``."""
    recorded: dict[tuple[str, int], tuple[list[Shape], list[Shape]]] = {}
    counts: dict[str, int] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            index = counts.get(name, 0)
            counts[name] = index + 1
            with torch._C.DisableTorchFunction():  # bookkeeping, not the model's: hidden from fastdal/uses.py
                recorded[(name, index)] = (
                    [tuple(t.shape) for t in tensor_inputs(args, kwargs)],
                    [tuple(t.shape) for t in tensor_outputs(output)],
                )

        return hook

    with _hooks_on_every_module(model, hook_for), torch.enable_grad():
        args, kwargs = split_batch(batch, inputs)
        logits = read_logits(model(*args, **kwargs), outputs)
    return recorded, logits.shape[0]


@contextlib.contextmanager
def _hooks_on_every_module(model: nn.Module, hook_for: Callable[[str], Callable]) -> Iterator[None]:
    handles = []
    try:
        for name, module in model.named_modules():
            handles.append(module.register_forward_hook(hook_for(name), with_kwargs=True, prepend=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


# Closed forms that find a call's samples without a sample dimension in its inputs: nn.EmbeddingBag's bags are
# given by its offsets (a flat tensor of every sample's tokens has none).
_FINDS_ITS_SAMPLES = ("bag",)


def _check_samples_found(target: Target, call: Call, reason: str) -> None:
    """By sizes, a call whose output holds samples while none of its tensor inputs does would be read as if its
    inputs were shared by all samples, when they may hold every sample's values side by side (one flat tensor of
    all tokens): refused."""
    if target.kind in _FINDS_ITS_SAMPLES or not call.inputs:
        return
    if any(isinstance(d, int) for d in call.out_dims) and not any(isinstance(d, int) for d in call.in_dims):
        raise LayoutError(
            f"module {target.name or '<model>'!r} ({type(target.module).__name__}) returns a tensor that holds the "
            "samples, but none of its inputs has a dimension of the batch size: fastdal cannot tell which of their "
            f"values belong to which sample, and it could not find out by running smaller batches ({reason}). Use a "
            "loader whose batches hold the samples in dimension 0 (DataLoader's default collation), rearranging them "
            "for the model with inputs=, or cover that module with a closed form (layers=[...] without it)"
        )


def dims_from_sizes(t: Tensor, batch_size: int, feature_dims: int | None, module_name: str, reason: str) -> SampleDim:
    """Sample dimension of ``t`` when the batch could not be probed: the one dimension of the batch size
    before the ``feature_dims`` trailing ones (at least one dimension is left to hold samples; None:
    dimension 0 only). Several such dimensions: a :class:`LayoutError`."""
    if t.dim() == 0:
        return None
    last = 1 if feature_dims is None else max(t.dim() - feature_dims, 1)
    candidates = [d for d in range(last) if t.shape[d] == batch_size]
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    raise LayoutError(
        f"module {module_name or '<model>'!r} sees a tensor of shape {tuple(t.shape)} with {len(candidates)} "
        f"dimensions of the batch size {batch_size}, so fastdal cannot tell which one holds the samples, and it "
        f"could not find out by running smaller batches ({reason}). Use a loader whose batches hold the samples in "
        "dimension 0 (DataLoader's default collation) and rearrange them for the model with inputs=, or use a "
        "batch size that differs from the model's other sizes"
    )
