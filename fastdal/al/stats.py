"""Paired comparisons of strategies over seeds, and the verdicts the experiments page draws from them.

Runs with the same seed share the initial labeled set, the model's initialization and the order of training
batches, so two strategies are compared seed by seed: the difference of a per-seed summary (the area under the
learning curve, i.e. the mean test accuracy over the rounds) with a two-sided paired t-test over the seeds.
Every table compares several strategies with the same reference, so its p-values are Holm-adjusted over the
table's rows before any verdict is drawn from them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import NamedTuple

import torch

BASELINES = ("conf", "margin", "entropy", "coreset", "badge", "albl")  # the paper's baselines other than random
LEVEL = 0.05


class Paired(NamedTuple):
    """``a - b`` over the seeds both have: mean and standard deviation of the differences, the paired
    t-test's p-value (NaN with fewer than 2 seeds or all differences equal), and how many seeds ``a`` won."""

    mean: float
    std: float
    p: float
    wins: int
    seeds: int


def paired(a: dict[int, float], b: dict[int, float]) -> Paired:
    """Compare per-seed values ``a`` and ``b`` (seed -> value) on their common seeds."""
    from scipy.stats import ttest_rel

    seeds = sorted(a.keys() & b.keys())
    x = torch.tensor([a[s] for s in seeds], dtype=torch.float64)
    y = torch.tensor([b[s] for s in seeds], dtype=torch.float64)
    d = x - y
    std = float(d.std()) if len(seeds) > 1 else math.nan
    p = float(ttest_rel(x.numpy(), y.numpy()).pvalue) if len(seeds) > 1 and std > 0 else math.nan
    return Paired(float(d.mean()) if seeds else math.nan, std, p, int((d > 0).sum()), len(seeds))


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment of ``pvalues`` (NaN entries are kept and not counted)."""
    order = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    adjusted = list(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        adjusted[i] = running
    return adjusted


def verdict(difference: Paired, adjusted_p: float) -> str:
    """ "better" / "worse" where the adjusted test rejects equality at LEVEL, else "no difference detected"."""
    if math.isnan(adjusted_p) or adjusted_p >= LEVEL:
        return "no difference detected"
    return "better" if difference.mean > 0 else "worse"


def per_seed(rows: list[dict], metric: str = "accuracy") -> dict[str, dict[str, dict[int, float]]]:
    """setting -> strategy -> seed -> area under the learning curve: ``metric`` (in %) averaged over the
    rounds after the first query (round 0 is the same model for every strategy)."""
    values: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for row in rows:
        if row["round"] > 0:
            values[row["setting"]][row["strategy"]][row["seed"]].append(100 * row[metric])
    return {
        setting: {strategy: {seed: sum(v) / len(v) for seed, v in seeds.items()} for strategy, seeds in by.items()}
        for setting, by in values.items()
    }


def best_baseline(by_strategy: dict[str, dict[int, float]]) -> str | None:
    """The baseline (of :data:`BASELINES`) with the highest mean over seeds, None if none ran."""
    ran = [s for s in BASELINES if s in by_strategy]
    return max(ran, key=lambda s: sum(by_strategy[s].values()) / len(by_strategy[s]), default=None)
