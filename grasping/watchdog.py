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

Item level (`ItemWatchdog`). The candidate embeddings see 12.8 cm patches, and at that scale a new
kind of item is often indistinguishable from a known one (a tube's patch is a lying bottle's). So
each segmented item also gets a small fixed-length shape descriptor (`item_descriptor`: its size
along its own principal axes, height above the floor, footprint fill, how its surface normals tilt,
its curvature across its long axis, how far it is from a smooth quadric and from a sphere, and what
lies just outside its edge: something higher on top of it, or a short step down to what it rests
on, as a thin mailer has), invariant to where the item lies in the tote and to its yaw. The item
watchdog scores each item by its mean distance to the k nearest descriptors of training-distribution
items relative to those neighbours' own spacing (standardised features; kNN because those items
come from several families, a multi-modal density one Gaussian would smear over the gaps between
families), and the scene by a high quantile (0.75) of its item scores, in sigmas of
in-distribution scenes with a conformal threshold, exactly like the embedding score. Where a model
carries one, the planner's scene sigma and in-distribution verdict come from the item watchdog
(measured to separate never-trained families far better: docs/training.md); the per-candidate
embedding distances still fill `Candidate.ood_score`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


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
    """Ledoit-Wolf (2004) shrinkage of the sample covariance towards mu * I (scikit-learn's
    `LedoitWolf`, maximum-likelihood centring). Returns (cov, shrinkage)."""
    from sklearn.covariance import LedoitWolf

    lw = LedoitWolf(assume_centered=False).fit(np.asarray(x, dtype=np.float64))
    return lw.covariance_, float(lw.shrinkage_)


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


# --- item level: one shape descriptor per segmented item ----------------------------------------------

# Bump when the descriptor's definition changes: a model fitted on another version's descriptors is
# not used (the planner falls back to the embedding watchdog, with a log line).
# 2: boundary (occlusion, thin edge) and sphere-fit features; no curvature_along. 3: see-through
# openings (`opening`): a picture frame's window. Measured before it was added: frames seen whole
# (segmentation purity 1.0) scored at chance (per-item AUROC 0.44-0.52) while this share alone
# separated them (AUROC 1.000): docs/training.md, "Doubt per item".
ITEM_DESCRIPTOR_VERSION = 3
ITEM_FEATURES = (
    "log_length",  # log metres, extent along the footprint's major axis (2nd-98th percentile)
    "log_width",  # log metres, extent along the minor axis
    "log_height",  # log metres, top (98th percentile) above the floor
    "width_over_length",  # minor / major extent, (0, 1]
    "height_over_width",  # height / minor extent
    "fill",  # fraction of the major x minor rectangle's 6 mm cells that hold a point
    "tilt_flat",  # fraction of normals with n_z > 0.97 (faces within 14 deg of up)
    "tilt_low",  # 0.85 < n_z <= 0.97
    "tilt_mid",  # 0.6 < n_z <= 0.85
    "tilt_steep",  # n_z <= 0.6 (walls; also the share of the item without a usable normal)
    "curvature_across",  # -2 * d2z/db2 * width: about 2 for a cylinder lying across b, 0 for a flat top
    "log_roughness",  # log metres, RMS residual of a quadric fit to the upward-facing surface
    "taper",  # narrower end third's footprint width / widest third's: 1 for a tube, < 1 for a bottle
    "relief",  # height range of the upward-facing surface / the item's height above the floor, [0, 1]
    "occluded",  # share of the item's boundary where the surface just outside is > 1 cm higher, [0, 1]
    "thin_edge",  # share of its top face's downward edge steps under 3.5 cm (a mailer's edge), [0, 1]
    "log_sphere_residual",  # log metres, RMS distance of the upward surface from its best-fit sphere
    "log_sphere_relative_residual",  # log of that residual / the sphere's radius (~ -5 for a ball)
    "opening",  # share of the filled-in outline that is a see-through opening (`item_openings`), [0, 1]
)
# Features whose training spread is ~0 by nature, with the smallest difference that means anything:
# every familiar item has no opening, so the generic floor (1e-3) would turn a 1% segmentation
# crumb into ten standard units. 0.02: an opening of 2% of the outline is one unit, a frame's
# window (30-60% of its outline) is 15-30, beyond the 4-7 units familiar items sit from their
# nearest training items.
_SCALE_FLOOR = {"opening": 0.02}
# Each version's descriptor is a prefix of the next one's (features are only ever appended), so an
# item watchdog fitted on an older version keeps working: it reads the first features it knows.
ITEM_FEATURE_COUNT = {2: 18, 3: 19}
assert ITEM_FEATURE_COUNT[ITEM_DESCRIPTOR_VERSION] == len(ITEM_FEATURES)


def item_feature_count(version: int) -> int:
    """How many leading ITEM_FEATURES a descriptor of `version` has; ValueError if unknown here."""
    try:
        return ITEM_FEATURE_COUNT[int(version)]
    except KeyError:
        raise ValueError(
            f"item descriptor version {version} is not one this pickcell knows ({sorted(ITEM_FEATURE_COUNT)})"
        ) from None


def _descriptor_rows(descriptors: Any, f: int) -> np.ndarray:
    """(K, >= f) descriptors -> (K, f) float64: the first f features (an older version's prefix)."""
    d = np.asarray(descriptors, dtype=np.float64)
    d = d.reshape(0, f) if d.size == 0 else d.reshape(-1, d.shape[-1])
    if d.shape[1] < f:
        raise ValueError(f"item descriptors have {d.shape[1]} features, this watchdog reads {f}")
    return d[:, :f]


_FILL_CELL_M = 0.006  # metres: a little coarser than the grid's point spacing at ~0.9 m (about 3 mm)
_MIN_ITEM_POINTS = 10  # fewer points: no descriptor (a segmentation crumb, not an item)
_BOUNDARY_OFFSET_CELLS = 2  # grid cells (~6 mm) between an item's edge cell and the cell outside it
OCCLUDER_STEP_M = 0.01  # metres: a neighbour this much higher than the item's edge lies on top of it
_EDGE_STEP_MIN_M = 0.004  # metres: smaller downward steps are noise, not an edge
_THIN_EDGE_M = 0.035  # metres: mailers are 1-3 cm thick, cartons at least 5 cm
_TOP_FACE_NZ = 0.45  # cosine: cells whose normal is within ~63 deg of up face up (top faces, floor)
_OPENING_DEPTH_M = 0.005  # metres: an enclosed cell this much below the item's median height is seen through
_MIN_OPENING_CELLS = 8  # grid cells (~0.7 cm^2 at 3 mm): smaller enclosed gaps are depth dropouts


def item_descriptor(
    points_base: np.ndarray,
    normals_base: np.ndarray,
    floor_z: float,
    boundary: np.ndarray | None = None,
    opening: float = 0.0,
) -> np.ndarray | None:
    """(len(ITEM_FEATURES),) shape descriptor of one item's visible points, or None if too few.

    points_base (N, 3) metres, normals_base (N, 3) unit (NaN rows where unknown), floor_z metres.
    boundary (B, 3): for each pair (item edge cell, cell just outside it), the edge's height minus
    the outside's (metres), the edge cell's normal z and the outside cell's (`boundary_steps`
    computes them for a whole scene); None or empty leaves the boundary features at 0. opening:
    the item's see-through share of its outline (`item_openings` computes it from the grid; 0
    without one).
    Everything is measured in the footprint's own principal axes and relative to the floor, so
    moving or yawing the item in the tote leaves it unchanged (up to the camera's changing view).
    Written for speed: an item has only 50-3,000 grid points, so numpy's per-call overhead is
    what costs; one percentile call and a 6x6 solve instead of lstsq keep it near 0.3 ms an item.
    """
    p = np.asarray(points_base, dtype=np.float64)
    good = np.isfinite(p).all(axis=1)
    p = p[good]
    n = len(p)
    if n < _MIN_ITEM_POINTS:
        return None
    xy = p[:, :2] - p[:, :2].mean(axis=0)
    sxx, syy, sxy = (xy[:, 0] ** 2).mean(), (xy[:, 1] ** 2).mean(), (xy[:, 0] * xy[:, 1]).mean()
    theta = 0.5 * math.atan2(2.0 * sxy, sxx - syy)  # the major axis of the 2x2 covariance
    c, s = math.cos(theta), math.sin(theta)
    a = xy[:, 0] * c + xy[:, 1] * s  # major axis coordinate
    b = -xy[:, 0] * s + xy[:, 1] * c
    z = p[:, 2] - floor_z
    (a_lo, b_lo, _), (a_hi, b_hi, z_hi) = np.percentile(np.stack([a, b, z]), [2, 98], axis=1)
    length = max(a_hi - a_lo, 0.004)
    width = max(b_hi - b_lo, 0.004)
    height = max(float(z_hi), 0.002)
    # Footprint fill: a box's footprint is full, a ring or an L-shaped blob is not.
    na = int(math.ceil(length / _FILL_CELL_M)) + 1
    nb = int(math.ceil(width / _FILL_CELL_M)) + 1
    ia = ((a - a_lo) / _FILL_CELL_M).astype(np.int64)
    ib = ((b - b_lo) / _FILL_CELL_M).astype(np.int64)
    inside = (ia >= 0) & (ia < na) & (ib >= 0) & (ib < nb)
    occ = np.zeros(na * nb, dtype=bool)
    occ[ia[inside] * nb + ib[inside]] = True
    fill = occ.sum() / (na * nb)
    nz = np.asarray(normals_base, dtype=np.float64)[good, 2]
    with np.errstate(invalid="ignore"):  # NaN normals compare False: they count as steep
        flat = np.count_nonzero(nz > 0.97) / n
        low = np.count_nonzero((nz > 0.85) & (nz <= 0.97)) / n
        mid = np.count_nonzero((nz > 0.6) & (nz <= 0.85)) / n
    steep = 1.0 - flat - low - mid
    # Quadric height fit in the principal frame, centred and scaled so the normal equations are
    # well conditioned; curvature is made dimensionless by the extent it is measured across. Only
    # the surface facing up takes part: how much of an item's side walls the camera sees depends on
    # where the item lies in the image, and walls would make a box away from the centre "rough".
    with np.errstate(invalid="ignore"):
        up = nz > 0.3
    if np.count_nonzero(up) < _MIN_ITEM_POINTS:
        up = np.ones(n, dtype=bool)
    ac, bc, zu = (a[up] - a.mean()) / length, (b[up] - b.mean()) / width, z[up]
    A = np.stack([np.ones_like(ac), ac, bc, ac * ac, bc * bc, ac * bc], axis=1)
    coef = np.linalg.solve(A.T @ A + 1e-9 * np.eye(6), A.T @ zu)
    resid = zu - A @ coef
    # z = c4 (b / width)^2 -> d2z/db2 = 2 c4 / width^2; times the width: -2 for a lying cylinder.
    curv_across = float(np.clip(-2.0 * coef[4] / width, -5.0, 5.0))
    rough = float(np.sqrt(np.mean(resid * resid)))
    # Sphere fit (algebraic, Kasa) to the same upward surface, centred and scaled for conditioning:
    # |q|^2 = 2 c.q + d. A ball's visible cap fits to the sensor noise; a lying cylinder, a flat top
    # or an irregular blob does not, and a fragment's partial cap keeps a ball-like relative residual
    # only if it really is spherical. (The quadric's second curvature, which this replaces, was
    # measured to blur balls into fragments: docs/training.md.)
    q = np.stack([a[up] - a[up].mean(), b[up] - b[up].mean(), zu - zu.mean()], axis=1) / length
    S = np.concatenate([2.0 * q, np.ones((len(q), 1))], axis=1)
    rhs = (q * q).sum(axis=1)
    sol = np.linalg.solve(S.T @ S + 1e-9 * np.eye(4), S.T @ rhs)
    r = math.sqrt(max(float(sol[3] + sol[:3] @ sol[:3]), 1e-12))
    sphere_res = float(np.sqrt(np.mean((np.linalg.norm(q - sol[:3], axis=1) - r) ** 2))) * length
    sphere_r = r * length
    # Boundary: what lies just outside the item's edge. Higher surfaces mean something lies on top
    # of it (a fragment is mostly bounded by its occluder); short downward steps mean a thin item.
    # Steps are read only from a top-face edge cell to a facing-up cell: away from the image centre
    # the camera sees an item's side wall (steep, left unclustered by segmentation), and a step onto
    # or off that wall is a few millimetres on any item, not its thickness.
    bd = np.zeros((0, 3)) if boundary is None else np.asarray(boundary, dtype=np.float64).reshape(-1, 3)
    st = bd[np.isfinite(bd[:, 0]), 0]
    occluded = np.count_nonzero(st < -OCCLUDER_STEP_M) / st.size if st.size else 0.0
    with np.errstate(invalid="ignore"):
        down = bd[(bd[:, 0] > _EDGE_STEP_MIN_M) & (bd[:, 1] > _TOP_FACE_NZ) & (bd[:, 2] > _TOP_FACE_NZ), 0]
    thin = np.count_nonzero(down < _THIN_EDGE_M) / down.size if down.size else 0.0
    # Taper: the footprint's width near each end of the major axis against its widest part. A
    # tube is as wide at both ends as in the middle; a lying bottle narrows to its neck.
    third = (a - a_lo) * (3.0 / length)
    w_end = []
    for sel in (third < 1.0, third > 2.0, (third >= 1.0) & (third <= 2.0)):
        bs = b[sel]
        w_end.append(float(bs.max() - bs.min()) if bs.size >= 2 else 0.0)
    taper = min(w_end[0], w_end[1]) / max(max(w_end), 1e-3)
    # Relief: the height range of the item's upward-facing surface as a share of its height above
    # the floor: about 0 for a box top, large for a lying cylinder, a ball or a bottle's shoulder.
    zq = np.percentile(zu, [2, 98])
    relief = min(max(float(zq[1] - zq[0]), 0.0) / height, 1.0)
    return np.array(
        [
            math.log(length),
            math.log(width),
            math.log(height),
            width / length,
            min(height / width, 10.0),
            fill,
            flat,
            low,
            mid,
            steep,
            curv_across,
            math.log(rough + 1e-4),
            taper,
            relief,
            occluded,
            thin,
            math.log(sphere_res + 1e-4),
            math.log(sphere_res / sphere_r + 1e-4),
            min(max(float(opening), 0.0), 1.0),
        ]
    )


def item_openings(labels: np.ndarray, z: np.ndarray, n_items: int) -> np.ndarray:
    """(n_items,) each item's see-through openings as a share of its filled-in outline, [0, 1].

    labels (h, w) int, item index or negative; z (h, w) metres, NaN where unknown. An opening is a
    region the item's grid cells enclose (`scipy.ndimage.binary_fill_holes`) that is not the item
    and lies lower than it: a frame's window shows the floor or an item beneath. Enclosed cells
    that are higher are something lying on the item (the `occluded` feature's business), cells of
    unknown depth are dropouts, and enclosed regions under `_MIN_OPENING_CELLS` are noise; none of
    them count.
    """
    from scipy import ndimage

    L = np.asarray(labels)
    z = np.asarray(z, dtype=np.float64)
    out = np.zeros(int(n_items))
    boxes = ndimage.find_objects(np.where(L >= 0, L + 1, 0), max_label=int(n_items))
    for k, box in enumerate(boxes):
        if box is None:
            continue
        mask = L[box] == k
        enclosed = ndimage.binary_fill_holes(mask) & ~mask
        if np.count_nonzero(enclosed) < _MIN_OPENING_CELLS:
            continue
        zk = z[box]
        top = float(np.nanmedian(np.where(mask, zk, np.nan)))
        with np.errstate(invalid="ignore"):
            through = enclosed & (zk < top - _OPENING_DEPTH_M)  # NaN compares False: not counted
        regions, n = ndimage.label(through)
        if n == 0:
            continue
        sizes = np.bincount(regions.reshape(-1), minlength=n + 1)[1:]
        cells = int(sizes[sizes >= _MIN_OPENING_CELLS].sum())
        out[k] = cells / (np.count_nonzero(mask) + np.count_nonzero(enclosed))
    return out


def boundary_steps(
    labels: np.ndarray, z: np.ndarray, normal_z: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Every (item edge cell, cell outside it) pair of an organised grid: (item labels (B,), (B, 3)).

    labels (h, w) int, item index or negative; z (h, w) metres, NaN where unknown; normal_z (h, w)
    the cells' normal z (None: all 1). Pairs are cells `_BOUNDARY_OFFSET_CELLS` apart in the 8
    grid directions (skipping the edge's own mixed-depth cells); per pair the item cell's height
    minus the outside cell's (metres), the item cell's normal z and the outside cell's (NaN normals
    read as 0: steep). Vectorised over the grid.
    """
    L = np.asarray(labels)
    z = np.asarray(z, dtype=np.float64)
    nz = np.ones_like(z) if normal_z is None else np.nan_to_num(np.asarray(normal_z, dtype=np.float64))
    h, w = L.shape
    o = _BOUNDARY_OFFSET_CELLS
    labs, steps = [], []
    for di, dj in ((0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1)):
        si, sj = di * o, dj * o
        here = (slice(max(0, -si), h - max(0, si)), slice(max(0, -sj), w - max(0, sj)))
        there = (slice(max(0, si), h - max(0, -si)), slice(max(0, sj), w - max(0, -sj)))
        la, lb, za, zb = L[here], L[there], z[here], z[there]
        m = (la >= 0) & (lb != la) & np.isfinite(za) & np.isfinite(zb)
        labs.append(la[m])
        steps.append(np.stack([za[m] - zb[m], nz[here][m], nz[there][m]], axis=1))
    return np.concatenate(labs), np.concatenate(steps)


def scene_item_descriptors(cloud: Any) -> np.ndarray:
    """(K, len(ITEM_FEATURES)) descriptors of a `grasping.pointcloud.SceneCloud`'s items.

    Items with too few points for a descriptor are left out (K <= cloud.n_clusters).
    """
    return scene_item_descriptors_by_cluster(cloud)[0]


def scene_item_descriptors_by_cluster(
    cloud: Any, descriptors: list[np.ndarray | None] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """`scene_item_descriptors` and, for each row, the index of the cluster it describes (K,).

    `descriptors`: `cluster_descriptors(cloud)` when the caller already has them (the planner does).
    """
    desc = cluster_descriptors(cloud) if descriptors is None else descriptors
    which = [k for k, d in enumerate(desc) if d is not None]
    rows = np.array([desc[k] for k in which]).reshape(-1, len(ITEM_FEATURES))
    return rows, np.array(which, dtype=np.int64)


def cluster_descriptors(cloud: Any) -> list[np.ndarray | None]:
    """One descriptor per cluster of a SceneCloud, in cluster order (None: too few points)."""
    labels = np.asarray(cloud.labels)
    pts = np.asarray(cloud.points_base).reshape(-1, 3)
    nrm = np.asarray(cloud.normals_base).reshape(-1, 3)
    flat = labels.reshape(-1)
    out: list[np.ndarray | None] = []
    # One sort instead of a full-grid comparison per item.
    idx = np.flatnonzero(flat >= 0)
    order = idx[np.argsort(flat[idx], kind="stable")]
    bounds = np.searchsorted(flat[order], np.arange(cloud.n_clusters + 1))
    b_lab, b_step = boundary_steps(
        labels, np.asarray(cloud.points_base)[..., 2], nrm.reshape(labels.shape + (3,))[..., 2]
    )
    b_order = np.argsort(b_lab, kind="stable")
    b_bounds = np.searchsorted(b_lab[b_order], np.arange(cloud.n_clusters + 1))
    holes = item_openings(labels, np.asarray(cloud.points_base)[..., 2], cloud.n_clusters)
    for k in range(cloud.n_clusters):
        rows = order[bounds[k] : bounds[k + 1]]
        steps = b_step[b_order[b_bounds[k] : b_bounds[k + 1]]]
        out.append(item_descriptor(pts[rows], nrm[rows], float(cloud.floor_z), steps, holes[k]))
    return out


@dataclass(frozen=True)
class ItemWatchdog:
    """Item-level watchdog: local-density (LOF-like) kNN score of item descriptors.

    An item's score is its mean distance to its k nearest training items divided by those items'
    own mean distance to *their* k nearest training items (from other scenes). Plain kNN distance
    flags the ordinary members of a diverse family (random meshes, cartons of every size) as much
    as a new family that sits between dense known ones (a tube between lying bottles and cartons);
    dividing by the neighbours' own spacing makes "1" mean "as close as training items are to each
    other" everywhere (measured: docs/training.md).
    """

    center: np.ndarray  # (F,) per-feature median of the bank's raw descriptors
    scale: np.ndarray  # (F,) per-feature robust spread (1.4826 MAD, floored), > 0
    bank: np.ndarray  # (N, F) standardised descriptors of in-distribution items
    radius: np.ndarray  # (N,) each bank item's mean distance to its k nearest bank items of other scenes
    k: int  # neighbours averaged for an item's distance
    scene_quantile: float  # quantile of the scene's item scores that is the scene's score (1.0 = max)
    scene_mu: float  # mean of in-distribution scene scores (LOF units)
    scene_sd: float  # their standard deviation, > 0
    threshold_sigma: float  # scene sigma above which the scene is out of distribution
    quantile: float = 0.99  # quantile of in-distribution scene sigmas the threshold sits at
    version: int = ITEM_DESCRIPTOR_VERSION  # item_descriptor definition the bank was computed with
    # Per-item verdict: an item whose score is above this (LOF units) is out of distribution. A
    # conformal quantile (`item_quantile`) of the scores of items from fresh in-distribution scenes
    # that are not in the bank (`fit_item_threshold`). None: no per-item verdict (older files).
    item_threshold: float | None = None
    item_quantile: float = 0.99  # quantile of in-distribution item scores item_threshold sits at

    def __post_init__(self) -> None:
        center = np.asarray(self.center, dtype=np.float64)
        scale = np.asarray(self.scale, dtype=np.float64)
        bank = np.asarray(self.bank, dtype=np.float64)
        radius = np.asarray(self.radius, dtype=np.float64)
        f = item_feature_count(self.version)
        if center.shape != (f,) or scale.shape != (f,) or bank.ndim != 2 or bank.shape[1] != f:
            raise ValueError(
                f"item watchdog needs center/scale ({f},) and bank (N, {f}); got {center.shape}, "
                f"{scale.shape}, {bank.shape}"
            )
        if radius.shape != (len(bank),):
            raise ValueError(f"item watchdog radius must be ({len(bank)},), got {radius.shape}")
        finite = [np.isfinite(x).all() for x in (center, scale, bank, radius)]
        if not all(finite):
            raise ValueError("item watchdog statistics contain NaN or inf")
        if not ((scale > 0).all() and (radius > 0).all()):
            raise ValueError("item watchdog feature scales and bank radii must be > 0")
        if not 1 <= self.k <= len(bank):
            raise ValueError(f"item watchdog k={self.k} needs 1 <= k <= bank size {len(bank)}")
        if not 0.0 <= self.scene_quantile <= 1.0:
            raise ValueError(f"item watchdog scene_quantile must be in [0, 1], got {self.scene_quantile}")
        if not (self.scene_sd > 0 and math.isfinite(self.scene_mu)):
            raise ValueError(
                f"item watchdog scene statistics invalid: mu={self.scene_mu}, sd={self.scene_sd}"
            )
        if self.item_threshold is not None and not (
            math.isfinite(self.item_threshold) and self.item_threshold > 0
        ):
            raise ValueError(
                f"item watchdog item_threshold must be finite and > 0, got {self.item_threshold}"
            )
        object.__setattr__(self, "center", center)
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "bank", bank)
        object.__setattr__(self, "radius", radius)
        object.__setattr__(self, "k", int(self.k))

    def standardise(self, descriptors: np.ndarray) -> np.ndarray:
        return (_descriptor_rows(descriptors, len(self.center)) - self.center) / self.scale

    def item_scores(self, descriptors: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
        """(K, F) raw descriptors -> (K,) LOF-like scores (about 1 for a typical training item).

        `exclude` (K, N) bool: bank items not to count as neighbours of each item (used when fitting,
        to score a calibration scene against the other scenes only).
        """
        q = self.standardise(descriptors)
        if len(q) == 0:
            return np.zeros(0)
        return _lof(q, self.bank, self.radius, self.k, exclude)

    def scene_raw(self, item_scores: np.ndarray) -> float:
        """The scene's score: a high quantile of its items' scores (1.0: the most unusual item)."""
        s = np.asarray(item_scores, dtype=np.float64)
        return float(np.quantile(s, self.scene_quantile)) if s.size else 0.0

    def scene_sigma(self, item_scores: np.ndarray) -> float:
        s = np.asarray(item_scores)
        if s.size == 0:
            return 0.0
        return float((self.scene_raw(s) - self.scene_mu) / self.scene_sd)

    def score(self, descriptors: np.ndarray) -> tuple[np.ndarray, float, bool]:
        """One scene's item descriptors -> (per-item scores, scene sigma, in_distribution)."""
        items = self.item_scores(descriptors)
        sigma = self.scene_sigma(items)
        return items, sigma, bool(sigma <= self.threshold_sigma)

    def score_cloud(self, cloud: Any) -> tuple[np.ndarray, float, bool]:
        """`score` on the items of a `grasping.pointcloud.SceneCloud`."""
        return self.score(scene_item_descriptors(cloud))

    def score_clusters(
        self, cloud: Any, descriptors: list[np.ndarray | None] | None = None
    ) -> tuple[np.ndarray, np.ndarray | None, float, bool]:
        """Per cluster of a SceneCloud: (scores (K,), in-distribution verdicts (K,) or None, scene
        sigma, scene in-distribution). A cluster too small for a descriptor has score NaN and is
        judged in distribution (nothing to judge it by; its candidates still face the thresholds).
        Verdicts are None when the watchdog has no per-item threshold."""
        desc, which = scene_item_descriptors_by_cluster(cloud, descriptors)
        items, sigma, in_dist = self.score(desc)
        scores = np.full(int(cloud.n_clusters), np.nan)
        scores[which] = items
        verdicts = None
        if self.item_threshold is not None:
            verdicts = ~(scores > self.item_threshold)  # NaN compares False: in distribution
        return scores, verdicts, sigma, in_dist


def _knn(
    q: np.ndarray, bank: np.ndarray, k: int, exclude: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """(distances (M, k), indices (M, k)) of each query row's k nearest bank rows (Euclidean)."""
    d2 = (q * q).sum(1)[:, None] + (bank * bank).sum(1)[None, :] - 2.0 * q @ bank.T
    d = np.sqrt(np.maximum(d2, 0.0))
    if exclude is not None:
        d = np.where(exclude, np.inf, d)
    k = min(k, d.shape[1])
    idx = np.argpartition(d, k - 1, axis=1)[:, :k]
    return np.take_along_axis(d, idx, axis=1), idx


def _lof(
    q: np.ndarray, bank: np.ndarray, radius: np.ndarray, k: int, exclude: np.ndarray | None
) -> np.ndarray:
    d, idx = _knn(q, bank, k, exclude)
    return d.mean(axis=1) / radius[idx].mean(axis=1)


def split_halves(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of two disjoint halves of n calibration scenes: (sigma-scale half, threshold half).

    A seeded random split, not even/odd positions: live calibration scenes are built round robin
    over the training catalogs, and with two catalogs even/odd would put every `train` scene in one
    half and every procedural scene in the other (the threshold would then be set on a different
    population than the scale it is expressed in).
    """
    perm = np.random.default_rng(seed).permutation(n)
    half = (n + 1) // 2
    return np.sort(perm[:half]), np.sort(perm[half:])


def fit_item_watchdog(
    scenes: list[np.ndarray],
    k: int = 5,
    scene_quantile: float = 0.75,
    quantile: float = 0.99,
    version: int = ITEM_DESCRIPTOR_VERSION,
) -> tuple[ItemWatchdog, dict[str, float]]:
    """Fit the item watchdog on the item descriptors of in-distribution scenes (one (K_i, F) array each).

    `version`: the descriptor version to fit on (an older one reads its prefix of each descriptor:
    a refit that must stay comparable with an incumbent's bank of that version).

    Every item goes into the bank. Bank radii and the scene statistics are leave-one-scene-out: a
    scene's items are compared with the other scenes' items only, as a fresh scene's would be. One
    half of the scenes (`split_halves`) sets mu and sd, the other the conformal threshold, so the
    threshold is not fitted on the scenes that define the sigma scale.
    """
    f = item_feature_count(version)
    arrays = [_descriptor_rows(s, f) for s in scenes]
    keep = [i for i, s in enumerate(arrays) if len(s)]
    if len(keep) < 4:
        raise ValueError(f"the item watchdog needs at least 4 scenes with items, got {len(keep)}")
    raw = np.concatenate([arrays[i] for i in keep])
    if not np.isfinite(raw).all():
        raise ValueError("item descriptors contain NaN or inf")
    if len(raw) <= 2 * k:
        raise ValueError(f"the item watchdog needs more than 2k={2 * k} items, got {len(raw)}")
    owner = np.concatenate([np.full(len(arrays[i]), j) for j, i in enumerate(keep)])
    center = np.median(raw, axis=0)
    mad = 1.4826 * np.median(np.abs(raw - center), axis=0)
    # A feature that hardly varies in training (e.g. fill on box-only data) must not turn every tiny
    # difference into a huge distance: floor its scale at a fraction of its ordinary spread.
    floor = np.array([_SCALE_FLOOR.get(name, 1e-3) for name in ITEM_FEATURES[:f]])
    scale = np.maximum(mad, np.maximum(0.25 * raw.std(axis=0), floor))
    bank = (raw - center) / scale
    same = owner[:, None] == owner[None, :]
    d_own, _ = _knn(bank, bank, k, same)
    # Floor: duplicates (the same item seen in two scenes) must not make a zero radius.
    radius = np.maximum(d_own.mean(axis=1), 1e-3)
    partial = ItemWatchdog(
        center, scale, bank, radius, k, scene_quantile, 0.0, 1.0, math.inf, quantile, version=version
    )
    scores = np.array(
        [
            partial.scene_raw(partial.item_scores(arrays[i], exclude=(owner[None, :] == j)))
            for j, i in enumerate(keep)
        ]
    )
    ref_idx, thr_idx = split_halves(len(scores))
    ref, thr = scores[ref_idx], scores[thr_idx]
    mu = float(ref.mean())
    sd = max(float(ref.std(ddof=1)), 1e-3 * max(abs(mu), 1.0))
    threshold = conformal_quantile((thr - mu) / sd, quantile)
    wd = ItemWatchdog(
        center, scale, bank, radius, k, scene_quantile, mu, sd, threshold, quantile, version=version
    )
    info = {
        "item_watchdog_scenes": float(len(keep)),
        "item_watchdog_items": float(len(raw)),
        "item_watchdog_k": float(k),
        "item_watchdog_scene_quantile": float(scene_quantile),
        "item_watchdog_scene_mu": mu,
        "item_watchdog_scene_sd": sd,
        "item_watchdog_threshold_sigma": float(threshold),
        "item_watchdog_quantile_exact": float(math.ceil((thr.size + 1) * quantile) <= thr.size),
    }
    return wd, info


def fit_item_threshold(
    wd: ItemWatchdog, scenes: list[np.ndarray], quantile: float = 0.99
) -> tuple[ItemWatchdog, dict[str, float]]:
    """Set the per-item threshold from the item descriptors of fresh in-distribution scenes.

    The scenes must not be the ones the bank was built from (then their items are exchangeable with
    a new in-distribution item, and the conformal quantile bounds the chance that such an item is
    flagged by 1 - quantile). Returns the watchdog with `item_threshold` set, and what was measured.
    """
    arrays = [_descriptor_rows(s, len(wd.center)) for s in scenes]
    scores = np.concatenate([wd.item_scores(a) for a in arrays if len(a)] or [np.zeros(0)])
    if scores.size < 20:
        raise ValueError(f"the per-item threshold needs at least 20 items, got {scores.size}")
    thr = conformal_quantile(scores, quantile)
    out = replace(wd, item_threshold=float(thr), item_quantile=float(quantile))
    info = {
        "item_threshold": float(thr),
        "item_quantile": float(quantile),
        "items": float(scores.size),
        "scenes": float(sum(1 for a in arrays if len(a))),
        "quantile_exact": float(math.ceil((scores.size + 1) * quantile) <= scores.size),
    }
    return out, info


def item_watchdog_of(scorer: Any) -> ItemWatchdog | None:
    """The item watchdog a scorer carries: its own `item_watchdog`, or its model file's (LearnedScorer).

    None when it has none (the analytic planner, a model file written before item watchdogs).
    """
    for owner in (scorer, getattr(scorer, "model", None)):
        wd = getattr(owner, "item_watchdog", None)
        if isinstance(wd, ItemWatchdog):
            return wd
    return None
