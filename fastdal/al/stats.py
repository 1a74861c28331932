"""Paired comparisons of strategies over seeds, and the verdicts the experiments page draws from them.

Runs with the same seed share the initial labeled set, the model's initialization and the order of training
batches, so two strategies are compared seed by seed: the difference of a per-seed summary (the area under the
learning curve, i.e. the mean test accuracy over the rounds) with a two-sided paired t-test over the seeds.
A claim's verdict is drawn from its primary family alone: the few comparisons the claim is about, declared in
the code before any number is seen, Holm-adjusted within that family (:func:`holm_within`). The tables also show
each column Holm-adjusted over all of its rows, as exploratory numbers that no verdict reads. Ties (equal per-seed
values) count as non-wins.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch

BASELINES = ("conf", "margin", "entropy", "coreset", "badge", "albl")  # the paper's baselines other than random
LEVEL = 0.05


class Paired(NamedTuple):
    """``a - b`` over the seeds both have: mean and standard deviation of the differences, the paired
    t-test's p-value (NaN with fewer than 2 seeds or all differences equal), how many seeds ``a`` won
    (``a > b``: a tie is not a win) and how many were ties (``a == b``)."""

    mean: float
    std: float
    p: float
    wins: int
    seeds: int
    ties: int = 0


def paired(a: dict[int, float], b: dict[int, float]) -> Paired:
    """Compare per-seed values ``a`` and ``b`` (seed -> value) on their common seeds."""
    from scipy.stats import ttest_rel

    seeds = sorted(a.keys() & b.keys())
    x = torch.tensor([a[s] for s in seeds], dtype=torch.float64)
    y = torch.tensor([b[s] for s in seeds], dtype=torch.float64)
    d = x - y
    std = float(d.std()) if len(seeds) > 1 else math.nan
    p = float(ttest_rel(x.numpy(), y.numpy()).pvalue) if len(seeds) > 1 and std > 0 else math.nan
    mean = float(d.mean()) if seeds else math.nan
    return Paired(mean, std, p, int((d > 0).sum()), len(seeds), int((d == 0).sum()))


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment of ``pvalues`` (NaN entries are kept and not counted)."""
    order = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    adjusted = list(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        adjusted[i] = running
    return adjusted


def holm_within(family: Sequence[str], pvalues: Mapping[str, float]) -> dict[str, float]:
    """Holm's adjustment over exactly the comparisons of a declared primary ``family`` (names -> p-values).

    Every member must have a p-value: a comparison that did not run would otherwise shrink the family silently.
    A NaN p-value (no test possible) still counts as a member, as if its p were 1, and stays NaN."""
    if len(set(family)) != len(family):
        raise ValueError(f"family must name each comparison once, got {list(family)}")
    if set(family) != set(pvalues):
        raise ValueError(f"p-values must be given for the family {sorted(family)} exactly, got {sorted(pvalues)}")
    raw = [pvalues[name] for name in family]
    adjusted = holm([1.0 if math.isnan(p) else p for p in raw])
    return {name: math.nan if math.isnan(p) else a for name, p, a in zip(family, raw, adjusted)}


INCONCLUSIVE = "inconclusive"


def powered_verdict(difference: Paired, adjusted_p: float, paper_effect: float, detectable: float) -> str:
    """:func:`verdict`, except that a test that rejects nothing says "inconclusive" where the paper's effect
    (``paper_effect``, in the same units as the differences) is below the test's minimal detectable effect
    ``detectable`` (see :mod:`.power`): such a test could not have seen the paper's effect, so its silence is no
    evidence against it. Where either is unknown (NaN), or no test was possible (a NaN p: fewer than 2 seeds, or
    every seed's difference the same), the silence cannot be weighed either: inconclusive."""
    found = verdict(difference, adjusted_p)
    if found != "no difference detected":
        return found
    unknown = math.isnan(detectable) or math.isnan(paper_effect) or math.isnan(adjusted_p)
    if unknown or abs(paper_effect) < detectable:
        return INCONCLUSIVE
    return found


def difference_in_differences(
    a_after: Mapping[int, float],
    a_before: Mapping[int, float],
    b_after: Mapping[int, float],
    b_before: Mapping[int, float],
) -> Paired:
    """``(a_after - a_before) - (b_after - b_before)`` seed by seed, compared with zero (paired t-test): what a
    change (e.g. more rounds) does for ``a`` beyond what it does for ``b``. Seeds missing anywhere are left out."""
    seeds = a_after.keys() & a_before.keys() & b_after.keys() & b_before.keys()
    gain = {s: (a_after[s] - a_before[s]) - (b_after[s] - b_before[s]) for s in seeds}
    return paired(gain, dict.fromkeys(seeds, 0.0))


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
