"""Learning from outcomes: dataset shards -> trained, calibrated, gated model file.

Data: the ledger export (`hitl.ledger.Ledger.export`): a directory of npz shards with `patches`
(N, C, S, S), `features` (N, F), `gripper` (N,), `label` (N,) and per-row metadata (`timestamp`,
`source`, `family`, optionally `scene_ood_sigma`, `row_id`, `plan_id`/`frame_id`/`scene`), plus a
`manifest.json` whose shard sha256 values are verified on load.

Splits are by scene (rows of one scene never straddle splits: neighbouring candidates of one
scene are near-duplicates), into five parts with five jobs:
  train      fits the network;
  val        early stopping;
  calib      fits the calibrators and the watchdog's scene statistics;
  conformal  sets the conformal auto-execute thresholds and the watchdog's threshold;
  test       the metrics in the model card (touched by nothing above).
Keeping calib and conformal apart keeps the conformal guarantee exact: the calibrated score is
fixed before the rows that pick its threshold are looked at.

Importance weights say what to learn most from: recent rows (half-life), rows from families the
incumbent model never saw, and rows the watchdog flagged (recorded `scene_ood_sigma`); old rows keep
a floor weight, i.e. experience replay, so old families are not forgotten (FIELD-NOTES: replay
usually beats EWC for this kind of shift).

`train(dataset, TrainConfig)` takes a `Dataset`, so `pickcell train --from-sim` is a thin wrapper:
collect episodes, build a `Dataset`, call `train`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from grasping.calibration import (
    NEVER,
    auroc,
    auto_execute_rates,
    brier,
    conformal_threshold,
    executed_failure_threshold,
    expected_calibration_error,
    fit_calibrator,
    nll,
    reliability_diagram,
    sigmoid,
)
from grasping.scoring import PARALLEL_JAW, SUCTION

log = logging.getLogger(__name__)

GRIPPER_NAMES = {SUCTION: "suction", PARALLEL_JAW: "parallel_jaw"}
REQUIRED_ARRAYS = ("patches", "features", "gripper", "label")
_SCENE_KEYS = ("scene", "plan_id", "frame_id")  # first one present names each row's scene
_OPTIONAL_ROWS = ("weight", "tote", "item", "decided_by", "row_id")  # optional (N,) Dataset columns


class DatasetError(Exception):
    """A dataset that cannot be trained on; the message names the file and the problem."""


# --- dataset ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dataset:
    """Labelled candidates. All arrays have N rows."""

    patches: np.ndarray  # (N, C, S, S) float32 local height map + occupancy in the grasp frame
    features: np.ndarray  # (N, F) float32 analytic features
    gripper: np.ndarray  # (N,) int64, SUCTION = 0, PARALLEL_JAW = 1
    label: np.ndarray  # (N,) float32, 1 = success, 0 = failure
    timestamp: np.ndarray  # (N,) float64 unix seconds when the outcome was recorded
    source: np.ndarray  # (N,) str: who labelled it (e.g. "robot", "associate", "sim")
    family: np.ndarray  # (N,) str: item family ("" when unknown)
    scene: np.ndarray  # (N,) str: scene key; rows of one scene always stay in one split
    ood_sigma: np.ndarray  # (N,) float64 watchdog sigma recorded at decision time (NaN unknown)
    feature_names: tuple[str, ...] = ()
    origin: str = ""  # where it came from (directory, shard list, "sim")
    # Optional per-row columns of a ledger export (format 2); None fills the default shown.
    weight: np.ndarray | None = None  # (N,) float64 export weight (weak negatives < 1); default 1
    tote: np.ndarray | None = None  # (N,) str tote id; default: the scene key
    item: np.ndarray | None = None  # (N,) str item key "<plan>:<cluster>"; default ""
    descriptor: np.ndarray | None = None  # (N, D) float64 item shape descriptor, NaN unknown; default (N, 0)
    decided_by: np.ndarray | None = None  # (N,) str "model" | "associate:<id>" | ...; default ""
    row_id: np.ndarray | None = None  # (N,) str ledger row id; default the row number

    def __post_init__(self) -> None:
        n = len(self.label)
        defaults = {
            "weight": lambda: np.ones(n),
            "tote": lambda: np.asarray(self.scene).astype(str),
            "item": lambda: np.full(n, "", dtype=np.str_),
            "descriptor": lambda: np.zeros((n, 0)),
            "decided_by": lambda: np.full(n, "", dtype=np.str_),
            "row_id": lambda: np.arange(n).astype(str),
        }
        for name, make in defaults.items():
            v = getattr(self, name)
            object.__setattr__(self, name, make() if v is None else np.asarray(v))
        if self.descriptor.ndim != 2 or self.descriptor.shape[0] != n:
            raise DatasetError(f"{self.origin}: descriptor must be (N, D) with N={n}")
        p = np.asarray(self.patches)
        if p.ndim != 4 or p.shape[0] != n or p.shape[2] != p.shape[3]:
            raise DatasetError(f"{self.origin}: patches must be (N, C, S, S) with N={n}, got {p.shape}")
        if np.asarray(self.features).shape[0] != n or np.asarray(self.features).ndim != 2:
            raise DatasetError(f"{self.origin}: features must be (N, F) with N={n}")
        for name in ("gripper", "timestamp", "source", "family", "scene", "ood_sigma", *_OPTIONAL_ROWS):
            if np.asarray(getattr(self, name)).shape != (n,):
                raise DatasetError(f"{self.origin}: {name} must have shape ({n},)")
        if n and not np.isin(self.gripper, (SUCTION, PARALLEL_JAW)).all():
            raise DatasetError(f"{self.origin}: gripper values must be 0 (suction) or 1 (parallel jaw)")
        if n and not np.isin(self.label, (0.0, 1.0)).all():
            raise DatasetError(f"{self.origin}: labels must be 0 or 1")
        if not (np.isfinite(self.patches).all() and np.isfinite(self.features).all()):
            raise DatasetError(f"{self.origin}: patches/features contain NaN or inf")
        if n and not (np.isfinite(self.weight).all() and (self.weight >= 0).all()):
            raise DatasetError(f"{self.origin}: row weights must be finite and >= 0")

    def __len__(self) -> int:
        return int(len(self.label))

    @property
    def n_channels(self) -> int:
        return int(self.patches.shape[1])

    @property
    def patch_size(self) -> int:
        return int(self.patches.shape[2])

    @property
    def n_features(self) -> int:
        return int(self.features.shape[1])

    def subset(self, idx: np.ndarray) -> Dataset:
        idx = np.asarray(idx)
        return replace(
            self,
            **{
                k: getattr(self, k)[idx]
                for k in (
                    "patches",
                    "features",
                    "gripper",
                    "label",
                    "timestamp",
                    "source",
                    "family",
                    "scene",
                    "ood_sigma",
                    *_OPTIONAL_ROWS,
                    "descriptor",
                )
            },
        )

    def fingerprint(self) -> str:
        """sha256 over labels, grippers, scenes and patches: identifies the exact training data."""
        h = hashlib.sha256()
        for a in (self.label, self.gripper, self.patches, self.features):
            h.update(np.ascontiguousarray(a).tobytes())
        h.update("\n".join(self.scene.astype(str)).encode())
        return h.hexdigest()

    def summary(self) -> dict[str, Any]:
        def counts(a: np.ndarray) -> dict[str, int]:
            k, c = np.unique(a.astype(str), return_counts=True)
            return {str(a_): int(b) for a_, b in zip(k, c, strict=True)}

        ts = self.timestamp[np.isfinite(self.timestamp)]
        return {
            "origin": self.origin,
            "rows": len(self),
            "positives": int(self.label.sum()),
            "scenes": int(np.unique(self.scene).size),
            "by_gripper": {GRIPPER_NAMES[g]: int((self.gripper == g).sum()) for g in (SUCTION, PARALLEL_JAW)},
            "by_family": counts(np.where(self.family == "", "unknown", self.family)),
            "by_source": counts(self.source),
            "time_span": [float(ts.min()), float(ts.max())] if ts.size else None,
            "patch_shape": [self.n_channels, self.patch_size, self.patch_size],
            "feature_names": list(self.feature_names),
            "sha256": self.fingerprint(),
        }


def make_dataset(
    patches: np.ndarray,
    features: np.ndarray,
    gripper: np.ndarray,
    label: np.ndarray,
    *,
    timestamp: np.ndarray | None = None,
    source: np.ndarray | str = "sim",
    family: np.ndarray | str = "",
    scene: np.ndarray | None = None,
    ood_sigma: np.ndarray | None = None,
    feature_names: tuple[str, ...] = (),
    origin: str = "memory",
) -> Dataset:
    """Build a Dataset from arrays (the entry point for simulation-collected data)."""
    n = len(label)

    def col(v: Any, dtype: Any, default: Any) -> np.ndarray:
        if v is None:
            v = default
        a = np.asarray(v)
        return np.full(n, a, dtype=dtype) if a.ndim == 0 else a.astype(dtype)

    return Dataset(
        patches=np.asarray(patches, dtype=np.float32),
        features=np.asarray(features, dtype=np.float32),
        gripper=np.asarray(gripper, dtype=np.int64),
        label=np.asarray(label, dtype=np.float32),
        timestamp=col(timestamp, np.float64, 0.0),
        source=col(source, np.str_, "sim"),
        family=col(family, np.str_, ""),
        scene=col(scene, np.str_, None) if scene is not None else np.arange(n).astype(str),
        ood_sigma=col(ood_sigma, np.float64, np.nan),
        feature_names=tuple(feature_names),
        origin=origin,
    )


def _default_feature_names(n: int) -> tuple[str, ...]:
    """grasping.patches.FEATURE_NAMES when the planner defines it and it fits; generic names otherwise."""
    try:
        from grasping.patches import FEATURE_NAMES  # the planner's module; optional at import time
    except ImportError:
        return tuple(f"f{i}" for i in range(n))
    return tuple(FEATURE_NAMES) if len(FEATURE_NAMES) == n else tuple(f"f{i}" for i in range(n))


def _load_shard(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise DatasetError(f"shard {path}: does not exist") from None
    except ValueError as exc:
        # np.load refuses object (pickled) arrays when allow_pickle=False: strings must be unicode.
        raise DatasetError(f"shard {path}: cannot be read without unpickling ({exc})") from None
    except Exception as exc:  # zipfile.BadZipFile, EOFError, OSError for truncated files
        raise DatasetError(f"shard {path}: not a readable npz file ({type(exc).__name__}: {exc})") from None
    missing = [k for k in REQUIRED_ARRAYS if k not in arrays]
    if missing:
        raise DatasetError(f"shard {path}: missing arrays {missing} (has {sorted(arrays)})")
    return arrays


def load_dataset(path: str | Path) -> Dataset:
    """Load a ledger export directory (or one .npz shard). Raises DatasetError naming the bad file.

    With a `manifest.json`, exactly its shards are read and each one's sha256 is checked; without
    one, every `*.npz` in the directory is read in name order. All shards must share the patch
    shape and feature dimension.
    """
    root = Path(path)
    if root.is_dir():
        manifest_path = root / "manifest.json"
        expected: dict[str, str] = {}
        if manifest_path.exists():
            try:
                manifest = json.loads(manifest_path.read_text())
                files = [root / s["file"] for s in manifest["shards"]]
                expected = {s["file"]: s.get("sha256", "") for s in manifest["shards"]}
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DatasetError(f"manifest {manifest_path}: malformed ({exc!r})") from None
        else:
            files = sorted(root.glob("*.npz"))
        if not files:
            raise DatasetError(f"dataset {root}: no npz shards found")
    elif root.is_file():
        files, expected = [root], {}
    else:
        raise DatasetError(f"dataset {root}: does not exist")
    parts: list[dict[str, np.ndarray]] = []
    for f in files:
        want = expected.get(f.name)
        if want:
            if not f.is_file():
                raise DatasetError(f"shard {f}: listed in manifest.json but missing")
            got = hashlib.sha256(f.read_bytes()).hexdigest()
            if got != want:
                raise DatasetError(f"shard {f}: sha256 {got[:16]}... does not match manifest {want[:16]}...")
        arrays = _load_shard(f)
        n = len(arrays["label"])
        if n == 0:
            continue
        if parts:
            ref = parts[0]
            if arrays["patches"].shape[1:] != ref["patches"].shape[1:] or (
                arrays["features"].shape[1:] != ref["features"].shape[1:]
            ):
                raise DatasetError(
                    f"shard {f}: patch/feature shape {arrays['patches'].shape[1:]}/"
                    f"{arrays['features'].shape[1:]} differs from the first shard's "
                    f"{ref['patches'].shape[1:]}/{ref['features'].shape[1:]}"
                )
        arrays["_shard"] = np.full(n, f.name)
        parts.append(arrays)
    if not parts:
        raise DatasetError(f"dataset {root}: every shard is empty")

    def cat(key: str, default: Any, dtype: Any) -> np.ndarray:
        return np.concatenate(
            [
                p[key].astype(dtype) if key in p else np.full(len(p["label"]), default, dtype=dtype)
                for p in parts
            ]
        )

    # Scene key: an explicit scene/plan/frame id when exported; otherwise the assist request id of
    # associate rows ("<request>:<index>"), and one scene per row for everything else.
    scene_cols = []
    for p in parts:
        key = next((k for k in _SCENE_KEYS if k in p), None)
        if key is not None:
            scene_cols.append(p[key].astype(str))
        elif "row_id" in p:
            scene_cols.append(np.array([r.split(":", 1)[0] for r in p["row_id"].astype(str)]))
        else:
            scene_cols.append(np.char.add(p["_shard"].astype(str), np.arange(len(p["label"])).astype(str)))
    n_f = parts[0]["features"].shape[1]
    try:
        return Dataset(
            patches=np.concatenate([p["patches"] for p in parts]).astype(np.float32, copy=False),
            features=np.concatenate([p["features"] for p in parts]).astype(np.float32, copy=False),
            gripper=cat("gripper", 0, np.int64),
            label=cat("label", 0, np.float32),
            timestamp=cat("timestamp", 0.0, np.float64),
            source=cat("source", "unknown", np.str_),
            family=cat("family", "", np.str_),
            scene=np.concatenate(scene_cols),
            ood_sigma=cat("scene_ood_sigma", np.nan, np.float64),
            feature_names=_default_feature_names(n_f),
            origin=str(root),
            weight=cat("weight", 1.0, np.float64),
            # Rows with no tote (an attempt without a plan) are their own scene's "tote".
            tote=np.concatenate(
                [
                    np.where(p["tote_id"].astype(str) != "", p["tote_id"].astype(str), sc)
                    if "tote_id" in p
                    else sc
                    for p, sc in zip(parts, scene_cols, strict=True)
                ]
            ),
            item=cat("item_key", "", np.str_),
            descriptor=_descriptors(parts),
            decided_by=cat("decided_by", "", np.str_),
            row_id=np.concatenate(
                [
                    p["row_id"].astype(str)
                    if "row_id" in p
                    else np.char.add(p["_shard"].astype(str), np.arange(len(p["label"])).astype(str))
                    for p in parts
                ]
            ),
        )
    except ValueError as exc:
        raise DatasetError(f"dataset {root}: {exc}") from None


def _pad_columns(a: np.ndarray, dim: int) -> np.ndarray:
    """(N, d <= dim) -> (N, dim) float64, the missing trailing columns NaN."""
    a = np.asarray(a, dtype=np.float64)
    return np.concatenate([a, np.full((len(a), dim - a.shape[1]), np.nan)], axis=1)


def _descriptors(parts: list[dict[str, np.ndarray]]) -> np.ndarray:
    """(N, D) item descriptors of the shards (NaN rows where a shard has none; a shard of an older,
    shorter descriptor version gets NaN for the features it lacks)."""
    dims = {p["item_descriptor"].shape[1] for p in parts if "item_descriptor" in p}
    if not dims:
        return np.zeros((sum(len(p["label"]) for p in parts), 0))
    d = max(dims)
    return np.concatenate(
        [
            _pad_columns(p["item_descriptor"], d)
            if "item_descriptor" in p
            else np.full((len(p["label"]), d), np.nan)
            for p in parts
        ]
    )


def join_datasets(parts: list[Dataset], origin: str) -> Dataset:
    """Join datasets of one patch shape and feature count (item descriptors padded with NaN)."""
    if not parts:
        raise DatasetError("no data: every source was empty")
    ref = parts[0]
    for d in parts[1:]:
        if d.patches.shape[1:] != ref.patches.shape[1:] or d.features.shape[1:] != ref.features.shape[1:]:
            raise DatasetError(
                f"{d.origin}: patch/feature shape {d.patches.shape[1:]}/{d.features.shape[1:]} differs "
                f"from {ref.origin}'s {ref.patches.shape[1:]}/{ref.features.shape[1:]}"
            )
    # Descriptor versions only append features: a shorter (older) descriptor is padded with NaN for
    # the features it lacks, a source without descriptors is all NaN.
    dim = max((d.descriptor.shape[1] for d in parts), default=0)
    desc = [_pad_columns(d.descriptor.reshape(len(d), -1), dim) for d in parts]
    cols = (
        "patches", "features", "gripper", "label", "timestamp", "source", "family", "scene", "ood_sigma",
        "weight", "tote", "item", "decided_by", "row_id",
    )  # fmt: skip
    return Dataset(
        **{c: np.concatenate([getattr(d, c) for d in parts]) for c in cols},
        descriptor=np.concatenate(desc) if desc else np.zeros((0, 0)),
        feature_names=ref.feature_names,
        origin=origin,
    )


# --- held-out totes ---------------------------------------------------------------------------------

HOLDOUT_PERCENT = 20  # share of totes (by a hash of the tote id) that only the gate ever sees, percent


def outcome_rows(ds: Dataset) -> np.ndarray:
    """(N,) bool: rows labelled by what happened when the candidate was executed.

    A person's judgments are not outcomes: candidates passed over (export weight < 1) and the
    candidates of an item answered "no safe pick" (source "associate"). They train the network,
    but calibration, the ask threshold, test metrics and the gate describe executed candidates
    and read outcome rows only: a judgment row pulls probabilities towards what the person thought,
    and one answer would count as up to 20 failures (docs/learning.md, stop 40).
    """
    return (np.asarray(ds.weight) >= 1.0) & (np.asarray(ds.source).astype(str) != "associate")


def held_out(tote: np.ndarray, percent: int = HOLDOUT_PERCENT) -> np.ndarray:
    """(N,) bool: rows of the totes a gate keeps for itself, chosen by a hash of the tote id (stable
    across learning rounds, cells and runs, so no model ever trains on them)."""
    memo: dict[str, bool] = {}
    out = np.zeros(len(tote), dtype=bool)
    for i, t in enumerate(np.asarray(tote).astype(str)):
        if t not in memo:
            memo[t] = int(hashlib.sha256(t.encode()).hexdigest()[:8], 16) % 100 < percent
        out[i] = memo[t]
    return out


def tote_digest(tote: str) -> str:
    """A short, stable name of a tote id for a model's `fitted_totes` (12 hex digits of its sha256:
    collisions among a few thousand totes are about 1 in 10^10)."""
    return hashlib.sha256(str(tote).encode()).hexdigest()[:12]


def fitted_totes(dataset: Dataset, rows: np.ndarray) -> list[str]:
    """Sorted digests of the totes of `rows`: what a model records as the data that shaped it."""
    return sorted({tote_digest(t) for t in np.unique(np.asarray(dataset.tote)[rows].astype(str))})


def incumbent_fitted_on(meta: dict[str, Any], tote: np.ndarray) -> np.ndarray | None:
    """(N,) bool: rows of totes the model (its metadata `meta`) was fitted on, or None when the file
    does not say (models written before `fitted_totes` existed). A gate must not judge a model on
    rows it fitted: on those it looks better than on new totes. The learner's own held-out totes
    (`held_out`) never reach a learner-trained model, but a model from another split rule (the
    recipe holds out every tenth tote by number) whose data is replayed would."""
    known = meta.get("fitted_totes")
    if not isinstance(known, dict) or not isinstance(known.get("totes"), list):
        return None
    have = set(known["totes"])
    memo: dict[str, bool] = {}
    out = np.zeros(len(tote), dtype=bool)
    for i, t in enumerate(np.asarray(tote).astype(str)):
        if t not in memo:
            memo[t] = tote_digest(t) in have
        out[i] = memo[t]
    return out


# --- item kinds -------------------------------------------------------------------------------------


def fit_item_kinds(descriptor: np.ndarray, k: int, seed: int) -> dict[str, Any] | None:
    """Group items by shape when no family is known: k-means (scikit-learn) on standardised
    descriptors. Returns a JSON-able model {center, scale, centroids} (None: too few items).

    A real cell has no simulator families; its ledger has every row's item shape descriptor. The
    kinds are stored in the model file so the gate groups held-out rows exactly as training did.
    """
    from sklearn.cluster import KMeans

    d = np.asarray(descriptor, dtype=np.float64)
    if d.ndim != 2 or d.shape[1] == 0:
        return None
    # A ledger that spans a descriptor upgrade holds older, shorter descriptors padded with NaN at
    # the end: group on the widest leading block of features that at least half the rows have.
    described = int(np.isfinite(d).any(axis=1).sum())
    w = d.shape[1]
    while w > 1 and np.isfinite(d[:, :w]).all(axis=1).sum() < 0.5 * described:
        w -= 1
    d = d[:, :w]
    d = d[np.isfinite(d).all(axis=1)]
    if len(d) < 2 * k or k < 1:
        return None
    center = np.median(d, axis=0)
    scale = np.maximum(1.4826 * np.median(np.abs(d - center), axis=0), np.maximum(0.25 * d.std(axis=0), 1e-3))
    z = (d - center) / scale
    k = min(k, len(np.unique(np.round(z, 6), axis=0)))  # no more kinds than distinct items
    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(z)
    return {"center": center.tolist(), "scale": scale.tolist(), "centroids": km.cluster_centers_.tolist()}


def item_kinds(ds: Dataset, kinds_model: dict[str, Any] | None = None) -> np.ndarray:
    """(N,) str: each row's kind of item: its family where known (simulation; a row without one takes
    that of another row on the same item), else its shape kind (`shape-<j>`, the nearest
    `fit_item_kinds` centroid of its descriptor), else "unknown"."""
    family = ds.family.astype(str).copy()
    # Rows without a family (a person's label on a candidate) take the family another row on the
    # same item has (the executed attempt on it), where there is one.
    known = {k: f for k, f in zip(ds.item.astype(str), family, strict=True) if k and f}
    if known:
        family = np.array([f or known.get(k, "") for k, f in zip(ds.item.astype(str), family, strict=True)])
    out = np.where(family != "", family, "unknown").astype(object)
    if kinds_model and ds.descriptor.shape[1] >= len(kinds_model["center"]):
        d = ds.descriptor[:, : len(kinds_model["center"])]
        ok = (family == "") & np.isfinite(d).all(axis=1)
        if ok.any():
            z = (d[ok] - np.asarray(kinds_model["center"])) / np.asarray(kinds_model["scale"])
            c = np.asarray(kinds_model["centroids"])
            j = np.argmin(((z[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
            out[ok] = [f"shape-{int(x)}" for x in j]
    return out.astype(str)


OWN_CALIBRATION_MIN_ROWS = 30  # calibration rows a gripper needs to be calibrated on its own rows


def split_by_scene(
    scene: np.ndarray, fractions: dict[str, float], seed: int, stable: bool = False
) -> dict[str, np.ndarray]:
    """Row indices per split; whole scenes are assigned, in a seeded random order, by row count.

    `stable`: each scene's split depends only on its id and `seed` (a hash of both, against the
    cumulative fractions of scenes), not on which other scenes are present. Successive fine-tunes
    on a growing dataset then keep every scene in the split it had: rows one round calibrated on or
    certified its threshold with never become the next round's training rows, and rows a model
    trained on never calibrate or certify its successor (learner rounds; docs/learning.md, stop 37).
    """
    total = sum(fractions.values())
    if not math.isclose(total, 1.0, abs_tol=1e-6) or min(fractions.values()) < 0:
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {fractions}")
    if stable:
        keys, inv = np.unique(np.asarray(scene).astype(str), return_inverse=True)
        u = np.array(
            [int(hashlib.sha256(f"split:{seed}:{k}".encode()).hexdigest()[:13], 16) / 16**13 for k in keys]
        )
        bounds = np.cumsum(list(fractions.values()))
        which = np.minimum(np.searchsorted(bounds, u, side="right"), len(fractions) - 1)
        row_split = which[inv]
        return {name: np.flatnonzero(row_split == i) for i, name in enumerate(fractions)}
    keys, inv, counts = np.unique(scene, return_inverse=True, return_counts=True)
    order = np.random.default_rng(seed).permutation(keys.size)
    cum = np.cumsum(counts[order]) / counts.sum()
    bounds = np.cumsum(list(fractions.values()))
    which = np.searchsorted(bounds, cum - 1e-12, side="left")  # split of each scene (in `order`)
    scene_split = np.empty(keys.size, dtype=np.int64)
    scene_split[order] = np.minimum(which, len(fractions) - 1)
    row_split = scene_split[inv]
    return {name: np.flatnonzero(row_split == i) for i, name in enumerate(fractions)}


# --- importance weights -----------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightConfig:
    half_life_s: float = 14 * 86400.0  # seconds: a row this much older than the newest counts half
    replay_floor: float = 0.25  # weight never decays below this (experience replay of old data)
    new_family_boost: float = 2.0  # multiplier for rows of families the incumbent model never saw
    ood_gain: float = 0.25  # extra weight per sigma of recorded watchdog score above 0
    ood_cap_sigma: float = 8.0  # sigmas; larger recorded scores count as this much
    balance_classes: bool = True  # equalise success/failure weight within each gripper


def importance_weights(
    ds: Dataset, cfg: WeightConfig, now: float | None = None, new_families: tuple[str, ...] = ()
) -> np.ndarray:
    """(N,) per-row weights with mean 1 (before class balancing). See the module docstring."""
    n = len(ds)
    if n == 0:
        return np.zeros(0)
    t = np.where(np.isfinite(ds.timestamp), ds.timestamp, np.nan)
    now = float(np.nanmax(t)) if now is None and np.isfinite(t).any() else (now or 0.0)
    age = np.clip(now - np.nan_to_num(t, nan=now), 0.0, None)
    w = np.maximum(0.5 ** (age / cfg.half_life_s), cfg.replay_floor)
    if new_families:
        w = w * np.where(np.isin(ds.family, list(new_families)), cfg.new_family_boost, 1.0)
    sig = np.nan_to_num(ds.ood_sigma, nan=0.0)
    w = w * (1.0 + cfg.ood_gain * np.clip(sig, 0.0, cfg.ood_cap_sigma))
    return w / w.mean()


def class_balance(weights: np.ndarray, label: np.ndarray, gripper: np.ndarray) -> np.ndarray:
    """Rescale so successes and failures carry equal total weight within each gripper.

    Balancing shifts the network's raw probabilities; the calibrators, fitted on unweighted held-out
    rows, map them back to real success rates.
    """
    w = weights.astype(np.float64).copy()
    for g in np.unique(gripper):
        pos, neg = (gripper == g) & (label == 1), (gripper == g) & (label == 0)
        total = w[pos].sum() + w[neg].sum()
        if w[pos].sum() > 0 and w[neg].sum() > 0:
            w[pos] *= 0.5 * total / w[pos].sum()
            w[neg] *= 0.5 * total / w[neg].sum()
    return w / w.mean()


# --- training ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30  # passes over the training split at most
    batch_size: int = 256  # rows per optimiser step
    lr: float = 2e-3  # AdamW learning rate
    weight_decay: float = 1e-4  # AdamW decoupled weight decay
    patience: int = 5  # epochs without validation improvement before stopping
    seed: int = 0  # seeds splits, initialisation, shuffling, augmentation
    embed_dim: int = 64  # backbone embedding size (watchdog dimension)
    alpha: float = 0.05  # conformal risk level for auto-execution
    risk: str = "joint"  # "joint": CRC bound on P(executed and failed); "executed": P(fail | executed)
    delta: float = 0.1  # confidence of the "executed" (Learn-then-Test) bound
    # Calibrated p below which the cell never acts alone, whatever the risk control allows: the joint
    # CRC bound can admit low thresholds when few held-out rows score high (raising a threshold only
    # lowers the controlled risk, so the guarantee still holds).
    min_threshold: float = 0.5
    # Never certify an auto-execute threshold below the incumbent's (per gripper, where the incumbent
    # has one): a fine-tune sharpens the probabilities, the bar on them stays where the fleet runs.
    # The joint bound on a ledger's conformal rows, which hold many passed-over candidates scored low,
    # fell to min_threshold and the candidate executed alone far more often than the incumbent
    # (docs/learning.md, stop 36). The incumbent's re-certified thresholds get the same floor, so
    # the gate still compares the two at matched bars.
    keep_incumbent_bar: bool = False
    val_fraction: float = 0.10  # fractions of scenes per split; train gets the rest
    calib_fraction: float = 0.15
    conformal_fraction: float = 0.15
    test_fraction: float = 0.10
    watchdog_quantile: float = 0.99  # in-distribution scenes flagged at most 1 - this often
    augment: bool = True  # random flips of the patch (both grippers are mirror-symmetric)
    weights: WeightConfig = field(default_factory=WeightConfig)
    forbidden_families: tuple[str, ...] = ()  # e.g. the test catalog: training refuses such rows
    new_families: tuple[str, ...] | None = None  # None: families the incumbent (if any) never saw
    incumbent: str | None = None  # path of the current model, for new-family detection
    model_version: str | None = None  # default: "graspnet-<UTC time>-s<seed>"
    min_rows: int = 200  # refuse to train on fewer rows than this
    progress: bool = True  # tqdm progress bar
    threads: int | None = None  # torch threads for training (None: leave torch's default)
    # "loss": importance weights scale each row's loss; "sample": rows are drawn with replacement in
    # proportion to their weight and the loss is unweighted (loss weights fade on over-parameterised
    # nets as training goes on: Byrd & Lipton, ICML 2019; sampling does not).
    sampling: str = "loss"
    init_model: str | None = None  # fine-tune: start from this model file's network (None: from scratch)
    # What fine-tuning may change: "none" (every weight) or "backbone" (the patch CNN, the feature MLP
    # and the fusion layer stay as they are: only the per-gripper heads learn, so the embedding the
    # watchdog reads keeps its meaning and a few hundred rows cannot bend the shared features).
    freeze: str = "none"
    # Fine-tuning: weight of a logit-matching loss on the anchor rows (old data: replay and rows the
    # incumbent already learned from), the squared difference between the network's logit and the
    # starting network's on the same (augmented) input. Replay alone keeps old rows in the batches
    # but lets their logits drift; matching the old model's logits on them (dark experience replay,
    # Buzzega et al., NeurIPS 2020; learning without forgetting, Li & Hoiem, 2016) keeps what the
    # incumbent knew about them. 0: off.
    distill: float = 0.0
    # Assign each scene (tote) to its split by a hash of its id (`split_by_scene(stable=True)`), so
    # a growing dataset keeps every tote in its split from one fine-tune to the next. Re-drawn each
    # round, continual seed 34's round-3 suction calibration split was 135 of 149 replay rows from
    # totes its incumbent had been fitted on; the temperature fitted there (1.68 against 0.97)
    # flattened every suction p and the gate called cartons and mailers forgotten (stop 37).
    stable_splits: bool = False


@dataclass(frozen=True)
class TrainResult:
    path: Path
    card_path: Path
    sha256: str
    version: str
    metrics: dict[str, Any]
    history: list[dict[str, float]]
    splits: dict[str, int]  # rows per split


def _batched(net: Any, ds: Dataset, batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    import torch

    logits, embs = [], []
    net.eval()
    with torch.inference_mode():
        for s in range(0, len(ds), batch):
            lg, em = net(
                torch.from_numpy(ds.patches[s : s + batch]),
                torch.from_numpy(ds.features[s : s + batch]),
                torch.from_numpy(ds.gripper[s : s + batch]),
            )
            logits.append(lg.numpy().astype(np.float64))
            embs.append(em.numpy().astype(np.float64))
    if not logits:
        return np.zeros(0), np.zeros((0, net.embed_dim))
    return np.concatenate(logits), np.concatenate(embs)


def _fit_net(
    train_ds: Dataset,
    val_ds: Dataset,
    w_train: np.ndarray,
    w_val: np.ndarray,
    cfg: TrainConfig,
    anchor: np.ndarray | None = None,
) -> tuple[Any, list[dict[str, float]]]:
    import torch
    from tqdm import tqdm

    from grasping.model import GraspNet

    if cfg.sampling not in ("loss", "sample"):
        raise ValueError(f"sampling must be 'loss' or 'sample', got {cfg.sampling!r}")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.distill > 0 and not cfg.init_model:
        raise ValueError("distill needs init_model: it matches the starting network's logits")
    teacher = None
    if cfg.init_model:
        from grasping.modelfile import load_model

        # Fine-tuning keeps the incumbent's feature normalisation: its weights were learnt on it.
        net = load_model(cfg.init_model).net
        have = (net.in_channels, net.patch_size, net.n_features)
        want = (train_ds.n_channels, train_ds.patch_size, train_ds.n_features)
        if have != want:
            raise DatasetError(f"{cfg.init_model}: network input {have} does not match the data {want}")
        if cfg.distill > 0:
            teacher = load_model(cfg.init_model).net  # a frozen copy of the starting network
            teacher.eval()
            for prm in teacher.parameters():
                prm.requires_grad_(False)
    else:
        net = GraspNet(train_ds.n_channels, train_ds.patch_size, train_ds.n_features, cfg.embed_dim)
        f = torch.from_numpy(train_ds.features)
        net.set_feature_normalisation(f.mean(0), f.std(0) if len(train_ds) > 1 else torch.ones(f.shape[1]))
    if cfg.freeze not in ("none", "backbone"):
        raise ValueError(f"freeze must be 'none' or 'backbone', got {cfg.freeze!r}")
    if cfg.freeze == "backbone":
        for part in (net.conv, net.feature_mlp, net.fuse):
            for prm in part.parameters() if part is not None else ():
                prm.requires_grad_(False)
    opt = torch.optim.AdamW(
        [prm for prm in net.parameters() if prm.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.epochs, 1))
    P, F = torch.from_numpy(train_ds.patches), torch.from_numpy(train_ds.features)
    G, Y = torch.from_numpy(train_ds.gripper), torch.from_numpy(train_ds.label)
    W = torch.from_numpy(w_train.astype(np.float32))
    A = torch.from_numpy(
        np.ones(len(train_ds), dtype=bool) if anchor is None else np.asarray(anchor, dtype=bool)
    )
    best = (math.inf, None, -1)
    history: list[dict[str, float]] = []
    bar = tqdm(range(cfg.epochs), desc="train", unit="epoch", disable=not cfg.progress, leave=False)
    for epoch in bar:
        net.train()
        if cfg.sampling == "sample":
            # One epoch = N draws with replacement, in proportion to the weights.
            perm = torch.multinomial(W, len(train_ds), replacement=True, generator=gen)
        else:
            perm = torch.randperm(len(train_ds), generator=gen)
        total, count = 0.0, 0
        for s in range(0, len(perm), cfg.batch_size):
            idx = perm[s : s + cfg.batch_size]
            x = P[idx]
            if cfg.augment:
                # Flip rows of the batch left-right / up-down with probability 1/2 each.
                flip_w = torch.rand(len(idx), generator=gen) < 0.5
                flip_h = torch.rand(len(idx), generator=gen) < 0.5
                x = torch.where(flip_w.view(-1, 1, 1, 1), x.flip(-1), x)
                x = torch.where(flip_h.view(-1, 1, 1, 1), x.flip(-2), x)
            logits, _ = net(x, F[idx], G[idx])
            loss_rows = torch.nn.functional.binary_cross_entropy_with_logits(logits, Y[idx], reduction="none")
            if cfg.sampling == "sample":
                loss = loss_rows.mean()  # the weights already chose the rows
            else:
                loss = (loss_rows * W[idx]).sum() / W[idx].sum()
            if teacher is not None:
                a = A[idx]
                if bool(a.any()):
                    with torch.no_grad():
                        target, _ = teacher(x[a], F[idx][a], G[idx][a])
                    # Averaged over the batch, not the anchored rows: the term's pull scales with
                    # the share of old rows drawn, which the replay share sets.
                    loss = loss + cfg.distill * ((logits[a] - target) ** 2).sum() / len(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        sched.step()
        val_logits, _ = _batched(net, val_ds)
        p = sigmoid(val_logits)
        p = np.clip(p, 1e-6, 1 - 1e-6)
        y = val_ds.label.astype(np.float64)
        val_loss = float(-np.sum(w_val * (y * np.log(p) + (1 - y) * np.log(1 - p))) / w_val.sum())
        val_auc = auroc(val_logits, y) if len(val_ds) else float("nan")
        history.append(
            {"epoch": epoch, "train_loss": total / max(count, 1), "val_loss": val_loss, "val_auroc": val_auc}
        )
        bar.set_postfix(loss=f"{total / max(count, 1):.3f}", val=f"{val_loss:.3f}", auc=f"{val_auc:.3f}")
        if val_loss < best[0] - 1e-4:
            best = (val_loss, {k: v.detach().clone() for k, v in net.state_dict().items()}, epoch)
        elif epoch - best[2] >= cfg.patience:
            log.info("early stop at epoch %d (best %d, val loss %.4f)", epoch, best[2], best[0])
            break
    if best[1] is not None:
        net.load_state_dict(best[1])
    net.eval()
    return net, history


def _feature_baseline_auroc(train_ds: Dataset, test_ds: Dataset, seed: int) -> float:
    """AUROC of logistic regression on the analytic features (+ gripper): what the patch must beat."""
    import torch

    def design(ds: Dataset, mu: np.ndarray, sd: np.ndarray) -> torch.Tensor:
        x = (ds.features - mu) / sd
        g = np.eye(2, dtype=np.float32)[ds.gripper]
        # Per-gripper slopes: the analytic quality of a suction seal and of a pinch differ.
        return torch.from_numpy(np.concatenate([x * g[:, :1], x * g[:, 1:], g], axis=1).astype(np.float32))

    if len(test_ds) == 0 or test_ds.label.min() == test_ds.label.max():
        return float("nan")
    mu = train_ds.features.mean(0)
    sd = train_ds.features.std(0) + 1e-6
    X, Y = design(train_ds, mu, sd), torch.from_numpy(train_ds.label)
    torch.manual_seed(seed)
    w = torch.zeros(X.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(X @ w, Y) + 1e-4 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        s = (design(test_ds, mu, sd) @ w).numpy()
    return auroc(s, test_ds.label)


def _thresholds(p: np.ndarray, y: np.ndarray, g: np.ndarray, cfg: TrainConfig) -> tuple[np.ndarray, dict]:
    """Per-gripper auto-execute thresholds on the conformal split (NEVER where data is too thin)."""
    thr = np.full(2, NEVER)
    info: dict[str, Any] = {}
    for k in (SUCTION, PARALLEL_JAW):
        rows = g == k
        if cfg.risk == "joint":
            res = conformal_threshold(p[rows], y[rows], cfg.alpha)
        elif cfg.risk == "executed":
            res = executed_failure_threshold(p[rows], y[rows], cfg.alpha, cfg.delta)
        else:
            raise ValueError(f"risk must be 'joint' or 'executed', got {cfg.risk!r}")
        thr[k] = max(res.threshold, cfg.min_threshold)
        floored = cfg.min_threshold if thr[k] > res.threshold else None
        info[GRIPPER_NAMES[k]] = {**asdict(res), "floored_to": floored}
    return thr, info


def evaluate(scorer: Any, ds: Dataset, bins: int = 15, kinds: np.ndarray | None = None) -> dict[str, Any]:
    """Holdout metrics of a LearnedScorer on labelled rows (used by the model card and the gate).

    `kinds` (N,) str: item kind per row (`item_kinds`); adds `by_kind`: per kind its rows, autonomous
    success (share of its rows the model would execute alone and that succeeded), conditional
    failure among those it would execute, and AUROC.
    """
    if len(ds) == 0:
        raise ValueError(f"cannot evaluate on an empty dataset ({ds.origin})")
    logits, emb = scorer.logits_and_embeddings(ds.patches, ds.features, ds.gripper)
    p_raw = sigmoid(logits)
    p = scorer.calibrate(logits, ds.gripper)
    y = ds.label.astype(np.float64)
    thr_rows = scorer.candidate_thresholds(ds.gripper)
    act = p >= thr_rows
    # Ranking metrics across grippers use the calibrated probabilities: the two heads' raw logits
    # are on scales of their own (a fine-tune may shift one head's against the other's), and the
    # cell ranks and thresholds candidates of both grippers by calibrated p. Per gripper the two
    # rank alike. (Pooled raw logits refused retrained models whose heads each ranked as well as
    # the incumbent's: docs/learning.md, stop 27.)
    out: dict[str, Any] = {
        "n": len(ds),
        "positives": int(y.sum()),
        "auroc": auroc(p, y),
        "ece_raw": expected_calibration_error(p_raw, y, bins),
        "ece": expected_calibration_error(p, y, bins),
        "brier": brier(p, y),
        "nll": nll(p, y),
        "auto_execute_rate": float(act.mean()),
        "auto_fail_joint": float((act & (y == 0)).mean()),
        "auto_fail_given_executed": float((act & (y == 0)).sum() / act.sum()) if act.any() else 0.0,
        "ood_candidate_median": float(np.median(scorer.model.watchdog.candidate_scores(emb))),
    }
    for g in (SUCTION, PARALLEL_JAW):
        rows = ds.gripper == g
        name = GRIPPER_NAMES[g]
        if rows.any():
            out[f"{name}.n"] = int(rows.sum())
            out[f"{name}.auroc"] = auroc(logits[rows], y[rows])
            out[f"{name}.accuracy"] = float(((p[rows] >= 0.5) == (y[rows] == 1)).mean())
            out[f"{name}.ece"] = expected_calibration_error(p[rows], y[rows], bins)
            out.update(
                {f"{name}.{k}": v for k, v in auto_execute_rates(p[rows], y[rows], thr_rows[rows][0]).items()}
            )
    fams = {}
    for fam in np.unique(ds.family):
        rows = ds.family == fam
        fams[str(fam) or "unknown"] = {
            "n": int(rows.sum()),
            "success_rate": float(y[rows].mean()),
            "mean_p": float(p[rows].mean()),
            "auroc": auroc(p[rows], y[rows]),
        }
    out["by_family"] = fams
    if kinds is not None:
        kinds = np.asarray(kinds).astype(str)
        out["by_kind"] = {
            str(k): {
                "n": int(rows.sum()),
                "auto_success": float((act[rows] & (y[rows] == 1)).mean()),
                "auto_execute_rate": float(act[rows].mean()),
                "auto_fail_given_executed": float(
                    (act[rows] & (y[rows] == 0)).sum() / max(act[rows].sum(), 1)
                ),
                "auroc": auroc(p[rows], y[rows]),
            }
            for k in np.unique(kinds)
            for rows in [kinds == k]
        }
    return out


def _card(result_meta: dict[str, Any], metrics: dict[str, Any], cfg: TrainConfig, path: Path) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    data = result_meta["data"]
    lines = [
        f"# Model card: {result_meta['model_version']}",
        "",
        f"File `{path.name}` (sha256 in `{path.name}.sha256`), format {result_meta.get('format', '')}, "
        f"created {result_meta['created']}.",
        "",
        "GraspNet: shared CNN backbone over the grasp-frame patch + MLP over analytic features, one head per",
        "gripper; per-gripper calibrator; conformal auto-execute threshold; Mahalanobis watchdog on the",
        "backbone embedding.",
        "",
        "## Data",
        f"- origin: `{data['origin']}`; rows {data['rows']} ({data['positives']} success), "
        f"scenes {data['scenes']}",
        f"- by gripper: {data['by_gripper']}; by family: {data['by_family']}; by source: {data['by_source']}",
        f"- splits (rows): {result_meta['splits']} (by scene; test untouched until the metrics below)",
        f"- new families weighted up: {result_meta['new_families'] or 'none'}",
        f"- data sha256: `{data['sha256']}`",
        "",
        "## Training settings",
        *[f"- {k}: {v}" for k, v in result_meta["train_config"].items()],
        "",
        "## Calibration and threshold",
        *[f"- {g}: {c}" for g, c in result_meta["calibration"].items()],
        f"- auto-execute thresholds (calibrated p; risk `{cfg.risk}`, alpha {cfg.alpha}): "
        f"{[fmt(t) for t in result_meta['thresholds']]}",
        f"- watchdog: threshold {fmt(result_meta['watchdog']['watchdog_threshold_sigma'])} sigma, "
        f"quantile {cfg.watchdog_quantile}",
        "",
        "## Test metrics",
        "| metric | value |",
        "| --- | --- |",
        *[f"| {k} | {fmt(v)} |" for k, v in metrics.items() if not isinstance(v, dict)],
        "",
        "### By family",
        "| family | n | success rate | mean p | AUROC |",
        "| --- | --- | --- | --- | --- |",
        *[
            f"| {f} | {m['n']} | {fmt(m['success_rate'])} | {fmt(m['mean_p'])} | {fmt(m['auroc'])} |"
            for f, m in metrics.get("by_family", {}).items()
        ],
        "",
    ]
    return "\n".join(lines)


def card_path_for(model_path: str | Path) -> Path:
    return Path(model_path).with_suffix(".md")


def train(
    dataset: Dataset,
    cfg: TrainConfig,
    out_path: str | Path,
    row_weights: np.ndarray | None = None,
    extra_meta: dict[str, Any] | None = None,
    anchor_rows: np.ndarray | None = None,
) -> TrainResult:
    """Train, calibrate, threshold, fit the watchdog, evaluate on the test split, write file + card.

    `row_weights` (N,): what to learn most from, computed by the caller (e.g. `learn.weights`);
    None: `importance_weights` (recency, new families, flagged scenes). Either way each row's export
    weight (`Dataset.weight`: weak negatives count less) multiplies it. `extra_meta` is stored in the
    model file's metadata (e.g. the learner's dataset manifest). `anchor_rows` (N,) bool: the rows whose
    logits a fine-tune keeps near the starting network's when `cfg.distill` > 0 (the learner passes
    its old rows); None: every row.
    """
    import torch

    from grasping.calibration import Calibrator
    from grasping.learned_scorer import LearnedScorer
    from grasping.modelfile import FORMAT, load_model, save_model
    from grasping.watchdog import fit_watchdog

    t0 = time.time()
    out_path = Path(out_path)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    bad = np.isin(dataset.family, list(cfg.forbidden_families)) if cfg.forbidden_families else None
    if bad is not None and bad.any():
        fams = sorted(set(dataset.family[bad].tolist()))
        raise DatasetError(f"{dataset.origin}: {int(bad.sum())} rows from forbidden families {fams}")
    if len(dataset) < cfg.min_rows:
        raise DatasetError(f"{dataset.origin}: {len(dataset)} rows, need at least {cfg.min_rows} to train")
    if dataset.label.min() == dataset.label.max():
        raise DatasetError(
            f"{dataset.origin}: all labels are {dataset.label[0]}; need successes and failures"
        )
    fractions = {
        "val": cfg.val_fraction,
        "calib": cfg.calib_fraction,
        "conformal": cfg.conformal_fraction,
        "test": cfg.test_fraction,
    }
    fractions = {"train": 1.0 - sum(fractions.values()), **fractions}
    idx = split_by_scene(dataset.scene, fractions, cfg.seed, stable=cfg.stable_splits)
    # Calibration, the ask threshold and the test metrics describe what happens when a candidate is
    # executed. A person's judgments (weak negatives: candidates passed over; "no safe pick" rows)
    # are not outcomes: weak negatives, about a third of a cell's rows, pulled every recalibrated
    # probability down (continual experiment, docs/learning.md). They still train the network.
    outcome = outcome_rows(dataset)
    for k in ("calib", "conformal", "test"):
        idx[k] = idx[k][outcome[idx[k]]]
    parts = {k: dataset.subset(v) for k, v in idx.items()}
    for k, d in parts.items():
        if len(d) == 0 or d.label.min() == d.label.max():
            raise DatasetError(
                f"{dataset.origin}: split {k!r} has {len(d)} rows and only one class; "
                "need more data or more scenes"
            )

    new_families: tuple[str, ...] = ()
    if cfg.new_families is not None:
        new_families = tuple(cfg.new_families)
    elif cfg.incumbent:
        old = load_model(cfg.incumbent).meta.get("data", {}).get("by_family", {})
        new_families = tuple(sorted(set(np.unique(dataset.family).tolist()) - set(old) - {""}))
    if row_weights is not None:
        row_weights = np.asarray(row_weights, dtype=np.float64)
        if row_weights.shape != (len(dataset),) or not (
            np.isfinite(row_weights).all() and (row_weights >= 0).all()
        ):
            raise ValueError(f"row_weights must be ({len(dataset)},) finite and >= 0")
        w_all = row_weights / max(row_weights.mean(), 1e-12)
    else:
        w_all = importance_weights(dataset, cfg.weights, new_families=new_families)
    w_all = w_all * dataset.weight
    w_all = w_all / max(w_all.mean(), 1e-12)
    w_tr, w_val = w_all[idx["train"]], w_all[idx["val"]]
    if cfg.weights.balance_classes:
        w_tr = class_balance(w_tr, parts["train"].label, parts["train"].gripper)
        w_val = class_balance(w_val, parts["val"].label, parts["val"].gripper)
    if anchor_rows is not None and np.shape(anchor_rows) != (len(dataset),):
        raise ValueError(f"anchor_rows must be ({len(dataset)},) booleans")
    anchor = None if anchor_rows is None else np.asarray(anchor_rows, dtype=bool)[idx["train"]]
    net, history = _fit_net(parts["train"], parts["val"], w_tr, w_val, cfg, anchor=anchor)

    # Calibrators per gripper on the calib split (pooled rows for a gripper with too little data).
    # Calibrators are weighted by recency only (half-life + replay floor): probabilities should
    # describe the items the cell sees now, while new-family and watchdog boosts are about what to
    # *learn*, not how often things happen.
    cal_logits, cal_emb = _batched(net, parts["calib"])
    y_cal = parts["calib"].label.astype(np.float64)
    g_cal = parts["calib"].gripper
    recency = importance_weights(
        dataset, replace(cfg.weights, new_family_boost=1.0, ood_gain=0.0), new_families=()
    )[idx["calib"]]
    pooled = fit_calibrator(cal_logits, y_cal, seed=cfg.seed, w=recency)
    calibrators: list[Calibrator] = []
    cal_info: dict[str, Any] = {}
    for g in (SUCTION, PARALLEL_JAW):
        rows = g_cal == g
        n_pos = int(y_cal[rows].sum())
        # A gripper's own rows from OWN_CALIBRATION_MIN_ROWS on: a temperature and a bias are two
        # parameters, and the pooled fit mixes the two heads' logit scales. With a 100-row bar,
        # continual seed 35's round 1 (stop 37) calibrated the jaw on the pooled rows (97 jaw rows
        # of its own, 32 failures): jaw bias -0.26 against the incumbent's +0.45, held-out ECE 0.099
        # against 0.054 on its own rows, and the gate refused the model as worse calibrated.
        if rows.sum() >= OWN_CALIBRATION_MIN_ROWS and min(n_pos, int(rows.sum()) - n_pos) >= 10:
            choice = fit_calibrator(cal_logits[rows], y_cal[rows], seed=cfg.seed, w=recency[rows])
            scope = "own rows"
        else:
            choice, scope = pooled, "pooled rows (too few of its own)"
        calibrators.append(choice.calibrator)
        cal_info[GRIPPER_NAMES[g]] = {
            "method": choice.calibrator.method,
            "fit_on": scope,
            "cv_nll": choice.cv_nll,
            "cv_ece": choice.cv_ece,
        }

    def calibrated(logits: np.ndarray, g: np.ndarray) -> np.ndarray:
        out = np.empty(len(logits))
        for k, cal in enumerate(calibrators):
            out[g == k] = cal.apply(logits[g == k])
        return out

    conf_logits, conf_emb = _batched(net, parts["conformal"])
    p_conf = calibrated(conf_logits, parts["conformal"].gripper)
    thresholds, thr_info = _thresholds(
        p_conf, parts["conformal"].label.astype(np.float64), parts["conformal"].gripper, cfg
    )
    # The incumbent's thresholds certified by the same rule on the same rows. The gate compares old
    # kinds' autonomy at matched risk control: a threshold fitted on other rows (the incumbent's own
    # split) can be looser than these rows support, and a candidate that honestly asks more where
    # the bound demands it has not forgotten anything (docs/learning.md, "The gate").
    recertified = None
    if cfg.incumbent:
        inc_scorer = LearnedScorer.from_file(cfg.incumbent, num_threads=None)
        _, p_inc = _scores(inc_scorer, parts["conformal"])
        inc_thr, _ = _thresholds(
            p_inc, parts["conformal"].label.astype(np.float64), parts["conformal"].gripper, cfg
        )
        if cfg.keep_incumbent_bar:
            bar = np.asarray(inc_scorer.model.thresholds, dtype=np.float64)
            for k in (SUCTION, PARALLEL_JAW):
                if np.isfinite(bar[k]) and bar[k] > thresholds[k]:
                    thr_info[GRIPPER_NAMES[k]]["floored_to_incumbent"] = float(bar[k])
                    thresholds[k] = bar[k]
            inc_thr = np.where(np.isfinite(bar), np.maximum(inc_thr, bar), inc_thr)
        recertified = {
            "incumbent_sha256": inc_scorer.sha256,
            "thresholds": inc_thr.tolist(),
            "as_shipped": [float(t) for t in inc_scorer.model.thresholds],
            "conformal_rows": len(parts["conformal"]),
        }

    _, train_emb = _batched(net, parts["train"])
    sub = np.random.default_rng(cfg.seed).permutation(len(train_emb))[:20000]
    watchdog, wd_info = fit_watchdog(
        train_emb[sub],
        cal_emb,
        parts["calib"].scene,
        conf_emb,
        parts["conformal"].scene,
        ref_family=parts["calib"].family,
        thr_family=parts["conformal"].family,
        quantile=cfg.watchdog_quantile,
        seed=cfg.seed,
    )

    version = cfg.model_version or f"graspnet-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-s{cfg.seed}"
    cfg_dict = asdict(cfg)
    meta: dict[str, Any] = {
        "model_version": version,
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "feature_names": list(dataset.feature_names),
        "data": dataset.summary(),
        "splits": {k: len(v) for k, v in idx.items()},
        "new_families": list(new_families),
        "train_config": cfg_dict,
        "alpha": cfg.alpha,
        "risk": cfg.risk,
        "thresholds": thresholds.tolist(),
        "calibration": cal_info,
        "conformal": thr_info,
        "watchdog": wd_info,
        "history": history,
        # The totes whose rows shaped the net, its calibration or its threshold (every split but
        # test): a later gate leaves them out of its held-out rows (`incumbent_fitted_on`).
        "incumbent_recertified": recertified,
        "fitted_totes": {
            "digest": "sha256(tote id)[:12]",
            "totes": fitted_totes(
                dataset, np.concatenate([idx[k] for k in ("train", "val", "calib", "conformal")])
            ),
        },
        **(extra_meta or {}),
    }
    # Write a draft without test metrics, load it back through the real loading path, evaluate the
    # file (not the in-memory net), then write the final file with the metrics that promoted it.
    draft = out_path.with_name(f".{out_path.name}.draft")
    save_model(draft, net, calibrators, thresholds, watchdog, meta)
    try:
        scorer = LearnedScorer(load_model(draft), num_threads=None)
        metrics = evaluate(scorer, parts["test"])
    finally:
        draft.unlink(missing_ok=True)
        Path(str(draft) + ".sha256").unlink(missing_ok=True)
    metrics["baseline_feature_auroc"] = _feature_baseline_auroc(parts["train"], parts["test"], cfg.seed)
    metrics["train_seconds"] = round(time.time() - t0, 1)
    metrics["epochs_run"] = len(history)
    meta["metrics"] = metrics
    digest = save_model(out_path, net, calibrators, thresholds, watchdog, meta)
    card = card_path_for(out_path)
    card.write_text(_card(meta, metrics, cfg, out_path))
    test = parts["test"]
    test_logits, _ = scorer.logits_and_embeddings(test.patches, test.features, test.gripper)
    try:
        reliability_diagram(
            {"raw": sigmoid(test_logits), "calibrated": scorer.calibrate(test_logits, test.gripper)},
            test.label,
            out_path.with_suffix(".reliability.png"),
            title=f"{version}: test split",
        )
    except Exception as exc:  # a plot is a nicety; never lose a trained model over it
        log.warning("reliability diagram for %s not written: %s", out_path, exc)
    log.info("trained %s -> %s (sha256 %s) in %.1f s", version, out_path, digest[:12], time.time() - t0)
    return TrainResult(out_path, card, digest, version, metrics, history, {k: len(v) for k, v in idx.items()})


# --- the gate ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GateTolerance:
    auroc_drop: float = 0.01  # candidate AUROC may be at most this much below the incumbent's
    ece_rise: float = 0.01  # candidate ECE may exceed the incumbent's by at most this
    ece_max: float = 0.05  # ... and must in any case be at most this (the project's calibration bar)
    auto_fail_rise: float = 0.01  # joint auto-execute failure rate may exceed max(alpha, incumbent) by this
    # Forgetting: no item family with at least family_min_rows holdout rows may lose more AUROC than this.
    family_auroc_drop: float = 0.05
    family_min_rows: int = 200
    # Per item kind (`item_kinds`), autonomous success on held-out rows: a kind the incumbent already
    # knew may lose at most this much (1 percentage point); a kind that triggered training must gain
    # more than `new_kind_min_gain`. Kinds with fewer than `kind_min_rows` rows are not judged.
    kind_success_drop: float = 0.01
    new_kind_min_gain: float = 0.0
    kind_min_rows: int = 30
    # One-sided level of the forgetting test (`paired_success_change`): an old kind is refused only
    # when the upper confidence bound of its paired change in autonomous success is below
    # -kind_success_drop, i.e. the held-out rows show, at this level, that it lost more than the
    # tolerance. None: the bare point comparison (on 10 rows one row is 10 pp, so that rule refuses
    # on noise). The old kinds pooled are tested the same way (more rows, more power).
    kind_test_level: float | None = 0.05
    # One-sided level of the AUROC and ECE checks (`paired_metric_change`): the candidate is refused
    # when a paired bootstrap of the held-out rows (resampled by tote) shows at this level that its
    # AUROC is lower than the incumbent's by more than auroc_drop, or its ECE higher by more than
    # ece_rise. None: the bare point comparison (on ~170 held-out rows the AUROC of one model moves
    # by +-0.03 from resample to resample, so the point rule refuses on noise).
    metric_test_level: float | None = 0.05
    metric_resamples: int = 2000  # bootstrap resamples of the paired metric test
    # Conditional precision: P(fail | auto-executed) may exceed max(alpha, incumbent's) by this much.
    executed_fail_rise: float = 0.02


SimSuite = Callable[[Path], tuple[bool, dict[str, Any]]]  # model path -> (passed, details)


@dataclass(frozen=True)
class PairedChange:
    """Change in autonomous success of a candidate against the incumbent on the same held-out rows."""

    n: int  # rows
    losses: int  # rows the incumbent would have executed successfully alone and the candidate not
    gains: int  # rows the candidate would, the incumbent not
    change: float  # (gains - losses) / n: candidate minus incumbent autonomous success
    upper: float  # one-sided upper confidence bound of the true change (`level`)
    level: float


def paired_success_change(incumbent_ok: np.ndarray, candidate_ok: np.ndarray, level: float) -> PairedChange:
    """One-sided upper confidence bound of the change in autonomous success on paired rows.

    Both models are judged on the same rows, so only discordant rows carry information (McNemar):
    given m = losses + gains, losses ~ Binomial(m, pi) and the change is (m / n)(1 - 2 pi). The
    exact (Clopper-Pearson) one-sided lower bound of pi at `level` gives the upper bound of the
    change. One lost row of ten (m = 1) bounds the change at +0.09, not -0.10: no evidence of
    forgetting; ten of thirty lost and none gained bounds it at -0.17.
    """
    from scipy.stats import beta

    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    a, c = np.asarray(incumbent_ok, dtype=bool), np.asarray(candidate_ok, dtype=bool)
    if a.shape != c.shape or a.ndim != 1:
        raise ValueError(f"paired rows must be two (N,) arrays, got {a.shape} and {c.shape}")
    n = len(a)
    losses, gains = int((a & ~c).sum()), int((c & ~a).sum())
    m = losses + gains
    if n == 0 or m == 0:
        return PairedChange(n, losses, gains, 0.0, 0.0, level)
    pi_low = float(beta.ppf(level, losses, m - losses + 1)) if losses > 0 else 0.0
    return PairedChange(n, losses, gains, (gains - losses) / n, (m / n) * (1.0 - 2.0 * pi_low), level)


@dataclass(frozen=True)
class PairedMetricChange:
    """Bootstrap confidence bounds of candidate minus incumbent for one metric on the same rows."""

    metric: str  # "auroc" or "ece"
    n: int  # rows
    groups: int  # resampling units (totes; rows when there are too few totes)
    candidate: float
    incumbent: float
    change: float  # candidate - incumbent on the rows as they are
    lower: float  # one-sided lower confidence bound of the change at `level`
    upper: float  # one-sided upper confidence bound of the change at `level`
    level: float
    resamples: int  # resamples that gave a defined value (AUROC needs both classes)


MIN_BOOTSTRAP_GROUPS = 10  # fewer totes than this: resample rows instead (and say so)
_BOOTSTRAP_CHUNK = 256  # resamples scored together (bounds the (resamples, rows) count matrix)


def _weighted_auroc(s: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(R,) AUROC of scores `s` (N,) with labels `y` (N,) under each row of weights `w` (R, N).

    With integer weights (bootstrap draw counts) this is exactly the AUROC of the resampled rows, ties
    counting half as in `grasping.calibration.auroc`: the weighted share of (success, failure) pairs
    ranked the right way. NaN where a resample holds one class only."""
    order = np.argsort(s, kind="stable")
    s_sorted, pos = s[order], y[order] > 0.5
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])  # first row of each tied level
    ws = w[:, order]
    p_lvl = np.add.reduceat(ws * pos, starts, axis=1)  # (R, levels) weight of successes per level
    n_lvl = np.add.reduceat(ws * ~pos, starts, axis=1)
    below = np.cumsum(n_lvl, axis=1) - n_lvl  # failures scored strictly lower
    u = np.sum(p_lvl * (below + 0.5 * n_lvl), axis=1)
    denom = p_lvl.sum(axis=1) * n_lvl.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, u / denom, np.nan)


def _weighted_ece(p: np.ndarray, y: np.ndarray, w: np.ndarray, bins: int) -> np.ndarray:
    """(R,) `expected_calibration_error` of (p, y) under each row of weights `w` (R, N)."""
    idx = np.clip((p * bins).astype(np.int64), 0, bins - 1)
    onehot = np.zeros((len(p), bins))
    onehot[np.arange(len(p)), idx] = 1.0
    sum_p, sum_y = w @ (onehot * p[:, None]), w @ (onehot * y[:, None])
    return np.abs(sum_y - sum_p).sum(axis=1) / w.sum(axis=1)


def paired_metric_change(
    metric: str,
    y: np.ndarray,
    incumbent: np.ndarray,
    candidate: np.ndarray,
    level: float,
    groups: np.ndarray | None = None,
    resamples: int = 2000,
    seed: int = 0,
    bins: int = 15,
) -> PairedMetricChange:
    """Paired bootstrap bounds of `metric`(candidate) - `metric`(incumbent) on one held-out set.

    `incumbent`/`candidate` are (N,) scores of the same rows: calibrated probabilities (for "auroc"
    any score the cell ranks by; the gate passes calibrated probabilities for both metrics). Both
    models are evaluated on each resample, so what the two share (the rows' difficulty) cancels
    and only their difference varies. Rows of one tote are correlated
    (one scene, the same items), so whole totes are resampled (cluster bootstrap) when `groups`
    holds at least MIN_BOOTSTRAP_GROUPS of them; otherwise rows. Percentile bounds, seeded.
    """
    if metric not in ("auroc", "ece"):
        raise ValueError(f"metric must be 'auroc' or 'ece', got {metric!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    y = np.asarray(y, dtype=np.float64)
    a, c = np.asarray(incumbent, dtype=np.float64), np.asarray(candidate, dtype=np.float64)
    if not (a.shape == c.shape == y.shape) or y.ndim != 1 or len(y) == 0:
        raise ValueError(f"paired rows must be three equal (N,) arrays, got {y.shape}, {a.shape}, {c.shape}")

    def value(s: np.ndarray) -> float:
        if metric == "auroc":
            return auroc(s, y)
        return expected_calibration_error(s, y, bins)

    if groups is not None and len(np.unique(np.asarray(groups))) >= MIN_BOOTSTRAP_GROUPS:
        _, row_group = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    else:
        row_group = np.arange(len(y))
    n_groups = int(row_group.max()) + 1
    # A resample is a multiset of the rows, so each metric of it is the metric of the original rows
    # weighted by how often each was drawn: every resample of a chunk is scored at once from one
    # (resamples, rows) matrix of draw counts, not by scoring a copied array per resample (which
    # took 12 s for 2,000 resamples of 600 rows with scikit-learn's roc_auc_score).
    rng = np.random.default_rng(seed)
    diffs = []
    for start in range(0, resamples, _BOOTSTRAP_CHUNK):
        r = min(_BOOTSTRAP_CHUNK, resamples - start)
        draws = rng.integers(0, n_groups, size=(r, n_groups))
        offsets = (np.arange(r) * n_groups)[:, None]
        per_group = np.bincount((draws + offsets).ravel(), minlength=r * n_groups).reshape(r, n_groups)
        w = per_group[:, row_group].astype(np.float64)  # (r, rows): times each row was drawn
        if metric == "auroc":
            d = _weighted_auroc(c, y, w) - _weighted_auroc(a, y, w)
        else:
            d = _weighted_ece(c, y, w, bins) - _weighted_ece(a, y, w, bins)
        diffs.extend(float(x) for x in d if x == x)  # NaN: one class only in this resample (AUROC undefined)
    ci, ii = value(c), value(a)
    if not diffs:
        lo = hi = float("nan")
    else:
        lo, hi = (float(v) for v in np.quantile(diffs, [level, 1.0 - level]))
    return PairedMetricChange(metric, len(y), n_groups, ci, ii, ci - ii, lo, hi, level, len(diffs))


def _metric_check(pm: PairedMetricChange, tol_value: float, worse_is: str) -> tuple[bool, str]:
    """(passed, text): refuse when the bound shows the candidate worse than the incumbent by more
    than `tol_value` (`worse_is` "lower" for AUROC, "higher" for ECE)."""
    name = pm.metric.upper() if pm.metric == "ece" else "AUROC"
    conf = f"{100 * (1 - pm.level):.0f}%"
    head = (
        f"{name} {pm.candidate:.4f} vs incumbent {pm.incumbent:.4f} (change {pm.change:+.4f}; paired "
        f"bootstrap over {pm.groups} {'totes' if pm.groups < pm.n else 'rows'}, {pm.resamples} resamples)"
    )
    if worse_is == "lower":
        ok = not (pm.upper < -tol_value)  # NaN bound (no defined resample): no evidence, passes
        return ok, f"{head}: {conf} upper bound {pm.upper:+.4f} >= -{tol_value}" + (
            "" if ok else f" (lower: short by {-tol_value - pm.upper:.4f})"
        )
    ok = not (pm.lower > tol_value)
    return ok, f"{head}: {conf} lower bound {pm.lower:+.4f} <= +{tol_value}" + (
        "" if ok else f" (worse calibrated: over by {pm.lower - tol_value:.4f})"
    )


@dataclass(frozen=True)
class GateReport:
    passed: bool
    reasons: tuple[str, ...]  # every check, "ok: ..." or "FAIL: ..."
    candidate_version: str
    candidate_sha256: str
    candidate: dict[str, Any]  # holdout metrics of the candidate
    incumbent: dict[str, Any] | None  # holdout metrics of the incumbent (None: first model)
    sim: dict[str, Any] | None  # simulation regression suite details (None: not run)
    holdout: str  # where the holdout came from, and its sha256

    def to_json(self) -> dict[str, Any]:
        from grasping.modelfile import _json_safe

        return _json_safe(asdict(self))


def _scores(scorer: Any, ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(logits, calibrated probabilities), (N,) each, as `evaluate` computes them."""
    logits, _ = scorer.logits_and_embeddings(ds.patches, ds.features, ds.gripper)
    return logits, scorer.calibrate(logits, ds.gripper)


def _auto_success_rows(scorer: Any, ds: Dataset, p: np.ndarray) -> np.ndarray:
    """(N,) bool: the model would execute the row alone and it succeeded (as `evaluate` counts);
    `p` the scorer's calibrated probabilities of the rows (`_scores`)."""
    return (p >= scorer.candidate_thresholds(ds.gripper)) & (ds.label == 1)


def _forgetting_check(
    what: str, inc_ok: np.ndarray, cand_ok: np.ndarray, c: float, i: float, tol: GateTolerance
) -> tuple[bool, str]:
    """(passed, text) of one old kind's forgetting check (point rule, or the paired test)."""
    drop = tol.kind_success_drop
    if tol.kind_test_level is None:
        need = i - drop
        ok = c >= need
        return ok, (
            f"{what} autonomous success {c:.4f} >= incumbent {i:.4f} - {drop}"
            + ("" if ok else f" (forgotten: short by {need - c:.4f})")
        )
    pc = paired_success_change(inc_ok, cand_ok, tol.kind_test_level)
    ok = pc.upper >= -drop
    return ok, (
        f"{what} autonomous success {c:.4f} vs incumbent {i:.4f} on {pc.n} rows "
        f"({pc.losses} lost, {pc.gains} gained): change {pc.change:+.4f}, "
        f"{100 * (1 - pc.level):.0f}% upper bound {pc.upper:+.4f} >= -{drop}"
        + ("" if ok else f" (forgotten: short by {-drop - pc.upper:.4f})")
    )


def gate(
    candidate_path: str | Path,
    incumbent_path: str | Path | None,
    holdout: Dataset,
    tolerance: GateTolerance | None = None,
    sim_suite: SimSuite | None = None,
    new_kinds: tuple[str, ...] | None = None,
) -> GateReport:
    """Does the candidate model regress against the incumbent on `holdout`? Pluggable sim suite.

    Pass only if: candidate ECE <= ece_max; the held-out rows do not show (paired bootstrap at
    `metric_test_level`; None: point comparison) the candidate's ECE above the incumbent's by more
    than ece_rise or its AUROC below by more than auroc_drop; no well-represented item family's
    AUROC drops by more than family_auroc_drop (old families must not be forgotten); joint
    auto-execute failure rate <= max(alpha, incumbent's) + auto_fail_rise; and the simulation
    regression suite (when given) passes. The holdout must be data neither model trained on (e.g. a
    later ledger export).

    Per item kind (family in simulation, shape kind from the candidate file's `item_kinds` on a real
    cell): kinds the incumbent knew must not lose more than `kind_success_drop` of autonomous
    success; `new_kinds` (default: the candidate file's `triggering_kinds`) must improve. Every
    refusal names the check and by how much it missed.
    """
    from grasping.learned_scorer import LearnedScorer

    tol = tolerance or GateTolerance()
    if len(holdout) == 0 or holdout.label.min() == holdout.label.max():
        raise ValueError(f"holdout {holdout.origin} needs both successes and failures to gate a model")
    cand = LearnedScorer.from_file(candidate_path, num_threads=None)
    kinds = item_kinds(holdout, cand.model.meta.get("item_kinds"))
    if new_kinds is None:
        new_kinds = tuple(cand.model.meta.get("triggering_kinds", ()))
    cm = evaluate(cand, holdout, kinds=kinds)
    inc = LearnedScorer.from_file(incumbent_path, num_threads=None) if incumbent_path else None
    im = evaluate(inc, holdout, kinds=kinds) if inc is not None else None
    alpha = float(cand.model.meta.get("alpha", 0.05))
    reasons: list[str] = []

    def check(ok: bool, text: str) -> None:
        reasons.append(("ok: " if ok else "FAIL: ") + text)

    check(cm["ece"] <= tol.ece_max, f"ECE {cm['ece']:.4f} <= {tol.ece_max}")
    fail_limit = alpha + tol.auto_fail_rise
    if im is not None:
        # Each model scores the held-out rows once; the metric and per-kind checks share it.
        (_, c_p), (_, i_p) = _scores(cand, holdout), _scores(inc, holdout)
        if tol.metric_test_level is None:
            check(
                cm["auroc"] >= im["auroc"] - tol.auroc_drop,
                f"AUROC {cm['auroc']:.4f} >= incumbent {im['auroc']:.4f} - {tol.auroc_drop}",
            )
            check(
                cm["ece"] <= im["ece"] + tol.ece_rise,
                f"ECE {cm['ece']:.4f} <= incumbent {im['ece']:.4f} + {tol.ece_rise}",
            )
        else:
            y = holdout.label.astype(np.float64)
            for metric, (ci, ii), margin, worse in (
                ("auroc", (c_p, i_p), tol.auroc_drop, "lower"),
                ("ece", (c_p, i_p), tol.ece_rise, "higher"),
            ):
                pm = paired_metric_change(
                    metric, y, ii, ci, tol.metric_test_level, holdout.tote, tol.metric_resamples
                )
                check(*_metric_check(pm, margin, worse))
        fail_limit = max(alpha, im["auto_fail_joint"]) + tol.auto_fail_rise
        for fam, fm in cm["by_family"].items():
            old = im["by_family"].get(fam)
            if old is None or fm["n"] < tol.family_min_rows or not (fm["auroc"] == fm["auroc"]):
                continue  # too few rows, or one class only (AUROC undefined)
            check(
                fm["auroc"] >= old["auroc"] - tol.family_auroc_drop,
                f"family {fam!r} AUROC {fm['auroc']:.4f} >= incumbent {old['auroc']:.4f} - "
                f"{tol.family_auroc_drop} (forgetting)",
            )
    check(
        cm["auto_fail_joint"] <= fail_limit,
        f"auto-executed-and-failed rate {cm['auto_fail_joint']:.4f} <= {fail_limit:.4f}",
    )
    cond_limit = (
        max(alpha, im["auto_fail_given_executed"] if im is not None else 0.0) + tol.executed_fail_rise
    )
    c_fail = cm["auto_fail_given_executed"]
    if cand.model.meta.get("risk") == "executed":
        check(
            c_fail <= cond_limit,
            f"conditional precision: P(fail | auto-executed) {c_fail:.4f} <= {cond_limit:.4f} "
            f"at alpha {alpha}" + ("" if c_fail <= cond_limit else f" (over by {c_fail - cond_limit:.4f})"),
        )
    else:  # a model thresholded for the joint rate promises nothing about the conditional one
        reasons.append(f"note: P(fail | auto-executed) {c_fail:.4f} (the model bounds the joint rate only)")
    if im is not None and inc is not None:
        kinds = np.asarray(kinds).astype(str)
        c_ok, i_ok = _auto_success_rows(cand, holdout, c_p), _auto_success_rows(inc, holdout, i_p)
        # Per-kind autonomy at matched risk control: the incumbent at its thresholds re-certified on
        # the candidate's conformal rows (train() stores them), when they are for this incumbent.
        rec = cand.model.meta.get("incumbent_recertified") or {}
        if rec.get("incumbent_sha256") == inc.sha256 and rec.get("thresholds"):
            inc_thr = np.asarray(rec["thresholds"], dtype=np.float64)
            olds = ~np.isin(kinds, list(new_kinds))
            shipped = i_ok[olds]  # the incumbent at its own thresholds, for the note
            i_ok = (i_p >= inc_thr[holdout.gripper]) & (holdout.label == 1)
            reasons.append(
                "note: per-kind autonomy compared with the incumbent at its thresholds re-certified on "
                f"the candidate's {rec.get('conformal_rows')} conformal rows, "
                f"{np.round(inc_thr, 4).tolist()} (as shipped "
                f"{np.round(np.asarray(rec.get('as_shipped', []), dtype=np.float64), 4).tolist()}); "
                "the incumbent's autonomous "
                f"success on old kinds: {float(i_ok[olds].mean()) if olds.any() else float('nan'):.4f} "
                f"re-certified, {float(shipped.mean()) if olds.any() else float('nan'):.4f} as shipped"
            )
        pooled = np.zeros(len(holdout), dtype=bool)
        for kind, km in cm["by_kind"].items():
            old = im["by_kind"].get(kind)
            if old is None:
                continue
            if kind not in new_kinds:
                pooled |= kinds == kind
            if km["n"] < tol.kind_min_rows:
                if kind in new_kinds:
                    reasons.append(
                        f"note: triggering kind {kind!r} has {km['n']} held-out outcome rows, fewer than "
                        f"{tol.kind_min_rows}: whether it improved is not judged"
                    )
                continue
            c, i = km["auto_success"], float(i_ok[kinds == kind].mean())
            if kind in new_kinds and not (holdout.label[np.asarray(kinds).astype(str) == kind] == 1).any():
                # Only failures held out (e.g. a person's "no safe pick" rows): no model can place
                # any of them alone, so there is nothing to improve and the check cannot pass.
                reasons.append(f"note: triggering kind {kind!r} has no successful held-out rows ({km['n']})")
            elif kind in new_kinds:
                need = i + tol.new_kind_min_gain
                check(
                    c > need,
                    f"triggering kind {kind!r} autonomous success {c:.4f} > incumbent {i:.4f}"
                    + ("" if c > need else f" (did not improve: short by {need - c + 1e-4:.4f})"),
                )
            else:
                rows = kinds == kind
                check(*_forgetting_check(f"old kind {kind!r}", i_ok[rows], c_ok[rows], c, i, tol))
        for kind in sorted(set(new_kinds) - set(cm["by_kind"])):
            reasons.append(f"note: triggering kind {kind!r} has no held-out outcome rows: not judged")
        if tol.kind_test_level is not None and pooled.sum() >= tol.kind_min_rows:
            c, i = float(c_ok[pooled].mean()), float(i_ok[pooled].mean())
            check(*_forgetting_check("old kinds pooled", i_ok[pooled], c_ok[pooled], c, i, tol))
    sim = None
    if sim_suite is None:
        reasons.append("note: simulation regression suite not run (none given)")
    else:
        ok, sim = sim_suite(Path(candidate_path))
        missed = "; ".join(sim.get("failed", ())) if isinstance(sim, dict) else ""
        check(
            bool(ok),
            f"simulation regression suite {'passed' if ok else 'failed'}" + (f": {missed}" if missed else ""),
        )
    passed = not any(r.startswith("FAIL") for r in reasons)
    return GateReport(
        passed=passed,
        reasons=tuple(reasons),
        candidate_version=cand.version,
        candidate_sha256=cand.sha256,
        candidate=cm,
        incumbent=im,
        sim=sim,
        holdout=f"{holdout.origin} ({len(holdout)} rows, sha256 {holdout.fingerprint()[:16]})",
    )
