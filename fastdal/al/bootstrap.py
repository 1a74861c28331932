"""Bootstrap intervals for Figure 4's approximation ratio, resampling seeds and the query sets within them.

Each seed (a model trained from its own initial set) contributes random query sets ``Q``, each with the numerator
``sum_u Delta({u}|S)`` and the denominator ``Delta(Q|S)`` of its ratio (:func:`.ratio.subset_gains`). The ratio
is right-skewed (a denominator near zero makes it huge), so its mean is a poor summary; Figure 4's verdict reads
two others:

* the median of the ratios over every query set of every seed;
* the ratio of expectations ``E[numerator] / E[denominator]``, the approximation's relative error on the
  expected change of training dynamics, which large ratios of small denominators cannot dominate.

The interval is the percentile interval of a two-stage bootstrap: draw the seeds with replacement, then within
each drawn seed its query sets with replacement, so that both the variation between trained models and between
query sets are in it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

DRAWS = 2000
LEVEL = 0.95


class Interval(NamedTuple):
    estimate: float  # the statistic on the data as observed
    low: float
    high: float


def median_ratio(numerator: np.ndarray, denominator: np.ndarray) -> float:
    return float(np.median(numerator / denominator))


def ratio_of_expectations(numerator: np.ndarray, denominator: np.ndarray) -> float:
    return float(numerator.mean() / denominator.mean())


STATISTICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "median": median_ratio,
    "ratio of expectations": ratio_of_expectations,
}


def two_stage_interval(
    seeds: Sequence[tuple[np.ndarray, np.ndarray]],
    statistic: Callable[[np.ndarray, np.ndarray], float],
    *,
    draws: int = DRAWS,
    level: float = LEVEL,
    seed: int = 0,
) -> Interval:
    """``statistic(numerators, denominators)`` over every query set of every seed, with its percentile interval
    at ``level`` from ``draws`` two-stage resamples; ``seeds`` holds each seed's (numerators, denominators)."""
    if not seeds or any(len(n) == 0 or len(n) != len(d) for n, d in seeds):
        raise ValueError("seeds must hold at least one seed, each with as many numerators as denominators (>= 1)")
    if not 0 < level < 1 or draws < 1:
        raise ValueError(f"need 0 < level < 1 and draws >= 1, got level={level}, draws={draws}")
    numerators = [np.asarray(n, dtype=np.float64) for n, _ in seeds]
    denominators = [np.asarray(d, dtype=np.float64) for _, d in seeds]
    estimate = statistic(np.concatenate(numerators), np.concatenate(denominators))
    rng = np.random.default_rng(seed)
    values = np.empty(draws)
    for i in range(draws):
        picked = rng.integers(0, len(seeds), len(seeds))
        rows = [rng.integers(0, len(numerators[s]), len(numerators[s])) for s in picked]
        values[i] = statistic(
            np.concatenate([numerators[s][r] for s, r in zip(picked, rows)]),
            np.concatenate([denominators[s][r] for s, r in zip(picked, rows)]),
        )
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return Interval(estimate, float(low), float(high))


WITHIN, OUTSIDE, UNDECIDED = "within", "outside", "undecided"


def interval_rule(interval: Interval, target: float = 1.0, tolerance: float = 0.1) -> str:
    """Figure 4's rule: "within" where the whole interval lies in ``[target - tolerance, target + tolerance]``,
    "outside" where none of it does, else "undecided" (the data cannot tell)."""
    lo, hi = target - tolerance, target + tolerance
    if lo <= interval.low and interval.high <= hi:
        return WITHIN
    if interval.high < lo or interval.low > hi:
        return OUTSIDE
    return UNDECIDED
