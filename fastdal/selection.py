"""Choosing the query from scores or gradient features: top-b, BADGE's k-means++ seeding, exact greedy.

* ``topk``: the paper's query, the ``b`` highest single-sample scores.
* ``badge``: k-means++ seeding over gradient embeddings (Ash et al., 2020): the first centre is the
  sample of largest gradient norm, each next one is drawn with probability proportional to its
  squared distance to the nearest centre. Distances come from the factored form
  ``||g_i - g_j||^2 = ||g_i||^2 + ||g_j||^2 - 2 <g_i, g_j>`` (op ``factored_min_distance`` for the
  exact last layer), so no embedding is ever materialized.
* ``greedy``: maximizes the paper's subset objective ``Delta(Q|S) = ||G + sum_{u in Q} g_u||^2 - ||G||^2``
  one sample (or one block of samples) at a time; the marginal gain of ``u`` given the chosen ``Q``
  is ``||g_u||^2 + 2 <g_u, G + sum_{q in Q} g_q>``.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from . import ops
from .features import FactoredBlock, GradFeatures
from .grads import LabeledGrad
from .results import as_real_number


class GreedyResult(NamedTuple):
    """Indices in the order chosen, and the exact increase of the objective at each step (its sum is
    ``Delta(Q|S)`` of the whole query)."""

    indices: Tensor
    gains: Tensor


def check_budget(b: object, n: int) -> int:
    b = as_real_number(b)
    if isinstance(b, bool) or not isinstance(b, numbers.Integral):
        raise TypeError(f"b must be an integer, got {type(b).__name__}")
    if not 0 <= b <= n:
        raise ValueError(f"b must be between 0 and the pool size {n}, got {b}")
    return int(b)


def badge(features: GradFeatures, b: int, *, seed: int = 0, backend: str = "auto") -> Tensor:
    """``b`` indices by k-means++ seeding over the gradients the features stand for.

    Random draws come from a ``torch.Generator`` seeded with ``seed``: one uniform number per centre
    after the first, turned into an index by inverting the cumulative sum of squared distances. The
    centres stay on the features' device until the end, so on a GPU no pick waits for the previous one.
    """
    n = len(features)
    b = check_budget(b, n)
    if b == 0:
        return torch.zeros(0, dtype=torch.long)
    sq_norm = features.sq_norm()
    generator = torch.Generator().manual_seed(int(seed))
    min_dist = torch.full_like(sq_norm, float("inf"))
    chosen = torch.empty(b, dtype=torch.long, device=sq_norm.device)
    center = torch.argmax(sq_norm)  # the first maximum: ties go to the lower index
    taken = torch.zeros(n, dtype=torch.bool, device=sq_norm.device)
    for step in range(b):
        chosen[step] = center
        taken.index_fill_(0, center.view(1), True)
        if step == b - 1:
            break
        min_dist = _min_distance(features, sq_norm, center, min_dist, backend)
        min_dist.masked_fill_(taken, 0)  # rounding may leave a chosen sample a tiny distance from itself
        u = torch.rand((), generator=generator, dtype=torch.float64).item()  # a CPU draw: no device wait
        center = _draw(min_dist, taken, u)
    return chosen.cpu()


def _min_distance(features: GradFeatures, sq_norm: Tensor, center: Tensor, min_dist: Tensor, backend: str) -> Tensor:
    blocks = features.blocks
    if len(blocks) == 1 and isinstance(blocks[0], FactoredBlock):
        head = blocks[0]
        # The fused kernels take the centre as an integer argument: on a GPU, one 8-byte read per pick.
        index = int(center)
        return ops.factored_min_distance(head.left, head.right, head.offset, sq_norm, index, min_dist, backend=backend)
    row = center.view(1)  # indexing by a 0-d tensor would read it on the host
    distance = (sq_norm + sq_norm[row] - 2 * features.gram(slice(None), row)[:, 0]).clamp_min_(0)
    return torch.minimum(min_dist, distance)


def _draw(weights: Tensor, taken: Tensor, u: float) -> Tensor:
    """The index (a 0-d tensor on ``weights``' device) where the cumulative sum of ``weights`` first exceeds
    ``u`` times its total, moved on to the next sample not taken with a positive weight (a zero-width step at
    the boundary); when every weight is zero (all samples coincide with a centre), the first sample not yet
    taken. Computed on the device without reading a value on the host."""
    n = weights.shape[0]
    cumulative = torch.cumsum(weights.double(), 0)
    total = cumulative[-1]
    index = torch.searchsorted(cumulative, (u * total).view(1), right=True)[0].clamp_max(n - 1)
    position = torch.arange(n, device=weights.device)
    # The first candidate at or after `index`, going round: the smallest cyclic distance from it.
    candidate = ~taken & (weights > 0)
    ahead = torch.where(candidate, (position - index) % n, n)
    if_positive = torch.argmin(ahead)
    if_all_zero = torch.argmin(torch.where(~taken, position, n))
    return torch.where(total > 0, if_positive, if_all_zero)


def greedy(
    features: GradFeatures, labeled_grad: LabeledGrad | Mapping[str, Tensor], b: int, *, block_size: int = 1
) -> GreedyResult:
    """Greedy maximization of ``Delta(Q|S)``, ``block_size`` samples per update of ``G``.

    With ``block_size=1`` each step takes the sample of largest marginal gain; a larger block takes
    that many highest gains at once (ties: lower index), then adds them all to ``G``.
    """
    n = len(features)
    b = check_budget(b, n)
    block_size = as_real_number(block_size)
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    sq_norm = features.sq_norm()
    gain = sq_norm + 2 * features.dot(labeled_grad)  # marginal gains given Q = {}
    available = torch.ones(n, dtype=torch.bool, device=gain.device)
    chosen: list[Tensor] = []
    increments: list[Tensor] = []
    while sum(len(c) for c in chosen) < b:
        k = min(int(block_size), b - sum(len(c) for c in chosen))
        candidates = torch.where(available, gain, torch.tensor(float("-inf"), dtype=gain.dtype, device=gain.device))
        block = torch.sort(candidates, descending=True, stable=True).indices[:k]
        # Exact increase of the objective for the whole block: single gains plus the block's cross terms.
        inner = features.gram(block, block)
        increments.append(gain[block].sum() + (inner.sum() - inner.diagonal().sum()))
        gain = gain + 2 * features.gram(slice(None), block).sum(1)
        available[block] = False
        chosen.append(block)
    if not chosen:
        return GreedyResult(torch.zeros(0, dtype=torch.long), sq_norm.new_zeros(0))
    return GreedyResult(torch.cat(chosen).cpu(), torch.stack(increments).cpu())


def subset_gain(
    features: GradFeatures, query: Sequence[int] | Tensor, labeled_grad: LabeledGrad | Mapping[str, Tensor]
) -> Tensor:
    """``Delta(Q|S) = ||G + sum_{u in Q} g_u||^2 - ||G||^2 = ||sum g_u||^2 + 2 <sum g_u, G>``."""
    rows = _query_rows(features, query)
    return features.gram(rows, rows).sum() + 2 * features.dot(labeled_grad)[rows].sum()


def approximation_ratio(
    features: GradFeatures, query: Sequence[int] | Tensor, labeled_grad: LabeledGrad | Mapping[str, Tensor]
) -> float:
    """The paper's Eq. 14: the sum of single-sample gains over the query's true subset gain,
    ``sum_{u in Q} Delta({u}|S) / Delta(Q|S)`` (1 when the samples' gradients are orthogonal)."""
    rows = _query_rows(features, query)
    if rows.numel() == 0:
        raise ValueError("query must hold at least one index")
    single = (features.sq_norm()[rows] + 2 * features.dot(labeled_grad)[rows]).sum()
    return float(single / subset_gain(features, rows, labeled_grad))


def _query_rows(features: GradFeatures, query: Sequence[int] | Tensor) -> Tensor:
    rows = torch.as_tensor(query, dtype=torch.long).reshape(-1)
    n = len(features)
    if rows.numel() and (rows.min() < 0 or rows.max() >= n):
        raise ValueError(f"query indices must lie in [0, {n}), got {rows.min().item()}..{rows.max().item()}")
    if rows.unique().numel() != rows.numel():
        raise ValueError("query indices must be distinct")
    return rows.to(features.labels.device)
