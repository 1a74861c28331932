"""The power of the paired t-test the verdicts use, and its minimal detectable effect.

With ``n`` pairs whose differences have standard deviation ``sd``, the two-sided paired t-test at level ``alpha``
rejects when ``|t| > c``, ``c`` the ``1 - alpha/2`` quantile of Student's t with ``n - 1`` degrees of freedom.
Where the true mean difference is ``delta``, ``t`` follows the noncentral t with ``n - 1`` degrees of freedom and
noncentrality ``delta * sqrt(n) / sd``, so the power is ``P(T > c) + P(T < -c)``. The minimal detectable effect
is the ``delta`` at which that power reaches ``power`` (0.8 by convention): the smallest true difference the
test finds four times in five.

``sd`` is the standard deviation the experiment observed, so this is the sensitivity of the test that was run,
stated next to the paper's effect size; ``alpha`` is the nominal level (Holm's adjustment within a family of
``m`` tests asks the first of them for ``alpha / m``, so for a family the effect stated is a lower bound).
"""

from __future__ import annotations

import math

ALPHA = 0.05
POWER = 0.8


def paired_power(effect: float, n: int, alpha: float = ALPHA) -> float:
    """Power of the two-sided paired t-test with ``n`` pairs at a standardized effect ``effect``
    (mean difference / sd of the differences)."""
    from scipy.stats import nct
    from scipy.stats import t as student

    _check(n, alpha, POWER)
    df, shift = n - 1, effect * math.sqrt(n)
    critical = float(student.ppf(1 - alpha / 2, df))
    # P(T < -c) written as P(T' > c) with the opposite noncentrality: scipy's nct.cdf returns NaN far in the
    # lower tail (e.g. df = 1, noncentrality 8), where its sf of the mirrored variable returns the tiny value.
    return float(nct.sf(critical, df, shift) + nct.sf(critical, df, -shift))


def standardized_detectable_effect(n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """The standardized effect (in units of the differences' sd) that the test detects with ``power``."""
    from scipy.optimize import brentq

    _check(n, alpha, power)
    # Power rises with the effect from alpha at 0; the normal approximation's effect with room to spare (the t
    # test needs more, and at n = 2 far more) brackets the root.
    high = 1.0
    while paired_power(high, n, alpha) < power:
        high *= 2
    return float(brentq(lambda d: paired_power(d, n, alpha) - power, 0.0, high, xtol=1e-12))


def minimal_detectable_effect(n: int, sd: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """The true mean difference, in the units of ``sd``, that ``n`` pairs detect with ``power`` at ``alpha``
    (two-sided paired t-test); NaN with fewer than 2 pairs or an unknown ``sd``."""
    if n < 2 or math.isnan(sd):
        return math.nan
    if sd < 0:
        raise ValueError(f"sd must be >= 0, got {sd}")
    return sd * standardized_detectable_effect(n, alpha, power)


def _check(n: int, alpha: float, power: float) -> None:
    if n < 2:
        raise ValueError(f"the paired t-test needs n >= 2 pairs, got {n}")
    if not 0 < alpha < 1 or not alpha < power < 1:
        raise ValueError(f"need 0 < alpha < power < 1, got alpha={alpha}, power={power}")
