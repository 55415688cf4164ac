"""Covariate-shift watchdog: how far is this scene from the data the model was trained on?

Per candidate, the Mahalanobis distance of its backbone embedding to the training embeddings
(mean + Ledoit-Wolf shrinkage covariance: the embedding is 64-D and ReLU-sparse, so the plain
sample covariance is near-singular). Per scene, the median of its candidates' distances (robust to
a few odd candidates, such as a patch on the tote rim), standardised into sigmas against the same
statistic on held-out *in-distribution scenes*, so "3.0" means "three standard deviations further
than a typical training-distribution scene". The in/out threshold is a conformal quantile of
held-out in-distribution scene sigmas: with quantile q = 0.99, an exchangeable in-distribution scene
is flagged with probability at most 1 - q.

OOD scores are not probabilities (FIELD-NOTES: "OOD scores alone are not calibrated"): the watchdog
flags drift so the cell asks a person and retraining weighs the new data; it does not adjust p.

When the held-out scenes have few labelled rows each (a ledger usually stores one executed grasp per
frame), a median over one or two rows has a far wider spread than the median over the 300 candidates
of a live scene. `fit_watchdog` therefore builds pseudo-scenes of `pseudo_scene_size` rows of one
family from held-out rows when real scenes are smaller than `min_scene_rows`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Watchdog:
    mean: np.ndarray  # (D,) training embedding mean
    precision: np.ndarray  # (D, D) inverse of the shrinkage covariance
    scene_mu: float  # mean of held-out in-distribution scene scores (Mahalanobis units)
    scene_sd: float  # their standard deviation (Mahalanobis units), > 0
    threshold_sigma: float  # scene sigma above which the scene is out of distribution
    quantile: float = 0.99  # quantile of in-distribution scene sigmas the threshold sits at
    shrinkage: float = 0.0  # Ledoit-Wolf shrinkage intensity used, [0, 1]

    def __post_init__(self) -> None:
        mean = np.asarray(self.mean, dtype=np.float64)
        prec = np.asarray(self.precision, dtype=np.float64)
        if mean.ndim != 1 or prec.shape != (mean.size, mean.size):
            raise ValueError(f"watchdog mean {mean.shape} and precision {prec.shape} do not match")
        if not (np.isfinite(mean).all() and np.isfinite(prec).all()):
            raise ValueError("watchdog statistics contain NaN or inf")
        if not (self.scene_sd > 0 and math.isfinite(self.scene_mu)):
            raise ValueError(f"watchdog scene statistics invalid: mu={self.scene_mu}, sd={self.scene_sd}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "precision", prec)

    @property
    def dim(self) -> int:
        return int(self.mean.size)

    def candidate_scores(self, embeddings: np.ndarray) -> np.ndarray:
        """(M, D) -> (M,) Mahalanobis distance of each embedding to the training distribution."""
        e = np.asarray(embeddings, dtype=np.float64)
        if e.ndim != 2 or e.shape[1] != self.dim:
            raise ValueError(f"embeddings must be (M, {self.dim}), got {e.shape}")
        d = e - self.mean
        # (d P) . d row-wise: one BLAS matmul (a 3-operand einsum is a slow Python-free loop).
        return np.sqrt(np.maximum(((d @ self.precision) * d).sum(axis=1), 0.0))

    def scene_sigma(self, candidate_scores: np.ndarray) -> float:
        """Aggregate one scene's candidate scores into sigmas of the in-distribution scene spread."""
        s = np.asarray(candidate_scores, dtype=np.float64)
        if s.size == 0:
            return 0.0
        return float((np.median(s) - self.scene_mu) / self.scene_sd)

    def score(self, embeddings: np.ndarray) -> tuple[np.ndarray, float, bool]:
        """One scene's embeddings -> (per-candidate scores, scene sigma, in_distribution)."""
        cand = self.candidate_scores(embeddings)
        sigma = self.scene_sigma(cand)
        return cand, sigma, bool(sigma <= self.threshold_sigma)


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Ledoit-Wolf (2004) shrinkage of the sample covariance towards mu * I. Returns (cov, shrinkage)."""
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    xc = x - x.mean(axis=0)
    s = xc.T @ xc / n
    mu = np.trace(s) / d
    delta = np.sum((s - mu * np.eye(d)) ** 2) / d
    # beta: how noisy the sample covariance is, estimated from the data itself.
    x2 = xc**2
    beta = (np.sum(x2.T @ x2) / n - np.sum(s**2)) / (d * n)
    beta = min(beta, delta)
    shrink = 0.0 if delta == 0 else beta / delta
    cov = shrink * mu * np.eye(d) + (1 - shrink) * s
    return cov, float(shrink)


def _scene_groups(
    scene: np.ndarray, family: np.ndarray | None, min_scene_rows: int, pseudo_scene_size: int, seed: int
) -> tuple[list[np.ndarray], int]:
    """Row-index groups to compute scene statistics on, and the pseudo-scene size (0: real scenes).

    Real scenes when they are big enough; otherwise pseudo-scenes of rows of one family (leftover
    rows of all families pooled), shrunk on small held-out sets so that there are about 20 of them.
    """
    scene = np.asarray(scene)
    _, inv, counts = np.unique(scene, return_inverse=True, return_counts=True)
    if np.median(counts) >= min_scene_rows:
        return [np.flatnonzero(inv == k) for k in range(counts.size)], 0
    size = max(1, min(pseudo_scene_size, scene.size // 20))
    rng = np.random.default_rng(seed)
    if family is None:
        fam = np.zeros(scene.size, dtype=np.int64)
    else:
        fam = np.unique(np.asarray(family), return_inverse=True)[1]
    groups: list[np.ndarray] = []
    leftover: list[np.ndarray] = []
    for f in np.unique(fam):
        rows = rng.permutation(np.flatnonzero(fam == f))
        rows = rows[np.argsort(inv[rows], kind="stable")]  # keep rows of one scene together
        full = rows.size - rows.size % size
        groups.extend(rows[s : s + size] for s in range(0, full, size))
        leftover.append(rows[full:])
    rest = np.concatenate(leftover) if leftover else np.zeros(0, dtype=np.int64)
    groups.extend(rest[s : s + size] for s in range(0, rest.size - rest.size % size, size))
    return groups, size


def conformal_quantile(values: np.ndarray, q: float) -> float:
    """The ceil((n+1) q)-th smallest value: P(new value > it) <= 1 - q for exchangeable values.

    With too few values for that rank (n < q / (1 - q)), the largest value is returned and the
    guarantee is weaker; `fit_watchdog` logs that case through the returned metadata.
    """
    v = np.sort(np.asarray(values, dtype=np.float64))
    if v.size == 0:
        raise ValueError("conformal quantile of an empty set")
    k = math.ceil((v.size + 1) * q)
    return float(v[min(k, v.size) - 1])


def fit_watchdog(
    train_embeddings: np.ndarray,
    ref_embeddings: np.ndarray,
    ref_scene: np.ndarray,
    thr_embeddings: np.ndarray,
    thr_scene: np.ndarray,
    ref_family: np.ndarray | None = None,
    thr_family: np.ndarray | None = None,
    quantile: float = 0.99,
    min_scene_rows: int = 8,
    pseudo_scene_size: int = 32,
    seed: int = 0,
) -> tuple[Watchdog, dict[str, float]]:
    """Fit the watchdog.

    train_*: embeddings the mean/covariance come from (the network's training rows);
    ref_*: held-out in-distribution rows + scene ids whose scene scores define mu and sd (sigmas);
    thr_*: other held-out in-distribution rows + scene ids whose scene sigmas set the threshold.
    Keeping ref and thr apart keeps the threshold's conformal quantile honest.
    """
    tr = np.asarray(train_embeddings, dtype=np.float64)
    if tr.ndim != 2 or tr.shape[0] < 2:
        raise ValueError(f"need at least 2 training embeddings, got shape {tr.shape}")
    cov, shrink = ledoit_wolf(tr)
    # A tiny ridge keeps dead ReLU units (zero variance) invertible.
    cov += 1e-6 * max(np.trace(cov) / cov.shape[0], 1e-12) * np.eye(cov.shape[0])
    partial = Watchdog(tr.mean(axis=0), np.linalg.inv(cov), 0.0, 1.0, math.inf, quantile, shrink)

    def scene_scores(emb: np.ndarray, scene: np.ndarray, fam: np.ndarray | None, s: int) -> np.ndarray:
        cand = partial.candidate_scores(emb)
        groups, size = _scene_groups(scene, fam, min_scene_rows, pseudo_scene_size, s)
        if len(groups) < 2:
            raise ValueError(f"the watchdog needs at least 2 held-out scenes, got {len(groups)}")
        sizes.append(size)
        return np.array([np.median(cand[g]) for g in groups])

    sizes: list[int] = []

    ref = scene_scores(ref_embeddings, ref_scene, ref_family, seed)
    sd = float(np.std(ref, ddof=1)) if ref.size > 1 else 0.0
    mu = float(np.mean(ref))
    sd = max(sd, 1e-3 * max(abs(mu), 1.0))
    thr_raw = scene_scores(thr_embeddings, thr_scene, thr_family, seed + 1)
    thr_sigma = (thr_raw - mu) / sd
    threshold = conformal_quantile(thr_sigma, quantile)
    wd = Watchdog(partial.mean, partial.precision, mu, sd, threshold, quantile, shrink)
    info = {
        "watchdog_ref_scenes": float(ref.size),
        "watchdog_thr_scenes": float(thr_raw.size),
        "watchdog_threshold_sigma": threshold,
        "watchdog_shrinkage": shrink,
        "watchdog_quantile_exact": float(math.ceil((thr_raw.size + 1) * quantile) <= thr_raw.size),
        "watchdog_pseudo_scene_size": float(max(sizes)),  # 0: real scenes were used
    }
    return wd, info
