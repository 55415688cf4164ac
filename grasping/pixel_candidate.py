"""A planner candidate at a pixel an associate clicked: grasp, patch, features, item and its descriptor.

`grasping.pixel_grasp.grasp_from_pixel` turns a click into an executable suction grasp, but nothing
the scorer can learn from: no patch, no analytic features, no item. Here the click goes through the
planner's own stages instead — the frame is segmented (`grasping.pointcloud.segment_scene`), the
candidate generator of the named gripper runs on the clicked item only (`grasping.candidates`), and
the patch is extracted exactly as for any planner candidate (`grasping.patches.extract_patches`) —
so the labelled attempt that follows is a training row like every other one.

Suction: the generator is given only the item's voxels within `radius_m` of the clicked point, and
the candidate closest to the click is kept. Parallel jaw: jaw candidates are generated with a dense
sampling pool and the one on the clicked item whose centre is closest to the click (within
`radius_m`, horizontally) is kept; its closing direction is the best-scoring the generator found
there. Either way the tool-collision checks of the planner apply: a click where the tool would hit
something is refused (`PixelGraspError`) rather than executed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from grasping.candidates import height_map, jaw_candidates, suction_candidates
from grasping.patches import extract_patches
from grasping.pixel_grasp import PixelGraspError
from grasping.planner import PlannerConfig, matrices_to_quats
from grasping.pointcloud import NO_CLUSTER, SceneCloud, segment_scene
from grasping.scoring import PARALLEL_JAW, SUCTION
from grasping.types import GRIPPER_KINDS, Frame, Grasp
from grasping.watchdog import cluster_descriptors


@dataclass(frozen=True)
class PixelCandidate:
    """What a click becomes: the grasp to execute and the observation its label belongs to."""

    grasp: Grasp
    patch: np.ndarray  # (C, S, S) float32, as grasping.patches defines it
    features: np.ndarray  # (F,) float32, grasping.patches.FEATURE_NAMES
    analytic_score: float  # [0, 1] the generator's geometric quality
    item: int  # cluster index of the clicked item in this frame's segmentation
    item_centroid: np.ndarray  # (3,) metres, base frame
    descriptor: np.ndarray | None  # the item watchdog's shape descriptor of the item (None: too small)
    click_point: np.ndarray  # (3,) metres, base frame: the surface point under the click


@dataclass(frozen=True)
class PixelCandidateConfig:
    radius_m: float = 0.012  # metres: the grasp point must lie this close to the clicked point
    search_px: int = 6  # pixels: how far from the click to look for an item pixel (clicks are imprecise)
    jaw_pool: int = 2000  # jaw centre samples per frame (the planner uses 240): dense enough near a click
    seed: int = 0  # seeds the candidate sampling


def _click_cell(cloud: SceneCloud, u: int, v: int, search_px: int) -> tuple[int, int]:
    """Grid cell (i, j) of the item pixel nearest the click, or PixelGraspError."""
    h, w = cloud.labels.shape
    i0 = (v - cloud.v0) / cloud.stride
    j0 = (u - cloud.u0) / cloud.stride
    r = max(1, int(np.ceil(search_px / cloud.stride)))
    i_lo, i_hi = max(0, int(np.floor(i0)) - r), min(h, int(np.ceil(i0)) + r + 1)
    j_lo, j_hi = max(0, int(np.floor(j0)) - r), min(w, int(np.ceil(j0)) + r + 1)
    # A click far outside the tote's rectangle gives an empty (or, left of it, reversed) window:
    # np.mgrid refuses a negative extent with a ValueError, which once stopped a cell mid-tote.
    if i_lo >= i_hi or j_lo >= j_hi:
        raise PixelGraspError(f"pixel ({u}, {v}) is outside the tote")
    ii, jj = np.mgrid[i_lo:i_hi, j_lo:j_hi]
    lab = cloud.labels[ii, jj]
    ok = (lab != NO_CLUSTER) & cloud.valid[ii, jj]
    if not ok.any():
        raise PixelGraspError(f"no item under pixel ({u}, {v})")
    d2 = (ii - i0) ** 2 + (jj - j0) ** 2
    k = int(np.argmin(np.where(ok, d2, np.inf)))
    return int(ii.flat[k]), int(jj.flat[k])


def candidate_at_pixel(
    frame: Frame,
    u: int,
    v: int,
    gripper: str,
    planner: PlannerConfig,
    config: PixelCandidateConfig | None = None,
) -> PixelCandidate:
    """The planner's candidate of kind `gripper` at image pixel (u, v) = (column, row) of `frame`."""
    cfg = config or PixelCandidateConfig()
    if gripper not in GRIPPER_KINDS:
        raise PixelGraspError(f"unknown gripper {gripper!r}; expected one of {GRIPPER_KINDS}")
    h, w = frame.shape
    if not (0 <= u < w and 0 <= v < h):
        raise PixelGraspError(f"pixel ({u}, {v}) is outside the {w}x{h} image")
    cloud = segment_scene(frame, planner.tote, planner.cloud_config())
    if cloud.n_clusters == 0:
        raise PixelGraspError("no item in the tote")
    i, j = _click_cell(cloud, u, v, cfg.search_px)
    item = int(cloud.labels[i, j])
    click = np.asarray(cloud.points_base[i, j], dtype=np.float64)
    rng = np.random.default_rng(cfg.seed)
    ccfg = planner.candidate_config()
    hmap = height_map(cloud, planner.voxel_m)
    if gripper == GRIPPER_KINDS[SUCTION]:
        near = (cloud.voxel_labels == item) & (
            np.linalg.norm(cloud.voxel_points - click, axis=1) <= cfg.radius_m
        )
        if not near.any():
            raise PixelGraspError(
                f"no surface of item {item} within {cfg.radius_m * 1000:.0f} mm of the click"
            )
        # Only the voxels at the click may be sampled; seal and collision checks still see everything.
        masked = np.where(near, cloud.voxel_labels, NO_CLUSTER).astype(np.int32)
        only_here = replace(cloud, voxel_labels=masked)
        cands = suction_candidates(only_here, ccfg, rng, planner.voxel_m, hmap=hmap)
        dist = np.linalg.norm(cands.positions - click, axis=1) if len(cands) else np.zeros(0)
    else:
        cands = jaw_candidates(cloud, replace(ccfg, jaw_pool=cfg.jaw_pool), rng, planner.voxel_m, hmap=hmap)
        on_item = cands.cluster == item
        cands = cands.take(np.flatnonzero(on_item))
        dist = np.linalg.norm((cands.positions - click)[:, :2], axis=1) if len(cands) else np.zeros(0)
    close = np.flatnonzero(dist <= cfg.radius_m)
    if close.size == 0:
        raise PixelGraspError(
            f"no collision-free {gripper} grasp on item {item} within {cfg.radius_m * 1000:.0f} mm of "
            f"pixel ({u}, {v})"
        )
    # Suction: the nearest cup to the click. Jaw: the best closing direction among the nearest centres.
    if gripper == GRIPPER_KINDS[PARALLEL_JAW]:
        nearest = dist[close].min()
        close = close[dist[close] <= nearest + planner.voxel_m]
        k = int(close[np.argmax(cands.analytic[close])])
    else:
        k = int(close[np.argmin(dist[close])])
    pos, rot = cands.positions[k : k + 1], cands.rotations[k : k + 1]
    patch = extract_patches(cloud, pos, rot)[0]
    desc = cluster_descriptors(cloud)[item]
    grasp = Grasp(
        gripper=gripper,
        position=pos[0],
        orientation=matrices_to_quats(rot)[0],
        width=float(cands.widths[k]),
    )
    return PixelCandidate(
        grasp=grasp,
        patch=patch,
        features=np.asarray(cands.features[k], dtype=np.float32),
        analytic_score=float(cands.analytic[k]),
        item=item,
        item_centroid=np.asarray(cloud.clusters[item].centroid, dtype=np.float64),
        descriptor=desc,
        click_point=click,
    )
