"""Paired statistics of the experiments page and the fixed rules that turn them into verdicts."""

import math

import pytest

from fastdal.al import experiments, stats


def test_paired_differences_by_hand():
    a = {0: 80.0, 1: 82.0, 2: 85.0, 3: 90.0}
    b = {0: 79.0, 1: 80.0, 2: 86.0, 3: 87.0, 4: 50.0}  # seed 4 has no partner: left out
    d = stats.paired(a, b)
    diffs = [1.0, 2.0, -1.0, 3.0]
    mean = sum(diffs) / 4
    std = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 3)
    t = mean / (std / 2)
    assert d.mean == pytest.approx(mean) and d.std == pytest.approx(std)
    assert (d.wins, d.seeds) == (3, 4)
    from scipy.stats import t as student

    assert d.p == pytest.approx(2 * student.sf(abs(t), 3))
    assert math.isnan(stats.paired({0: 1.0}, {0: 2.0}).p)  # one seed: no test
    assert math.isnan(stats.paired({0: 1.0, 1: 2.0}, {0: 0.0, 1: 1.0}).p)  # constant difference: no test


def test_holm_by_hand():
    adjusted = stats.holm([0.01, 0.04, math.nan, 0.03, 0.5])
    # sorted: 0.01 x4 = 0.04; 0.03 x3 = 0.09; 0.04 x2 = 0.08 -> kept monotone at 0.09; 0.5 x1 = 0.5
    assert adjusted[0] == pytest.approx(0.04)
    assert adjusted[3] == pytest.approx(0.09)
    assert adjusted[1] == pytest.approx(0.09)
    assert math.isnan(adjusted[2]) and adjusted[4] == pytest.approx(0.5)
    assert stats.holm([0.9, 0.8]) == [1.0, 1.0]


def test_verdict_needs_the_adjusted_test():
    up, down = stats.Paired(2.0, 1.0, 0.01, 9, 10), stats.Paired(-2.0, 1.0, 0.01, 1, 10)
    assert stats.verdict(up, 0.01) == "better" and stats.verdict(down, 0.01) == "worse"
    assert stats.verdict(up, 0.2) == "no difference detected"
    assert stats.verdict(up, math.nan) == "no difference detected"


def rows_for(setting: str, values: dict[str, list[float]], rounds: int = 2) -> list[dict]:
    """Learning-curve rows: each strategy's per-seed AUC is given; round 0 is 0 (it must not count)."""
    rows = []
    for strategy, per_seed in values.items():
        for seed, auc in enumerate(per_seed):
            for r in range(rounds + 1):
                acc = 0.0 if r == 0 else auc / 100
                rows.append(
                    {"setting": setting, "strategy": strategy, "seed": seed, "round": r, "rounds": rounds,
                     "accuracy": acc, "best_accuracy": acc}
                )  # fmt: skip
    return rows


def test_per_seed_auc_leaves_round_zero_out_and_the_best_baseline():
    rows = rows_for("s", {"random": [70, 72], "margin": [75, 76], "badge": [74, 80]})
    auc = stats.per_seed(rows)["s"]
    assert auc["random"] == {0: pytest.approx(70.0), 1: pytest.approx(72.0)}
    assert stats.best_baseline(auc) == "badge"  # mean 77 against margin's 75.5


def test_fig3_verdict_rules():
    seeds = 10
    ahead = [80 + i % 3 for i in range(seeds)]
    behind = [70 + (i * 2) % 5 for i in range(seeds)]
    reproduced = rows_for("s", {"random": behind, "margin": [a - 3 - i % 2 for i, a in enumerate(ahead)],
                                experiments.DYNAMIC: ahead})  # fmt: skip
    assert experiments.fig3_verdict(reproduced).startswith("**Exploratory: as the paper.**")
    partly = rows_for("s", {"random": behind, "margin": [a + 3 + i % 2 for i, a in enumerate(ahead)],
                            experiments.DYNAMIC: ahead})  # fmt: skip
    assert experiments.fig3_verdict(partly).startswith("**Exploratory: partly as the paper.**")
    neither = rows_for("s", {"random": ahead, "margin": ahead, experiments.DYNAMIC: behind})
    text = experiments.fig3_verdict(neither)
    assert text.startswith("**Exploratory: not as the paper.**") and "worse" in text


def test_write_sections_replaces_only_between_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("head\n<!-- a:start -->\nold\n<!-- a:end -->\ntail\n")
    experiments.write_sections(page, {"a": "new"})
    assert page.read_text() == "head\n<!-- a:start -->\nnew\n<!-- a:end -->\ntail\n"
    with pytest.raises(ValueError, match="lacks the markers"):
        experiments.write_sections(page, {"b": "x"})


def test_holm_within_a_declared_family_by_hand():
    # Figure 3's family for one arm: g2 vs random (p 0.03) and g2 vs the best of margin/BADGE (p 0.02):
    # sorted 0.02 x 2 = 0.04, then 0.03 x 1 = 0.03, kept monotone at 0.04
    adjusted = stats.holm_within(("vs random", "vs best"), {"vs best": 0.02, "vs random": 0.03})
    assert adjusted == {"vs random": pytest.approx(0.04), "vs best": pytest.approx(0.04)}
    # a NaN p still counts in the family: the other p is doubled
    adjusted = stats.holm_within(("a", "b"), {"a": 0.01, "b": math.nan})
    assert adjusted["a"] == pytest.approx(0.02) and math.isnan(adjusted["b"])
    with pytest.raises(ValueError, match="exactly"):
        stats.holm_within(("a", "b"), {"a": 0.01})
    with pytest.raises(ValueError, match="exactly"):
        stats.holm_within(("a",), {"a": 0.01, "extra": 0.5})


def test_ties_are_not_wins():
    d = stats.paired({0: 1.0, 1: 2.0, 2: 3.0}, {0: 1.0, 1: 1.0, 2: 4.0})
    assert (d.wins, d.ties, d.seeds) == (1, 1, 3)


def test_inconclusive_where_the_paper_effect_is_below_the_detectable_one():
    up = stats.Paired(0.3, 1.0, 0.2, 6, 10)
    assert stats.powered_verdict(up, 0.2, paper_effect=0.17, detectable=0.7) == stats.INCONCLUSIVE
    assert stats.powered_verdict(up, 0.2, paper_effect=2.0, detectable=0.7) == "no difference detected"
    assert stats.powered_verdict(up, 0.2, paper_effect=2.0, detectable=math.nan) == stats.INCONCLUSIVE
    assert stats.powered_verdict(up, 0.2, paper_effect=math.nan, detectable=0.7) == stats.INCONCLUSIVE
    assert stats.powered_verdict(up, math.nan, paper_effect=2.0, detectable=0.0) == stats.INCONCLUSIVE  # no test
    assert stats.powered_verdict(up, 0.01, paper_effect=0.17, detectable=0.7) == "better"  # a finding stands


def test_difference_in_differences_by_hand():
    a_after, a_before = {0: 80.0, 1: 82.0, 2: 84.0}, {0: 78.0, 1: 81.0, 2: 80.0}
    b_after, b_before = {0: 75.0, 1: 76.0, 2: 77.0, 3: 1.0}, {0: 74.0, 1: 76.0, 2: 75.0}
    d = stats.difference_in_differences(a_after, a_before, b_after, b_before)
    # gains 2, 1, 4 against 1, 0, 2: differences 1, 1, 2; mean 4/3, sd sqrt(1/3), t = 4 on 2 df
    from scipy.stats import t as student

    assert d.mean == pytest.approx(4 / 3) and d.std == pytest.approx(math.sqrt(1 / 3))
    assert d.p == pytest.approx(2 * student.sf(4.0, 2)) and (d.wins, d.seeds) == (3, 3)


def ratio_rows(ratios_by_seed: list[list[float]]) -> list[dict]:
    """Figure 4 rows after the last training point: each seed's random query sets with the given ratios."""
    return [
        {"setting": "s", "seed": seed, "epochs": 80, "b": 10, "train_loss": 0.001, "random_q_mean": 1.0,
         "random_numerators": [2 * r for r in ratios], "random_denominators": [2.0] * len(ratios)}
        for seed, ratios in enumerate(ratios_by_seed)
    ]  # fmt: skip


def test_fig4_verdict_reads_the_median_and_the_ratio_of_expectations_with_intervals():
    close = ratio_rows([[0.98, 1.0, 1.02, 1.01] * 5 for _ in range(5)])
    assert experiments.fig4_verdict(close).startswith("**Verdict: reproduced.**")
    far = ratio_rows([[1.5, 1.6, 1.55] * 5 for _ in range(5)])
    assert experiments.fig4_verdict(far).startswith("**Verdict: not reproduced.**")
    # Two query sets of twenty with a tiny denominator have ratios of 20: the mean of the ratios is 2.9, far from
    # 1; the median (1) and the ratio of expectations (40 / 36.2 = 1.105) are barely moved by them, though how
    # many tiny denominators a resample draws widens the latter's interval across the tolerance's edge
    skewed = ratio_rows([[1.0] * 20 for _ in range(5)])
    for row in skewed:
        row["random_denominators"] = [2.0] * 18 + [0.1, 0.1]
    text = experiments.fig4_verdict(skewed)
    assert "median 1.00 [1.00, 1.00]: within" in text and "ratio of expectations 1.10 [" in text
    assert text.startswith("**Verdict: inconclusive.**") and "]: undecided." in text
    straddling = ratio_rows([[0.85, 1.0, 1.15] * 3, [0.88, 1.05, 1.1] * 3])
    assert experiments.fig4_verdict(straddling).startswith("**Verdict: inconclusive.**")
