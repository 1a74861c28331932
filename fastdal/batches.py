"""Reading loaders: what a batch holds, where it goes, how it is cut into samples, and whether a pool
loader keeps pool order."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler
from torch.utils.data.sampler import BatchSampler

InputsFn = Callable[[Any], Any]


# Keys of a dict batch that hold the labels (Hugging Face's collators name them "labels"), never model inputs.
LABEL_KEYS = ("labels", "label")


def check_loader(loader: object, argument: str, *, pool: bool, sharded: bool = False) -> None:
    """Refuse what cannot be iterated as batches, and pool loaders that would reorder or drop samples.

    ``sharded``: the loader is one rank's shard over a process group, where a DistributedSampler says which
    global sample each position is (fastdal/distributed.py), so it may draw in any order.
    """
    if isinstance(loader, Tensor) or not isinstance(loader, Iterable):
        raise TypeError(
            f"{argument} must be an iterable of batches such as a torch.utils.data.DataLoader, got "
            f"{type(loader).__name__}; wrap tensors as DataLoader(TensorDataset(x), batch_size=...)"
        )
    if not pool or not isinstance(loader, DataLoader):
        return
    sampler = loader.batch_sampler.sampler if isinstance(loader.batch_sampler, BatchSampler) else loader.sampler
    if loader.batch_sampler is not None and not isinstance(loader.batch_sampler, BatchSampler):
        raise ValueError(
            f"{argument} uses a custom batch_sampler ({type(loader.batch_sampler).__name__}); scores are returned "
            "in iteration order, so the pool loader must visit samples in order: use batch_size with shuffle=False"
        )
    if sharded and isinstance(sampler, DistributedSampler):
        return
    if not isinstance(sampler, SequentialSampler) and not isinstance(loader.dataset, torch.utils.data.IterableDataset):
        raise ValueError(
            f"{argument} draws samples with {type(sampler).__name__}, so the scores would not line up with the "
            "pool; build the pool loader with shuffle=False (a SequentialSampler)"
        )
    if loader.drop_last:
        raise ValueError(f"{argument} has drop_last=True, which would leave pool samples unscored")


def pool_size(loader: object) -> int | None:
    """Number of samples a DataLoader over a sized dataset will yield, else None."""
    if isinstance(loader, DataLoader) and not isinstance(loader.dataset, torch.utils.data.IterableDataset):
        try:
            return len(loader.dataset)
        except TypeError:
            return None
    return None


def map_tensors(fn: Callable[[Tensor], Any], obj: Any) -> Any:
    """``obj`` with ``fn`` applied to every tensor in it (through mappings, tuples, named tuples and lists)."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        items = {k: map_tensors(fn, v) for k, v in obj.items()}
        try:
            return type(obj)(items)
        except TypeError:
            return items
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(map_tensors(fn, v) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(fn, v) for v in obj)
    return obj


def tensors_in(obj: Any) -> Iterator[Tensor]:
    """Every tensor in a batch, in the order :func:`take_samples` visits them."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from tensors_in(v)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from tensors_in(v)


def batch_length(batch: Any) -> int | None:
    """How many samples a collated batch holds, as DataLoader lays them out: the leading size of its
    first tensor of at least one dimension (None if it has none).

    Whether the samples really lie along that dimension is checked where it matters, by the model's
    number of logits rows (:func:`take_samples` and its callers).
    """
    for t in tensors_in(batch):
        if t.dim() >= 1:
            return int(t.shape[0])
    return None


def batch_device(batch: Any) -> torch.device | None:
    """The device of a batch's first tensor (None if it holds none)."""
    for t in tensors_in(batch):
        return t.device
    return None


def take_samples(batch: Any, rows: slice | Tensor, length: int) -> Any:
    """The samples ``rows`` of a collated batch of ``length`` samples, cut before ``inputs=`` is applied.

    Every tensor whose leading size is ``length`` is indexed along dimension 0 (where DataLoader's
    collation puts the samples); other tensors and values are shared by all samples and kept whole.
    """
    return map_tensors(lambda t: t[rows] if t.dim() >= 1 and t.shape[0] == length else t, batch)


def check_pool_count(loader: Iterable, scored: int) -> None:
    """One result per sample of a sized loader: any other count would misalign results and indices."""
    expected = pool_size(loader)
    if expected is not None and scored != expected:
        raise ValueError(
            f"the model returned {scored} logits rows over a loader of {expected} samples; fastdal needs one row per "
            "sample (does inputs= or the model move the samples out of the batch dimension of the logits?)"
        )


def split_batch(batch: Any, inputs: InputsFn | None) -> tuple[tuple, dict]:
    """Model arguments of a batch: ``inputs(batch)`` if given, else the batch or its first element.

    ``inputs`` may return a tensor (one argument), a tuple/list (positional arguments) or a dict
    (keyword arguments).
    """
    if inputs is not None:
        value = inputs(batch)
        if isinstance(value, dict):
            return (), value
        if isinstance(value, (tuple, list)):
            return tuple(value), {}
        return (value,), {}
    if isinstance(batch, Tensor):
        return (batch,), {}
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return (batch[0],), {}
    if isinstance(batch, Mapping):
        # A Hugging Face-style batch (input_ids, attention_mask, ...): keyword arguments. Its labels are
        # left out: given labels, such models also compute a loss, and a pool's labels are not to be read.
        kwargs = {k: v for k, v in batch.items() if k not in LABEL_KEYS}
        if kwargs:
            return (), kwargs
    raise TypeError(
        f"cannot read model inputs from a batch of type {_describe(batch)}: expected a tensor, a "
        "tuple/list whose first element is the input tensor, or a dict of keyword arguments; pass "
        "inputs=lambda batch: ... to map other batch structures to model arguments"
    )


def batch_labels(batch: Any, labels: Callable[[Any], Tensor] | None) -> Tensor:
    """True labels of a labeled batch: ``labels(batch)`` if given, else its second element."""
    if labels is not None:
        value = labels(batch)
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        value = batch[1]
    elif isinstance(batch, Mapping) and any(k in batch for k in LABEL_KEYS):
        value = batch[next(k for k in LABEL_KEYS if k in batch)]
    else:
        raise TypeError(
            f"cannot read labels from a labeled batch of type {_describe(batch)}: expected (inputs, labels) or a "
            f"dict with a key in {list(LABEL_KEYS)}; pass labels=lambda batch: ... to say where the labels are"
        )
    if not isinstance(value, Tensor):
        value = torch.as_tensor(value)
    return value


def check_label_layout(y: Tensor, batch_size: int, first_index: int) -> None:
    """Integer labels, one per sample of the batch (reads no value)."""
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise TypeError(f"labels must be integer class indices, got dtype {y.dtype} (at labeled index {first_index})")
    if y.shape != (batch_size,):
        raise ValueError(
            f"labels must have shape ({batch_size},) to match the batch, got {tuple(y.shape)} "
            f"(batch starting at labeled index {first_index})"
        )


def check_labels(y: Tensor, batch_size: int, num_classes: int, first_index: int) -> Tensor:
    """The labels as int64 class indices (what torch's losses take), after checking dtype, shape and range."""
    check_label_layout(y, batch_size, first_index)
    bad = (y < 0) | (y >= num_classes)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise label_error(int(y[i]), first_index + i, num_classes)
    return y.long()


def label_error(label: int, index: int, num_classes: int) -> ValueError:
    error = ValueError(
        f"label {label} at labeled index {index} is outside [0, {num_classes}) for a model with {num_classes} classes"
    )
    error.fastdal_sample = ("labeled", index)  # fastdal/distributed.py names its global index
    return error


def read_logits(output: Any, outputs: Callable[[Any], Tensor] | None) -> Tensor:
    """The (batch, classes) logits in a model's output."""
    if outputs is not None:
        output = outputs(output)
    elif not isinstance(output, Tensor):
        logits = getattr(output, "logits", None)
        if logits is None and isinstance(output, dict):
            logits = output.get("logits")
        if logits is None:
            raise TypeError(
                f"the model returned {_describe(output)}, not a logits tensor; pass outputs=lambda out: ... "
                "to say where the logits are"
            )
        output = logits
    if not isinstance(output, Tensor) or output.dim() != 2 or not output.is_floating_point():
        raise ValueError(
            f"the model's logits must be a floating-point tensor of shape (batch, classes), got {_describe(output)}"
        )
    return output


def all_finite(t: Tensor) -> bool:
    """Whether every element of ``t`` is finite.

    A sum is NaN or infinite whenever one of its terms is, so one reduction pass answers for the usual
    case; ``torch.isfinite`` makes several passes and allocates two tensors of ``t``'s size (on a
    10000 x 512 head's gradient it took 20x a sum). Only a non-finite sum, which finite terms of huge
    magnitude can also give, is checked element by element.
    """
    with torch.no_grad():
        return math.isfinite(t.sum().item()) or bool(torch.isfinite(t).all())


def check_finite(logits: Tensor, first_index: int, what: str) -> None:
    if all_finite(logits):
        return
    bad = ~torch.isfinite(logits).all(dim=1)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise not_finite_error(first_index + i, what, int(bad.sum()))


def not_finite_error(index: int, what: str, count: int) -> ValueError:
    error = ValueError(
        f"the model's logits for {what} index {index} are not finite (nan or inf); {count} sample(s) are affected"
    )
    error.fastdal_sample = (what, index)  # fastdal/distributed.py names its global index
    return error


def to_device(obj: Any, device: torch.device) -> Any:
    """Every tensor of ``obj`` on ``device``.

    Only a copy from the host to a device is asynchronous (``non_blocking``): it overlaps the device's work and
    the stream orders it before any use. A copy to the host stays blocking: into pinned memory an asynchronous
    one returns before the data has arrived, and the host would read an unfinished batch.
    """
    target = torch.device(device)

    def move(t: Tensor) -> Tensor:
        return t.to(target, non_blocking=t.device.type == "cpu" and target.type != "cpu")

    return map_tensors(move, obj)


def with_progress(loader: Iterable, progress: bool | None, desc: str) -> Iterator:
    """Iterate ``loader``, with a tqdm bar if ``progress`` (default: only when stderr is a terminal)."""
    show = sys.stderr.isatty() if progress is None else bool(progress)
    if not show:
        yield from loader
        return
    from tqdm.auto import tqdm

    total = len(loader) if hasattr(loader, "__len__") else None
    with tqdm(loader, total=total, desc=desc, unit="batch", leave=False) as bar:
        yield from bar


def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"Tensor(shape={tuple(x.shape)}, dtype={x.dtype})"
    if isinstance(x, dict):
        return f"dict with keys {list(x)[:6]}"
    if isinstance(x, (tuple, list)):
        return f"{type(x).__name__} of {len(x)} ({', '.join(type(v).__name__ for v in x[:4])})"
    return type(x).__name__
