"""The gate's per-kind forgetting test: paired rows, one-sided exact bound (grasping.learning)."""

from __future__ import annotations

import numpy as np
import pytest

from grasping.calibration import auroc, expected_calibration_error
from grasping.learning import (
    _metric_check,
    _weighted_auroc,
    _weighted_ece,
    paired_metric_change,
    paired_success_change,
)


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


# --- the AUROC and ECE checks: paired bootstrap over totes (grasping.learning.paired_metric_change) ---


def scored_rows(n: int, seed: int, separation: float) -> tuple[np.ndarray, np.ndarray]:
    """Labels and logits whose AUROC grows with `separation` (0: chance)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.6).astype(float)
    return y, separation * (2 * y - 1) + rng.normal(0, 1, n)


def test_a_model_that_ranks_far_worse_is_shown_worse_and_a_copy_is_not() -> None:
    y, good = scored_rows(200, seed=1, separation=1.5)
    _, noise = scored_rows(200, seed=2, separation=0.0)
    totes = np.repeat(np.arange(20), 10).astype(str)
    worse = paired_metric_change("auroc", y, good, noise, level=0.05, groups=totes, resamples=500)
    assert worse.groups == 20  # whole totes resampled
    assert worse.change < -0.2 and worse.upper < -0.01
    same = paired_metric_change("auroc", y, good, good.copy(), level=0.05, groups=totes, resamples=500)
    assert (same.change, same.lower, same.upper) == (0.0, 0.0, 0.0)


def test_a_small_auroc_difference_on_170_rows_is_not_evidence() -> None:
    # The candidate is the incumbent plus a little noise: AUROC differs by about a point either way,
    # which the old point rule (candidate >= incumbent - 0.01) refused about half the time.
    y, inc = scored_rows(170, seed=3, separation=1.0)
    cand = inc + np.random.default_rng(4).normal(0, 0.4, 170)
    pm = paired_metric_change("auroc", y, inc, cand, level=0.05, resamples=500)
    assert pm.groups == 170  # no totes given: rows are resampled
    assert pm.lower < pm.change < pm.upper
    assert pm.upper > -0.01


def test_ece_worse_by_far_is_refused_and_bad_input_is_refused() -> None:
    rng = np.random.default_rng(5)
    p = rng.random(300)
    y = (rng.random(300) < p).astype(float)  # p is calibrated
    off = np.clip(p + 0.25, 0, 1)  # every probability 25 points too high
    pm = paired_metric_change("ece", y, p, off, level=0.05, resamples=500)
    assert pm.change > 0.1 and pm.lower > 0.03
    ok, text = _metric_check(pm, 0.01, "higher")
    assert not ok and "worse calibrated" in text
    with pytest.raises(ValueError, match="metric"):
        paired_metric_change("brier", y, p, off, level=0.05)
    with pytest.raises(ValueError, match="paired rows"):
        paired_metric_change("ece", y, p, off[:10], level=0.05)


def test_the_auroc_check_keeps_its_level_when_nothing_changed() -> None:
    # Two models of equal skill scoring the same rows independently: refused at most ~5% of draws.
    refused = 0
    draws = 200
    for k in range(draws):
        y, a = scored_rows(150, seed=100 + k, separation=1.0)
        b = 1.0 * (2 * y - 1) + np.random.default_rng(1000 + k).normal(0, 1, 150)
        pm = paired_metric_change("auroc", y, a, b, level=0.05, resamples=300, seed=k)
        refused += not _metric_check(pm, 0.01, "lower")[0]
    assert refused / draws <= 0.1


def test_a_resample_scored_by_its_draw_counts_is_the_resampled_rows_scored() -> None:
    # The bootstrap scores each resample from how often each row was drawn instead of copying the
    # rows: the same number, ties (AUROC counts them half) and one-class resamples included.
    rng = np.random.default_rng(4)
    n = 120
    y = (rng.random(n) < 0.6).astype(np.float64)
    s = np.round(np.clip(0.3 * y + 0.7 * rng.random(n), 0.0, 1.0), 1)  # few levels: many ties
    draws = rng.integers(0, n, size=(40, n))
    draws[0] = np.flatnonzero(y > 0.5)[0]  # a resample of one success only: AUROC undefined
    counts = np.stack([np.bincount(d, minlength=n) for d in draws]).astype(np.float64)
    got_auroc, got_ece = _weighted_auroc(s, y, counts), _weighted_ece(s, y, counts, 15)
    assert np.isnan(got_auroc[0]) and np.isnan(auroc(s[draws[0]], y[draws[0]]))
    for k in range(1, len(draws)):
        assert got_auroc[k] == pytest.approx(auroc(s[draws[k]], y[draws[k]]), abs=1e-12)
    for k in range(len(draws)):
        assert got_ece[k] == pytest.approx(expected_calibration_error(s[draws[k]], y[draws[k]]), abs=1e-12)
