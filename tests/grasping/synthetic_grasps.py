"""Seeded synthetic grasp data with a known success probability, for the learning tests.

Each row is a 2-channel S x S patch in the grasp frame (normalised height, occupancy) of one of
four surface families, plus 4 analytic features, a gripper and a label drawn from a known
probability function of the *geometry*:
  boxes      tilted planes, sometimes with an item edge crossing the patch
  cylinders  curved surfaces (curvature along a random direction)
  bags       rough, noisy surfaces
  holey      (the shifted family, never trained on) strongly domed, perforated surfaces
Suction likes flat, level, smooth, fully occupied patches; the parallel jaw likes curvature and
edges (something to pinch), with curvature only helping when it runs across the closing direction.
The features see tilt, roughness and occupancy but not the direction of curvature, so a model that
reads the patch can beat a model of the features alone.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from grasping.learning import Dataset, TrainConfig, TrainResult, make_dataset, train

S = 32
FEATURES = ("tilt", "height_std", "occupancy", "residual_std")
TRAIN_FAMILIES = ("boxes", "cylinders", "bags")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def make_rows(
    family: str, n: int, rng: np.random.Generator, gripper: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """n rows of one family: patches (n, 2, S, S), features (n, 4), gripper, true probability p."""
    u, v = np.meshgrid(np.linspace(-1, 1, S), np.linspace(-1, 1, S), indexing="xy")
    u, v = u[None], v[None]
    tilt = rng.uniform(0, 0.6, n)
    az = rng.uniform(0, 2 * np.pi, n)
    curv = np.zeros(n)
    noise = np.full(n, 0.005)
    edge = np.zeros(n, dtype=bool)
    if family == "boxes":
        edge = rng.random(n) < 0.4
    elif family == "cylinders":
        curv = rng.uniform(0.1, 0.8, n)
    elif family == "bags":
        noise = rng.uniform(0.02, 0.12, n)
        curv = rng.uniform(0.0, 0.2, n)
    elif family == "holey":
        curv = rng.uniform(1.0, 2.0, n)
        noise = rng.uniform(0.05, 0.15, n)
    else:
        raise ValueError(family)
    gx, gy = tilt * np.cos(az), tilt * np.sin(az)
    cdir = rng.uniform(0, np.pi, n)
    along = u * np.cos(cdir)[:, None, None] + v * np.sin(cdir)[:, None, None]
    if family == "holey":
        along = np.sqrt(u**2 + v**2)  # a dome, not a cylinder
    h = gx[:, None, None] * u + gy[:, None, None] * v - curv[:, None, None] * along**2
    h = h + noise[:, None, None] * rng.standard_normal((n, S, S))
    occ = np.ones((n, S, S))
    off = rng.uniform(0.2, 0.8, n)
    side = np.where(edge[:, None, None], u > off[:, None, None], False)
    occ[side] = 0.0
    h[side] = -1.0  # the floor/tote far below the item, clipped (normalised height)
    if family == "holey":
        occ = (rng.random((n, S, S)) > 0.3).astype(np.float64)
        h = np.where(occ > 0, h, -1.0)
    patches = np.stack([h, occ], axis=1).astype(np.float32)
    if gripper is None:
        gripper = rng.integers(0, 2, n)
    occ_frac = occ.mean(axis=(1, 2))
    # Residual of a plane fit: roughness + curvature mixed (what a planner can cheaply measure).
    hs = np.where(occ > 0, h, np.nan)
    resid = np.nanstd(hs - (gx[:, None, None] * u + gy[:, None, None] * v), axis=(1, 2))
    features = np.stack(
        [
            tilt + rng.normal(0, 0.05, n),
            np.nanstd(hs, axis=(1, 2)),
            occ_frac,
            resid + rng.normal(0, 0.02, n),
        ],
        axis=1,
    ).astype(np.float32)
    suction_logit = 3.0 - 5.0 * tilt - 6.0 * curv - 25.0 * noise - 4.0 * edge
    # The jaw closes along the patch's x axis: curvature across that axis (a cylinder lying across the
    # fingers) gives a pinch, curvature along it does not. The features cannot see that direction.
    across = np.cos(cdir) ** 2
    jaw_logit = -1.5 + 8.0 * curv * (across - 0.35) + 2.5 * edge - 2.0 * tilt - 10.0 * noise
    p = _sigmoid(np.where(gripper == 0, suction_logit, jaw_logit))
    return {"patches": patches, "features": features, "gripper": gripper.astype(np.int64), "p": p}


def make_dataset_synth(
    n_scenes: int,
    seed: int,
    families: tuple[str, ...] = TRAIN_FAMILIES,
    rows_per_scene: int = 24,
    t0: float = 1.7e9,
    scene_prefix: str = "s",
) -> tuple[Dataset, np.ndarray]:
    """A Dataset of n_scenes scenes (one family each) and the true success probability of every row."""
    rng = np.random.default_rng(seed)
    fam_of_scene = np.array(families)[rng.integers(0, len(families), n_scenes)]
    chunks = [make_rows(str(f), rows_per_scene, rng) for f in fam_of_scene]
    p = np.concatenate([c["p"] for c in chunks])
    label = (rng.random(p.size) < p).astype(np.float32)
    n = p.size
    ds = make_dataset(
        np.concatenate([c["patches"] for c in chunks]),
        np.concatenate([c["features"] for c in chunks]),
        np.concatenate([c["gripper"] for c in chunks]),
        label,
        timestamp=t0 + np.arange(n) * 10.0,
        source="sim",
        family=np.repeat(fam_of_scene, rows_per_scene),
        scene=np.repeat([f"{scene_prefix}{seed}-{i}" for i in range(n_scenes)], rows_per_scene),
        feature_names=FEATURES,
        origin=f"synthetic(seed={seed}, families={','.join(families)})",
    )
    return ds, p


# --- one trained model shared by every test file of a pytest run (training takes ~15 s) ---------------

# One torch thread: on a shared 2-core machine, two threads spin against other processes (3x slower).
torch.set_num_threads(1)
_TMP = Path(tempfile.mkdtemp(prefix="pickcell-learning-tests-"))
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)
TRAIN_SCENES = 500  # 12,000 rows; fewer and the patch's extra information is not learnt reliably
TRAIN_CONFIG = TrainConfig(epochs=10, seed=0, progress=False, model_version="synthetic-v1", threads=1)


@functools.cache
def training_data() -> Dataset:
    return make_dataset_synth(TRAIN_SCENES, seed=1)[0]


@functools.cache
def trained_model() -> TrainResult:
    """The model every learning test looks at: trained once per process on `training_data()`."""
    return train(training_data(), TRAIN_CONFIG, _TMP / "synthetic-v1.safetensors")


@functools.cache
def fresh_data() -> tuple[Dataset, np.ndarray]:
    """Fresh rows from the training distribution (other seed, other scenes) + true probabilities."""
    return make_dataset_synth(400, seed=7, scene_prefix="fresh")
