"""Figure 4's bootstrap intervals (median, ratio of expectations) and the rule that reads them."""

import numpy as np
import pytest

from fastdal.al import bootstrap


def test_the_two_statistics_by_hand():
    numerator, denominator = np.array([1.0, 2.0, 30.0]), np.array([2.0, 2.0, 0.5])
    assert bootstrap.median_ratio(numerator, denominator) == pytest.approx(1.0)  # ratios 0.5, 1, 60
    assert bootstrap.ratio_of_expectations(numerator, denominator) == pytest.approx(33 / 4.5)


def test_one_query_set_per_seed_is_a_bootstrap_over_seeds():
    # Seeds with ratios 1 and 3: a resample of two seeds has median 1 (1/4), 2 (1/2) or 3 (1/4), so the 95%
    # percentile interval is [1, 3] and the estimate 2.
    seeds = [(np.array([1.0]), np.array([1.0])), (np.array([3.0]), np.array([1.0]))]
    interval = bootstrap.two_stage_interval(seeds, bootstrap.median_ratio, draws=4000)
    assert interval == (pytest.approx(2.0), pytest.approx(1.0), pytest.approx(3.0))


def test_query_sets_are_resampled_within_their_seed():
    # One seed, two query sets with ratios 0.5 and 1.5: resamples have median 0.5, 1 or 1.5
    seeds = [(np.array([0.5, 1.5]), np.array([1.0, 1.0]))]
    interval = bootstrap.two_stage_interval(seeds, bootstrap.median_ratio, draws=4000)
    assert (interval.low, interval.high) == (pytest.approx(0.5), pytest.approx(1.5))
    same = bootstrap.two_stage_interval([(np.ones(5), np.ones(5))], bootstrap.ratio_of_expectations)
    assert same == (1.0, 1.0, 1.0)


def test_the_interval_is_seeded_and_narrows_with_more_data():
    rng = np.random.default_rng(0)
    small = [(rng.lognormal(0, 0.3, 20), np.ones(20)) for _ in range(3)]
    large = [(rng.lognormal(0, 0.3, 200), np.ones(200)) for _ in range(30)]
    a = bootstrap.two_stage_interval(small, bootstrap.median_ratio, draws=500, seed=1)
    assert a == bootstrap.two_stage_interval(small, bootstrap.median_ratio, draws=500, seed=1)
    b = bootstrap.two_stage_interval(large, bootstrap.median_ratio, draws=500, seed=1)
    assert a.low <= a.estimate <= a.high and b.high - b.low < a.high - a.low
    assert b.low < 1.0 < b.high  # the lognormal's median is 1


def test_the_rule():
    assert bootstrap.interval_rule(bootstrap.Interval(1.0, 0.95, 1.05)) == bootstrap.WITHIN
    assert bootstrap.interval_rule(bootstrap.Interval(1.3, 1.2, 1.5)) == bootstrap.OUTSIDE
    assert bootstrap.interval_rule(bootstrap.Interval(0.5, 0.4, 0.89)) == bootstrap.OUTSIDE
    assert bootstrap.interval_rule(bootstrap.Interval(1.0, 0.85, 1.05)) == bootstrap.UNDECIDED
    with pytest.raises(ValueError, match="as many numerators as denominators"):
        bootstrap.two_stage_interval([(np.ones(2), np.ones(3))], bootstrap.median_ratio)
