"""Calibration, ECE, AUROC and the conformal auto-execute threshold, on seeded synthetic scores."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from grasping.calibration import (
    ISOTONIC,
    NEVER,
    TEMPERATURE,
    Calibrator,
    auroc,
    auto_execute_rates,
    conformal_threshold,
    executed_failure_threshold,
    expected_calibration_error,
    fit_calibrator,
    fit_isotonic,
    fit_temperature,
    reliability_diagram,
    sigmoid,
)


def draw(n: int, seed: int, scale: float = 2.5, shift: float = 0.0) -> tuple[np.ndarray, ...]:
    """True logits z ~ N(0, 3); a model reports z * scale + shift (over-confident, biased) logits."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 3.0, n)
    y = (rng.random(n) < sigmoid(z)).astype(np.float64)
    return z * scale + shift, y, sigmoid(z)


def test_ece_of_true_probabilities_is_small_and_of_overconfident_ones_large() -> None:
    reported, y, p_true = draw(20000, 0)
    assert expected_calibration_error(p_true, y) < 0.015
    assert expected_calibration_error(sigmoid(reported), y) > 0.05


def test_ece_hand_example() -> None:
    # Bin [0.2, 0.2667): p = 0.25 twice, observed 1 of 2 -> gap 0.25, weight 2/4; bin of 0.9: gap 0.1 x2.
    p = np.array([0.25, 0.25, 0.9, 0.9])
    y = np.array([1, 0, 1, 1])
    assert expected_calibration_error(p, y) == pytest.approx(0.5 * 0.25 + 0.5 * 0.1)


def test_auroc_equals_pair_counting_with_ties() -> None:
    rng = np.random.default_rng(3)
    s = rng.integers(0, 5, 60).astype(float)  # many ties
    y = (rng.random(60) < 0.4).astype(float)
    pos, neg = s[y == 1], s[y == 0]
    pairs = [(a > b) + 0.5 * (a == b) for a, b in itertools.product(pos, neg)]
    assert auroc(s, y) == pytest.approx(np.mean(pairs))
    assert math.isnan(auroc(s, np.ones(60)))


def test_temperature_scaling_recovers_scale_and_bias_and_lowers_held_out_ece() -> None:
    reported, y, _ = draw(6000, 1, scale=2.5, shift=1.0)
    cal = fit_temperature(reported[:3000], y[:3000])
    assert cal.temperature == pytest.approx(2.5, rel=0.1)
    assert cal.bias == pytest.approx(-1.0 / 2.5, abs=0.1)
    before = expected_calibration_error(sigmoid(reported[3000:]), y[3000:])
    after = expected_calibration_error(cal.apply(reported[3000:]), y[3000:])
    assert after < 0.03 < before


def test_isotonic_is_monotone_and_pools_violators() -> None:
    cal = fit_isotonic(np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.0, 1.0, 0.0, 1.0]))
    np.testing.assert_allclose(cal.apply(np.array([1.0, 2.0, 3.0, 4.0])), [0.0, 0.5, 0.5, 1.0])
    rng = np.random.default_rng(2)
    z = rng.normal(size=500)
    cal = fit_isotonic(z, (rng.random(500) < sigmoid(2 * z)).astype(float))
    grid = np.linspace(-4, 4, 200)
    assert np.all(np.diff(cal.apply(grid)) >= 0)


def test_fit_calibrator_prefers_isotonic_for_a_non_logistic_link() -> None:
    rng = np.random.default_rng(4)
    z = rng.normal(0, 2, 6000)
    p = np.where(z > 0.5, 0.9, 0.2)  # a step: no temperature/bias can express it
    y = (rng.random(6000) < p).astype(float)
    choice = fit_calibrator(z[:3000], y[:3000])
    assert choice.calibrator.method == ISOTONIC
    assert expected_calibration_error(choice.calibrator.apply(z[3000:]), y[3000:]) < 0.03
    reported, y2, _ = draw(3000, 5)
    assert fit_calibrator(reported, y2).calibrator.method == TEMPERATURE


def test_few_calibration_rows_get_temperature_scaling_so_a_threshold_can_still_be_certified() -> None:
    # Continual seed 33 (stop 37): isotonic on ~150 jaw rows mapped every logit above -0.49 to
    # p = 1.0; on the conformal rows that block held failures, so no threshold was certified and
    # the model would never use the jaw alone. Here the calibration rows happen to succeed above
    # z = 0 and fresh rows succeed at most 90% of the time.
    for seed in range(4):
        rng = np.random.default_rng(seed)
        z = rng.normal(0, 2, 200)
        y = np.where(z > 0.0, 1.0, (rng.random(200) < sigmoid(z)).astype(float))
        z_new = rng.normal(0, 2, 400)
        y_new = (rng.random(400) < np.minimum(sigmoid(2 * z_new), 0.9)).astype(float)
        iso = fit_isotonic(z, y)
        assert iso.iso_y.max() == 1.0  # the overfit top block certifies nothing:
        assert conformal_threshold(iso.apply(z_new), y_new, 0.05).threshold == math.inf
        choice = fit_calibrator(z, y)
        assert choice.calibrator.method == TEMPERATURE and ISOTONIC not in choice.cv_nll
        assert conformal_threshold(choice.calibrator.apply(z_new), y_new, 0.05).threshold < 0.96


def test_bad_input_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        expected_calibration_error(np.array([0.1, 0.2]), np.array([1.0]))
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        fit_temperature(np.array([0.1, 0.2]), np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="both successes and failures"):
        fit_calibrator(np.zeros(100), np.ones(100))
    with pytest.raises(ValueError, match="NaN"):
        conformal_threshold(np.array([np.nan]), np.array([1.0]))
    with pytest.raises(ValueError, match="temperature"):
        Calibrator(TEMPERATURE, temperature=0.0)


def test_crc_threshold_matches_the_bound_by_hand() -> None:
    # 39 rows, alpha 0.05: (fails_above + 1) / 40 <= 0.05 allows exactly 1 failure at or above t.
    p = np.linspace(0.99, 0.61, 39)
    y = np.ones(39)
    y[[5, 20]] = 0  # the 6th and 21st highest fail
    res = conformal_threshold(p, y, alpha=0.05)
    assert res.threshold == pytest.approx(p[19])  # everything down to just above the 2nd failure
    assert res.bound == pytest.approx((1 + 1) / 40)
    assert res.empirical_risk == pytest.approx(1 / 39)
    assert res.coverage == pytest.approx(20 / 39)


def test_crc_is_never_feasible_with_too_few_rows() -> None:
    # n = 18 < 1/alpha - 1 = 19: even executing nothing gives bound 1/19 > 0.05.
    res = conformal_threshold(np.full(18, 0.99), np.ones(18), alpha=0.05)
    assert res.threshold == NEVER
    assert auto_execute_rates(np.array([0.999]), np.array([0.0]), res.threshold)["auto_execute_rate"] == 0.0


def test_crc_keeps_auto_executed_failures_below_alpha_on_fresh_samples() -> None:
    """Guarantee: E[P(auto-executed and failed)] <= alpha. 200 calibration draws, one big fresh set."""
    alpha = 0.05
    fresh_logit, fresh_y, _ = draw(200000, 99)
    cal = fit_temperature(*draw(5000, 98)[:2])
    p_fresh = cal.apply(fresh_logit)
    risks, coverages = [], []
    for seed in range(200):
        logit, y, _ = draw(400, 1000 + seed)
        t = conformal_threshold(cal.apply(logit), y, alpha).threshold
        rates = auto_execute_rates(p_fresh, fresh_y, t)
        risks.append(rates["auto_fail_joint"])
        coverages.append(rates["auto_execute_rate"])
    assert np.mean(risks) <= alpha
    assert np.mean(risks) > 0.8 * alpha  # not trivially safe: it does use its budget
    assert np.mean(coverages) > 0.3


def test_executed_failure_threshold_bounds_failures_among_executed() -> None:
    alpha = 0.05
    logit, y, _ = draw(4000, 11)
    cal = fit_temperature(logit[:2000], y[:2000])
    res = executed_failure_threshold(cal.apply(logit[2000:]), y[2000:], alpha=alpha, delta=0.1)
    assert res.threshold < 1.0
    fresh_logit, fresh_y, _ = draw(200000, 12)
    rates = auto_execute_rates(cal.apply(fresh_logit), fresh_y, res.threshold)
    assert rates["auto_fail_given_executed"] <= alpha
    assert rates["auto_execute_rate"] > 0.1
    # The joint CRC threshold is lower, and its failure rate *among executed* is well above alpha.
    crc = conformal_threshold(cal.apply(logit[2000:]), y[2000:], alpha=alpha)
    assert crc.threshold < res.threshold
    crc_rates = auto_execute_rates(cal.apply(fresh_logit), fresh_y, crc.threshold)
    assert crc_rates["auto_fail_given_executed"] > alpha


def test_reliability_diagram_writes_a_png(tmp_path) -> None:
    reported, y, _ = draw(2000, 6)
    cal = fit_temperature(reported, y)
    out = reliability_diagram(
        {"raw": sigmoid(reported), "calibrated": cal.apply(reported)}, y, tmp_path / "d" / "rel.png"
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_weighted_calibration_follows_the_recent_regime() -> None:
    """Old rows succeeded more often than new ones (a packaging change): weight the new ones."""
    rng = np.random.default_rng(7)
    z = rng.normal(0, 2, 8000)
    new = np.arange(8000) >= 6000  # the last quarter is recent
    p_true = np.where(new, sigmoid(z - 1.5), sigmoid(z))
    y = (rng.random(8000) < p_true).astype(float)
    w = np.where(new, 1.0, 0.02)
    z_new = rng.normal(0, 2, 20000)
    y_new = (rng.random(20000) < sigmoid(z_new - 1.5)).astype(float)
    for fit in (fit_temperature, fit_isotonic):
        plain = expected_calibration_error(fit(z, y).apply(z_new), y_new)
        weighted = expected_calibration_error(fit(z, y, w).apply(z_new), y_new)
        assert weighted < 0.03 < plain
    with pytest.raises(ValueError, match="weights"):
        fit_temperature(z, y, -w)
