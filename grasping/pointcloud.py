"""From one depth image to segmented items: the first half of the grasp planner.

Steps, in the order they run (and why in that order, see FIELD-NOTES: on a whole 640x480 frame
open3d normals alone cost 210 ms):

1. Region of interest: project the tote's corners into the image and keep only that rectangle,
   sampled every `pixel_stride` pixels. Everything after works on this small organised grid.
2. Back-project the depth (pinhole K) and move the points into the robot base frame.
   NaN, zero and negative depths are invalid and ignored from here on.
3. Crop to the tote's inner volume, minus a margin at the walls so the walls themselves go.
4. Normals from the organised grid: a 3x3 box filter (noise) and central differences of the
   neighbouring points, oriented towards the camera. Pixels at depth edges get no normal.
5. Floor: the median height of the upward-facing points near the tote's floor; everything
   within `floor_margin_m` of it is floor.
6. Voxel-downsample the item points (numpy: a sort of voxel keys, cheaper than building an open3d
   cloud for it) and split them into items with open3d's DBSCAN (measured 9-12 ms on 8k points).
   Items are unknown: no models, no classes, only connected surface.

Everything is deterministic: no random sampling happens here.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np

from grasping.types import Bounds, Frame, ItemCluster

log = logging.getLogger(__name__)

NO_CLUSTER = -1  # label of floor / noise / outside-the-crop grid cells


@dataclass(frozen=True)
class CloudConfig:
    """Parameters of the point-cloud stage (the PlannerConfig carries one)."""

    voxel_m: float = 0.004  # metres, voxel edge for downsampling item points
    pixel_stride: int = 2  # pixels, sampling step of the depth image inside the tote's rectangle
    wall_margin_m: float = 0.008  # metres, points this close to a tote wall (x/y) are wall
    above_rim_m: float = 0.15  # metres, how far above the tote's top items are still kept
    floor_margin_m: float = 0.006  # metres, points this close above the floor are floor
    max_edge_jump_m: float = 0.01  # metres, neighbour distance beyond which a pixel is a depth edge
    smooth_passes: int = 1  # count of edge-aware 3x3 depth smoothing passes (more merges touching items)
    cluster_eps_m: float = 0.009  # metres, DBSCAN neighbourhood radius
    cluster_min_points: int = 3  # DBSCAN core-point neighbours
    min_cluster_voxels: int = 12  # clusters with fewer voxels are noise (about 2 cm^2 at 4 mm)
    # ... unless they have at least this many and lie apart: no voxel within `isolation_m` of a
    # cluster kept above. A thin or small item lying alone (a 1-2 cm part, a flat item seen edge-on)
    # shows only a few voxels; a small piece next to a big cluster is usually a piece of that item
    # (benchmarks/segmentation_recall.py: 12 alone found 76% of visible `test` items and 48% of
    # procedural small parts). Equal to min_cluster_voxels: off.
    min_isolated_cluster_voxels: int = 4
    isolation_m: float = 0.02  # metres, see min_isolated_cluster_voxels
    cluster_step_m: float = 0.005  # metres, depth second difference that marks an occluding edge
    cluster_min_normal_z: float = 0.3  # cosine: only surfaces tilted < ~72 deg from up are clustered


@dataclass(frozen=True)
class SceneCloud:
    """The organised grid of the tote region plus the segmented items, all base frame.

    Grid cell (i, j) is image pixel (u, v) = (u0 + stride * j, v0 + stride * i).
    """

    points_base: np.ndarray  # (h, w, 3) metres, smoothed points (NaN where invalid)
    valid: np.ndarray  # (h, w) bool: finite depth, inside the tote crop (items and floor)
    normals_base: np.ndarray  # (h, w, 3) unit normals towards the camera (NaN where unknown)
    labels: np.ndarray  # (h, w) int32 cluster index, NO_CLUSTER for floor / noise / outside
    u0: int  # pixel column of grid column 0
    v0: int  # pixel row of grid row 0
    stride: int  # pixels per grid step
    K: np.ndarray  # (3, 3) camera intrinsics (full image)
    T_base_camera: np.ndarray  # (4, 4)
    floor_z: float  # metres, estimated floor height in the base frame
    noise_m: float  # metres, std of the smoothed points' heights on the floor (sensor noise left)
    bounds: Bounds  # the tote's inner volume
    voxel_points: np.ndarray  # (N, 3) metres, downsampled item points
    voxel_normals: np.ndarray  # (N, 3) unit normals (NaN rows where unknown)
    voxel_labels: np.ndarray  # (N,) int32 cluster index (NO_CLUSTER = noise)
    clusters: tuple[ItemCluster, ...]  # one per item, indexed by the labels

    @property
    def n_clusters(self) -> int:
        return len(self.clusters)

    def project(self, p_base: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Base-frame points (..., 3) -> full-image pixels (u, v) as float, and depth z_cam."""
        T_cam_base = np.linalg.inv(self.T_base_camera)
        p_cam = p_base @ T_cam_base[:3, :3].T + T_cam_base[:3, 3]
        z = p_cam[..., 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            u = self.K[0, 0] * p_cam[..., 0] / z + self.K[0, 2]
            v = self.K[1, 1] * p_cam[..., 1] / z + self.K[1, 2]
        return u, v, z

    def lookup_cam(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For camera-frame coordinates (any shape): (flat grid index, ok) of the cell on each ray.

        The hot path of patches and seal checks: float32 arithmetic, no (..., 3) temporaries.
        """
        h, w = self.valid.shape
        s = self.stride
        with np.errstate(divide="ignore", invalid="ignore"):
            inv_z = 1.0 / z
            j = np.rint(x * inv_z * np.float32(self.K[0, 0] / s) + np.float32((self.K[0, 2] - self.u0) / s))
            i = np.rint(y * inv_z * np.float32(self.K[1, 1] / s) + np.float32((self.K[1, 2] - self.v0) / s))
            inside = (z > 0) & (i >= 0) & (i < h) & (j >= 0) & (j < w)
        flat = np.where(inside, i * w + j, 0).astype(np.intp)
        ok = inside & self.valid.reshape(-1)[flat]
        return flat, ok

    def to_camera(self, p_base: np.ndarray) -> np.ndarray:
        """Base-frame points or directions (..., 3) rotated into the camera frame (no translation)."""
        return p_base @ self.T_base_camera[:3, :3]

    def lookup(self, p_base: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For base-frame points (..., 3): the grid cell seen along the camera ray through each.

        Returns (points (..., 3) observed there, ok (...) bool, labels (...) int32). `ok` is False
        where the ray leaves the grid or the cell has no valid point.
        """
        p_cam = self.to_camera(p_base - self.T_base_camera[:3, 3])
        flat, ok = self.lookup_cam(p_cam[..., 0], p_cam[..., 1], p_cam[..., 2])
        labels = np.where(ok, self.labels.reshape(-1)[flat], NO_CLUSTER)
        return self.points_base.reshape(-1, 3)[flat], ok, labels


def tote_roi(frame: Frame, bounds: Bounds) -> tuple[int, int, int, int]:
    """(u0, v0, u1, v1): image rectangle holding the tote's projection (half-open), clamped."""
    h, w = frame.shape
    corners = np.array(list(itertools.product(*zip(bounds.lo, bounds.hi, strict=True))))  # the 8 corners
    T_cam_base = np.linalg.inv(frame.T_base_camera)
    p_cam = corners @ T_cam_base[:3, :3].T + T_cam_base[:3, 3]
    if (p_cam[:, 2] <= 1e-6).any():  # a corner behind the camera: no useful rectangle, use the image
        return 0, 0, w, h
    u = frame.K[0, 0] * p_cam[:, 0] / p_cam[:, 2] + frame.K[0, 2]
    v = frame.K[1, 1] * p_cam[:, 1] / p_cam[:, 2] + frame.K[1, 2]
    u0, u1 = int(np.clip(np.floor(u.min()), 0, w)), int(np.clip(np.ceil(u.max()) + 1, 0, w))
    v0, v1 = int(np.clip(np.floor(v.min()), 0, h)), int(np.clip(np.ceil(v.max()) + 1, 0, h))
    return u0, v0, u1, v1


def _neighbours(a: np.ndarray, fill: float | bool) -> list[np.ndarray]:
    """The 8 shifted copies of a 2-D array (each cell's neighbours), padded with `fill`."""
    h, w = a.shape
    pad = np.pad(a, 1, constant_values=fill)
    return [pad[di : di + h, dj : dj + w] for di in (0, 1, 2) for dj in (0, 1, 2) if (di, dj) != (1, 1)]


def fill_holes(depth: np.ndarray, ok: np.ndarray, max_jump: float, min_neighbours: int = 6) -> np.ndarray:
    """In place: invalid pixels with >= `min_neighbours` valid 8-neighbours on one smooth surface
    (depth spread below max_jump / 3) get their mean depth. Returns the new validity mask.

    Depth sensors drop isolated pixels; without this, every hole costs its four neighbours their
    normals too. Holes at depth edges (neighbours on two surfaces) stay holes.
    """
    z = np.where(ok, depth, 0.0)
    s1 = np.zeros_like(z)
    s2 = np.zeros_like(z)
    cnt = np.zeros(z.shape, np.float32)
    for nb, good in zip(_neighbours(z, 0.0), _neighbours(ok, False), strict=True):
        s1 += nb
        s2 += nb * nb
        cnt += good
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s1 / cnt
        var = s2 / cnt - mean * mean
    fill = ~ok & (cnt >= min_neighbours) & (var < (max_jump / 3.0) ** 2)
    depth[fill] = mean[fill]
    return ok | fill


def edge_aware_smooth(depth: np.ndarray, ok: np.ndarray, max_jump: float) -> np.ndarray:
    """3x3 mean of each valid depth with those neighbours less than `max_jump` (metres) away.

    Averaging across a depth edge would invent points hanging between an item's top and the
    floor; leaving out the far neighbours keeps edges sharp while cutting noise about 3x.
    """
    z = np.where(ok, depth, np.nan)
    acc = np.where(ok, depth, 0.0)
    cnt = ok.astype(depth.dtype)
    for nb in _neighbours(z, np.nan):
        with np.errstate(invalid="ignore"):
            good = np.abs(nb - z) < max_jump  # False where either is NaN
        acc += np.where(good, nb, 0.0)
        cnt += good
    with np.errstate(invalid="ignore", divide="ignore"):
        out = acc / cnt
    out[~ok] = np.nan
    return out


def organised_normals(
    points: np.ndarray, ok: np.ndarray, camera_pos: np.ndarray, max_jump: float
) -> np.ndarray:
    """Unit normals (h, w, 3) of an organised grid of points from central differences; NaN at edges.

    A normal needs both neighbours in each direction valid and no neighbour further than
    `max_jump` (a depth edge: the cross product there mixes two surfaces).
    """
    h, w, _ = points.shape
    n = np.full((h, w, 3), np.nan)
    if h < 3 or w < 3:
        return n
    c = points[1:-1, 1:-1]
    left, right = points[1:-1, :-2], points[1:-1, 2:]
    up, down = points[:-2, 1:-1], points[2:, 1:-1]
    du = right - left
    dv = down - up
    cr = np.cross(du, dv)
    norm = np.sqrt(np.einsum("ijk,ijk->ij", cr, cr))
    good = ok[1:-1, 1:-1] & ok[1:-1, :-2] & ok[1:-1, 2:] & ok[:-2, 1:-1] & ok[2:, 1:-1] & (norm > 1e-12)
    for nb in (left, right, up, down):
        d = nb - c
        with np.errstate(invalid="ignore"):
            good &= np.einsum("ijk,ijk->ij", d, d) < max_jump * max_jump
    with np.errstate(invalid="ignore", divide="ignore"):
        cr = cr / norm[..., None]
    # Orient towards the camera: a visible surface faces it.
    flip = np.einsum("ijk,ijk->ij", cr, camera_pos - c) < 0
    cr[flip] *= -1.0
    cr[~good] = np.nan
    n[1:-1, 1:-1] = cr
    return n


def depth_steps(depth: np.ndarray, threshold: float) -> np.ndarray:
    """(h, w) bool: pixels whose depth second difference along rows or columns exceeds `threshold`."""
    out = np.zeros(depth.shape, dtype=bool)
    with np.errstate(invalid="ignore"):
        d2c = np.abs(depth[:, :-2] - 2.0 * depth[:, 1:-1] + depth[:, 2:]) > threshold
        d2r = np.abs(depth[:-2, :] - 2.0 * depth[1:-1, :] + depth[2:, :]) > threshold
    out[:, 1:-1] |= d2c
    out[1:-1, :] |= d2r
    return out


def _voxel_downsample(points: np.ndarray, normals: np.ndarray, voxel: float) -> tuple[np.ndarray, ...]:
    """Mean point and mean normal per occupied voxel; returns (points, normals, inverse index)."""
    keys = np.floor(points / voxel).astype(np.int64)
    keys -= keys.min(axis=0)
    span = keys.max(axis=0) + 1
    flat = (keys[:, 0] * span[1] + keys[:, 1]) * span[2] + keys[:, 2]
    _, inv = np.unique(flat, return_inverse=True)
    cnt = np.bincount(inv).astype(np.float64)
    pts = np.stack([np.bincount(inv, points[:, k]) for k in range(3)], axis=1) / cnt[:, None]
    has_n = np.isfinite(normals).all(axis=1)
    nz = np.where(has_n[:, None], normals, 0.0)
    nrm = np.stack([np.bincount(inv, nz[:, k], minlength=len(cnt)) for k in range(3)], axis=1)
    ln = np.linalg.norm(nrm, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        nrm = nrm / ln[:, None]
    nrm[ln < 1e-9] = np.nan
    return pts, nrm, inv


def _dbscan(points: np.ndarray, eps: float, min_points: int) -> np.ndarray:
    import open3d as o3d  # heavy; only the planner's latency path needs it

    pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points))
    with o3d.utility.VerbosityContextManager(o3d.utility.VerbosityLevel.Error):
        return np.asarray(pc.cluster_dbscan(eps=eps, min_points=min_points, print_progress=False), np.int32)


def _cluster(vpts: np.ndarray, cfg: CloudConfig) -> np.ndarray:
    """DBSCAN labels, small clusters dropped, renumbered by centroid (x, then y) for stable ids."""
    if len(vpts) == 0:
        return np.zeros(0, dtype=np.int32)
    raw_lab = _dbscan(vpts, cfg.cluster_eps_m, cfg.cluster_min_points)
    if raw_lab.max(initial=-1) < 0:
        return np.full(len(vpts), NO_CLUSTER, dtype=np.int32)
    sizes = np.bincount(raw_lab[raw_lab >= 0])
    keep = np.flatnonzero(sizes >= cfg.min_cluster_voxels)
    small = np.flatnonzero((sizes >= cfg.min_isolated_cluster_voxels) & (sizes < cfg.min_cluster_voxels))
    if len(small) > 0:
        from scipy.spatial import cKDTree

        big = np.isin(raw_lab, keep)
        tree = cKDTree(vpts[big]) if big.any() else None
        apart = [
            k for k in small if tree is None or tree.query(vpts[raw_lab == k])[0].min() > cfg.isolation_m
        ]
        keep = np.sort(np.concatenate([keep, np.asarray(apart, dtype=keep.dtype)]))
    cents = np.array([vpts[raw_lab == k].mean(axis=0) for k in keep]).reshape(-1, 3)
    order = np.lexsort((cents[:, 1], cents[:, 0]))
    remap = np.full(raw_lab.max() + 1, NO_CLUSTER, dtype=np.int32)
    remap[keep[order]] = np.arange(len(keep), dtype=np.int32)
    return np.where(raw_lab >= 0, remap[np.maximum(raw_lab, 0)], NO_CLUSTER).astype(np.int32)


def _grow_labels(
    labels: np.ndarray, item: np.ndarray, z: np.ndarray, max_jump: float, iterations: int
) -> None:
    """In place: unlabelled item cells take the label of a labelled 4-neighbour less than `max_jump`
    higher or lower (grid neighbours on a steep wall differ mostly in height). Works on the few
    unlabelled cells only, not the whole grid."""
    h, w = labels.shape
    flat_l = labels.reshape(-1)
    flat_z = z.reshape(-1)
    todo = np.flatnonzero(item.reshape(-1) & (flat_l == NO_CLUSTER))
    for _ in range(iterations):
        if len(todo) == 0:
            return
        row, col = np.divmod(todo, w)
        new = np.full(len(todo), NO_CLUSTER, np.int32)
        for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            r, c = row + dr, col + dc
            inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
            nb = np.where(inside, r * w + c, 0)
            with np.errstate(invalid="ignore"):
                take = (new == NO_CLUSTER) & inside & (flat_l[nb] != NO_CLUSTER)
                take &= np.abs(flat_z[nb] - flat_z[todo]) < max_jump
            new[take] = flat_l[nb[take]]
        got = new != NO_CLUSTER
        if not got.any():
            return
        flat_l[todo[got]] = new[got]  # labels seen by the next iteration, like a breadth-first fill
        todo = todo[~got]


def segment_scene(frame: Frame, bounds: Bounds, config: CloudConfig | None = None) -> SceneCloud:
    """Depth image -> organised tote grid, floor, normals, voxelised and clustered item points."""
    cfg = config or CloudConfig()
    if cfg.pixel_stride < 1 or cfg.voxel_m <= 0:
        raise ValueError(f"pixel_stride must be >= 1 and voxel_m > 0, got {cfg.pixel_stride}, {cfg.voxel_m}")
    K = np.asarray(frame.K, dtype=np.float64)
    T = np.asarray(frame.T_base_camera, dtype=np.float64)
    u0, v0, u1, v1 = tote_roi(frame, bounds)
    s = cfg.pixel_stride
    depth = np.array(frame.depth[v0:v1:s, u0:u1:s], dtype=np.float32)
    h, w = depth.shape
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(depth) & (depth > 0)
    ok = fill_holes(depth, ok, cfg.max_edge_jump_m)
    # Unit-depth rays of the grid's pixels, in the base frame: point = camera + depth * ray.
    uu = (u0 + s * np.arange(w, dtype=np.float32) - K[0, 2]) / K[0, 0]
    vv = (v0 + s * np.arange(h, dtype=np.float32) - K[1, 2]) / K[1, 1]
    R = T[:3, :3].astype(np.float32)
    rays = uu[None, :, None] * R[:, 0] + vv[:, None, None] * R[:, 1] + R[:, 2]  # (h, w, 3)
    cam = T[:3, 3].astype(np.float32)
    raw = cam + np.where(ok, depth, 0.0)[..., None] * rays
    lo = bounds.lo + np.array([cfg.wall_margin_m, cfg.wall_margin_m, -0.02])  # keep the floor: we fit it
    # Items may stick out above the rim (a tall box, a pile): keep what is above, up to a limit.
    hi = bounds.hi - np.array([cfg.wall_margin_m, cfg.wall_margin_m, -cfg.above_rim_m])
    ok &= np.all((raw >= lo) & (raw <= hi), axis=-1)
    # Smooth before differentiating: central differences of raw depth noise give useless normals.
    smooth = depth
    for _ in range(cfg.smooth_passes):
        smooth = edge_aware_smooth(smooth, ok, cfg.max_edge_jump_m)
    pts = cam + smooth[..., None] * rays
    normals = organised_normals(pts, ok, cam, cfg.max_edge_jump_m)

    # Floor: upward-facing points near the tote's nominal floor. A tote sits level in a real cell, so
    # a height is enough (no tilted-plane fit); the median ignores low flat items on it.
    zb = pts[..., 2]
    with np.errstate(invalid="ignore"):
        near_floor = ok & (zb < bounds.lo[2] + 0.03) & (normals[..., 2] > 0.95)
    floor_z = float(np.median(zb[near_floor])) if near_floor.sum() >= 50 else float(bounds.lo[2])
    # The smoothed cloud's noise, measured on the floor (robust std of its heights): what a perfectly
    # flat surface's plane fit residual looks like at this range. Zero when too little floor is seen.
    if near_floor.sum() >= 50:
        noise_m = float(1.4826 * np.median(np.abs(zb[near_floor] - floor_z)))
    else:
        noise_m = 0.0
    with np.errstate(invalid="ignore"):
        item = ok & (zb > floor_z + cfg.floor_margin_m)

    labels_grid = np.full((h, w), NO_CLUSTER, dtype=np.int32)
    item_idx = np.flatnonzero(item)
    clusters: list[ItemCluster] = []
    vpts = np.zeros((0, 3))
    vnrm = np.zeros((0, 3))
    vlab = np.zeros((0,), dtype=np.int32)
    facing = np.zeros(0, dtype=bool)
    if len(item_idx) > 0:
        with np.errstate(invalid="ignore"):
            facing = (normals.reshape(-1, 3)[item_idx][:, 2] > cfg.cluster_min_normal_z) & ~depth_steps(
                smooth, cfg.cluster_step_m
            ).reshape(-1)[item_idx]
    # Item points but none facing the camera (e.g. only steep walls in view): no cluster to seed.
    if facing.any():
        ip = pts.reshape(-1, 3)[item_idx]
        inr = normals.reshape(-1, 3)[item_idx]
        # Steep walls seen from above are sampled a centimetre or more apart vertically: DBSCAN
        # would cut them off as separate "items". Cluster the surfaces facing the camera, then
        # give the wall pixels the label of their neighbour in the image (below).
        # Occluding edges between touching items (a thin item lying on another, a box leaning on a
        # bottle) show as steps in the smoothed depth that curved and tilted surfaces do not make
        # (a second difference above cluster_step_m): leave those pixels out of the clustering too,
        # so DBSCAN does not bridge the items there.
        with np.errstate(invalid="ignore"):
            facing = (inr[:, 2] > cfg.cluster_min_normal_z) & ~depth_steps(
                smooth, cfg.cluster_step_m
            ).reshape(-1)[item_idx]
        vpts, vnrm, inv = _voxel_downsample(ip[facing], inr[facing], cfg.voxel_m)
        vlab = _cluster(vpts, cfg)
        flat_labels = labels_grid.reshape(-1)
        flat_labels[item_idx[facing]] = vlab[inv]
        _grow_labels(labels_grid, item, zb, cfg.max_edge_jump_m * 2, iterations=6)
        for k in range(int(vlab.max(initial=-1)) + 1):
            gp = pts[labels_grid == k]
            clusters.append(
                ItemCluster(
                    centroid=vpts[vlab == k].mean(axis=0),
                    # The camera sees tops, not bottoms: an item is taken to reach down to the tote
                    # floor (conservative for packing: one resting on another looks taller).
                    lo=np.minimum(gp.min(axis=0), [np.inf, np.inf, floor_z]),
                    hi=gp.max(axis=0),
                    n_points=len(gp),
                )
            )
    log.debug(
        "segment_scene: grid %dx%d, floor %.4f m, %d voxels, %d items",
        h,
        w,
        floor_z,
        len(vpts),
        len(clusters),
    )
    return SceneCloud(
        points_base=pts,
        valid=ok,
        normals_base=normals,
        labels=labels_grid,
        u0=u0,
        v0=v0,
        stride=s,
        K=K,
        T_base_camera=T,
        floor_z=floor_z,
        noise_m=noise_m,
        bounds=bounds,
        voxel_points=vpts,
        voxel_normals=vnrm,
        voxel_labels=vlab,
        clusters=tuple(clusters),
    )
