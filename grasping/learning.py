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

    def __post_init__(self) -> None:
        n = len(self.label)
        p = np.asarray(self.patches)
        if p.ndim != 4 or p.shape[0] != n or p.shape[2] != p.shape[3]:
            raise DatasetError(f"{self.origin}: patches must be (N, C, S, S) with N={n}, got {p.shape}")
        if np.asarray(self.features).shape[0] != n or np.asarray(self.features).ndim != 2:
            raise DatasetError(f"{self.origin}: features must be (N, F) with N={n}")
        for name in ("gripper", "timestamp", "source", "family", "scene", "ood_sigma"):
            if np.asarray(getattr(self, name)).shape != (n,):
                raise DatasetError(f"{self.origin}: {name} must have shape ({n},)")
        if n and not np.isin(self.gripper, (SUCTION, PARALLEL_JAW)).all():
            raise DatasetError(f"{self.origin}: gripper values must be 0 (suction) or 1 (parallel jaw)")
        if n and not np.isin(self.label, (0.0, 1.0)).all():
            raise DatasetError(f"{self.origin}: labels must be 0 or 1")
        if not (np.isfinite(self.patches).all() and np.isfinite(self.features).all()):
            raise DatasetError(f"{self.origin}: patches/features contain NaN or inf")

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
        )
    except ValueError as exc:
        raise DatasetError(f"dataset {root}: {exc}") from None


def split_by_scene(scene: np.ndarray, fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Row indices per split; whole scenes are assigned, in a seeded random order, by row count."""
    total = sum(fractions.values())
    if not math.isclose(total, 1.0, abs_tol=1e-6) or min(fractions.values()) < 0:
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {fractions}")
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
    train_ds: Dataset, val_ds: Dataset, w_train: np.ndarray, w_val: np.ndarray, cfg: TrainConfig
) -> tuple[Any, list[dict[str, float]]]:
    import torch
    from tqdm import tqdm

    from grasping.model import GraspNet

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    net = GraspNet(train_ds.n_channels, train_ds.patch_size, train_ds.n_features, cfg.embed_dim)
    f = torch.from_numpy(train_ds.features)
    net.set_feature_normalisation(f.mean(0), f.std(0) if len(train_ds) > 1 else torch.ones(f.shape[1]))
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.epochs, 1))
    P, F = torch.from_numpy(train_ds.patches), torch.from_numpy(train_ds.features)
    G, Y = torch.from_numpy(train_ds.gripper), torch.from_numpy(train_ds.label)
    W = torch.from_numpy(w_train.astype(np.float32))
    best = (math.inf, None, -1)
    history: list[dict[str, float]] = []
    bar = tqdm(range(cfg.epochs), desc="train", unit="epoch", disable=not cfg.progress, leave=False)
    for epoch in bar:
        net.train()
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
            loss = (loss_rows * W[idx]).sum() / W[idx].sum()
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


def evaluate(scorer: Any, ds: Dataset, bins: int = 15) -> dict[str, Any]:
    """Holdout metrics of a LearnedScorer on labelled rows (used by the model card and the gate)."""
    if len(ds) == 0:
        raise ValueError(f"cannot evaluate on an empty dataset ({ds.origin})")
    logits, emb = scorer.logits_and_embeddings(ds.patches, ds.features, ds.gripper)
    p_raw = sigmoid(logits)
    p = scorer.calibrate(logits, ds.gripper)
    y = ds.label.astype(np.float64)
    thr_rows = scorer.candidate_thresholds(ds.gripper)
    act = p >= thr_rows
    out: dict[str, Any] = {
        "n": len(ds),
        "positives": int(y.sum()),
        "auroc": auroc(logits, y),
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
            "auroc": auroc(logits[rows], y[rows]),
        }
    out["by_family"] = fams
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


def train(dataset: Dataset, cfg: TrainConfig, out_path: str | Path) -> TrainResult:
    """Train, calibrate, threshold, fit the watchdog, evaluate on the test split, write file + card."""
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
    idx = split_by_scene(dataset.scene, fractions, cfg.seed)
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
    w_all = importance_weights(dataset, cfg.weights, new_families=new_families)
    w_tr, w_val = w_all[idx["train"]], w_all[idx["val"]]
    if cfg.weights.balance_classes:
        w_tr = class_balance(w_tr, parts["train"].label, parts["train"].gripper)
        w_val = class_balance(w_val, parts["val"].label, parts["val"].gripper)
    net, history = _fit_net(parts["train"], parts["val"], w_tr, w_val, cfg)

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
        if rows.sum() >= 100 and min(n_pos, int(rows.sum()) - n_pos) >= 10:
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


SimSuite = Callable[[Path], tuple[bool, dict[str, Any]]]  # model path -> (passed, details)


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


def gate(
    candidate_path: str | Path,
    incumbent_path: str | Path | None,
    holdout: Dataset,
    tolerance: GateTolerance | None = None,
    sim_suite: SimSuite | None = None,
) -> GateReport:
    """Does the candidate model regress against the incumbent on `holdout`? Pluggable sim suite.

    Pass only if: candidate ECE <= ece_max and <= incumbent ECE + ece_rise; AUROC >= incumbent AUROC
    - auroc_drop; no well-represented item family's AUROC drops by more than family_auroc_drop (old
    families must not be forgotten); joint auto-execute failure rate <= max(alpha, incumbent's) +
    auto_fail_rise; and the simulation regression suite (when given) passes. The holdout must be
    data neither model trained on (e.g. a later ledger export).
    """
    from grasping.learned_scorer import LearnedScorer

    tol = tolerance or GateTolerance()
    if len(holdout) == 0 or holdout.label.min() == holdout.label.max():
        raise ValueError(f"holdout {holdout.origin} needs both successes and failures to gate a model")
    cand = LearnedScorer.from_file(candidate_path, num_threads=None)
    cm = evaluate(cand, holdout)
    im = (
        evaluate(LearnedScorer.from_file(incumbent_path, num_threads=None), holdout)
        if incumbent_path
        else None
    )
    alpha = float(cand.model.meta.get("alpha", 0.05))
    reasons: list[str] = []

    def check(ok: bool, text: str) -> None:
        reasons.append(("ok: " if ok else "FAIL: ") + text)

    check(cm["ece"] <= tol.ece_max, f"ECE {cm['ece']:.4f} <= {tol.ece_max}")
    fail_limit = alpha + tol.auto_fail_rise
    if im is not None:
        check(
            cm["auroc"] >= im["auroc"] - tol.auroc_drop,
            f"AUROC {cm['auroc']:.4f} >= incumbent {im['auroc']:.4f} - {tol.auroc_drop}",
        )
        check(
            cm["ece"] <= im["ece"] + tol.ece_rise,
            f"ECE {cm['ece']:.4f} <= incumbent {im['ece']:.4f} + {tol.ece_rise}",
        )
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
    sim = None
    if sim_suite is not None:
        ok, sim = sim_suite(Path(candidate_path))
        check(bool(ok), f"simulation regression suite {'passed' if ok else 'failed'}")
    passed = all(r.startswith("ok") for r in reasons)
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
