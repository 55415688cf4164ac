"""The auto-execute threshold bounds P(fail | executed without asking) <= alpha at confidence 1 - delta."""

from __future__ import annotations

import numpy as np
import pytest

from grasping.calibration import NEVER, selective_threshold


def _rows(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores uniform on [0, 1]; the true failure rate at score s is 0.5 (1 - s)^2 + 0.01 * (s < 0.9).

    So the failure rate among rows with score >= t is known in closed form (`true_rate`).
    """
    p = rng.uniform(0.0, 1.0, n)
    fail = rng.uniform(0.0, 1.0, n) < _fail_prob(p)
    return p, (~fail).astype(float)


def _fail_prob(s: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 - s) ** 2 + 0.01 * (s < 0.9)


def true_rate(t: float) -> float:
    """P(fail | score >= t) for the model of `_rows`, by numerical integration."""
    s = np.linspace(t, 1.0, 20001)
    return float(np.trapezoid(_fail_prob(s), s) / (1.0 - t))


def test_the_conditional_failure_rate_is_bounded_in_at_least_1_minus_delta_of_fits():
    """200 independent fits on 600 rows each: the true failure rate among executed picks at the
    returned threshold exceeds alpha in at most delta of them (plus binomial slack for 200 fits)."""
    alpha, delta = 0.05, 0.1
    rng = np.random.default_rng(7)
    over, thresholds = 0, []
    for _ in range(200):
        p, y = _rows(rng, 600)
        res = selective_threshold(p, y, alpha=alpha, delta=delta)
        if res.threshold == NEVER:
            continue  # always ask: safe, counted as not over
        thresholds.append(res.threshold)
        over += true_rate(res.threshold) > alpha
    assert len(thresholds) >= 150  # most fits certify a threshold
    # Binomial(200, 0.1) exceeds 30 with probability < 1%; a method that ignored the confidence
    # (the empirical rate <= alpha) is over in about half of the fits.
    assert over <= 30, over
    # ... and it is not vacuous: the thresholds sit near the true boundary, not at the top.
    t_star = min(t for t in np.linspace(0.01, 0.99, 99) if true_rate(t) <= alpha)
    assert t_star - 0.05 < np.median(thresholds) < t_star + 0.2


def test_the_joint_rate_would_not_have_bounded_the_conditional_one():
    """Why the conditional rate: a threshold that executes few rows keeps P(executed and failed) low
    even when most executed picks fail; the selective threshold refuses it."""
    rng = np.random.default_rng(3)
    p = rng.uniform(0.0, 1.0, 2000)
    y = (rng.uniform(0.0, 1.0, 2000) < 0.7).astype(float)  # 30% fail at every score: p is useless
    res = selective_threshold(p, y, alpha=0.05, delta=0.1)
    assert res.threshold == NEVER and res.n_exec == 0
    joint_at_09 = float(((p >= 0.9) & (y == 0)).mean())
    assert joint_at_09 <= 0.05  # the joint rate would have allowed t = 0.9 ...
    assert float((y[p >= 0.9] == 0).mean()) > 0.2  # ... where a quarter of unasked picks fail


def test_what_the_fit_reports_matches_the_rows():
    rng = np.random.default_rng(11)
    p, y = _rows(rng, 1000)
    res = selective_threshold(p, y, alpha=0.05, delta=0.1)
    act = p >= res.threshold
    assert res.n == 1000 and res.n_exec == int(act.sum()) and res.n_fail == int((y[act] == 0).sum())
    assert res.coverage == pytest.approx(act.mean())
    assert res.p_value <= 0.1 and res.upper_bound <= 0.05 + 1e-9  # one-sided CP <= alpha at 1 - delta
    # every threshold tested above it was rejected too: the executed failure rate there is lower
    assert (y[act] == 0).mean() <= 0.05


def test_a_smaller_alpha_never_lowers_the_threshold_and_too_few_rows_certify_nothing():
    rng = np.random.default_rng(5)
    p, y = _rows(rng, 1500)
    t = [selective_threshold(p, y, alpha=a, delta=0.1).threshold for a in (0.01, 0.02, 0.05, 0.10)]
    assert t == sorted(t, reverse=True)
    # 44 executed rows without one failure cannot reject at alpha 0.05, delta 0.1 (0.95^44 > 0.1)
    few = selective_threshold(np.full(44, 0.99), np.ones(44), alpha=0.05, delta=0.1, min_exec=0)
    assert few.threshold == NEVER
    enough = selective_threshold(np.full(45, 0.99), np.ones(45), alpha=0.05, delta=0.1, min_exec=0)
    assert enough.threshold <= 0.99 and enough.n_exec == 45  # every t <= 0.99 executes the same rows
    # by default the walk starts where 100 rows are executed: fewer rows certify nothing
    assert selective_threshold(np.full(99, 0.99), np.ones(99)).threshold == NEVER
    with pytest.raises(ValueError, match="alpha and delta"):
        selective_threshold(p, y, alpha=0.0)
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        selective_threshold(p, y * 2)


def test_a_cell_configured_with_an_alpha_uses_the_thresholds_certified_for_it(tmp_path):
    """The model file carries thresholds per alpha; an alpha it has none for is refused, naming the file."""
    from test_modelfile import write_model

    from grasping.learned_scorer import LearnedScorer
    from grasping.modelfile import ModelFileError, load_model, save_model

    write_model(tmp_path / "a.safetensors")
    m = load_model(tmp_path / "a.safetensors")
    meta = dict(m.meta, alpha=0.05)
    meta["threshold_fit"] = {"alpha": 0.05, "by_alpha": {"0.01": [0.97, np.inf], "0.05": [0.81, 0.9]}}
    path = tmp_path / "b.safetensors"
    save_model(path, m.net, m.calibrators, np.array([0.81, 0.9]), m.watchdog, meta)
    assert LearnedScorer.from_file(path).thresholds.tolist() == [0.81, 0.9]
    strict = LearnedScorer.from_file(path, alpha=0.01)
    assert strict.alpha == 0.01 and strict.thresholds[0] == 0.97 and strict.thresholds[1] == np.inf
    assert strict.candidate_thresholds(np.array([0, 1, 0])).tolist() == [0.97, np.inf, 0.97]
    with pytest.raises(ModelFileError, match=r"no auto-execute thresholds certified for alpha 0\.03") as e:
        LearnedScorer.from_file(path, alpha=0.03)
    assert str(path) in str(e.value)
