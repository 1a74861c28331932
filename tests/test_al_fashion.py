"""The Fashion-MNIST experiment's wiring: its tasks as the issue sizes them, and its page parts and verdicts
from hand-made rows (the runs themselves go through `python -m fastdal.al experiments --quick` in CI)."""

import pytest

from fastdal.al import claims, fashion, pools


def test_the_full_sizes_are_the_papers_proportions():
    tasks = fashion.strategy_tasks(fashion.FULL)
    assert len(tasks) == 2 * len(fashion.STRATEGIES) * 10
    arm_a, arm_b = fashion.arms(fashion.FULL)
    assert (arm_a.pool.size, arm_a.pool.keep_ratios, arm_b.pool.keep_ratios) == (
        20000,
        None,
        pools.OFFICIAL_KEEP_RATIOS,
    )
    c = arm_a.config
    assert (c.initial, c.b, c.rounds, c.balanced_initial) == (500, 250, 4, True)
    rounds = {(t.setting, t.config.b, t.config.rounds) for t in fashion.rounds_tasks(fashion.FULL)}
    assert rounds == {("fashion-A-R1", 1000, 1), ("fashion-A-R4", 250, 4), ("fashion-A-R10", 100, 10)}
    assert {"dynamic-g0", "dynamic-ginf", "margin", "badge"} <= set(fashion.STRATEGIES)


def rows_for(setting: str, strategy: str, accuracies: list[float], recall: list[float] | None = None) -> list[dict]:
    """One run per seed, with the given accuracy in every round after the first."""
    rows = []
    for seed, acc in enumerate(accuracies):
        for r in range(3):
            rows.append(
                {"setting": setting, "strategy": strategy, "seed": seed, "round": r, "rounds": 2,
                 "accuracy": acc if r else 0.1, "class_recall": recall or []}
            )  # fmt: skip
    return rows


def test_page_parts_and_verdicts_from_hand_made_rows():
    seeds = 10
    base = [0.70 + 0.01 * (i % 3) for i in range(seeds)]
    ahead = {"dynamic-g2": 0.05, "random": 0.0, "margin": 0.01, "badge": 0.02, "dynamic-g0": 0.0,
             "dynamic-ginf": 0.01, "dynamic-last": 0.03}  # fmt: skip
    rows = []
    for arm in claims.ARMS:
        for strategy, gain in ahead.items():
            noise = [0.002 * ((i * 7 + len(strategy)) % 5) for i in range(seeds)]
            rows += rows_for(arm, strategy, [b + gain + n for b, n in zip(base, noise)], [0.5] * 10)
    rows_rounds = []
    for rounds, extra in ((1, 0.0), (4, 0.01), (10, 0.03)):
        for strategy, gain in (("dynamic-g2", extra), ("random", extra / 3)):
            noise = [0.001 * ((i * i + rounds * len(strategy)) % 5) for i in range(seeds)]
            rows_rounds += rows_for(f"fashion-A-R{rounds}", strategy, [b + gain + n for b, n in zip(base, noise)])
    parts = fashion.sections(fashion.FULL, rows, rows_rounds)
    assert set(parts) == {"fashion-protocol", "fashion-strategies", "fashion-recall", "fashion-table1",
                          "verdict-fashion-fig3", "verdict-fashion-fig5", "verdict-fashion-table1"}  # fmt: skip
    assert parts["verdict-fashion-fig3"].startswith("**Verdict: reproduced.**")  # 5 points ahead, tiny noise
    assert "vs best of margin/badge: +3.00 points" in parts["verdict-fashion-fig3"]  # badge is the better one
    assert "detectable at power 0.8" in parts["verdict-fashion-fig5"]
    table1 = parts["verdict-fashion-table1"]
    assert table1.startswith("**Verdict: reproduced.**") and "the paper's effect: 2.04 points" in table1
    assert "R=10 minus R=1: +3.0" in table1 and "dynamic-g2 minus random: +1.9" in table1  # 3 - 1, noise -0.1
    assert "| keep ratio | 0.30 |" in parts["fashion-recall"] and "| random | 50.0 |" in parts["fashion-recall"]
    assert "difference in differences" in parts["fashion-table1"]


def test_an_unknown_comparison_kind_is_refused():
    with pytest.raises(ValueError, match="comparison kind"):
        fashion.difference(claims.Comparison("x", "other", "fashion-A", "random"), [], [])
