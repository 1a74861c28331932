"""The paired t-test's power and minimal detectable effect, against computations that do not use scipy's nct."""

import math

import pytest
from scipy import integrate
from scipy.stats import chi2, norm
from scipy.stats import t as student

from fastdal.al import power


def power_by_integration(effect: float, n: int, alpha: float = 0.05) -> float:
    """The definition, integrated by hand: t = (Z + lambda) / sqrt(V / df), Z standard normal, V chi-square with
    df = n - 1, lambda = effect * sqrt(n); it rejects when |t| > c, i.e. when Z > c s - lambda or Z < -c s -
    lambda with s = sqrt(V / df)."""
    df, shift = n - 1, effect * math.sqrt(n)
    c = student.ppf(1 - alpha / 2, df)

    def given_v(v: float) -> float:
        s = math.sqrt(v / df)
        return (norm.sf(c * s - shift) + norm.cdf(-c * s - shift)) * chi2.pdf(v, df)

    return integrate.quad(given_v, 0, math.inf, limit=200)[0]


@pytest.mark.parametrize("n", [3, 10, 25])
def test_power_matches_the_integrated_definition(n):
    for effect in (0.0, 0.4, 1.0, 2.0):
        assert power.paired_power(effect, n) == pytest.approx(power_by_integration(effect, n), abs=1e-7)
    assert power.paired_power(0.0, n) == pytest.approx(0.05)  # no effect: rejects at the test's level
    detectable = power.standardized_detectable_effect(n)
    assert power_by_integration(detectable, n) == pytest.approx(0.8, abs=1e-6)


def test_detectable_effects_against_published_values():
    # Two-sided one-sample/paired t-test, alpha 0.05, power 0.8 (Cohen's tables; G*Power): d = 0.996 at n = 10,
    # 0.660 at n = 20, 0.529 at n = 30
    assert power.standardized_detectable_effect(10) == pytest.approx(0.996, abs=1e-3)
    assert power.standardized_detectable_effect(20) == pytest.approx(0.660, abs=1e-3)
    assert power.standardized_detectable_effect(30) == pytest.approx(0.529, abs=1e-3)


def test_the_t_test_needs_more_than_the_normal_approximation_and_meets_it_for_large_n():
    normal = (norm.ppf(0.975) + norm.ppf(0.8)) / math.sqrt(10)  # 0.886: known sd, z-test
    assert power.standardized_detectable_effect(10) > normal
    large = (norm.ppf(0.975) + norm.ppf(0.8)) / math.sqrt(2000)
    assert power.standardized_detectable_effect(2000) == pytest.approx(large, rel=2e-3)
    assert power.standardized_detectable_effect(2) > 10  # one degree of freedom: almost nothing is detectable


def test_minimal_detectable_effect_in_the_data_units():
    assert power.minimal_detectable_effect(10, 1.5) == pytest.approx(1.5 * power.standardized_detectable_effect(10))
    assert power.minimal_detectable_effect(10, 0.0) == 0.0
    assert math.isnan(power.minimal_detectable_effect(1, 1.0)) and math.isnan(
        power.minimal_detectable_effect(5, math.nan)
    )
    with pytest.raises(ValueError, match="sd must be >= 0"):
        power.minimal_detectable_effect(10, -1.0)
    with pytest.raises(ValueError, match="alpha < power"):
        power.standardized_detectable_effect(10, alpha=0.05, power=0.01)
