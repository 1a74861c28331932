"""``fastdal.features``: compact per-sample gradient features, exact for the last layer, projected elsewhere.

A :class:`GradFeatures` holds, for every sample of a loader, blocks from which inner products of
per-sample gradients follow without the gradients ever existing (DESIGN.md, "Low-rank features"):

* the model's head (the ``nn.Linear`` whose output is the logits), **exact and factored**: the
  gradient at label ``y`` is ``e (x) [h, 1]`` with ``e = softmax(z) - onehot(y)``, so
  ``<g_i, g_j> = (e_i . e_j)(h_i . h_j + 1)`` (no ``+ 1`` when the bias is not covered);
* every other covered ``nn.Linear``/``nn.Conv*`` weight, **projected**: the ``r x r`` matrix
  ``sum_t (P_out delta_t)(P_in a_t)^T = P_out g P_in^T`` (op ``kron_project``), with seeded Gaussian
  ``P`` of variance ``1/r`` so that inner products of projections are unbiased estimates of the true
  ones; a bias becomes ``P_out g_b``. Other parameters (norm layers, embeddings, modules without a
  closed form) have their per-sample gradient flattened and projected by one seeded matrix. A
  dimension no larger than the rank is kept as it is (``P`` is the identity there: exact).

Projections depend only on ``seed`` and the parameter's name, drawn on the CPU in float64, so the
same seed gives the same projection on every machine, device and backend.
"""

from __future__ import annotations

import numbers
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from . import attention, backends, bags, distributed, generic, layers, ops, precision, recurrent, use_forms
from .batches import batch_labels, check_loader, check_pool_count, split_batch, to_device, with_progress
from .capture import USES, Call, Target, model_on_device, preserved_model_state
from .coverage import covered_parameters
from .grads import LabeledGrad
from .head import find_head, logits_head
from .passes import BackwardPass, check_batchnorm_statistics
from .results import accumulation_dtype, as_real_number
from .torch_ops import chunks


def projection(seed: int, name: str, rows: int, cols: int) -> Tensor | None:
    """The seeded ``(rows, cols)`` Gaussian projection of variance ``1/rows`` (float64, CPU), or None
    for the identity when ``rows >= cols``."""
    if rows >= cols:
        return None
    generator = torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (1 << 63))
    return torch.randn(rows, cols, generator=generator, dtype=torch.float64) / rows**0.5


@precision.follows_mode
def _apply(p: Tensor | None, x: Tensor) -> Tensor:
    """``x @ p^T`` over the last dimension (the identity for ``p=None``)."""
    return x if p is None else x @ p.to(x).T


def _sq_rows(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x, dim=1).square()


@dataclass
class FactoredBlock:
    """The head's exact gradient ``left_i (x) [right_i, sqrt(offset)]`` per sample."""

    weight: str | None  # full parameter names, None when not covered
    bias: str | None
    left: Tensor  # (N, K): e
    right: Tensor  # (N, D): h, or (N, 0) when the weight is not covered

    @property
    def offset(self) -> float:
        return 1.0 if self.bias is not None else 0.0

    def sq_norm(self) -> Tensor:
        # vector_norm reduces without an N x K temporary.
        return _sq_rows(self.left) * (_sq_rows(self.right) + self.offset)

    @precision.follows_mode
    def inner(self, rows: Tensor | slice, other: Tensor | slice) -> Tensor:
        return (self.left[rows] @ self.left[other].T) * (self.right[rows] @ self.right[other].T + self.offset)

    @precision.follows_mode
    def dot(self, grads: Mapping[str, Tensor]) -> Tensor:
        # e . (G_W h + G_b) as (e G_W) . h + e . G_b: temporaries of N x D, never N x K.
        result = self.left.new_zeros(self.left.shape[0])
        if self.weight is not None:
            result += ((self.left @ grads[self.weight].to(self.left)) * self.right).sum(1)
        if self.bias is not None:
            result += self.left @ grads[self.bias].to(self.left)
        return result

    def take(self, rows: Tensor | slice) -> FactoredBlock:
        return replace(self, left=self.left[rows], right=self.right[rows])

    def to(self, *args, **kwargs) -> FactoredBlock:
        return replace(self, left=self.left.to(*args, **kwargs), right=self.right.to(*args, **kwargs))


@dataclass
class ProjectedBlock:
    """Projected per-sample gradients of some parameters, one flat row per sample.

    ``project`` maps the parameters' full gradients (name -> tensor) to the same flat space, so that
    a labeled-set gradient is compared with the features in it.
    """

    names: list[str]
    values: Tensor  # (N, m)
    project: Callable[[Mapping[str, Tensor]], Tensor] = field(repr=False)

    def sq_norm(self) -> Tensor:
        return _sq_rows(self.values)

    @precision.follows_mode
    def inner(self, rows: Tensor | slice, other: Tensor | slice) -> Tensor:
        return self.values[rows] @ self.values[other].T

    @precision.follows_mode
    def dot(self, grads: Mapping[str, Tensor]) -> Tensor:
        return self.values @ self.project(grads).to(self.values)

    def take(self, rows: Tensor | slice) -> ProjectedBlock:
        return replace(self, values=self.values[rows])

    def to(self, *args, **kwargs) -> ProjectedBlock:
        return replace(self, values=self.values.to(*args, **kwargs))


Block = FactoredBlock | ProjectedBlock


class GradFeatures:
    """Per-sample gradient features of a set of samples (see the module docstring).

    Attributes:
        blocks: the factored head block (if covered) and the projected blocks.
        labels: (N,) the labels the gradients are taken at (pseudo labels for a pool).
        names: the parameter names covered, as a LabeledGrad for the same ``layers`` covers them.
        rank, seed: the projection rank (None: last layer only, exact) and seed.
    """

    def __init__(self, blocks: list[Block], labels: Tensor, names: list[str], rank: int | None, seed: int):
        self.blocks, self.labels, self.names, self.rank, self.seed = blocks, labels, names, rank, seed

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __repr__(self) -> str:
        return (
            f"GradFeatures(samples={len(self)}, rank={self.rank}, blocks={len(self.blocks)}, "
            f"floats_per_sample={self.floats_per_sample})"
        )

    @property
    def exact(self) -> bool:
        """Whether every block is exact (no random projection was applied)."""
        return self.rank is None

    @property
    def floats_per_sample(self) -> int:
        return sum(
            b.left.shape[1] + b.right.shape[1] if isinstance(b, FactoredBlock) else b.values.shape[1]
            for b in self.blocks
        )

    def __getitem__(self, rows: Tensor | slice | Sequence[int]) -> GradFeatures:
        """The features of a subset of the samples, in the order given."""
        if not isinstance(rows, slice):
            rows = torch.as_tensor(rows, dtype=torch.long, device=self.labels.device)
        return GradFeatures([b.take(rows) for b in self.blocks], self.labels[rows], self.names, self.rank, self.seed)

    def to(self, *args, **kwargs) -> GradFeatures:
        """A copy with every tensor moved like ``Tensor.to`` (labels keep their integer dtype)."""
        blocks = [b.to(*args, **kwargs) for b in self.blocks]
        first = blocks[0].left if isinstance(blocks[0], FactoredBlock) else blocks[0].values
        return GradFeatures(blocks, self.labels.to(first.device), self.names, self.rank, self.seed)

    def sq_norm(self) -> Tensor:
        """``||g_i||^2`` of every sample, (N,)."""
        return sum(b.sq_norm() for b in self.blocks)

    def gram(self, rows: Tensor | slice = slice(None), other: Tensor | slice | None = None) -> Tensor:
        """Inner products ``<g_i, g_j>`` for ``i`` in ``rows`` and ``j`` in ``other`` (default: ``rows``)."""
        other = rows if other is None else other
        return sum(b.inner(rows, other) for b in self.blocks)

    def inner(self, index: int) -> Tensor:
        """``<g_i, g_index>`` for every sample ``i``, (N,)."""
        return self.gram(slice(None), slice(index, index + 1))[:, 0]

    def dot(self, labeled_grad: LabeledGrad | Mapping[str, Tensor]) -> Tensor:
        """``<g_i, G>`` of every sample with a labeled-set gradient projected the same way, (N,)."""
        grads = _grads_for(labeled_grad, self.names)
        return sum(b.dot(grads) for b in self.blocks)

    def score(self, labeled_grad: LabeledGrad | Mapping[str, Tensor], gamma: float = 2.0) -> Tensor:
        """The dynamic-AL score ``||g_i||^2 + gamma <g_i, G>`` from the features (approximate when projected)."""
        return self.sq_norm() + gamma * self.dot(labeled_grad)


def _grads_for(labeled_grad: LabeledGrad | Mapping[str, Tensor], names: list[str]) -> dict[str, Tensor]:
    grads = labeled_grad.grads if isinstance(labeled_grad, LabeledGrad) else labeled_grad
    if not isinstance(grads, Mapping):
        raise TypeError(
            "labeled_grad must be a fastdal.LabeledGrad or a dict of parameter name to tensor, "
            f"got {type(labeled_grad).__name__}"
        )
    missing = [n for n in names if n not in grads]
    extra = [n for n in grads if n not in names]
    if missing or extra:
        raise ValueError(
            "labeled_grad must cover exactly the parameters of the features "
            f"(missing: {missing[:5]}, not in the features: {extra[:5]}); compute both with the same layers="
        )
    return dict(grads)


# --------------------------------------------------------------------------------------------------
# Building the features
# --------------------------------------------------------------------------------------------------


def features(
    model: nn.Module,
    loader: Iterable,
    *,
    layers: str | Sequence[str] = "last",
    rank: int | None = None,
    seed: int = 0,
    labeled: bool = False,
    backend: str = "auto",
    device: torch.device | str | None = None,
    progress: bool | None = None,
    inputs: Callable[[Any], Any] | None = None,
    labels: Callable[[Any], Tensor] | None = None,
    outputs: Callable[[Any], Tensor] | None = None,
    group: Any = None,
    indices: Sequence[int] | Tensor | None = None,
) -> GradFeatures:
    """Per-sample gradient features of every sample of ``loader``, in loader order.

    Args:
        model: a classifier returning logits (batch, classes); it comes back exactly as it was.
        loader: batches in a fixed order; with ``labeled=True``, batches of (inputs, labels).
        layers: "last" (the head, exact), "all" or module names (the head exact, the rest projected).
        rank: projection rank ``r`` for the parameters other than the head; required when those exist.
        seed: seed of the projections.
        labeled: take gradients at the true labels (read like :func:`fastdal.labeled_grad` does)
            instead of the pseudo labels.
        backend, device, progress, inputs, labels, outputs: as in :func:`fastdal.score`.

    Returns:
        A :class:`GradFeatures` on the compute device, float64 for a float64 model, float32 otherwise.

    Over a process group (``group``, or a default group of more than one rank; ``indices`` as in
    :func:`fastdal.score`), each rank passes its own shard of the loader and every rank gets the features of
    the whole set in global order (all-gathered: ``floats_per_sample`` floats a sample on each rank), so
    BADGE and greedy selection pick the same samples on every rank as in one process. Every shard must
    hold at least one sample (the projections' parameters are read from the local result).
    """
    group = distributed.active_group(group)
    local = partial(
        _features_here,
        model,
        loader,
        layers,
        rank,
        seed,
        labeled,
        backend,
        device,
        progress,
        inputs,
        labels,
        outputs,
        group,
    )
    if group is None:
        if indices is not None:
            raise ValueError("indices= gives a rank's shard; it needs a process group (group= or torchrun)")
        return local()
    return _gathered_features(local, loader, group, indices)


def _gathered_features(local: Callable[[], GradFeatures], loader: Iterable, group: Any, indices: Any) -> GradFeatures:
    """Every rank's features, in global order, on every rank (fastdal/distributed.py says which sample is which)."""
    shard = distributed.run_on_all(lambda: distributed.Shard(loader, group, indices), group)
    mine = distributed.run_on_all(local, group, shard.local_to_global)
    counts = distributed.gather_objects(len(mine), group)
    index, keep, n = distributed.run_on_all(lambda: shard.resolve(len(mine), counts), group)
    device = mine.labels.device
    kept = mine[keep.nonzero()[:, 0].to(device)].to("cpu")
    tensors = [[b.left, b.right] if isinstance(b, FactoredBlock) else [b.values] for b in kept.blocks]
    parts = distributed.gather_objects((index[keep], kept.labels, tensors), group)
    distributed.check_partition([part[0] for part in parts], n)
    order = torch.argsort(torch.cat([part[0] for part in parts]))

    def joined(pieces: list[Tensor]) -> Tensor:
        """One tensor per rank, joined in global sample order."""
        return torch.cat(pieces)[order].to(device)

    blocks: list[Block] = []
    for i, block in enumerate(kept.blocks):
        ranks = [part[2][i] for part in parts]
        if isinstance(block, FactoredBlock):
            blocks.append(replace(block, left=joined([t[0] for t in ranks]), right=joined([t[1] for t in ranks])))
        else:
            blocks.append(replace(block, values=joined([t[0] for t in ranks])))
    return GradFeatures(blocks, joined([part[1] for part in parts]), mine.names, mine.rank, mine.seed)


def _features_here(
    model: nn.Module,
    loader: Iterable,
    layers: str | Sequence[str],
    rank: int | None,
    seed: int,
    labeled: bool,
    backend: str,
    device: torch.device | str | None,
    progress: bool | None,
    inputs: Callable[[Any], Any] | None,
    labels: Callable[[Any], Tensor] | None,
    outputs: Callable[[Any], Tensor] | None,
    group: Any,
) -> GradFeatures:
    """The features of the samples ``loader`` yields here (this rank's shard over a process group)."""
    model = distributed.scored_module(model)
    rank, seed = as_real_number(rank), as_real_number(seed)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1):
        raise ValueError(f"rank must be a positive integer or None, got {rank!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
    backend = backends.requested(backend)
    backends.check_runs_here(backend)
    if backend == backends.REFERENCE:
        raise ValueError("backend 'reference' computes fastdal.score only; features need 'auto' or an op backend")
    check_loader(loader, "loader", pool=not labeled, sharded=group is not None)
    check_batchnorm_statistics(model)
    params = dict(model.named_parameters())
    parts: list[list[Block]] = []
    label_parts: list[Tensor] = []
    builder: _Builder | None = None
    seen = 0
    with model_on_device(model, device) as dev, preserved_model_state(model):
        for batch in with_progress(loader, progress, "fastdal.features"):
            batch = to_device(batch, dev)
            if builder is None:
                args, kwargs = split_batch(batch, inputs)
                head = logits_head(model, args, kwargs, outputs)
                # find_head runs again only to raise its error when layers="last" finds no head.
                named_head = (
                    partial(_given, head) if head is not None else partial(find_head, model, args, kwargs, outputs)
                )
                names, _ = covered_parameters(model, layers, named_head)
                for n in names:
                    params[n].requires_grad_(True)
                dtype = accumulation_dtype(params[n] for n in names)
                builder = _Builder(model, names, None if head is None else head.module, rank, seed, dtype, backend)
            y = batch_labels(batch, labels) if labeled else None
            blocks, used = builder(batch, inputs, outputs, seen, y)
            parts.append(blocks)
            label_parts.append(used)
            seen += used.shape[0]
        if builder is not None:
            builder.pass_.checks.finish()  # the pass's finite and label checks, read once (fastdal/checks.py)
    if group is None:
        check_pool_count(loader, seen)
    if builder is None:
        raise ValueError("loader yielded no batches: features need at least one sample (on every rank)")
    blocks = [_concat([p[i] for p in parts]) for i in range(len(parts[0]))]
    return GradFeatures(blocks, torch.cat(label_parts), builder.names, rank if builder.projects else None, seed)


def _given(value: Any) -> Any:
    return value


def _concat(blocks: list[Block]) -> Block:
    first = blocks[0]
    if isinstance(first, FactoredBlock):
        return replace(first, left=torch.cat([b.left for b in blocks]), right=torch.cat([b.right for b in blocks]))
    return replace(first, values=torch.cat([b.values for b in blocks]))


class _Builder:
    """Turns one batch's captured layer inputs and output gradients into feature blocks."""

    def __init__(self, model, names: list[str], head: str | None, rank, seed: int, dtype, backend: str):
        self.model, self.names, self.rank, self.seed, self.dtype, self.backend = (
            model,
            names,
            rank,
            seed,
            dtype,
            backend,
        )
        self.pass_ = BackwardPass(model, {n: torch.empty(0) for n in names}, dtype, backend)
        self.head = head
        self.projects = False

    def __call__(self, batch, inputs, outputs, first_index: int, labels: Tensor | None):
        calls, logits, used = self.pass_.capture(batch, inputs, outputs, first_index, labels)
        batch_size = logits.shape[0]
        blocks: list[Block] = []
        with torch.no_grad():
            for target in sorted(calls, key=lambda t: t.name):
                record = calls[target]
                if self._is_head(target, record, logits):
                    blocks.append(self._head_block(target, record, batch_size))
                else:
                    blocks.append(self._projected_block(target, record, batch_size))
        return blocks, used.detach()

    def _is_head(self, target: Target, record: list[Call], logits: Tensor) -> bool:
        return (
            target.kind == "linear"
            and target.name == self.head
            and len(record) == 1
            and record[0].outputs[0] is logits
            and layers.data_input(record[0]).dim() == 2
        )

    def _head_block(self, target: Target, record: list[Call], batch_size: int) -> FactoredBlock:
        call = record[0]
        delta = call.deltas[0].to(self.dtype)
        h = layers.data_input(call).detach().to(self.dtype)
        weight, bias = target.params.get("weight"), target.params.get("bias")
        right = h if weight is not None else h.new_zeros(batch_size, 0)
        return FactoredBlock(weight, bias, delta, right)

    def _projected_block(self, target: Target, record: list[Call], batch_size: int) -> ProjectedBlock:
        if self.rank is None:
            raise ValueError(
                f"features of {target.name or '<model>'!r} ({type(target.module).__name__}) need a projection: "
                "pass rank= (only the head's features are exact without one)"
            )
        self.projects = True
        kind = target.kind
        if kind in ("linear", "conv") and "weight" in target.params:
            return _weight_block(target, record, batch_size, self.rank, self.seed, self.dtype, self.backend)
        if kind == "embedding" and "weight" in target.params:
            return _embedding_block(target, record, batch_size, self.rank, self.seed, self.dtype)
        return _flat_block(target, record, batch_size, self.rank, self.seed, self.dtype)


def _weight_block(target: Target, record: list[Call], batch_size: int, rank: int, seed: int, dtype, backend):
    """``P_out g P_in^T`` of a Linear/Conv weight (and ``P_out g_b`` of its bias), by ``kron_project``."""
    m = target.module
    weight_name, bias_name = target.params["weight"], target.params.get("bias")
    out_features = m.out_features if target.kind == "linear" else m.out_channels
    groups = 1 if target.kind == "linear" else m.groups
    d_in = m.weight[0].numel() if target.kind == "conv" else m.in_features
    p_out = projection(seed, weight_name + ":out", rank, out_features)
    p_in = projection(seed, weight_name + ":in", rank, d_in)
    device = m.weight.device
    po = torch.eye(out_features, dtype=dtype, device=device) if p_out is None else p_out.to(device, dtype)
    pi = torch.eye(d_in, dtype=dtype, device=device) if p_in is None else p_in.to(device, dtype)
    r_out, r_in = po.shape[0], pi.shape[0]
    po_groups = po.view(r_out, groups, out_features // groups).permute(1, 0, 2).contiguous()

    weight = torch.zeros(batch_size, r_out, r_in, dtype=dtype, device=device)
    bias = torch.zeros(batch_size, r_out, dtype=dtype, device=device)
    for a, delta in _positions(target, record, batch_size, dtype):
        # a: (B * groups, T, d_in), delta: (B * groups, T, d_out / groups), in pieces of samples.
        for samples, a_part, delta_part in a:
            projected = ops.kron_project(a_part, delta_part, pi, po_groups, backend=backend)
            weight[samples] += projected.view(-1, groups, r_out, r_in).sum(1)
        if bias_name is not None:
            bias += _apply(p_out, delta)
    values = [weight.flatten(1)] + ([bias] if bias_name is not None else [])

    def project(grads: Mapping[str, Tensor]) -> Tensor:
        # On the features' device: G is never copied to the host (on a GPU that would wait for it).
        g = grads[weight_name].to(device, dtype).reshape(groups, out_features // groups, d_in)
        parts = [torch.einsum("gro,goi,si->rs", po_groups, g, pi).flatten()]
        if bias_name is not None:
            parts.append(_apply(p_out, grads[bias_name].to(device, dtype)))
        return torch.cat(parts)

    names = [weight_name] + ([bias_name] if bias_name is not None else [])
    return ProjectedBlock(names, torch.cat(values, 1), project)


def _positions(target: Target, record: list[Call], batch_size: int, dtype):
    """Per call: (pieces of (samples, a, delta) with positions, delta summed over positions (B, d_out))."""
    m = target.module
    for call in record:
        delta = call.deltas[0] if call.deltas else None
        if delta is None:
            continue
        x = call.inputs[0].detach().movedim(call.in_dims[0], 0)
        delta = delta.movedim(call.out_dims[0], 0)
        if target.kind == "linear":
            a = x.reshape(batch_size, -1, m.in_features).to(dtype)
            d = delta.reshape(batch_size, -1, m.out_features).to(dtype)
            yield [(slice(None), a, d)], d.sum(1)
            continue
        # Convolution: pad explicitly (any padding mode), unfold a chunk of samples at a time.
        x, delta = layers.padded_input(m, x).to(dtype), delta.to(dtype)
        positions = delta[0].numel() // m.out_channels
        per_sample = positions * (m.groups * m.weight[0].numel() + m.out_channels)  # unfolded input + delta

        def pieces(x=x, delta=delta, per_sample=per_sample):
            for samples in chunks(batch_size, per_sample):
                yield (samples, *layers.unfolded_rows(m, x, delta, samples))

        yield pieces(), delta.reshape(batch_size, m.out_channels, -1).sum(-1)


def _embedding_block(target: Target, record: list[Call], batch_size: int, rank: int, seed: int, dtype):
    """An Embedding weight as a Linear on one-hot inputs: ``P_in onehot(id)`` is column ``id`` of ``P_in``."""
    m: nn.Embedding = target.module
    name = target.params["weight"]
    p_out = projection(seed, name + ":out", rank, m.embedding_dim)
    p_in = projection(seed, name + ":in", rank, m.num_embeddings)
    r_out = m.embedding_dim if p_out is None else rank
    r_in = m.num_embeddings if p_in is None else rank
    device = m.weight.device
    values = torch.zeros(batch_size, r_out * r_in, dtype=dtype, device=device)
    found = layers.embedding_rows(target, record, batch_size, dtype)
    if found is not None:
        owner, ids, rows = found
        projected_rows = _apply(p_out, rows)  # (keys, r_out)
        if p_in is None:
            outer = projected_rows.new_zeros(rows.shape[0], r_out, r_in)
            outer[torch.arange(rows.shape[0], device=device), :, ids] = projected_rows
        else:
            columns = p_in.to(device, dtype)[:, ids].T  # (keys, r_in)
            outer = projected_rows[:, :, None] * columns[:, None, :]
        values.index_add_(0, owner, outer.flatten(1))

    def project(grads: Mapping[str, Tensor]) -> Tensor:
        g = grads[name].to(device, dtype)  # (num_embeddings, dim)
        projected = _apply(p_out, g).T  # (r_out, num_embeddings)
        return _apply(p_in, projected).flatten()

    return ProjectedBlock([name], values, project)


def _flat_block(target: Target, record: list[Call], batch_size: int, rank: int, seed: int, dtype) -> ProjectedBlock:
    """Any other parameters: per-sample gradients, flattened, projected to at most ``rank^2`` values each."""
    per_sample = _per_sample(target, record, batch_size, dtype)
    matrices = {}
    values = []
    for local, full in target.params.items():
        g = per_sample[local].reshape(batch_size, -1)
        p = projection(seed, full, rank * rank, g.shape[1])
        matrices[full] = p
        values.append(_apply(p, g))

    def project(grads: Mapping[str, Tensor]) -> Tensor:
        device = values[0].device
        return torch.cat([_apply(matrices[n], grads[n].to(device, dtype).reshape(-1)) for n in matrices])

    return ProjectedBlock(list(matrices), torch.cat(values, 1), project)


# Closed forms that give dense per-sample gradients for the flat, projected features.
_PER_SAMPLE = {
    USES: use_forms.per_sample_gradients,
    "recurrent": recurrent.per_sample_gradients,
    "bag": bags.per_sample_gradients,
}


def _per_sample(target: Target, record: list[Call], batch_size: int, dtype) -> dict[str, Tensor]:
    """Exact per-sample gradients ``{local: (B, *shape)}`` of parameters other than Linear/Conv weights (a
    MultiheadAttention's projections included: flattened and projected like any parameter without a Linear
    of its own)."""
    m = target.module
    if target.kind in ("batchnorm", "layernorm", "rmsnorm", "groupnorm"):
        sums = layers.norm_per_sample(target, record, batch_size, dtype)
    elif target.kind in ("linear", "conv"):  # a bias whose weight is not covered
        total = None
        for call in record:
            if call.deltas and call.deltas[0] is not None:
                d = call.deltas[0].movedim(call.out_dims[0], 0).to(dtype)
                part = (
                    d.reshape(batch_size, -1, m.out_features).sum(1)
                    if target.kind == "linear"
                    else d.reshape(batch_size, m.out_channels, -1).sum(-1)
                )
                total = part if total is None else total + part
        sums = {"bias": total} if total is not None else {}
    elif target.kind == "mha":  # from the recomputed projections' factors, without vmap
        sums = attention.per_sample_gradients(target, record, batch_size, dtype)
    elif target.kind in _PER_SAMPLE:
        sums = _PER_SAMPLE[target.kind](target, record, batch_size, dtype)
    else:
        sums = generic.per_sample_gradients(target, record, slice(0, batch_size), batch_size) or {}
    device = next(target.module.parameters()).device
    return {
        local: sums[local].to(dtype)
        if local in sums
        else torch.zeros(batch_size, *m.get_parameter(local).shape, dtype=dtype, device=device)
        for local in target.params
    }
