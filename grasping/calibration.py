"""Turning model logits into honest probabilities, and deciding when the cell may act alone.

Two calibrators, both fitted on held-out outcomes (never on the rows the network trained on):
  * temperature scaling with a bias (Platt scaling): p = sigmoid(logit / T + b), two parameters,
    cannot overfit, keeps the ranking. The bias matters here: training balances classes, which
    shifts every logit by about log(n_fail / n_success), and a temperature alone cannot undo a shift;
  * isotonic regression: the best non-decreasing map logit -> p (pool-adjacent-violators), more
    flexible, needs more data.
`fit_calibrator` picks between them by cross-validated negative log-likelihood on the calibration
rows, then refits the winner on all of them.

Conformal risk control (Angelopoulos, Bates, Fisch, Lei, Schuster, "Conformal Risk Control",
ICLR 2024) picks the auto-execute threshold t on the calibrated probability. For held-out rows
i = 1..n with calibrated probability p_i and outcome y_i, the loss of threshold t is
    L_i(t) = 1{p_i >= t and y_i = 0}        ("auto-executed and failed"), bounded by B = 1,
which is non-increasing in t. With Rhat(t) = (1/n) sum_i L_i(t), CRC chooses
    t_hat = inf { t : (n * Rhat(t) + B) / (n + 1) <= alpha }
and guarantees, for a fresh exchangeable row, E[L_{n+1}(t_hat)] <= alpha: the probability that a
new candidate is auto-executed AND fails is at most alpha. (That is the joint rate over all
candidates scored; the failure rate *among auto-executed picks* is that divided by the fraction
auto-executed, and we report both.) If even t = "never" is needed, i.e. n < 1/alpha - 1, no
threshold is feasible and `NEVER` (above any probability) is returned: the cell then always asks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

TEMPERATURE = "temperature"
ISOTONIC = "isotonic"
METHOD_CODES = {TEMPERATURE: 0, ISOTONIC: 1}
NEVER = math.inf  # threshold meaning "never auto-execute"
# Isotonic regression is only tried with at least this many calibration rows. Fewer, it overfits
# (scikit-learn's calibration guide: "not advised when there are too few calibration samples
# (<<1000)"), and its worst overfit is the one thresholding cannot survive: a flat top block at
# p = 1.0. On continual seed 33 (stop 37) the jaw calibrator, fitted on ~150 rows, mapped every
# logit above -0.49 to 1.0; on the conformal rows that block held failures, no threshold was
# certified, and the model would never have used the jaw alone.
ISOTONIC_MIN_ROWS = 1000
_EPS = 1e-6  # probabilities are clipped to [EPS, 1-EPS] so log-loss stays finite


def sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free logistic


def _check_py(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(p, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if p.shape != y.shape:
        raise ValueError(f"probabilities and labels differ in length: {p.shape} vs {y.shape}")
    if not np.isfinite(p).all():
        raise ValueError("probabilities/logits contain NaN or inf")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    return p, y


def _weights(w: np.ndarray | None, n: int) -> np.ndarray:
    """Row weights normalised to mean 1 (None: all 1)."""
    if w is None:
        return np.ones(n)
    w = np.asarray(w, dtype=np.float64).ravel()
    if w.shape != (n,) or not np.isfinite(w).all() or (w < 0).any() or (n and w.sum() <= 0):
        raise ValueError(f"weights must be {n} finite non-negative numbers with a positive sum")
    return w / w.mean() if n else w


def nll(p: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> float:
    """Mean binary negative log-likelihood (nats), optionally weighted by row."""
    p, y = _check_py(p, y)
    w = _weights(w, p.size)
    p = np.clip(p, _EPS, 1 - _EPS)
    return float(-np.mean(w * (y * np.log(p) + (1 - y) * np.log(1 - p))))


def brier(p: np.ndarray, y: np.ndarray) -> float:
    p, y = _check_py(p, y)
    return float(np.mean((p - y) ** 2))


def expected_calibration_error(
    p: np.ndarray, y: np.ndarray, bins: int = 15, w: np.ndarray | None = None
) -> float:
    """ECE with `bins` equal-width bins on [0, 1]: sum_b (n_b / n) |mean(y_b) - mean(p_b)|.

    With row weights `w`, n_b and the means are weighted.
    """
    p, y = _check_py(p, y)
    if p.size == 0:
        raise ValueError("ECE of an empty set")
    w = _weights(w, p.size)
    idx = np.clip((p * bins).astype(np.int64), 0, bins - 1)
    sum_p = np.bincount(idx, weights=w * p, minlength=bins)
    sum_y = np.bincount(idx, weights=w * y, minlength=bins)
    return float(np.sum(np.abs(sum_y - sum_p)) / w.sum())


def auroc(scores: np.ndarray, y: np.ndarray) -> float:
    """Area under the ROC curve (scikit-learn's roc_auc_score: ties count half). NaN if one class only."""
    from sklearn.metrics import roc_auc_score

    s, y = _check_py(scores, y)
    if y.min(initial=1.0) == y.max(initial=0.0):
        return float("nan")
    return float(roc_auc_score(y, s))


# --- calibrators ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibrator:
    """A fitted monotone map from logit to calibrated probability."""

    method: str  # TEMPERATURE or ISOTONIC
    temperature: float = 1.0  # dimensionless; used by TEMPERATURE
    bias: float = 0.0  # logit offset added after dividing by the temperature; used by TEMPERATURE
    iso_x: np.ndarray | None = None  # (K,) logits at the isotonic knots, increasing
    iso_y: np.ndarray | None = None  # (K,) calibrated probability at each knot, non-decreasing

    def __post_init__(self) -> None:
        if self.method not in METHOD_CODES:
            raise ValueError(f"unknown calibration method {self.method!r}")
        if self.method == TEMPERATURE and not (np.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be finite and > 0, got {self.temperature}")
        if not np.isfinite(self.bias):
            raise ValueError(f"bias must be finite, got {self.bias}")
        if self.method == ISOTONIC:
            x = np.asarray(self.iso_x, dtype=np.float64)
            y = np.asarray(self.iso_y, dtype=np.float64)
            if x.ndim != 1 or x.shape != y.shape or x.size < 1:
                raise ValueError("isotonic knots must be two equal-length 1-D arrays")
            if np.any(np.diff(x) < 0) or np.any(np.diff(y) < -1e-12) or y.min() < 0 or y.max() > 1:
                raise ValueError("isotonic knots must be sorted with non-decreasing y in [0, 1]")
            object.__setattr__(self, "iso_x", x)
            object.__setattr__(self, "iso_y", y)

    def apply(self, logits: np.ndarray) -> np.ndarray:
        z = np.asarray(logits, dtype=np.float64)
        if self.method == TEMPERATURE:
            return sigmoid(z / self.temperature + self.bias)
        # Piecewise-linear between knots, constant beyond them (as scikit-learn's IsotonicRegression).
        return np.interp(z, self.iso_x, self.iso_y)


def fit_temperature(logits: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> Calibrator:
    """Temperature T and bias b minimising held-out NLL of sigmoid(logit / T + b).

    Newton's method on (a = 1/T, b) -- a 2-parameter logistic regression, convex, converges in a few
    steps -- with step halving, a kept in [1/20, 20] (T in [0.05, 20]) so the ranking never flips.
    """
    z, y = _check_py(logits, y)
    w = _weights(w, z.size)
    a, b = 1.0, 0.0

    def loss(a_: float, b_: float) -> float:
        return nll(sigmoid(a_ * z + b_), y, w)

    cur = loss(a, b)
    for _ in range(50):
        p = sigmoid(a * z + b)
        r = w * (p - y)
        h = w * np.maximum(p * (1 - p), 1e-9)
        grad = np.array([np.mean(r * z), np.mean(r)])
        hess = np.array([[np.mean(h * z * z), np.mean(h * z)], [np.mean(h * z), np.mean(h)]])
        hess += 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-6:
            a_new = float(np.clip(a - t * step[0], 0.05, 20.0))
            b_new = float(b - t * step[1])
            new = loss(a_new, b_new)
            if new <= cur:
                break
            t *= 0.5
        else:
            break
        done = abs(cur - new) < 1e-10
        a, b, cur = a_new, b_new, new
        if done:
            break
    return Calibrator(TEMPERATURE, temperature=1.0 / a, bias=b)


def fit_isotonic(logits: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> Calibrator:
    """(Weighted) isotonic regression of y on logit (scikit-learn's IsotonicRegression: tied logits
    pooled, pool-adjacent-violators); knots at each constant block's lowest and highest logit."""
    from sklearn.isotonic import IsotonicRegression

    z, y = _check_py(logits, y)
    w = _weights(w, z.size)
    if z.size < 2:
        raise ValueError("isotonic calibration needs at least 2 rows")
    # + tiny: a zero-weight tie block stays defined.
    ir = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
    ir.fit(z, y, sample_weight=w + 1e-12)
    x, p = np.asarray(ir.X_thresholds_, dtype=np.float64), np.asarray(ir.y_thresholds_, dtype=np.float64)
    keep = np.concatenate([[True], np.diff(x) > 0])
    return Calibrator(ISOTONIC, iso_x=x[keep], iso_y=np.clip(p[keep], 0.0, 1.0))


@dataclass(frozen=True)
class CalibrationChoice:
    calibrator: Calibrator
    cv_nll: dict[str, float]  # method -> cross-validated NLL on the calibration rows
    cv_ece: dict[str, float]  # method -> cross-validated ECE on the calibration rows


def fit_calibrator(
    logits: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0, w: np.ndarray | None = None
) -> CalibrationChoice:
    """Fit both calibrators, choose by k-fold cross-validated NLL, refit the winner on all rows.

    Isotonic is tried only with `ISOTONIC_MIN_ROWS` rows or more (below that it memorises the
    calibration set, tops out at p = 1.0 and leaves no threshold to certify). Optional row weights
    `w` (e.g. recency) weight the fits and the cross-validated NLL/ECE.
    """
    z, y = _check_py(logits, y)
    w = _weights(w, z.size)
    if z.size < 2 or y.min() == y.max():
        raise ValueError(
            f"calibration needs both successes and failures; got {z.size} rows, {int(y.sum())} ok"
        )
    methods = {TEMPERATURE: fit_temperature}
    if z.size >= ISOTONIC_MIN_ROWS:
        methods[ISOTONIC] = fit_isotonic
    rng = np.random.default_rng(seed)
    fold = rng.permutation(z.size) % max(2, min(folds, z.size))
    cv_nll: dict[str, float] = {}
    cv_ece: dict[str, float] = {}
    for name, fit in methods.items():
        p_out = np.empty_like(z)
        for k in np.unique(fold):
            tr, te = fold != k, fold == k
            if y[tr].min() == y[tr].max():
                cal = fit_temperature(z[tr], y[tr], w[tr]) if name == TEMPERATURE else Calibrator(TEMPERATURE)
            else:
                cal = fit(z[tr], y[tr], w[tr])
            p_out[te] = cal.apply(z[te])
        cv_nll[name] = nll(p_out, y, w)
        cv_ece[name] = expected_calibration_error(p_out, y, w=w)
    best = min(cv_nll, key=cv_nll.get)
    return CalibrationChoice(methods[best](z, y, w), cv_nll, cv_ece)


# --- conformal risk control -------------------------------------------------------------------------


@dataclass(frozen=True)
class ConformalThreshold:
    threshold: float  # calibrated p needed to auto-execute; NEVER (inf) if no threshold is safe
    alpha: float  # target bound on P(auto-executed and failed)
    n: int  # held-out rows used
    empirical_risk: float  # Rhat(threshold): fraction auto-executed and failed on those rows
    bound: float  # (n * Rhat + B) / (n + 1) at the threshold (<= alpha when feasible)
    coverage: float  # fraction of those rows that would be auto-executed


def conformal_threshold(
    p: np.ndarray, y: np.ndarray, alpha: float = 0.05, B: float = 1.0
) -> ConformalThreshold:
    """Smallest t with (n * Rhat(t) + B) / (n + 1) <= alpha, Rhat(t) = mean(p_i >= t and y_i == 0).

    Candidate thresholds are the observed p values (Rhat only changes there); between two observed
    values the smallest t that works is the next observed value, so searching them is exact.
    """
    p, y = _check_py(p, y)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    n = p.size
    if n == 0:
        return ConformalThreshold(NEVER, alpha, 0, 0.0, B, 0.0)
    order = np.argsort(-p, kind="mergesort")  # descending p
    p_desc = p[order]
    fail_desc = (y[order] == 0).astype(np.float64)
    # For t = p_desc[k], the executed set is every row with p >= p_desc[k]: include all ties.
    cum_fail = np.cumsum(fail_desc)
    last_of_tie = np.concatenate([p_desc[1:] != p_desc[:-1], [True]])
    cand_t = p_desc[last_of_tie]
    cand_fail = cum_fail[last_of_tie]
    cand_exec = np.flatnonzero(last_of_tie) + 1
    bound = (cand_fail + B) / (n + 1)
    ok = bound <= alpha
    if not ok.any():
        return ConformalThreshold(NEVER, alpha, n, 0.0, B / (n + 1), 0.0)
    # The risk is monotone, so the feasible candidates are a prefix (highest thresholds); take the
    # last feasible one = the smallest feasible threshold.
    k = int(np.flatnonzero(ok)[-1]) if ok.all() else int(np.argmin(ok)) - 1
    return ConformalThreshold(
        threshold=float(cand_t[k]),
        alpha=alpha,
        n=n,
        empirical_risk=float(cand_fail[k] / n),
        bound=float(bound[k]),
        coverage=float(cand_exec[k] / n),
    )


def executed_failure_threshold(
    p: np.ndarray, y: np.ndarray, alpha: float = 0.05, delta: float = 0.1, grid: int = 99
) -> ConformalThreshold:
    """Threshold bounding the failure rate *among auto-executed picks*, P(fail | p >= t) <= alpha.

    CRC (above) bounds the joint rate P(p >= t and fail); when the cell auto-executes only a small
    fraction of candidates, the failure rate among those it does execute can be several times alpha.
    This alternative is Learn-then-Test (Angelopoulos et al. 2021) with fixed-sequence testing on
    the grid t = grid/(grid+1), ..., 1/(grid+1), from the strictest threshold down. At each t, H0_t
    "failure rate among rows with p >= t is > alpha" is tested with the exact binomial tail
    p-value P(Binom(n_exec, alpha) <= n_fail); the walk stops at the first t where H0_t is not
    rejected at level delta and returns the last rejected t. Thresholds that execute so few rows
    that no outcome could reject ((1 - alpha)^n_exec > delta) are passed over before the walk
    starts; which ones those are depends only on the scores, not the outcomes, so the sequence is
    still fixed given the scores. With probability >= 1 - delta over the held-out outcomes, the
    failure rate among executed picks at the returned threshold is <= alpha. `bound` holds the
    binomial p-value there.
    """
    p, y = _check_py(p, y)
    if not 0.0 < alpha < 1.0 or not 0.0 < delta < 1.0:
        raise ValueError(f"alpha and delta must be in (0, 1), got {alpha}, {delta}")
    n = p.size
    n_min = math.ceil(math.log(delta) / math.log1p(-alpha))  # fewest rows that can reject at all
    best: ConformalThreshold | None = None
    for t in np.arange(grid, 0, -1) / (grid + 1.0):
        act = p >= t
        n_exec, n_fail = int(act.sum()), int((act & (y == 0)).sum())
        if n_exec < n_min:
            continue  # powerless: not yet part of the sequence
        pval = _binom_cdf(n_fail, n_exec, alpha)
        if pval > delta:
            break
        best = ConformalThreshold(float(t), alpha, n, n_fail / n, pval, n_exec / n)
    return best if best is not None else ConformalThreshold(NEVER, alpha, n, 0.0, 1.0, 0.0)


@dataclass(frozen=True)
class SelectiveThreshold:
    """A threshold with a guaranteed precision for what the cell does unasked (`selective_threshold`)."""

    threshold: float  # calibrated p needed to auto-execute; NEVER (inf) if no threshold is certified
    alpha: float  # bound on P(fail | executed without asking)
    delta: float  # the bound holds with probability >= 1 - delta over the held-out rows
    n: int  # held-out rows (executed picks of the always-execute policy) of this gripper
    n_exec: int  # of them, rows at or above the threshold (what the cell would have done alone)
    n_fail: int  # of those, failures
    p_value: float  # binomial p-value of H0 "failure rate among executed > alpha" at the threshold
    upper_bound: float  # Clopper-Pearson (1 - delta) upper bound on the failure rate among executed
    coverage: float  # n_exec / n: share of decisions the cell would take alone
    tested: int  # thresholds tested in the fixed sequence before it stopped


def selective_threshold(
    p: np.ndarray,
    y: np.ndarray,
    alpha: float = 0.05,
    delta: float = 0.1,
    step: float = 0.005,
    min_exec: int = 100,
) -> SelectiveThreshold:
    """Lowest threshold t with P(fail | p >= t) <= alpha certified at confidence 1 - delta.

    Learn-then-Test (Angelopoulos, Bates, Candes, Jordan, Lei 2021) with fixed-sequence testing:
    thresholds t_1 > t_2 > ... on a fixed grid (`step`), from the strictest down. At each t the null
    H0_t "the failure rate among rows with p >= t exceeds alpha" is tested with the exact binomial
    tail p-value P(Binom(n_exec, alpha) <= n_fail) (scipy); the walk stops at the first t not
    rejected at level delta and returns the last rejected one. Fixed-sequence testing controls the
    family-wise error at delta, so with probability >= 1 - delta every returned threshold (and so
    the one used) has failure rate among executed picks <= alpha, for rows exchangeable with these.
    The walk starts at the first threshold that executes at least max(min_exec, n_min) rows, where
    n_min is the fewest rows that could reject at all ((1 - alpha)^n_min <= delta); the stricter
    thresholds are passed over. Which those are depends on the scores alone, not on the outcomes, so
    the sequence is still fixed given the scores; starting where a test has some power keeps one
    unlucky failure among the very first few rows from ending the walk. NEVER when nothing is
    certified.
    The rows must be the picks the cell would execute (not every candidate) and must come from
    totes the model was not fitted on, split by tote.
    """
    from scipy.stats import beta, binom

    p, y = _check_py(p, y)
    if not 0.0 < alpha < 1.0 or not 0.0 < delta < 1.0:
        raise ValueError(f"alpha and delta must be in (0, 1), got {alpha}, {delta}")
    if not 0.0 < step < 0.5:
        raise ValueError(f"step must be in (0, 0.5), got {step}")
    n = p.size
    n_min = math.ceil(math.log(delta) / math.log1p(-alpha))  # fewest rows that can reject at all
    grid = np.round(np.arange(1.0 - step, 0.0, -step), 10)
    best = SelectiveThreshold(NEVER, alpha, delta, n, 0, 0, 1.0, 1.0, 0.0, 0)
    tested = 0
    for t in grid:
        act = p >= t
        n_exec, n_fail = int(act.sum()), int((act & (y == 0)).sum())
        if n_exec < max(n_min, min_exec):
            continue  # (nearly) powerless: not yet part of the sequence
        tested += 1
        pval = float(binom.cdf(n_fail, n_exec, alpha))
        if pval > delta:
            break
        upper = float(beta.ppf(1.0 - delta, n_fail + 1, n_exec - n_fail)) if n_fail < n_exec else 1.0
        best = SelectiveThreshold(float(t), alpha, delta, n, n_exec, n_fail, pval, upper, n_exec / n, tested)
    return replace(best, tested=tested)


def _binom_cdf(k: int, n: int, q: float) -> float:
    """P(Binom(n, q) <= k), summed in log space (n up to 1e5 is fine)."""
    i = np.arange(k + 1, dtype=np.float64)
    lg = np.vectorize(math.lgamma)
    logs = lg(n + 1.0) - lg(i + 1.0) - lg(n - i + 1.0) + i * math.log(q) + (n - i) * math.log1p(-q)
    m = logs.max()
    return float(min(1.0, math.exp(m) * np.exp(logs - m).sum()))


def auto_execute_rates(p: np.ndarray, y: np.ndarray, threshold: float) -> dict[str, float]:
    """What a threshold does on labelled rows: how often it acts, and how often acting fails."""
    p, y = _check_py(p, y)
    act = p >= threshold
    n_act = int(act.sum())
    fail = act & (y == 0)
    return {
        "auto_execute_rate": float(act.mean()) if p.size else 0.0,
        "auto_fail_joint": float(fail.mean()) if p.size else 0.0,  # P(executed and failed): CRC-bounded
        "auto_fail_given_executed": float(fail.sum() / n_act) if n_act else 0.0,
        "n": float(p.size),
    }


# --- plots ------------------------------------------------------------------------------------------


def reliability_diagram(
    curves: dict[str, np.ndarray], y: np.ndarray, path: str | Path, bins: int = 15, title: str = ""
) -> Path:
    """Write a reliability diagram PNG: one line per named probability array against labels y."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = np.asarray(y, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", label="perfect")
    for name, p in curves.items():
        p, yy = _check_py(p, y)
        idx = np.clip((p * bins).astype(np.int64), 0, bins - 1)
        counts = np.bincount(idx, minlength=bins)
        nz = counts > 0
        mean_p = np.bincount(idx, weights=p, minlength=bins)[nz] / counts[nz]
        mean_y = np.bincount(idx, weights=yy, minlength=bins)[nz] / counts[nz]
        ece = expected_calibration_error(p, yy, bins)
        ax.plot(mean_p, mean_y, marker="o", label=f"{name} (ECE {ece:.3f})")
    ax.set_xlabel("predicted p(success)")
    ax.set_ylabel("observed success rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title or "reliability")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
