"""Grasp candidates on segmented items, with analytic scores: suction and parallel-jaw.

Suction: the cup's disk laid on the surface at sampled item points. For each one we look, through
the camera, at 24 points of the disk (two rings) and at its centre, fit a plane to those that lie
on the same item and score the seal: planarity (RMS and worst gap to the plane), the surface's tilt
(angle between its normal and straight up: the cup approaches along the normal, and steep
approaches are weaker and harder to reach), the lever arm to the item's centroid (torque on the
seal), and the room for the cup (the fraction of the disk that lies on this item, not over an edge
or on a neighbour). The approach is that plane's normal refitted on a wider, 3 cm patch of the
same surface (refine_normals): the disk's 25 noisy samples leave it a few degrees off, which a rigid
cup lip cannot bridge.

Parallel jaw: top-down antipodal pairs on the item's outline in a height map of the tote
(Dex-Net 2.0's depth-image antipodal sampler, in the base frame). For a sampled item cell and a
closing direction, walk outwards both ways until the line leaves the item: those are the contacts.
The outline's outward normal at each contact (from the local shape of the item's cells) must lie
inside the friction cone (half-angle atan(mu)) around the closing line, the item between the
contacts must fit the jaw's opening with clearance, and both fingers, lowered to grasp depth with
the jaw opened, must not hit anything in the height map (neighbours, walls, unseen cells filled
conservatively).

The rest of the tool: for both kinds, the hand, the flange and (suction) the stem and the opened
fingers are swept from pre-grasp down the approach to the grasp and checked against the height map
of the tote dilated to the samples' spacing, with everything outside the tote a wall up to its rim
(suction_tool_clearance, jaw_tool_clearance). Only the cup may touch the target item; the body must
clear it too (a hand landing on the target's taller end is a collision). In simulation this is what
went wrong most often: the 20 cm long Panda hand, a few centimetres above the fingertips, hitting a
tote wall while the fingers were lowered next to it, and fingertips touching the tote floor.

Everything is vectorised over candidates; the only Python loops run over items.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from grasping.patches import FEATURE_NAMES, N_FEATURES
from grasping.pointcloud import NO_CLUSTER, SceneCloud
from grasping.scoring import PARALLEL_JAW, SUCTION

_F = {name: i for i, name in enumerate(FEATURE_NAMES)}
_DOWN = np.array([0.0, 0.0, -1.0])


@dataclass(frozen=True)
class CandidateConfig:
    """Geometry of the grippers and the sampling budget."""

    cup_diameter_m: float = 0.03  # metres, suction cup lip diameter
    seal_sigma_m: float = 0.0015  # metres, plane-fit RMS at which seal quality falls to 1/e
    seal_max_gap_m: float = 0.005  # metres, largest gap between the lip and the surface that still seals
    suction_max_tilt_rad: float = np.deg2rad(60.0)  # radians, steeper surfaces get no suction candidate
    # metres, radius of the surface patch the suction approach (plane normal) is fitted on; 0: the
    # cup's own disk only (refine_normals)
    approach_support_m: float = 0.03
    torque_scale_m: float = 0.06  # metres, lever arm at which the torque factor halves
    max_opening_m: float = 0.08  # metres, parallel-jaw full opening
    finger_thickness_m: float = 0.012  # metres, along the closing direction
    finger_width_m: float = 0.02  # metres, across the closing direction
    finger_depth_m: float = 0.02  # metres, how far below the item's top the fingertips go
    finger_pad_half_m: float = 0.0115  # metres, fingertip below the jaw's grasp point (TCP)
    # metres, least drop of the grasp point (pad centre) below the height of the item's outline where
    # the fingers close: the outline cell of a round item sits 1-1.5 cm above its widest point
    jaw_edge_drop_m: float = 0.01
    floor_clearance_m: float = 0.003  # metres, least gap left between the fingertips and the floor
    jaw_clearance_m: float = 0.01  # metres, opening beyond the item on each side
    min_jaw_clearance_m: float = 0.003  # metres, the least side clearance a candidate may have
    collision_tol_m: float = 0.003  # metres, height-map noise tolerated under the fingers
    friction_coef: float = 0.5  # Coulomb mu: friction-cone half-angle atan(mu)
    jaw_angles: int = 8  # closing directions tried per sampled point, over 180 degrees
    suction_pool: int = 900  # sampled suction points per frame before ranking
    jaw_pool: int = 240  # sampled jaw centre points per frame (each tried at jaw_angles directions)
    min_per_item: int = 12  # each item gets at least this many samples of each kind (if it has them)
    # The rest of the tool, for the swept-volume check (tool_clearance). These numbers describe the
    # Panda hand with the suction stem of sim/sim_arm.py (measured there with rays against its
    # collision shapes); a real cell configures its own tool. Each box is (half width across the
    # closing direction, inner and outer reach along it from the tool axis (mirrored to both sides),
    # bottom and top along the tool axis above the TCP), metres, in the hand's frame. The jaw's
    # fingertips are checked separately (finger_* above); link 6 and the arm beyond it are not
    # modelled (they stay above 25 cm over the TCP and depend on the wrist joint).
    jaw_body_boxes: tuple[tuple[float, float, float, float, float], ...] = (
        (0.020, 0.0, 0.100, 0.038, 0.135),  # palm: the hand's lowest part, between the finger slots
        (0.036, 0.0, 0.090, 0.069, 0.135),  # the hand's outer shell
        (0.045, 0.0, 0.085, 0.103, 0.170),  # link 7 and the flange above the hand
    )
    # The stem (8 mm radius, above the cup) needs no box: the cup's swept rim (cup_height_m plus the
    # sweep, 15 mm radius) encloses it, and it is checked against everything but the target.
    suction_body_boxes: tuple[tuple[float, float, float, float, float], ...] = (
        (0.014, 0.036, 0.070, 0.085, 0.145),  # the fingers, opened fully during a suction pick
        (0.020, 0.0, 0.100, 0.133, 0.230),  # palm
        (0.036, 0.0, 0.090, 0.164, 0.230),  # the hand's outer shell
        (0.045, 0.0, 0.085, 0.198, 0.260),  # link 7 and the flange
    )
    cup_height_m: float = 0.03  # metres, the cup (lip to stem) that may touch only the target item
    approach_sweep_m: float = 0.10  # metres, the straight approach checked: pre-grasp back along it
    wall_margin_m: float = 0.005  # metres, the tool keeps this far above the tote's rim near the walls
    body_sample_m: float = 0.016  # metres, spacing of the tool's sample points (the map is dilated to match)
    body_clearance_scale_m: float = 0.01  # metres, clearance at which the near-miss factor reaches 1
    tool_check_pool: int = 640  # count, best suction candidates (spread over items) checked; rest dropped
    # (480 left 257-400 candidates per sim plan once colliding ones were removed; 640 keeps 400 in 12
    # procedural scenes for about 3 ms more CPU per plan)


@dataclass(frozen=True)
class CandidateSet:
    """M candidates of one gripper kind (or several), as arrays."""

    gripper: np.ndarray  # (M,) int64, SUCTION or PARALLEL_JAW
    positions: np.ndarray  # (M, 3) metres, base frame (cup contact / fingertip midpoint)
    rotations: np.ndarray  # (M, 3, 3) grasp frame in base frame (z approach, x closing)
    widths: np.ndarray  # (M,) metres, jaw opening before closing (0 for suction)
    analytic: np.ndarray  # (M,) [0, 1]
    features: np.ndarray  # (M, F) float32, FEATURE_NAMES
    cluster: np.ndarray  # (M,) int64 item index

    def __len__(self) -> int:
        return len(self.gripper)

    def take(self, idx: np.ndarray) -> CandidateSet:
        return CandidateSet(
            self.gripper[idx],
            self.positions[idx],
            self.rotations[idx],
            self.widths[idx],
            self.analytic[idx],
            self.features[idx],
            self.cluster[idx],
        )

    @staticmethod
    def empty() -> CandidateSet:
        return CandidateSet(
            np.zeros(0, np.int64),
            np.zeros((0, 3)),
            np.zeros((0, 3, 3)),
            np.zeros(0),
            np.zeros(0),
            np.zeros((0, N_FEATURES), np.float32),
            np.zeros(0, np.int64),
        )

    @staticmethod
    def concat(sets: list[CandidateSet]) -> CandidateSet:
        if not sets:
            return CandidateSet.empty()
        return CandidateSet(*(np.concatenate([getattr(s, f) for s in sets]) for f in _FIELDS))


_FIELDS = ("gripper", "positions", "rotations", "widths", "analytic", "features", "cluster")


def _quotas(sizes: np.ndarray, pool: int, min_per_item: int) -> np.ndarray:
    """Samples per item: at least `min_per_item`, the rest by sqrt(size) so small items are not starved."""
    if len(sizes) == 0:
        return np.zeros(0, int)
    w = np.sqrt(sizes.astype(np.float64))
    q = np.maximum(min_per_item, np.floor(pool * w / w.sum())).astype(int)
    return np.minimum(q, sizes)


def _sample_per_item(
    labels: np.ndarray, n_items: int, pool: int, min_per_item: int, rng: np.random.Generator
):
    """Indices into `labels`, sampled per item without replacement (deterministic for a seeded rng)."""
    sizes = np.bincount(labels[labels >= 0], minlength=n_items)
    quotas = _quotas(sizes, pool, min_per_item)
    picks = []
    for k in range(n_items):
        members = np.flatnonzero(labels == k)
        if quotas[k] > 0:
            picks.append(np.sort(rng.choice(members, size=quotas[k], replace=False)))
    return np.concatenate(picks) if picks else np.zeros(0, int)


def _item_geometry(cloud: SceneCloud) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per item: centroid (K, 3), horizontal extent (K,), top height above the floor (K,)."""
    if not cloud.clusters:
        return np.zeros((0, 3)), np.zeros(0), np.zeros(0)
    cent = np.array([c.centroid for c in cloud.clusters])
    ext = np.array([float(np.max(c.extents[:2])) for c in cloud.clusters])
    top = np.array([float(c.hi[2]) for c in cloud.clusters]) - cloud.floor_z
    return cent, ext, top


def _tangent_basis(n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors (M, 3) orthogonal to unit normals n (M, 3) and to each other."""
    a = np.where(np.abs(n[:, :1]) < 0.9, np.array([[1.0, 0.0, 0.0]]), np.array([[0.0, 1.0, 0.0]]))
    t1 = np.cross(n, a)
    t1 /= np.linalg.norm(t1, axis=1, keepdims=True)
    return t1, np.cross(n, t1)


def _frames_from_approach(z: np.ndarray) -> np.ndarray:
    """Rotations (M, 3, 3) with +z = z (unit, M x 3) and +x = base x projected (grasp_frame's rule)."""
    x = np.where(np.abs(z[:, :1]) < 0.9, np.array([[1.0, 0.0, 0.0]]), np.array([[0.0, 1.0, 0.0]]))
    x = x - z * np.sum(x * z, axis=1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.stack([x, np.cross(z, x), z], axis=2)


def _grid(lo: float, hi: float, spacing: float) -> np.ndarray:
    """Points from lo to hi (both included) no further apart than `spacing`."""
    return np.linspace(lo, hi, max(2, int(np.ceil((hi - lo) / spacing - 1e-9)) + 1))


@functools.lru_cache(maxsize=16)
def tool_points(
    boxes: tuple[tuple[float, float, float, float, float], ...], spacing: float, sweep_m: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample points (u across the closing direction, v along it, w up the tool axis from the TCP) of
    the tool's swept volume: (bottom faces (Pb, 3), side faces (Ps, 3), the side faces' outward
    normals (Ps, 2: u, v)).

    Moving the tool straight back along its axis by up to `sweep_m` (the approach from pre-grasp)
    sweeps each box into a taller box; the lowest points of a swept box over any spot of the map lie
    on its bottom face or, when the axis is tilted, on its side faces that face downwards, which are
    the bottom outline lifted up the axis. A vertical approach needs only the bottom faces. A box's
    sides stop where a box above it whose footprint holds its own begins (that box's swept sides
    cover the rest). Side points come sorted by w.
    """
    bottom, sides, normals = [np.zeros((0, 3))], [np.zeros((0, 3))], [np.zeros((0, 2))]
    for hu, v_in, v_out, w_lo, w_hi in boxes:
        covers = [
            b[3]
            for b in boxes
            if b[3] > w_lo and b[4] >= w_hi and b[0] >= hu and b[1] <= v_in and b[2] >= v_out
        ]
        w_end = min(covers, default=w_hi + sweep_m)
        us = _grid(-hu, hu, spacing)
        vs_half = _grid(v_in, v_out, spacing)
        vs = np.unique(np.concatenate([vs_half, -vs_half]))
        uu, vv = np.meshgrid(us, vs, indexing="ij")
        bottom.append(np.stack([uu.ravel(), vv.ravel(), np.full(uu.size, w_lo)], 1))
        # The outline, face by face (corners belong to both of their faces).
        faces = [
            (np.full(len(vs), hu), vs, (1.0, 0.0)),
            (np.full(len(vs), -hu), vs, (-1.0, 0.0)),
            (us, np.full(len(us), v_out), (0.0, 1.0)),
            (us, np.full(len(us), -v_out), (0.0, -1.0)),
        ]
        if v_in > 0.0:  # two separate boxes (the fingers): their inner faces look at the axis
            faces += [(us, np.full(len(us), v_in), (0.0, -1.0)), (us, np.full(len(us), -v_in), (0.0, 1.0))]
        ring = np.concatenate([np.stack([fu, fv], 1) for fu, fv, _ in faces])
        ring_n = np.concatenate([np.tile(n, (len(fu), 1)) for fu, _, n in faces])
        for w in _grid(w_lo, w_end, spacing)[1:]:
            sides.append(np.column_stack([ring, np.full(len(ring), w)]))
            normals.append(ring_n)
    side_pts, side_n = np.concatenate(sides), np.concatenate(normals)
    order = np.argsort(side_pts[:, 2], kind="stable")
    out = np.concatenate(bottom), side_pts[order], side_n[order]
    for a in out:
        a.flags.writeable = False  # cached: shared by every call
    return out


@functools.lru_cache(maxsize=16)
def _disk_points(radius: float, height: float, spacing: float, sweep_m: float, level_step: float):
    """The cup: (lip disk (Pb, 3), its rim lifted up the axis to the stem plus the sweep (Ps, 3), the
    rim's outward normals (Ps, 2)). `spacing` (metres) between rim points, `level_step` between rims."""
    n = max(8, int(np.ceil(2 * np.pi * radius / spacing)))
    ang = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    radial = np.stack([np.cos(ang), np.sin(ang)], 1)
    rim = radius * radial
    disk = np.vstack([rim, rim / 2.0, [[0.0, 0.0]]])
    bottom = np.column_stack([disk, np.zeros(len(disk))])
    levels = _grid(0.0, height + sweep_m, level_step)[1:]
    sides = np.concatenate([np.column_stack([rim, np.full(n, w)]) for w in levels], axis=0)
    normals = np.tile(radial, (len(levels), 1))
    for a in (bottom, sides, normals):
        a.flags.writeable = False  # cached: shared by every call
    return bottom, sides, normals


def body_map(hmap: HeightMap, rim_z: float, r_cells: int) -> HeightMap:
    """The height map padded with the tote's walls (height `rim_z`) and dilated by a max filter of
    (2 r_cells + 1)^2 cells: a tool point looked up here also covers the points of its sampling
    neighbourhood (the tool's samples are at most r_cells cells apart)."""
    h = np.pad(hmap.height, r_cells, constant_values=rim_z)
    for axis in (0, 1):
        n = h.shape[axis]
        p = np.pad(h, [(r_cells, r_cells) if a == axis else (0, 0) for a in (0, 1)], constant_values=rim_z)
        h = np.max(
            np.stack([np.take(p, np.arange(k, k + n), axis=axis) for k in range(2 * r_cells + 1)]), axis=0
        )
    return HeightMap(
        height=h,
        label=np.full(h.shape, NO_CLUSTER, np.int32),
        lo=hmap.lo - r_cells * hmap.res,
        res=hmap.res,
    )


def _clearance(
    hmap: HeightMap,
    outside_z: float,
    pos: np.ndarray,
    e_across: np.ndarray,
    e_close: np.ndarray,
    e_up: np.ndarray,
    pts: np.ndarray,
    ignore_label: np.ndarray | None = None,
    care_below: float = np.inf,
    normals: np.ndarray | None = None,
) -> np.ndarray:
    """(M,) least height of the tool points `pts` (P, 3: u, v, w) above the map, candidates placed at
    `pos` with axes e_across, e_close, e_up (M, 3 each). Off the map counts as `outside_z` (walls);
    cells labelled `ignore_label` (M,) (the target item, for the cup) or unlabelled count as free
    (the map's labels are needed then: not for a dilated body_map). Points at or
    above `care_below` (base z, metres) are not looked up: their clearance is reported as +inf.
    `normals` (P, 2: u, v; zero for bottom-face points): points on side faces that face upwards are
    never the lowest over their spot and are skipped too.
    """
    m = len(pos)
    if m == 0 or len(pts) == 0:
        return np.full(m, np.inf)
    # float32 and plain broadcasting (not BLAS, whose threads spin on a busy machine for these
    # 3-long products): millimetres are all that matter here.
    axes = np.stack([e_across, e_close, e_up], axis=1).astype(np.float32)  # (M, tool axis, base xyz)
    pts32 = pts.astype(np.float32)
    z = pos[:, 2:3].astype(np.float32) + axes[:, 0, 2:3] * pts32[:, 0]
    z += axes[:, 1, 2:3] * pts32[:, 1]
    z += axes[:, 2, 2:3] * pts32[:, 2]
    # Most of the hand rides far above everything in the tote: only look up the points that could
    # touch something (the map's top plus the near-miss range), a fraction of the tool's samples.
    near = z < care_below
    if normals is not None:
        n32 = normals.astype(np.float32)
        near &= axes[:, 0, 2:3] * n32[:, 0] + axes[:, 1, 2:3] * n32[:, 1] <= 1e-7
    mi, pi = np.nonzero(near)
    out = np.full(m, np.inf)
    if len(mi) == 0:
        return out
    a = axes[mi]
    q = pts32[pi]
    xy = pos[mi, :2] + q[:, 0:1] * a[:, 0, :2] + q[:, 1:2] * a[:, 1, :2] + q[:, 2:3] * a[:, 2, :2]
    ix, iy, inside = hmap.cell(xy)
    h = np.where(inside, hmap.height[ix, iy], outside_z)
    if ignore_label is not None:
        # The target and unlabelled cells (floor, and the steep edges segmentation leaves out,
        # mostly the target's own) are free: only other items and the walls can block the cup.
        lab = hmap.label[ix, iy]
        h = np.where(inside & ((lab == ignore_label[mi]) | (lab == NO_CLUSTER)), -np.inf, h)
    # nonzero() lists the pairs row by row: one reduceat per candidate row that has any.
    starts = np.flatnonzero(np.r_[True, mi[1:] != mi[:-1]])
    out[mi[starts]] = np.minimum.reduceat(z[mi, pi] - h, starts)
    return out


def _dilation_cells(cfg: CandidateConfig, res: float) -> int:
    # Neighbouring samples are body_sample_m apart: every point of a face lies within half of that
    # (per axis) of a sample, so within ceil(half / res) cells of the sample's cell.
    return max(1, int(np.ceil(cfg.body_sample_m / 2.0 / res - 1e-9)))


def suction_tool_clearance(
    hmap: HeightMap,
    rim_z: float,
    cfg: CandidateConfig,
    positions: np.ndarray,
    rotations: np.ndarray,
    target: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """(body clearance (M,), cup clearance (M,)) in metres for suction candidates (cup lips at
    `positions`, grasp frames `rotations`, items `target`); negative = collision. `rim_z`: the tote's
    top (base z, metres); off the map is wall up to it.

    Body: the stem, the open fingers, the hand and the flange, swept from pre-grasp down the
    approach to the grasp, against everything in the tote (the target item included: only the cup
    may touch it) and the walls up to the rim. The arm may turn the hand about the cup's axis (the
    simulated arm tries four turns and prefers one that clears the walls), so each candidate gets
    the better of the two distinct hand orientations. Cup: the cup, swept the same way, against
    everything but the target item.
    """
    m = len(positions)
    if m == 0:
        return np.zeros(0), np.zeros(0)
    r = _dilation_cells(cfg, hmap.res)
    rim = rim_z + cfg.wall_margin_m
    bmap = body_map(hmap, rim, r)
    bottom, sides, side_n = tool_points(cfg.suction_body_boxes, cfg.body_sample_m, cfg.approach_sweep_m)
    # The cup is looked up cell by cell in the undilated map: a cell that a rim point falls in may hold
    # its blocking point anywhere, up to half a cell diagonal further out; sampling the rim that much
    # inside the lip keeps the check from being a cell wider than the cup.
    cup_r = max(cfg.cup_diameter_m / 2.0 - hmap.res * np.sqrt(0.5), 0.0)
    cup_bottom, cup_sides, cup_n = _disk_points(
        cup_r, cfg.cup_height_m, hmap.res, cfg.approach_sweep_m, cfg.body_sample_m
    )
    gx, gy, up = rotations[:, :, 0], rotations[:, :, 1], -rotations[:, :, 2]
    # A vertical approach sweeps each tool point straight up over itself: its bottom faces are
    # enough. Tilted ones also need the sides (the bottom outline lifted along the axis). Below 5
    # degrees a point 9 cm up the side is within the map's dilation of the bottom face's outline.
    tilted = up[:, 2] < np.cos(np.deg2rad(5.0))
    care = float(bmap.height.max()) + cfg.body_clearance_scale_m
    # Side points higher up the axis than a candidate's w_need cannot come below `care` (the tool's
    # points lie within `reach` of its axis): tilted candidates go in chunks sorted by w_need, each
    # with the side points (sorted by w) it needs.
    reach = float(np.linalg.norm(sides[:, :2], axis=1).max()) if len(sides) else 0.0
    sin_t = np.sqrt(np.maximum(1.0 - up[:, 2] ** 2, 0.0))
    w_need = (care - positions[:, 2] + reach * sin_t) / np.maximum(up[:, 2], 1e-6)
    flat_b, flat_c = np.zeros((len(bottom), 2)), np.zeros((len(cup_bottom), 2))
    groups = [(np.flatnonzero(~tilted), bottom, flat_b, cup_bottom, flat_c)]
    t_idx = np.flatnonzero(tilted)
    t_idx = t_idx[np.argsort(w_need[t_idx], kind="stable")]
    for chunk in np.array_split(t_idx, min(4, len(t_idx))) if len(t_idx) else []:
        w_max = float(w_need[chunk].max())
        ns = int(np.searchsorted(sides[:, 2], w_max, side="right"))
        nc = int(np.searchsorted(cup_sides[:, 2], w_max, side="right"))
        groups.append(
            (
                chunk,
                np.vstack([bottom, sides[:ns]]),
                np.vstack([flat_b, side_n[:ns]]),
                np.vstack([cup_bottom, cup_sides[:nc]]),
                np.vstack([flat_c, cup_n[:nc]]),
            )
        )
    body = np.full(m, -np.inf)
    cup = np.full(m, np.inf)
    for group, pts, nrm, cpts, cnrm in groups:
        if len(group) == 0:
            continue
        p, x, y, u = positions[group], gx[group], gy[group], up[group]
        kw = {"care_below": care, "normals": nrm}
        c = _clearance(bmap, rim, p, y, x, u, pts, **kw)  # closing direction along the grasp's x
        # Turned a quarter about the cup's axis: only needed where the first way is not clear.
        again = np.flatnonzero(c < cfg.body_clearance_scale_m - cfg.collision_tol_m)
        if len(again):
            c[again] = np.maximum(
                c[again], _clearance(bmap, rim, p[again], x[again], y[again], u[again], pts, **kw)
            )
        body[group] = c
        cup[group] = _clearance(
            hmap, rim, p, y, x, u, cpts, ignore_label=target[group], care_below=care, normals=cnrm
        )
    return body, cup


def jaw_tool_clearance(
    hmap: HeightMap, rim_z: float, cfg: CandidateConfig, positions: np.ndarray, closing: np.ndarray
) -> np.ndarray:
    """(M,) metres: least clearance of the hand and flange above everything in the tote (the target
    item included) and the walls, for top-down jaw grasps at `positions` closing along `closing`
    (M, 2 or 3, horizontal unit vectors); negative = collision. The approach is vertical, so the
    tool at the grasp pose is its whole swept volume."""
    m = len(positions)
    if m == 0:
        return np.zeros(0)
    r = _dilation_cells(cfg, hmap.res)
    rim = rim_z + cfg.wall_margin_m
    bmap = body_map(hmap, rim, r)
    bottom, _, _ = tool_points(cfg.jaw_body_boxes, cfg.body_sample_m, 0.0)
    e_close = np.zeros((m, 3))
    e_close[:, :2] = closing[:, :2]
    e_across = np.stack([-e_close[:, 1], e_close[:, 0], np.zeros(m)], 1)
    e_up = np.broadcast_to(np.array([0.0, 0.0, 1.0]), (m, 3))
    care = float(bmap.height.max()) + cfg.body_clearance_scale_m
    return _clearance(bmap, rim, positions, e_across, e_close, e_up, bottom, care_below=care)


def _fit_planes(seen: np.ndarray, mask: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, ...]:
    """Least-squares planes through the points `seen` (M, P, 3) where `mask` (M, P): (centroids
    (M, 3), unit normals (M, 3) turned to the side of `ref` (M, 3), eigenvalues of the covariance
    (M, 3) ascending, offsets of the points from their centroid (M, P, 3), 0 where masked out)."""
    cnt = np.maximum(mask.sum(axis=1), 1.0)
    mean = np.where(mask[..., None], seen, 0.0).sum(axis=1) / cnt[:, None]
    d = np.where(mask[..., None], seen - mean[:, None, :], 0.0)
    evals, evecs = np.linalg.eigh(np.einsum("mpi,mpj->mij", d, d) / cnt[:, None, None])
    n = evecs[:, :, 0]
    return mean, np.where((np.sum(n * ref, axis=1) < 0)[:, None], -n, n), evals, d


def refine_normals(
    cloud: SceneCloud,
    p: np.ndarray,
    centre: np.ndarray,
    normal: np.ndarray,
    lab: np.ndarray,
    support_m: float,
    noise: float,
    rings: int = 3,
    per_ring: int = 16,
) -> np.ndarray:
    """Unit normals (M, 3) of the surface around each point `p` (M, 3), refitted on a disk of radius
    `support_m` around it: samples on `rings` rings (plus the centre) looked up through the camera,
    kept where they lie on item `lab` within 3 sigma of depth noise (at least 3 mm) of the plane
    through `centre` with `normal` (so an edge, a neighbour or the far side of a curve drops out),
    then a least-squares plane through those. Fewer than 12 inliers, or a refit that turns more
    than 20 deg from `normal`: `normal` is kept.

    The plane of the cup's own 25 samples is what the seal is scored on; the approach needs a better
    normal than that. Plane-normal error falls with the square root of the samples and with their
    spread: about 100 samples over 3 cm radius instead of 25 over 1.5 cm.
    """
    m = len(p)
    if m == 0 or support_m <= 0:
        return normal
    t1, t2 = _tangent_basis(normal)
    radii = np.linspace(support_m / rings, support_m, rings)
    ang = np.linspace(0.0, 2 * np.pi, per_ring, endpoint=False)
    uv = np.vstack(
        [
            [0.0, 0.0],
            np.concatenate(
                [np.stack([r * np.cos(ang + k), r * np.sin(ang + k)], 1) for k, r in enumerate(radii)]
            ),
        ]
    )
    q = p[:, None, :] + uv[None, :, 0:1] * t1[:, None, :] + uv[None, :, 1:2] * t2[:, None, :]
    seen, ok, seen_lab = cloud.lookup(q)
    off = np.einsum("mpi,mi->mp", seen - centre[:, None, :], normal)
    tol = max(3.0 * float(noise), 0.003)
    inl = ok & (seen_lab == lab[:, None]) & (np.abs(off) <= tol)
    _, n_ref, _, _ = _fit_planes(seen, inl, normal)
    use = (inl.sum(axis=1) >= 12) & (np.sum(n_ref * normal, axis=1) >= np.cos(np.deg2rad(20.0)))
    return np.where(use[:, None], n_ref, normal)


def suction_candidates(
    cloud: SceneCloud,
    cfg: CandidateConfig,
    rng: np.random.Generator,
    res: float = 0.004,
    hmap: HeightMap | None = None,
) -> CandidateSet:
    """Suction cups on sampled item points, scored for seal, tilt, torque and room; those whose tool
    would hit something on the way down are dropped, near misses score lower (suction_tool_clearance).
    `res` (metres) is the height map's cell size; pass `hmap` when it is already built."""
    vlab = cloud.voxel_labels
    n_items = cloud.n_clusters
    with np.errstate(invalid="ignore"):
        usable = (vlab >= 0) & np.isfinite(cloud.voxel_normals).all(axis=1)
        usable &= cloud.voxel_normals[:, 2] >= np.cos(cfg.suction_max_tilt_rad)
    labels = np.where(usable, vlab, NO_CLUSTER)
    idx = _sample_per_item(labels, n_items, cfg.suction_pool, cfg.min_per_item, rng)
    if len(idx) == 0:
        return CandidateSet.empty()
    p = cloud.voxel_points[idx]
    n = cloud.voxel_normals[idx]
    lab = labels[idx]
    m = len(idx)

    # The cup disk: 16 points on the lip, 8 at half radius, and the centre, seen through the camera.
    r = cfg.cup_diameter_m / 2.0
    ang16 = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    ang8 = np.linspace(0, 2 * np.pi, 8, endpoint=False) + np.pi / 8
    rings = np.concatenate(
        [
            np.stack([r * np.cos(ang16), r * np.sin(ang16)], 1),
            np.stack([r / 2 * np.cos(ang8), r / 2 * np.sin(ang8)], 1),
        ]
    )
    rings = np.vstack([rings, [[0.0, 0.0]]])  # (25, 2)
    t1, t2 = _tangent_basis(n)
    q = p[:, None, :] + rings[None, :, 0:1] * t1[:, None, :] + rings[None, :, 1:2] * t2[:, None, :]
    seen, ok, seen_lab = cloud.lookup(q)
    on_item = ok & (seen_lab == lab[:, None])
    coverage = on_item[:, :-1].mean(axis=1)

    # Plane fit over the samples on this item.
    mean, n_fit, evals, d = _fit_planes(seen, on_item, n)
    rms = np.sqrt(np.maximum(evals[:, 0], 0.0))
    dev = np.abs(np.einsum("mpi,mi->mp", d, n_fit))
    max_dev = np.where(on_item, dev, 0.0).max(axis=1)
    # Too few samples on the item: no plane to speak of, the fit normal is meaningless.
    enough = on_item.sum(axis=1) >= 8
    # The approach: that plane refitted on a wider patch of the surface (the disk's 25 samples
    # leave a ~4 deg normal error at this camera's depth noise, and a cup tilted 9.5 deg to the
    # surface leaves a 2.5 mm gap at its rim; measured in docs/benchmarks.md).
    n_use = np.where(
        enough[:, None],
        refine_normals(cloud, p, mean, n_fit, lab, cfg.approach_support_m, noise=cloud.noise_m),
        n,
    )
    tilt = np.arccos(np.clip(n_use[:, 2], -1.0, 1.0))

    cent, ext, top = _item_geometry(cloud)
    dist = np.linalg.norm((p - cent[lab])[:, :2], axis=1)
    # Sensor noise inflates both the residual and the worst gap of a perfectly flat surface: score
    # what is left after taking out the noise measured on the floor (RMS in quadrature, gap 2 sigma).
    noise = cloud.noise_m
    rms_excess = np.sqrt(np.maximum(rms**2 - noise**2, 0.0))
    gap_excess = np.maximum(max_dev - 2.0 * noise, 0.0)
    s_plan = np.exp(-((rms_excess / cfg.seal_sigma_m) ** 2))
    s_gap = np.clip(1.0 - gap_excess / cfg.seal_max_gap_m, 0.0, 1.0)
    # 1 for a horizontal surface, 0 at the steepest allowed approach: steep cups hold the load in
    # shear, and steep approaches are the hardest for the arm to reach.
    cos_max = np.cos(cfg.suction_max_tilt_rad)
    s_tilt = np.clip((np.cos(tilt) - cos_max) / (1.0 - cos_max), 0.0, 1.0) ** 2
    s_torque = 1.0 / (1.0 + (dist / cfg.torque_scale_m) ** 2)
    s_room = coverage**3
    score = s_plan * np.sqrt(s_gap) * s_tilt * np.sqrt(s_torque) * s_room
    keep = enough & (tilt <= cfg.suction_max_tilt_rad)
    score = np.where(keep, score, 0.0)
    rotations = _frames_from_approach(-n_use)

    # The whole tool, swept down the approach: collisions are dropped, near misses score lower.
    # Only the best tool_check_pool (spread over items as the planner selects them) are worth the
    # check; the planner would never reach the others.
    sel = np.flatnonzero(keep)
    sel = sel[_spread_order(score[sel], lab[sel])[: cfg.tool_check_pool]]
    keep[:] = False
    keep[sel] = True
    if hmap is None:
        hmap = height_map(cloud, res)
    body, cup = suction_tool_clearance(hmap, float(cloud.bounds.hi[2]), cfg, p[sel], rotations[sel], lab[sel])
    tol = cfg.collision_tol_m
    keep[sel] = (body >= -tol) & (cup >= -tol)
    score[sel] *= np.clip((body + tol) / cfg.body_clearance_scale_m, 0.0, 1.0)

    feats = np.zeros((m, N_FEATURES), np.float32)
    feats[:, _F["analytic_score"]] = score
    feats[:, _F["normal_tilt_rad"]] = tilt
    feats[:, _F["seal_rms_m"]] = rms
    feats[:, _F["seal_max_dev_m"]] = max_dev
    feats[:, _F["seal_coverage"]] = coverage
    feats[:, _F["centroid_dist_m"]] = dist
    feats[:, _F["cluster_extent_m"]] = ext[lab]
    feats[:, _F["cluster_height_m"]] = top[lab]
    feats[:, _F["height_above_floor_m"]] = p[:, 2] - cloud.floor_z
    out = CandidateSet(
        gripper=np.full(m, SUCTION, np.int64),
        positions=p,
        rotations=rotations,
        widths=np.zeros(m),
        analytic=score,
        features=feats,
        cluster=lab.astype(np.int64),
    )
    return out.take(np.flatnonzero(keep))


@dataclass(frozen=True)
class HeightMap:
    """Top-down max-height map of the tote's inside, cell (ix, iy) centred at lo + (i + 0.5) * res."""

    height: np.ndarray  # (nx, ny) metres, base z; unseen cells filled conservatively
    label: np.ndarray  # (nx, ny) int32 item of the topmost point, NO_CLUSTER for floor / unseen
    lo: np.ndarray  # (2,) metres, x/y of the map's corner
    res: float  # metres per cell

    def cell(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ix, iy, inside) for base-frame xy (..., 2)."""
        ij = np.floor((xy - self.lo) / self.res).astype(np.intp)
        nx, ny = self.height.shape
        inside = (ij[..., 0] >= 0) & (ij[..., 0] < nx) & (ij[..., 1] >= 0) & (ij[..., 1] < ny)
        return np.clip(ij[..., 0], 0, nx - 1), np.clip(ij[..., 1], 0, ny - 1), inside


_NB8 = [(di, dj) for di in (-1, 0, 1) for dj in (-1, 0, 1) if (di, dj) != (0, 0)]


def height_map(cloud: SceneCloud, res: float) -> HeightMap:
    """Max height per cell of all valid tote points (items and floor); labels of the topmost points."""
    lo = cloud.bounds.lo[:2]
    nx, ny = np.ceil((cloud.bounds.hi[:2] - lo) / res).astype(int)
    pts = cloud.points_base[cloud.valid]
    lab = cloud.labels[cloud.valid]
    ij = np.clip(np.floor((pts[:, :2] - lo) / res).astype(np.intp), 0, [nx - 1, ny - 1])
    flat = ij[:, 0] * ny + ij[:, 1]
    hm = np.full(nx * ny, -np.inf)
    np.maximum.at(hm, flat, pts[:, 2])
    top = pts[:, 2] >= hm[flat] - 1e-9
    lm = np.full(nx * ny, NO_CLUSTER, np.int32)
    lm[flat[top]] = lab[top]
    hm = hm.reshape(nx, ny)
    lm = lm.reshape(nx, ny)
    # Unseen cells (occlusion shadows, holes): assume the highest neighbour, a few cells deep, so
    # fingers are not sent into space the camera could not see; the rest is floor.
    # The filled cells take the label of the neighbour whose height they took: an unseen cell next to
    # an item is treated as part of it (wider, never narrower, than what was seen).
    for _ in range(3):
        unseen = ~np.isfinite(hm)
        if not unseen.any():
            break
        pad_h = np.pad(hm, 1, constant_values=-np.inf)
        pad_l = np.pad(lm, 1, constant_values=NO_CLUSTER)
        nb_h = np.stack([pad_h[1 + di : 1 + di + nx, 1 + dj : 1 + dj + ny] for di, dj in _NB8])
        nb_l = np.stack([pad_l[1 + di : 1 + di + nx, 1 + dj : 1 + dj + ny] for di, dj in _NB8])
        best = np.argmax(nb_h, axis=0)
        top_h = np.take_along_axis(nb_h, best[None], 0)[0]
        top_l = np.take_along_axis(nb_l, best[None], 0)[0]
        fill = unseen & np.isfinite(top_h)
        hm = np.where(fill, top_h, hm)
        lm = np.where(fill, top_l, lm)
    hm = np.where(np.isfinite(hm), hm, cloud.floor_z)
    return HeightMap(height=hm, label=lm, lo=lo.copy(), res=res)


def _disk_offsets(radius_cells: int) -> np.ndarray:
    k = np.arange(-radius_cells, radius_cells + 1)
    o = np.stack(np.meshgrid(k, k, indexing="ij"), -1).reshape(-1, 2)
    return o[(o**2).sum(1) <= radius_cells**2]


_NORMAL_DISK = _disk_offsets(3)


def _outline_normals(hmap: HeightMap, ix: np.ndarray, iy: np.ndarray, lab: np.ndarray) -> np.ndarray:
    """Outward unit normals (M, 2) of item `lab` at boundary cells (ix, iy): minus the direction to the
    centroid of the item's cells in a 7-cell disk around it (a smoothed outline normal)."""
    nx, ny = hmap.label.shape
    jx = ix[:, None] + _NORMAL_DISK[None, :, 0]
    jy = iy[:, None] + _NORMAL_DISK[None, :, 1]
    inside = (jx >= 0) & (jx < nx) & (jy >= 0) & (jy < ny)
    member = inside & (hmap.label[np.clip(jx, 0, nx - 1), np.clip(jy, 0, ny - 1)] == lab[:, None])
    c = (member[..., None] * _NORMAL_DISK[None].astype(np.float64)).sum(1) / np.maximum(member.sum(1), 1)[
        :, None
    ]
    nrm = np.linalg.norm(c, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(nrm > 1e-9, -c / nrm, np.nan)


def jaw_candidates(
    cloud: SceneCloud,
    cfg: CandidateConfig,
    rng: np.random.Generator,
    res: float,
    hmap: HeightMap | None = None,
) -> CandidateSet:
    """Top-down antipodal jaw grasps: fit the opening, pass the friction cone, fingers collision-free,
    hand and flange collision-free (jaw_tool_clearance). Pass `hmap` when it is already built."""
    if cloud.n_clusters == 0:
        return CandidateSet.empty()
    if hmap is None:
        hmap = height_map(cloud, res)
    nx, ny = hmap.height.shape
    flat_lab = hmap.label.reshape(-1)
    idx = _sample_per_item(flat_lab, cloud.n_clusters, cfg.jaw_pool, cfg.min_per_item, rng)
    if len(idx) == 0:
        return CandidateSet.empty()
    cix, ciy = np.divmod(idx, ny)
    lab0 = flat_lab[idx]
    centre = hmap.lo + (np.stack([cix, ciy], 1) + 0.5) * res
    # Every sampled point at every closing direction; a small seeded jitter of the angle avoids
    # all items sharing the same 8 directions.
    theta = np.linspace(0.0, np.pi, cfg.jaw_angles, endpoint=False)[None, :] + rng.uniform(
        0, np.pi / cfg.jaw_angles, size=(len(idx), 1)
    )
    theta = theta.reshape(-1)
    centre = np.repeat(centre, cfg.jaw_angles, axis=0)
    lab = np.repeat(lab0, cfg.jaw_angles)
    direction = np.stack([np.cos(theta), np.sin(theta)], 1)

    # Walk along the closing line (half a cell steps) until it leaves the item on both sides.
    step = res / 2.0
    n_side = int(np.ceil((cfg.max_opening_m / 2.0 + step) / step))
    s = np.arange(-n_side, n_side + 1) * step
    xy = centre[:, None, :] + s[None, :, None] * direction[:, None, :]
    jx, jy, inside = hmap.cell(xy)
    same = inside & (hmap.label[jx, jy] == lab[:, None])
    right = same[:, n_side:]
    left = same[:, n_side::-1]
    kr = np.argmin(right, axis=1)  # first step off the item; 0 if it never leaves
    kl = np.argmin(left, axis=1)
    closed = (~right.all(axis=1)) & (~left.all(axis=1))
    s_r = (kr - 0.5) * step
    s_l = -(kl - 0.5) * step
    width = s_r - s_l
    fits = closed & (width + 2 * cfg.min_jaw_clearance_m <= cfg.max_opening_m)
    # Only the lines that fit the opening go on to the costlier checks.
    k = np.flatnonzero(fits)
    if len(k) == 0:
        return CandidateSet.empty()
    centre, direction, theta, lab = centre[k], direction[k], theta[k], lab[k]
    s_r, s_l, width, same, jx, jy = s_r[k], s_l[k], width[k], same[k], jx[k], jy[k]
    fits = np.ones(len(k), dtype=bool)
    mid = centre + ((s_r + s_l) / 2.0)[:, None] * direction

    # Outline normals at the two contacts (the last item cell on each side).
    cr = centre + (s_r - step / 2.0)[:, None] * direction
    cl = centre + (s_l + step / 2.0)[:, None] * direction
    rx, ry, _ = hmap.cell(cr)
    lx, ly, _ = hmap.cell(cl)
    n_r = _outline_normals(hmap, rx, ry, lab)
    n_l = _outline_normals(hmap, lx, ly, lab)
    # Height of the lower of the two outline cells the fingers close on: on a box it is the top, on
    # a lying cylinder or a ball it is just above the widest point (the outline seen from above).
    z_edge = np.minimum(hmap.height[rx, ry], hmap.height[lx, ly])
    with np.errstate(invalid="ignore"):
        ang_r = np.arccos(np.clip(np.sum(n_r * direction, 1), -1, 1))
        ang_l = np.arccos(np.clip(np.sum(n_l * -direction, 1), -1, 1))
    ang = np.fmax(ang_r, ang_l)
    ang = np.where(np.isnan(ang_r) | np.isnan(ang_l), np.pi, ang)
    cone = np.arctan(cfg.friction_coef)
    antipodal = ang <= cone
    # The finger pads are finger_width_m wide: on lines offset by half a pad to each side, the item
    # must still be there and its outline must not recede or advance faster than the cone allows.
    # This rejects lines cutting an item's corner, whose smoothed outline normals look antipodal.
    perp = np.stack([-direction[:, 1], direction[:, 0]], 1)
    half_pad = cfg.finger_width_m / 4.0
    for sign in (1.0, -1.0):
        off = centre + ((s_r + s_l) / 2.0)[:, None] * direction + sign * half_pad * perp
        oxy = off[:, None, :] + s[None, :, None] * direction[:, None, :]
        ox, oy, oin = hmap.cell(oxy)
        osame = oin & (hmap.label[ox, oy] == lab[:, None])
        okr = np.argmin(osame[:, n_side:], axis=1)
        okl = np.argmin(osame[:, n_side::-1], axis=1)
        mid_s = (s_r - s_l) / 2.0
        o_r = (okr - 0.5) * step
        o_l = (okl - 0.5) * step
        slack = half_pad * cfg.friction_coef + step
        antipodal &= osame[:, n_side] & (np.abs(o_r - mid_s) <= slack) & (np.abs(o_l - mid_s) <= slack)

    k = np.flatnonzero(antipodal)
    if len(k) == 0:
        return CandidateSet.empty()
    centre, direction, theta, lab, mid, ang = centre[k], direction[k], theta[k], lab[k], mid[k], ang[k]
    s_r, s_l, width, same, jx, jy = s_r[k], s_l[k], width[k], same[k], jx[k], jy[k]
    z_edge = z_edge[k]
    fits = antipodal = np.ones(len(k), dtype=bool)

    # Grasp depth: fingertips finger_depth below the item's top between the contacts, and the pads'
    # centre at least jaw_edge_drop_m below the outline's height, so that on a round item (bottle or
    # tube lying down, ball) the pads reach past the widest point instead of squeezing the item from
    # above it, which pushes it out of the fingers as they lift. Never into the floor.
    between = same & (np.abs(s[None, :] - ((s_r + s_l) / 2.0)[:, None]) <= (width / 2.0)[:, None])
    z_top = np.where(between, hmap.height[jx, jy], -np.inf).max(axis=1)
    # The fingertips stop floor_clearance_m above the floor: touching the tote's floor is a collision.
    z_grasp = np.maximum(
        np.minimum(z_top - cfg.finger_depth_m, z_edge - cfg.jaw_edge_drop_m),
        cloud.floor_z + cfg.finger_pad_half_m + cfg.floor_clearance_m,
    )
    z_tip = z_grasp - cfg.finger_pad_half_m
    opening = np.minimum(cfg.max_opening_m, width + 2 * cfg.jaw_clearance_m)

    # Finger collision. The open fingers' footprints must be free of everything (this item included:
    # an open finger landing on the item is no grasp), and the strips they sweep while closing onto
    # the contacts must be free of everything else. Outside the tote is a wall: always a collision.
    across = np.linspace(-0.5, 0.5, 5) * cfg.finger_width_m
    perp = np.stack([-direction[:, 1], direction[:, 0]], 1)
    clearance = np.full(len(lab), np.inf)
    for sign in (1.0, -1.0):
        contact = width / 2.0 + 0.5 * step  # just outside the item, relative to the midpoint
        inner = opening / 2.0
        outer = opening / 2.0 + cfg.finger_thickness_m
        for a0, a1, ignore_item in ((contact, inner, True), (inner, outer, False)):
            a = sign * (a0[:, None] + (a1 - a0)[:, None] * np.linspace(0.0, 1.0, 4)[None, :])  # (M, 4)
            pts = (
                mid[:, None, None, :]
                + a[:, :, None, None] * direction[:, None, None, :]
                + across[None, None, :, None] * perp[:, None, None, :]
            )
            fx, fy, fin = hmap.cell(pts)
            h = np.where(fin, hmap.height[fx, fy], np.inf)
            if ignore_item:
                h = np.where(hmap.label[fx, fy] == lab[:, None, None], -np.inf, h)
            clearance = np.minimum(clearance, (z_tip[:, None, None] - h).min(axis=(1, 2)))
    free = clearance >= -cfg.collision_tol_m

    ok = fits & antipodal & free & np.isfinite(z_top)
    if not ok.any():
        return CandidateSet.empty()
    sel = np.flatnonzero(ok)
    # Near-duplicates (recentred lines converge): keep one per 3 mm x 3 mm x 11.25 deg cell.
    key = np.stack(
        [np.rint(mid[sel, 0] / 0.003), np.rint(mid[sel, 1] / 0.003), np.rint(theta[sel] / (np.pi / 16))], 1
    ).astype(np.int64)
    _, first = np.unique(key, axis=0, return_index=True)
    sel = sel[np.sort(first)]
    # The hand above the fingers: 20 cm long along the closing direction and only a few centimetres
    # above the fingertips, it is what hits a tote wall or a taller neighbour.
    pos = np.concatenate([mid[sel], z_grasp[sel, None]], axis=1)
    body = jaw_tool_clearance(hmap, float(cloud.bounds.hi[2]), cfg, pos, direction[sel])
    free_body = body >= -cfg.collision_tol_m
    if not free_body.any():
        return CandidateSet.empty()
    sel, pos, body = sel[free_body], pos[free_body], body[free_body]

    cent, ext, top = _item_geometry(cloud)
    lab_s = lab[sel]
    dist = np.linalg.norm(pos[:, :2] - cent[lab_s, :2], axis=1)
    contact_h = np.minimum(z_top[sel] - cloud.floor_z, cfg.finger_depth_m)
    s_fc = 1.0 - 0.5 * ang[sel] / cone
    s_clear = np.clip((clearance[sel] + cfg.collision_tol_m) / 0.01, 0.0, 1.0)
    s_depth = np.clip(contact_h / cfg.finger_depth_m, 0.0, 1.0)
    s_torque = 1.0 / (1.0 + (dist / cfg.torque_scale_m) ** 2)
    s_width = np.clip((cfg.max_opening_m - width[sel]) / 0.02, 0.0, 1.0) ** 0.5
    s_body = np.clip((body + cfg.collision_tol_m) / cfg.body_clearance_scale_m, 0.0, 1.0)
    score = s_fc * s_clear * s_depth * np.sqrt(s_torque) * s_width * s_body

    d3 = np.concatenate([direction[sel], np.zeros((len(sel), 1))], 1)
    z = np.broadcast_to(_DOWN, d3.shape)
    rot = np.stack([d3, np.cross(z, d3), z], axis=2)
    m = len(sel)
    feats = np.zeros((m, N_FEATURES), np.float32)
    feats[:, _F["analytic_score"]] = score
    feats[:, _F["centroid_dist_m"]] = dist
    feats[:, _F["cluster_extent_m"]] = ext[lab_s]
    feats[:, _F["cluster_height_m"]] = top[lab_s]
    feats[:, _F["jaw_width_m"]] = width[sel]
    feats[:, _F["antipodal_angle_rad"]] = ang[sel]
    feats[:, _F["finger_clearance_m"]] = np.minimum(clearance[sel], 0.02)
    feats[:, _F["height_above_floor_m"]] = pos[:, 2] - cloud.floor_z
    return CandidateSet(
        gripper=np.full(m, PARALLEL_JAW, np.int64),
        positions=pos,
        rotations=rot,
        widths=opening[sel],
        analytic=score,
        features=feats,
        cluster=lab_s.astype(np.int64),
    )


def _spread_order(score: np.ndarray, cluster: np.ndarray) -> np.ndarray:
    """Indices best first, each item's best before any item's second best (ties: lower index first)."""
    m = len(score)
    idx = np.arange(m)
    by_item = np.lexsort((idx, -score, cluster))  # item, then best first
    cl_sorted = cluster[by_item]
    rank = np.empty(m, np.int64)
    rank[by_item] = idx - np.searchsorted(cl_sorted, cl_sorted, side="left")
    return np.lexsort((idx, -score, rank))


def select_spread(cands: CandidateSet, n: int) -> CandidateSet:
    """The best `n` candidates, spread over items, sorted best first.

    Each item's best candidate comes before any item's second best (round robin by rank within
    the item), so one large item cannot take every slot.
    """
    if len(cands) == 0:
        return cands
    chosen = _spread_order(cands.analytic, cands.cluster)[:n]
    return cands.take(chosen[np.lexsort((chosen, -cands.analytic[chosen]))])
