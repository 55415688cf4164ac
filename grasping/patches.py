"""The learned scorer's input: a local height map per candidate, plus analytic features.

Patch definition (exact; the model's training data depends on it)
------------------------------------------------------------------
For a grasp with position p (base frame) and rotation R (columns x, y, z of the grasp frame; +z =
approach into the item, +x = jaw closing direction, or the base-x-aligned tangent for suction):

* The patch is a PATCH_SIZE x PATCH_SIZE grid in the grasp frame's xy plane through p, cell edge
  PATCH_RES_M (32 x 4 mm = 12.8 cm square), centred on p. Row r, column c has its centre at
  grasp-frame coordinates x = (c - (S - 1) / 2) * res, y = (r - (S - 1) / 2) * res, z = 0: columns run
  along the grasp's x axis (the closing direction), rows along its y axis.
* Each cell samples the scene cloud (the organised grid of the tote crop, items and floor, walls
  removed; see grasping.pointcloud) at the point the camera sees along its ray through the cell
  centre: one sample per cell (the camera looks roughly along the approach, so this is the
  surface a gripper moving along +z would meet first).
* Channel 0 (HEIGHT): that point's height towards the gripper relative to the grasp point,
  h = -(q - p) . z_grasp, clipped to [-HEIGHT_CLIP_M, +HEIGHT_CLIP_M] and divided by HEIGHT_CLIP_M,
  so in [-1, 1]; positive = the surface stands out towards the gripper (an obstacle for the
  fingers or the cup's bellows), negative = it falls away. 0 where the cell is empty.
* Channel 1 (OCCUPANCY): 1.0 where the sample exists (valid depth inside the tote crop),
  0.0 where the ray leaves the tote region, hits a hole in the depth image, or a wall.

Features: FEATURE_NAMES below, float32 (M, F), SI units (metres, radians, plain ratios); features
that do not apply to a gripper kind are 0 for it.
"""

from __future__ import annotations

import numpy as np

from grasping.pointcloud import SceneCloud

PATCH_SIZE = 32  # cells per side
PATCH_RES_M = 0.004  # metres per cell: 12.8 cm square
PATCH_CHANNELS = 2  # height, occupancy
HEIGHT_CLIP_M = 0.05  # metres: heights are clipped to +-5 cm, then scaled to [-1, 1]

FEATURE_NAMES: tuple[str, ...] = (
    "analytic_score",  # [0, 1] the geometric quality the candidate generator computed
    "normal_tilt_rad",  # suction: angle between the surface normal and base +z; jaw: 0 (top-down)
    "seal_rms_m",  # suction: RMS distance of the cup disk's points from their fitted plane
    "seal_max_dev_m",  # suction: largest distance of a cup-disk point from that plane
    "seal_coverage",  # suction: fraction of the cup disk's samples that lie on this item
    "centroid_dist_m",  # horizontal distance from the grasp point to the item's centroid
    "cluster_extent_m",  # largest horizontal extent of the item's points
    "cluster_height_m",  # item top above the floor
    "jaw_width_m",  # jaw: item width between the contacts; suction: 0
    "antipodal_angle_rad",  # jaw: worst angle between a contact normal and the closing line
    "finger_clearance_m",  # jaw: free height under the fingers (capped at 2 cm); suction: 0
    "height_above_floor_m",  # grasp point above the floor
)
N_FEATURES = len(FEATURE_NAMES)


def _cell_offsets() -> np.ndarray:
    """(S, S, 2) grasp-frame (x, y) of each cell centre: [r, c] = (x of column c, y of row r)."""
    k = (np.arange(PATCH_SIZE) - (PATCH_SIZE - 1) / 2.0) * PATCH_RES_M
    xx, yy = np.meshgrid(k, k)  # xx varies along columns, yy along rows
    return np.stack([xx, yy], axis=-1)


_OFFSETS = _cell_offsets()


def extract_patches(cloud: SceneCloud, positions: np.ndarray, rotations: np.ndarray) -> np.ndarray:
    """(M, PATCH_CHANNELS, S, S) float32 patches for M grasps (positions (M, 3), rotations (M, 3, 3)).

    Vectorised over all candidates: one camera-ray lookup per cell (M * 1024 lookups).
    """
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    rotations = np.asarray(rotations, dtype=np.float64).reshape(-1, 3, 3)
    m = len(positions)
    out = np.zeros((m, PATCH_CHANNELS, PATCH_SIZE, PATCH_SIZE), dtype=np.float32)
    if m == 0:
        return out
    # Cell centres in the camera frame, one coordinate array at a time (M, S, S), float32.
    t_cb = cloud.T_base_camera[:3, 3]
    p_cam = cloud.to_camera(positions - t_cb).astype(np.float32)
    ex = cloud.to_camera(rotations[:, :, 0]).astype(np.float32)
    ey = cloud.to_camera(rotations[:, :, 1]).astype(np.float32)
    ez = rotations[:, :, 2].astype(np.float32)
    ox = _OFFSETS[None, :, :, 0].astype(np.float32)
    oy = _OFFSETS[None, :, :, 1].astype(np.float32)
    cam = [p_cam[:, k, None, None] + ox * ex[:, k, None, None] + oy * ey[:, k, None, None] for k in range(3)]
    flat, ok = cloud.lookup_cam(*cam)
    pts = cloud.points_base.reshape(-1, 3)
    # h = -(q - p) . z_grasp, for the seen point q.
    h = np.float32(0.0) + (positions.astype(np.float32) * ez).sum(axis=1)[:, None, None]
    for k in range(3):
        h = h - pts[:, k].astype(np.float32)[flat] * ez[:, k, None, None]
    h = np.clip(np.nan_to_num(h), -HEIGHT_CLIP_M, HEIGHT_CLIP_M) / np.float32(HEIGHT_CLIP_M)
    out[:, 0] = np.where(ok, h, 0.0)
    out[:, 1] = ok
    return out
