"""The naive per-sample autograd loop: the ground truth of the tests and the baseline of the benchmarks.

Every sample goes through the model alone (a batch of one), its cross-entropy gradient is taken with
``torch.autograd.grad`` over the covered parameters and flattened, and ``||g||^2`` and ``<g, G>`` are
formed from it directly. Nothing is clever here on purpose. With ``dtype=torch.float64`` it runs on a
float64 copy of the model with floating-point inputs cast to float64; the model itself is not touched.

Batches are split into samples along dimension 0 of every input tensor whose leading size is the
batch size (taken from the first input tensor).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from .api import ScoreResult, _check_gamma, accumulation_dtype, covered_parameters
from .batches import (
    batch_labels,
    check_finite,
    check_labels,
    check_loader,
    read_logits,
    split_batch,
    to_device,
    with_progress,
)
from .capture import model_on_device, preserved_model_state
from .grads import LabeledGrad, as_grad_dict
from .passes import find_head


def _working_model(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    return model if dtype is None else copy.deepcopy(model).to(dtype)


def _cast_inputs(obj: Any, dtype: torch.dtype | None) -> Any:
    if dtype is None:
        return obj
    return tree_map(lambda t: t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t, obj)


def _samples(args: tuple, kwargs: dict) -> Iterable[tuple[tuple, dict]]:
    """Split a batch's model arguments into batches of one sample each."""
    leaves = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
    if not leaves:
        raise TypeError("the reference needs at least one input tensor to split the batch into samples")
    n = leaves[0].shape[0]
    for i in range(n):
        yield tree_map(partial(_one_sample, i=i, n=n), (args, kwargs))


def _one_sample(t: Any, i: int, n: int) -> Any:
    return t[i : i + 1] if isinstance(t, Tensor) and t.dim() and t.shape[0] == n else t


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
    gamma = _check_gamma(gamma)
    check_loader(pool_loader, "pool_loader", pool=True)
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
            args, kwargs = _cast_inputs(to_device(split_batch(batch, inputs), dev), dtype)
            for sample_args, sample_kwargs in _samples(args, kwargs):
                with torch.enable_grad():
                    logits = read_logits(work(*sample_args, **sample_kwargs), outputs)
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
    work = _working_model(model, dtype)
    params_by_name = dict(work.named_parameters())
    total: dict[str, Tensor] | None = None
    request: Any = None
    count = 0
    with model_on_device(work, device) as dev, preserved_model_state(work, []):
        for batch in with_progress(labeled_loader, progress, "fastdal.reference.labeled_grad"):
            args, kwargs = _cast_inputs(to_device(split_batch(batch, inputs), dev), dtype)
            y = to_device(batch_labels(batch, labels), dev)
            if total is None:
                names, request = covered_parameters(work, layers, partial(find_head, work, args, kwargs, outputs))
                for n in names:
                    params_by_name[n].requires_grad_(True)
                acc = accumulation_dtype(params_by_name[n] for n in names)
                total = {n: torch.zeros_like(params_by_name[n], dtype=acc) for n in names}
            for i, (sample_args, sample_kwargs) in enumerate(_samples(args, kwargs)):
                with torch.enable_grad():
                    logits = read_logits(work(*sample_args, **sample_kwargs), outputs)
                    check_labels(y[i : i + 1], 1, logits.shape[1], count)
                    loss = nn.functional.cross_entropy(logits, y[i : i + 1], reduction="sum")
                    grads = torch.autograd.grad(loss, [params_by_name[n] for n in total], allow_unused=True)
                for n, g in zip(total, grads):
                    if g is not None:
                        total[n] += g.to_dense().to(total[n].dtype)
                count += 1
    if total is None:
        raise ValueError("labeled_loader yielded no batches: the labeled set must not be empty")
    return LabeledGrad(total, request, count)
