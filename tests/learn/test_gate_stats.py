"""The gate's per-kind forgetting test: paired rows, one-sided exact bound (grasping.learning)."""

from __future__ import annotations

import numpy as np
import pytest

from grasping.learning import paired_success_change


def rows(n: int, lost: int, gained: int, both: int = 0) -> tuple[np.ndarray, np.ndarray]:
    inc = np.zeros(n, dtype=bool)
    cand = np.zeros(n, dtype=bool)
    inc[:lost] = True
    cand[lost : lost + gained] = True
    inc[lost + gained : lost + gained + both] = True
    cand[lost + gained : lost + gained + both] = True
    return inc, cand


def test_one_row_of_ten_is_not_evidence_of_forgetting() -> None:
    pc = paired_success_change(*rows(10, lost=1, gained=0, both=2), level=0.05)
    assert (pc.n, pc.losses, pc.gains) == (10, 1, 0)
    assert pc.change == pytest.approx(-0.1)
    assert pc.upper == pytest.approx(0.1 * (1 - 2 * 0.05))  # one-sided CP lower bound of pi is 0.05
    assert pc.upper > -0.01


def test_a_kind_that_lost_a_third_of_its_rows_is_refused() -> None:
    pc = paired_success_change(*rows(30, lost=10, gained=0, both=5), level=0.05)
    assert pc.change == pytest.approx(-1 / 3)
    assert pc.upper < -0.1


def test_identical_models_change_nothing_and_bad_input_is_refused() -> None:
    inc, _ = rows(20, lost=4, gained=0)
    pc = paired_success_change(inc, inc, level=0.05)
    assert (pc.change, pc.upper, pc.losses, pc.gains) == (0.0, 0.0, 0, 0)
    with pytest.raises(ValueError, match="level"):
        paired_success_change(inc, inc, level=1.0)
    with pytest.raises(ValueError, match="paired rows"):
        paired_success_change(inc, inc[:5], level=0.05)


def test_the_test_keeps_its_level_without_forgetting_and_has_power_with_it() -> None:
    rng = np.random.default_rng(7)
    n, draws = 40, 2000

    def refusals(p_loss: float, p_gain: float) -> float:
        out = 0
        for _ in range(draws):
            u = rng.random(n)
            inc = u < p_loss  # discordant rows: the incumbent succeeded, the candidate not
            cand = (u >= p_loss) & (u < p_loss + p_gain)
            out += paired_success_change(inc, cand, level=0.05).upper < -0.01
        return out / draws

    # No change in truth (as many rows lost as gained): refused at most about 5% of the time.
    assert refusals(0.1, 0.1) <= 0.05
    # A kind that truly lost 25 pp of its rows: refused nearly always.
    assert refusals(0.25, 0.0) >= 0.9
