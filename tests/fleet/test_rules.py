"""The stage rule's statistics against published values, and its verdicts on known counts."""

from __future__ import annotations

import pytest

from fleet.rollout import Counts, StageRule, canary_cells, diff_interval, judge, wilson


def test_intervals_match_newcombe_1998() -> None:
    # Newcombe, Statistics in Medicine 17:873 (1998), table II, method 10.
    d, lo, hi = diff_interval(56, 70, 48, 80)
    assert (
        d == pytest.approx(0.2)
        and lo == pytest.approx(0.0524, abs=1e-4)
        and hi == pytest.approx(0.3339, abs=1e-4)
    )
    _, lo, hi = diff_interval(9, 10, 3, 10)
    assert lo == pytest.approx(0.1705, abs=1e-4) and hi == pytest.approx(0.8090, abs=1e-4)
    lo, hi = wilson(81, 263)
    assert lo == pytest.approx(0.2553, abs=1e-4) and hi == pytest.approx(0.3662, abs=1e-4)
    assert diff_interval(0, 0, 5, 10)[1:] == (-1.0, 1.0)  # no data: no knowledge


def counts(n: int, prec: float, rate: float) -> Counts:
    return Counts(
        picks=n, auto_attempts=n, auto_success=round(prec * n), auto_picks=round(rate * n), items_done=n
    )


RULE = StageRule(
    min_picks=100, max_picks=3000, max_drop_auto_precision=0.02, max_drop_autonomous_pick_rate=0.05
)


def test_verdicts() -> None:
    base = counts(5000, 0.97, 0.90)
    assert judge("canary", RULE, counts(50, 0.5, 0.5), base).verdict == "collecting"  # below min_picks
    v = judge("canary", RULE, counts(400, 0.85, 0.90), base)
    assert v.verdict == "fail" and "auto_precision" in v.reason
    v = judge("canary", RULE, counts(400, 0.97, 0.70), base)
    assert v.verdict == "fail" and "autonomous_pick_rate" in v.reason
    # As good as live, but 400 picks cannot show a drop under 2 points: keep collecting ...
    assert judge("canary", RULE, counts(400, 0.97, 0.90), base).verdict == "collecting"
    # ... which is settled with more picks,
    assert judge("canary", RULE, counts(2500, 0.975, 0.91), base).verdict == "pass"
    # and a stage that cannot show it within max_picks fails.
    v = judge("canary", RULE, counts(3000, 0.955, 0.90), base)
    assert v.verdict == "fail" and "max_picks" in v.reason


def test_canary_cells_are_a_stable_share() -> None:
    cells = [f"cell-{k}" for k in range(10)]
    a = canary_cells(cells, 0.2, "v7")
    assert len(a) == 2 and a == canary_cells(list(reversed(cells)), 0.2, "v7")
    assert canary_cells(cells[:2], 0.2, "v7") and canary_cells([], 0.2, "v7") == []
