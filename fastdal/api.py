"""Public API: iterate the loaders, run each batch through a pass, assemble results in pool order."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from . import backends, distributed, reference, selection
from .allocator import release_free_memory
from .batches import (
    batch_labels,
    batch_length,
    check_loader,
    check_pool_count,
    pool_size,
    split_batch,
    take_samples,
    to_device,
    with_progress,
)
from .capture import Plan, Target, model_on_device, preserved_model_state
from .checks import PassChecks
from .columns import Columns
from .coverage import Layers, covered_parameters
from .features import GradFeatures
from .grads import LabeledGrad, as_grad_dict
from .head import find_head
from .ops import last_layer_labeled_grad
from .passes import (
    BackwardPass,
    LastLayerPass,
    check_batchnorm_statistics,
    head_input_and_logits,
    labeled_batch_grads,
)
from .results import ScoreResult, accumulation_dtype, check_gamma, results_on_host


def score(
    model: nn.Module,
    pool_loader: Iterable,
    labeled_grad: LabeledGrad | Mapping[str, Tensor],
    *,
    gamma: float = 2.0,
    backend: str = "auto",
    device: torch.device | str | None = None,
    progress: bool | None = None,
    return_components: bool = False,
    inputs: Callable[[Any], Any] | None = None,
    outputs: Callable[[Any], Tensor] | None = None,
    group: Any = None,
    indices: Sequence[int] | Tensor | None = None,
) -> Tensor | ScoreResult:
    """Dynamic-AL score ``||g_u||^2 + gamma <g_u, G>`` of every pool sample, in pool order.

    ``g_u`` is the cross-entropy gradient of sample ``u`` at its predicted label, over the parameters
    that ``labeled_grad`` covers; the model runs in eval mode and comes back exactly as it was.

    Args:
        model: a classifier returning logits of shape (batch, classes).
        pool_loader: batches of pool samples, in a fixed order (a DataLoader with shuffle=False).
        labeled_grad: from :func:`labeled_grad`, or a dict of parameter name to tensor.
        gamma: weight of the inner-product term (the paper uses 2).
        backend: "auto", "torch", "cpp", "cuda", "triton" or "reference" (fastdal.backends.available()
            says which can run here); "auto" defers to the ``FASTDAL_BACKEND`` environment variable.
        device: where to compute; default: the model's device.
        progress: show a progress bar; default: only when stderr is a terminal.
        return_components: return a :class:`ScoreResult` instead of the scores alone.
        inputs: maps a batch to model arguments (tensor, tuple or dict of keyword arguments).
        outputs: maps the model's output to its logits.
        group: a torch.distributed process group to score across (default: the default group, when one is
            initialized with more than one rank); each rank passes the loader over its own shard. ``False``:
            this process alone on its own loader, with no collective, even under an initialized default group
            (a rank-local call under torchrun).
        indices: over a process group, the global pool indices of this rank's samples in loader order
            (default: those of its DistributedSampler, else shards consecutive in rank order); all ranks'
            together must hold 0..N-1 exactly once, or every rank raises a ValueError naming the index and ranks.

    Returns:
        ``(N,)`` scores on the CPU, float64 for a float64 model and float32 otherwise; over a process group,
        the whole pool's, in global order, on every rank (fastdal/distributed.py).
    """
    group = distributed.active_group(group)
    local = partial(
        _score_here, model, pool_loader, labeled_grad, gamma, backend, device, progress, inputs, outputs, group
    )
    if group is None:
        _check_no_indices(indices)
        result = local()
    else:
        result = _gathered_scores(*_scored_shard(local, pool_loader, group, indices))
    return result if return_components else result.score


def _check_no_indices(indices: object) -> None:
    if indices is not None:
        raise ValueError(
            "indices= gives a rank's shard of the pool; it needs a process group (group= or torchrun, not group=False)"
        )


def _scored_shard(local: Callable[[], ScoreResult], pool_loader: Iterable, group: Any, indices: Any):
    """This rank's scores, its Shard, the global indices of its samples, which to keep, and the pool size N."""
    shard = distributed.run_on_all(lambda: distributed.Shard(pool_loader, group, indices, "pool_loader"), group)
    result = distributed.run_on_all(local, group, shard.local_to_global)
    counts = distributed.gather_objects(result.score.shape[0], group)
    index, keep, n = distributed.run_on_all(lambda: shard.resolve(result.score.shape[0], counts), group)
    return result, shard, index, keep, n


def _gathered_scores(result: ScoreResult, shard: distributed.Shard, index: Tensor, keep: Tensor, n: int) -> ScoreResult:
    """Every rank's kept scores, placed at their global indices, on every rank."""
    mine = (index[keep], result.sq_norm[keep], result.dot[keep], result.pseudo_label[keep], result.score[keep])
    parts = distributed.gather_objects(mine, shard.group)
    distributed.check_partition([p[0] for p in parts], n)
    fields = []
    for k in range(1, 5):
        out = torch.empty(n, dtype=parts[0][k].dtype)
        for part in parts:
            out[part[0]] = part[k]
        fields.append(out)
    sq, dot, pseudo, total = fields
    return ScoreResult(total, sq, dot, pseudo)


def _score_here(
    model: nn.Module,
    pool_loader: Iterable,
    labeled_grad: LabeledGrad | Mapping[str, Tensor],
    gamma: float,
    backend: str,
    device: torch.device | str | None,
    progress: bool | None,
    inputs: Callable[[Any], Any] | None,
    outputs: Callable[[Any], Tensor] | None,
    group: Any,
) -> ScoreResult:
    """The scores of the samples ``pool_loader`` yields here (this rank's shard over a process group)."""
    gamma = check_gamma(gamma)
    backend = backends.requested(backend)
    backends.check_runs_here(backend)
    check_loader(pool_loader, "pool_loader", pool=True, sharded=group is not None)
    model = distributed.scored_module(model)
    grads = as_grad_dict(labeled_grad, model)
    check_batchnorm_statistics(model)
    params = dict(model.named_parameters())
    dtype = accumulation_dtype(params[n] for n in grads)
    if backend == backends.REFERENCE:
        result = reference.score(
            model,
            pool_loader,
            grads,
            gamma=gamma,
            dtype=torch.float64,
            device=device,
            progress=progress,
            inputs=inputs,
            outputs=outputs,
            return_components=True,
        )
        return ScoreResult(*(t.to(dtype) for t in result[:3]), result.pseudo_label)

    columns = Columns(pool_size(pool_loader) if group is None else None)  # all that outlives a batch
    covered = [params[n] for n in grads]
    checks = PassChecks()
    with model_on_device(model, device) as dev, preserved_model_state(model, covered):
        local = {n: g.to(device=dev, dtype=dtype) for n, g in grads.items()}
        head = _single_linear(model, list(local))
        last = LastLayerPass(model, head, local, backend, checks) if head is not None else None
        full: BackwardPass | None = None
        for batch in with_progress(pool_loader, progress, "fastdal.score"):
            batch = to_device(batch, dev)
            terms = last(batch, inputs, outputs, columns.count) if last is not None else None
            if terms is None:
                # Something follows the head (or there is no single head): use the backward pass
                # from here on.
                last = None
                full = full or BackwardPass(model, local, dtype, backend, checks)
                terms = full(batch, inputs, outputs, columns.count)
            columns.append(terms.sq_norm, terms.dot, terms.pseudo_label)
        checks.finish()
    if group is None:
        check_pool_count(pool_loader, columns.count)
    found = columns.finish()
    release_free_memory()
    if found is not None:
        sq, dot, pseudo = results_on_host(found)
    else:
        sq = torch.zeros(0, dtype=dtype)
        dot = torch.zeros(0, dtype=dtype)
        pseudo = torch.zeros(0, dtype=torch.long)
    return ScoreResult(sq + gamma * dot, sq, dot, pseudo)


def labeled_grad(
    model: nn.Module,
    labeled_loader: Iterable,
    *,
    layers: Layers = "last",
    device: torch.device | str | None = None,
    progress: bool | None = None,
    inputs: Callable[[Any], Any] | None = None,
    labels: Callable[[Any], Tensor] | None = None,
    outputs: Callable[[Any], Tensor] | None = None,
    group: Any = None,
) -> LabeledGrad:
    """``G``: the sum over the labeled set of per-sample cross-entropy gradients at the true labels.

    One batched backward per batch, model in eval mode; the model comes back exactly as it was.

    Args:
        model: a classifier returning logits of shape (batch, classes).
        labeled_loader: batches of (inputs, labels), or anything ``inputs``/``labels`` can read.
        layers: "last" (the final nn.Linear), "all" (every trainable parameter) or module names.
        device, progress, inputs, outputs: as in :func:`score`.
        labels: maps a batch to its integer labels (default: the batch's second element).
        group: a torch.distributed process group (default: the default group, when one is initialized with
            more than one rank): each rank passes its own shard of the labeled set, any of which may be
            empty, and every rank gets the sum over all of them. A shard drawn by a ``DistributedSampler``
            has the padding the sampler adds left out (each labeled sample counts once); a
            ``DistributedSampler(drop_last=True)``, which leaves labeled samples out, is refused. ``False``:
            this process alone on its own loader, with no collective, even under an initialized default group.
    """
    group = distributed.active_group(group)
    here = partial(_labeled_grad_here, model, labeled_loader, layers, device, progress, inputs, labels, outputs)
    if group is None:
        found = here()
        if found is None:
            raise ValueError("labeled_loader yielded no batches: the labeled set must not be empty")
        return LabeledGrad(*found)
    found = distributed.run_on_all(
        lambda: here(distributed.labeled_shard(labeled_loader, group)),
        group,
        distributed.sampler_global_index(labeled_loader),
    )
    shapes = None if found is None else {n: (g.shape, g.dtype) for n, g in found[0].items()}
    plan = distributed.sampler_plan(distributed.distributed_sampler(labeled_loader))  # it was read without error
    metas = distributed.gather_objects(
        (shapes, None if found is None else found[1], 0 if found is None else found[2], plan), group
    )
    problem = distributed.samplers_disagree([m[3] for m in metas], len(metas))
    if problem is not None:
        raise ValueError(f"labeled_loader: the ranks' DistributedSamplers do not split one labeled set: {problem}")
    given = [m for m in metas if m[0] is not None]
    if not given:
        raise ValueError("no rank's labeled_loader yielded a batch: the labeled set must not be empty")
    if any(m[0].keys() != given[0][0].keys() for m in given):
        raise ValueError("the ranks' labeled gradients cover different parameters: pass the same model and layers=")
    shapes, request = given[0][0], given[0][1]
    if found is None:  # an empty shard adds zeros
        total = {n: torch.zeros(shape, dtype=dtype) for n, (shape, dtype) in shapes.items()}
    else:
        total = found[0]
    distributed.all_reduce_sum(iter(total.values()), group)
    return LabeledGrad(total, request, sum(m[2] for m in metas))


def _labeled_grad_here(
    model: nn.Module,
    labeled_loader: Iterable,
    layers: Layers,
    device: torch.device | str | None,
    progress: bool | None,
    inputs: Callable[[Any], Any] | None,
    labels: Callable[[Any], Tensor] | None,
    outputs: Callable[[Any], Tensor] | None,
    shard: tuple[int, int] | None = None,
) -> tuple[dict[str, Tensor], Any, int] | None:
    """(sums, what layers= asked for, count) over the batches of ``labeled_loader`` here; None without batches.

    ``shard``: (real, drawn) for a loader drawing with a DistributedSampler (:func:`distributed.labeled_shard`): of
    the ``drawn`` samples, those past the first ``real`` are the sampler's padding, cut from their batch before
    the model sees them (in eval mode samples do not interact, so the others' gradients are unchanged).
    """
    check_loader(labeled_loader, "labeled_loader", pool=False)
    model = distributed.scored_module(model)
    check_batchnorm_statistics(model)
    params = dict(model.named_parameters())
    total: dict[str, Tensor] | None = None
    request: Any = None
    count = 0
    drawn = 0  # samples the loader yielded, padding included
    checks = PassChecks()
    with model_on_device(model, device) as dev, preserved_model_state(model):
        for batch in with_progress(labeled_loader, progress, "fastdal.labeled_grad"):
            if shard is not None:
                batch, drawn = _without_padding(batch, drawn, shard[0])
                if batch is None:
                    continue
            batch = to_device(batch, dev)
            args, kwargs = split_batch(batch, inputs)
            y = to_device(batch_labels(batch, labels), dev)
            if total is None:
                names, request = covered_parameters(model, layers, partial(find_head, model, args, kwargs, outputs))
                _check_embeddings(model, names)
                for n in names:  # frozen parameters named explicitly still get their gradient
                    params[n].requires_grad_(True)
                dtype = accumulation_dtype(params[n] for n in names)
                total = {n: torch.zeros_like(params[n], dtype=dtype) for n in names}
                head = _single_linear(model, names)
            grads = _closed_form_labeled(model, head, args, kwargs, y, outputs, count, dtype, checks) if head else None
            if grads is None:
                head = None  # something follows the head: one batched backward per batch from here on
                grads = labeled_batch_grads(model, list(total), args, kwargs, y, outputs, count, checks)
            for n, g in grads.items():
                total[n] += g.to(total[n].dtype)
            count += y.shape[0]
        checks.finish()
    if shard is not None and drawn != shard[1]:
        raise ValueError(
            f"labeled_loader yielded {drawn} samples but its DistributedSampler draws {shard[1]}; fastdal tells the "
            "sampler's padding by its position (a DataLoader with drop_last=True also leaves labeled samples out)"
        )
    return None if total is None else (total, request, count)


def _without_padding(batch: Any, drawn: int, real: int) -> tuple[Any, int]:
    """(the batch without a DistributedSampler's padding, or None if it holds only padding; samples drawn after it).

    ``drawn``: samples drawn before this batch; the first ``real`` drawn are real, the rest padding.
    """
    length = batch_length(batch)
    if length is None:
        raise ValueError(
            "labeled_loader yielded a batch without a tensor of samples; with a DistributedSampler fastdal cuts the "
            "padding it adds from the batches as DataLoader collates them (samples along dimension 0)"
        )
    keep = min(length, max(real - drawn, 0))
    if keep == 0:
        return None, drawn + length
    return (batch if keep == length else take_samples(batch, slice(0, keep), length)), drawn + length


def _single_linear(model: nn.Module, names: list[str]) -> Target | None:
    """The target, if the named parameters all belong to one closed-form ``nn.Linear``."""
    targets = list(Plan(model, names).targets.values())
    return targets[0] if len(targets) == 1 and targets[0].kind == "linear" else None


def _closed_form_labeled(
    model: nn.Module,
    head: Target,
    args: tuple,
    kwargs: dict,
    y: Tensor,
    outputs: Callable[[Any], Tensor] | None,
    first_index: int,
    dtype: torch.dtype,
    checks: PassChecks,
) -> dict[str, Tensor] | None:
    """Summed head gradient of a labeled batch in closed form, or None if the closed form does not apply."""
    found = head_input_and_logits(model, head, args, kwargs, outputs)
    if found is None:
        return None
    h, logits = found
    y = checks.labels(y, logits.shape[0], logits.shape[1], first_index)
    checks.logits(logits, first_index, "labeled")
    weight, bias = last_layer_labeled_grad(h, logits, y, dtype)
    by_local = {"weight": weight, "bias": bias}
    return {full: by_local[local] for local, full in head.params.items()}


def _check_embeddings(model: nn.Module, names: list[str]) -> None:
    for module_name, m in model.named_modules():
        tables = (nn.Embedding, nn.EmbeddingBag)
        if isinstance(m, tables) and m.scale_grad_by_freq and f"{module_name}.weight".lstrip(".") in names:
            raise ValueError(
                f"{type(m).__name__} {module_name!r} has scale_grad_by_freq=True: its batched gradient is scaled by "
                "counts over the whole batch, so it is not the sum of per-sample gradients"
            )


def select(
    scores: Tensor | ScoreResult | Any,
    b: int,
    *,
    method: str = "topk",
    labeled_grad: LabeledGrad | Mapping[str, Tensor] | None = None,
    gamma: float = 2.0,
    seed: int = 0,
    block_size: int = 1,
    backend: str = "auto",
) -> Tensor:
    """Indices of the ``b`` pool samples to query.

    Args:
        scores: per-sample scores (a tensor or a :class:`ScoreResult`) for "topk", or a
            :class:`fastdal.GradFeatures` of the pool for any method.
        b: how many to choose.
        method: "topk" (the paper's query: highest scores first, ties to the lower index), "badge"
            (k-means++ seeding over the gradient features) or "greedy" (the paper's subset objective,
            maximized exactly one sample, or ``block_size`` samples, at a time).
        labeled_grad: ``G``, needed with features for "topk" (scores ``sq_norm + gamma dot``) and "greedy".
        gamma: weight of the inner-product term when "topk" scores features.
        seed: random draws of "badge".
        block_size: samples per update of "greedy".
        backend: op backend for "badge"'s distance updates.

    Raises:
        ValueError: if ``b`` is not in ``[0, pool size]``, a score is NaN, or the method lacks an input.
    """
    if method not in ("topk", "badge", "greedy"):
        raise ValueError(f"method must be 'topk', 'badge' or 'greedy', got {method!r}")
    if isinstance(scores, GradFeatures):
        features = scores
        if method == "badge":
            return selection.badge(features, b, seed=seed, backend=backend)
        if labeled_grad is None:
            raise ValueError(f"method={method!r} on GradFeatures needs labeled_grad= (G)")
        if method == "greedy":
            return selection.greedy(features, labeled_grad, b, block_size=block_size).indices
        scores = features.score(labeled_grad, check_gamma(gamma)).cpu()
    elif method != "topk":
        raise ValueError(f"method={method!r} needs the pool's fastdal.GradFeatures (fastdal.features), not scores")
    if isinstance(scores, ScoreResult):
        scores = scores.score
    scores = torch.as_tensor(scores)
    if scores.dim() != 1:
        raise ValueError(f"scores must be one-dimensional, got shape {tuple(scores.shape)}")
    b = selection.check_budget(b, scores.shape[0])
    if scores.is_floating_point() and torch.isnan(scores).any():
        raise ValueError(f"scores contain NaN at index {int(torch.isnan(scores).nonzero()[0, 0])}")
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:b]


def query(
    model: nn.Module,
    pool_loader: Iterable,
    labeled_loader: Iterable,
    b: int,
    *,
    layers: Layers = "last",
    gamma: float = 2.0,
    backend: str = "auto",
    device: torch.device | str | None = None,
    progress: bool | None = None,
    inputs: Callable[[Any], Any] | None = None,
    labels: Callable[[Any], Tensor] | None = None,
    outputs: Callable[[Any], Tensor] | None = None,
    group: Any = None,
    indices: Sequence[int] | Tensor | None = None,
) -> Tensor:
    """The paper's query: :func:`labeled_grad`, then :func:`score`, then the top-``b`` pool indices.

    Over a process group (``group``, ``indices``: as in :func:`score`; ``labeled_loader`` is this rank's
    shard of the labeled set, as in :func:`labeled_grad`), every rank returns the same global indices, and
    only each rank's top ``b`` candidates cross the network (fastdal/distributed.py), besides ``indices=``,
    all-gathered once to check that the ranks' shards partition the pool (a ValueError naming the index held
    twice or by no rank, and the ranks). ``group=False``: this process alone, with no collective.
    """
    check_gamma(gamma)
    backends.check_runs_here(backends.requested(backend))
    group = distributed.active_group(group)
    common = dict(device=device, progress=progress, inputs=inputs, outputs=outputs)
    if group is None:
        _check_no_indices(indices)
        check_loader(pool_loader, "pool_loader", pool=True)
        size = pool_size(pool_loader)
        if size is not None:
            select(torch.zeros(size), b)  # checks b against the pool size before any work is done
        # group=False, not None: under an initialized default group, None would mean that group again.
        grad = labeled_grad(model, labeled_loader, layers=layers, labels=labels, group=False, **common)
        return select(score(model, pool_loader, grad, gamma=gamma, backend=backend, group=False, **common), b)
    grad = labeled_grad(model, labeled_loader, layers=layers, labels=labels, group=group, **common)
    local = partial(_score_here, model, pool_loader, grad, gamma, backend, device, progress, inputs, outputs, group)
    result, shard, index, keep, n = _scored_shard(local, pool_loader, group, indices)
    distributed.check_shards(shard, index[keep], n)

    def candidates() -> tuple[Tensor, Tensor]:
        select(torch.zeros(n), b)  # b against the whole pool
        scores, where = result.score[keep], index[keep]
        nan = torch.isnan(scores)
        if nan.any():
            raise ValueError(f"scores contain NaN at global pool index {int(where[nan][0])}")
        return distributed.top(scores, where, b)

    parts = distributed.gather_objects(distributed.run_on_all(candidates, group), group)
    return distributed.merge_top(parts, b)
