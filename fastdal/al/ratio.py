"""The approximation ratio of the paper's Eq. 14 as its Figure 4 measures it: an expectation over query sets.

For a query set ``Q`` of pool samples at their pseudo labels, with ``G`` the summed labeled gradient,

    R(Q|S) = sum_{u in Q} Delta({u}|S) / Delta(Q|S),   Delta({u}|S) = ||g_u||^2 + 2 <g_u, G>,
    Delta(Q|S) = ||G + sum_{u in Q} g_u||^2 - ||G||^2 = ||sum_{u in Q} g_u||^2 + 2 sum_{u in Q} <g_u, G>,

and Figure 4 plots ``E_Q R(Q|S)`` over subsets ``Q`` of size ``b`` against training epochs. Everything is exact
over the chosen parameters: the single-sample terms come from one :func:`fastdal.score` pass over the pool, and
``sum_{u in Q} g_u`` is the gradient of the summed loss of ``Q`` at its pseudo labels, one batched backward
(:func:`fastdal.labeled_grad`), so no per-sample gradient is ever formed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

import fastdal

from .strategy import _collate_x, _collate_xy


def query_sets(n: int, b: int, draws: int, generator: torch.Generator) -> list[Tensor]:
    """Every subset of size ``b`` of ``range(n)`` when there are at most ``draws`` of them (the expectation is
    then exact), else ``draws`` subsets drawn uniformly (each a ``randperm`` prefix) from ``generator``."""
    if not 1 <= b <= n or draws < 1:
        raise ValueError(f"need 1 <= b <= n and draws >= 1, got n={n}, b={b}, draws={draws}")
    if math.comb(n, b) <= draws:
        return [torch.tensor(q) for q in itertools.combinations(range(n), b)]
    return [torch.randperm(n, generator=generator)[:b] for _ in range(draws)]


def subset_gains(
    model: nn.Module,
    dataset: Dataset,
    labeled: Sequence[int] | Tensor,
    pool: Sequence[int] | Tensor,
    queries: Sequence[Tensor],
    *,
    layers: str | Sequence[str] = "all",
    batch_size: int = 256,
) -> tuple[Tensor, Tensor]:
    """For each query set of ``queries`` (positions into ``pool``), the numerator ``sum_{u in Q} Delta({u}|S)``
    and the denominator ``Delta(Q|S)`` of ``R(Q|S)`` (float64); ``S`` is ``dataset[labeled]`` at its labels, the
    pool samples are taken at the model's predictions. Kept apart, they give the ratio of expectations too."""
    labeled, pool = torch.as_tensor(labeled).tolist(), torch.as_tensor(pool)
    labeled_loader = DataLoader(Subset(dataset, labeled), batch_size=batch_size, collate_fn=_collate_xy)
    grad = fastdal.labeled_grad(model, labeled_loader, layers=layers)
    pool_loader = DataLoader(Subset(dataset, pool.tolist()), batch_size=batch_size, collate_fn=_collate_x)
    parts = fastdal.score(model, pool_loader, grad, return_components=True)
    single = parts.sq_norm.double() + 2 * parts.dot.double()
    numerators, denominators = [], []
    for q in queries:
        inputs = DataLoader(Subset(dataset, pool[q].tolist()), batch_size=batch_size, collate_fn=_collate_x)
        summed = fastdal.labeled_grad(model, zip(inputs, parts.pseudo_label[q].split(batch_size)), layers=layers)
        sq = sum(float(g.double().square().sum()) for g in summed.grads.values())
        numerators.append(float(single[q].sum()))
        denominators.append(sq + 2 * float(parts.dot[q].double().sum()))
    return torch.tensor(numerators, dtype=torch.float64), torch.tensor(denominators, dtype=torch.float64)


def subset_ratios(
    model: nn.Module,
    dataset: Dataset,
    labeled: Sequence[int] | Tensor,
    pool: Sequence[int] | Tensor,
    queries: Sequence[Tensor],
    *,
    layers: str | Sequence[str] = "all",
    batch_size: int = 256,
) -> Tensor:
    """``R(Q|S)`` (float64) for each query set of ``queries``: :func:`subset_gains`' numerator over its
    denominator."""
    numerators, denominators = subset_gains(
        model, dataset, labeled, pool, queries, layers=layers, batch_size=batch_size
    )
    return numerators / denominators


def expected_ratio(
    model: nn.Module,
    dataset: Dataset,
    labeled: Sequence[int] | Tensor,
    pool: Sequence[int] | Tensor,
    b: int,
    *,
    draws: int = 50,
    generator: torch.Generator | None = None,
    layers: str | Sequence[str] = "all",
) -> Tensor:
    """The ratios ``R(Q|S)`` over the query sets of :func:`query_sets` (their mean is ``E_Q R(Q|S)``)."""
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    queries = query_sets(len(torch.as_tensor(pool)), b, draws, generator)
    return subset_ratios(model, dataset, labeled, pool, queries, layers=layers)
