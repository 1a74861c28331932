"""The naive per-sample autograd loop: the ground truth of the tests and the baseline of the benchmarks.

Every sample goes through the model alone (a batch of one), its cross-entropy gradient is taken with
``torch.autograd.grad`` over the covered parameters and flattened, and ``||g||^2`` and ``<g, G>`` are
formed from it directly. Nothing is clever here on purpose. With ``dtype=torch.float64`` it runs on a
float64 copy of the model with floating-point inputs cast to float64; the model itself is not touched.

Batches are cut into samples as the loader collated them (:func:`fastdal.batches.take_samples`: along
dimension 0 of every tensor of the batch's leading size), and only then handed to ``inputs=``; a
sample that does not give exactly one logits row, or not its batch's own logits row, is an error. A batch on
which the model gives one logits row is one sample as it is (a flat tensor of one text's tokens with its
offsets). The reference is autograd on the model as it is: where a PyTorch backward is wrong, so is the
reference (the CPU backward of ``nn.EmbeddingBag`` with ``scale_grad_by_freq`` in torch 2.13 divides some rows
by another id's count, pytorch/pytorch#190063).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from .batches import (
    batch_labels,
    batch_length,
    check_finite,
    check_labels,
    check_loader,
    map_tensors,
    read_logits,
    split_batch,
    take_samples,
    to_device,
    with_progress,
)
from .capture import model_on_device, preserved_model_state, unwrapped
from .coverage import covered_parameters
from .grads import LabeledGrad, as_grad_dict
from .head import find_head
from .results import ScoreResult, accumulation_dtype, check_gamma


def _working_model(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    return model if dtype is None else copy.deepcopy(model).to(dtype)


def _cast_inputs(obj: Any, dtype: torch.dtype | None) -> Any:
    if dtype is None:
        return obj
    return map_tensors(lambda t: t.to(dtype) if t.is_floating_point() else t, obj)


def _samples(work: nn.Module, batch: Any, inputs, outputs) -> tuple[list[Any], Tensor | None]:
    """The samples of a collated batch, each as a batch of one, and the batch's own logits to check them by.

    A batch on which the model gives a single logits row is one sample as it is, whatever its tensors' leading
    sizes (one text as a flat tensor of tokens with its offsets); any other is cut along dimension 0 of every
    tensor of the batch's leading size."""
    length = batch_length(batch)
    if length is None:
        raise TypeError("the reference needs at least one tensor in each batch to cut it into samples")
    if length == 1:
        return [batch], None
    with torch.no_grad():
        args, kwargs = split_batch(batch, inputs)
        logits = read_logits(work(*args, **kwargs), outputs)
    if logits.shape[0] == 1:
        return [batch], None
    return [take_samples(batch, slice(i, i + 1), length) for i in range(length)], logits


def _check_cut(sample_logits: Tensor, batch_logits: Tensor | None, i: int, index: int) -> None:
    """A sample cut from its batch must give the batch's own logits row: else the cut did not find the samples
    (a flat tensor of every sample's tokens, say, is not cut along its tokens)."""
    if batch_logits is None or i >= batch_logits.shape[0]:
        return
    expected = batch_logits[i].to(sample_logits.dtype)
    scale = expected.abs().max().clamp_min(1e-12)
    if ((sample_logits.detach()[0] - expected).abs().max() > 1e-3 * scale).item():
        raise ValueError(
            f"the reference cut sample {index} from its batch along dimension 0, but the model gives it other logits "
            "than the batch's own row: the batch does not hold its samples along dimension 0 of its tensors. Pass the "
            "reference a loader whose every batch is one sample"
        )


def _sample_logits(work: nn.Module, sample: Any, inputs, outputs, index: int) -> Tensor:
    args, kwargs = split_batch(sample, inputs)
    logits = read_logits(work(*args, **kwargs), outputs)
    if logits.shape[0] != 1:
        raise ValueError(
            f"cut from its batch along dimension 0, sample {index} gave {logits.shape[0]} logits rows instead of one: "
            "the reference needs batches collated with the samples in dimension 0 (rearrange them with inputs=)"
        )
    return logits


def _flat_grad(loss: Tensor, params: list[nn.Parameter]) -> Tensor:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])


def score(
    model: nn.Module,
    pool_loader: Iterable,
    labeled_grad: LabeledGrad | Mapping[str, Tensor],
    *,
    gamma: float = 2.0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    inputs: Callable[[Any], Any] | None = None,
    outputs: Callable[[Any], Tensor] | None = None,
    return_components: bool = False,
) -> Tensor | ScoreResult:
    """Same contract as :func:`fastdal.score`, one sample at a time; ``dtype`` runs a converted copy."""
    gamma = check_gamma(gamma)
    check_loader(pool_loader, "pool_loader", pool=True)
    model = unwrapped(model)
    grads = as_grad_dict(labeled_grad, model)
    out_dtype = accumulation_dtype(dict(model.named_parameters())[n] for n in grads)
    work = _working_model(model, dtype)
    names = list(grads)
    sq_list: list[float] = []
    dot_list: list[float] = []
    pseudo_list: list[int] = []
    with model_on_device(work, device) as dev, preserved_model_state(work, []):
        params_by_name = dict(work.named_parameters())
        params = [params_by_name[n] for n in names]
        for p in params:
            p.requires_grad_(True)
        flat_g = torch.cat([grads[n].to(device=dev, dtype=params_by_name[n].dtype).reshape(-1) for n in names])
        for batch in with_progress(pool_loader, progress, "fastdal.reference.score"):
            samples, batch_logits = _samples(work, _cast_inputs(to_device(batch, dev), dtype), inputs, outputs)
            for i, sample in enumerate(samples):
                with torch.enable_grad():
                    logits = _sample_logits(work, sample, inputs, outputs, len(sq_list))
                    _check_cut(logits, batch_logits, i, len(sq_list))
                    check_finite(logits, len(sq_list), "pool")
                    pseudo = logits.argmax(dim=1)
                    loss = nn.functional.cross_entropy(logits, pseudo, reduction="sum")
                    g = _flat_grad(loss, params)
                sq_list.append(float(g.double() @ g.double()))
                dot_list.append(float(g.double() @ flat_g.double()))
                pseudo_list.append(int(pseudo[0]))
    sq = torch.tensor(sq_list, dtype=torch.float64)
    dot = torch.tensor(dot_list, dtype=torch.float64)
    pseudo = torch.tensor(pseudo_list, dtype=torch.long)
    result = ScoreResult((sq + gamma * dot).to(out_dtype), sq.to(out_dtype), dot.to(out_dtype), pseudo)
    return result if return_components else result.score


def labeled_grad(
    model: nn.Module,
    labeled_loader: Iterable,
    *,
    layers: str | list[str] = "last",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    inputs: Callable[[Any], Any] | None = None,
    labels: Callable[[Any], Tensor] | None = None,
    outputs: Callable[[Any], Tensor] | None = None,
) -> LabeledGrad:
    """Same contract as :func:`fastdal.labeled_grad`, summing one per-sample gradient at a time."""
    check_loader(labeled_loader, "labeled_loader", pool=False)
    work = _working_model(unwrapped(model), dtype)
    params_by_name = dict(work.named_parameters())
    total: dict[str, Tensor] | None = None
    request: Any = None
    count = 0
    with model_on_device(work, device) as dev, preserved_model_state(work, []):
        for batch in with_progress(labeled_loader, progress, "fastdal.reference.labeled_grad"):
            batch = _cast_inputs(to_device(batch, dev), dtype)
            if total is None:
                args, kwargs = split_batch(batch, inputs)
                names, request = covered_parameters(work, layers, partial(find_head, work, args, kwargs, outputs))
                for n in names:
                    params_by_name[n].requires_grad_(True)
                acc = accumulation_dtype(params_by_name[n] for n in names)
                total = {n: torch.zeros_like(params_by_name[n], dtype=acc) for n in names}
            samples, batch_logits = _samples(work, batch, inputs, outputs)
            for i, sample in enumerate(samples):
                with torch.enable_grad():
                    logits = _sample_logits(work, sample, inputs, outputs, count)
                    _check_cut(logits, batch_logits, i, count)
                    y = check_labels(batch_labels(sample, labels), 1, logits.shape[1], count)
                    loss = nn.functional.cross_entropy(logits, y, reduction="sum")
                    grads = torch.autograd.grad(loss, [params_by_name[n] for n in total], allow_unused=True)
                for n, g in zip(total, grads):
                    if g is not None:
                        total[n] += g.to_dense().to(total[n].dtype)
                count += 1
    if total is None:
        raise ValueError("labeled_loader yielded no batches: the labeled set must not be empty")
    return LabeledGrad(total, request, count)
