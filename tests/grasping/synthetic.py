"""A small synthetic depth camera for testing the planner without the simulator.

Numpy ray casting of boxes, cylinders and spheres standing (or lying) on the floor of a tote, seen
by a pinhole camera about 0.9 m above looking straight down (640x480, OpenCV axes). It renders
what a real cell's camera delivers: metric depth along the optical axis (NaN where a ray hits
nothing), an RGB image, K and T_base_camera. Optional Gaussian depth noise and missing pixels
(NaN or 0) model the sensor's defects. Every random choice comes from a seeded Generator.

Base frame: z up, tote floor at z = 0, tote inner volume TOTE_LO..TOTE_HI.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from grasping.types import Bounds, Frame

TOTE_LO = np.array([-0.30, -0.20, 0.0])  # metres, inner floor corner
TOTE_HI = np.array([0.30, 0.20, 0.20])  # metres, inner rim corner
TOTE = Bounds(TOTE_LO, TOTE_HI)
WALL_THICKNESS = 0.01  # metres
TABLE_Z = -0.02  # metres: the table the tote stands on (outside the tote)


def default_camera(
    width: int = 640, height: int = 480, height_m: float = 0.9
) -> tuple[np.ndarray, np.ndarray]:
    """(K, T_base_camera): a camera `height_m` above the tote centre looking straight down."""
    f = 550.0 * width / 640.0  # pixels; 640 px wide covers about 1.05 m at 0.9 m
    K = np.array([[f, 0.0, (width - 1) / 2.0], [0.0, f, (height - 1) / 2.0], [0.0, 0.0, 1.0]])
    T = np.eye(4)
    # OpenCV camera: x right, y down, z forward. Looking down: z_cam = -z_base, x_cam = +x_base.
    T[:3, :3] = np.array([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]])
    T[:3, 3] = [0.0, 0.0, height_m]
    return K, T


def rot_z(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def rot_x(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


@dataclass(frozen=True)
class Box:
    centre: np.ndarray  # (3,) metres, base frame
    size: np.ndarray  # (3,) metres, full extents along the box's own axes
    R: np.ndarray = field(default_factory=lambda: np.eye(3))  # box axes in base frame
    color: tuple[int, int, int] = (200, 120, 60)


@dataclass(frozen=True)
class Cylinder:
    centre: np.ndarray  # (3,) metres
    radius: float  # metres
    length: float  # metres, along the cylinder's own z axis
    R: np.ndarray = field(default_factory=lambda: np.eye(3))  # column 2 = cylinder axis
    color: tuple[int, int, int] = (60, 160, 200)


@dataclass(frozen=True)
class Sphere:
    centre: np.ndarray  # (3,) metres
    radius: float  # metres
    color: tuple[int, int, int] = (90, 200, 90)


Shape = Box | Cylinder | Sphere


def box_on_floor(x: float, y: float, sx: float, sy: float, sz: float, yaw: float = 0.0, **kw) -> Box:
    return Box(np.array([x, y, sz / 2.0]), np.array([sx, sy, sz]), rot_z(yaw), **kw)


def standing_cylinder(x: float, y: float, radius: float, length: float, **kw) -> Cylinder:
    return Cylinder(np.array([x, y, length / 2.0]), radius, length, np.eye(3), **kw)


def lying_cylinder(x: float, y: float, radius: float, length: float, yaw: float = 0.0, **kw) -> Cylinder:
    # Axis horizontal along the yawed x direction.
    R = rot_z(yaw) @ np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])
    return Cylinder(np.array([x, y, radius]), radius, length, R, **kw)


def sphere_on_floor(x: float, y: float, radius: float, **kw) -> Sphere:
    return Sphere(np.array([x, y, radius]), radius, **kw)


def _intersect_box(
    o: np.ndarray, d: np.ndarray, c: np.ndarray, half: np.ndarray, R: np.ndarray
) -> np.ndarray:
    """Ray parameter t of the first hit with an oriented box (inf where missed). o (3,), d (N, 3)."""
    o_l = R.T @ (o - c)
    d_l = d @ R  # (N, 3) = (R.T @ d.T).T
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / d_l
        t1 = (-half - o_l) * inv
        t2 = (half - o_l) * inv
    tmin = np.nanmax(np.minimum(t1, t2), axis=1)
    tmax = np.nanmin(np.maximum(t1, t2), axis=1)
    hit = (tmax >= tmin) & (tmax > 0)
    t = np.where(tmin > 0, tmin, tmax)
    return np.where(hit, t, np.inf)


def _intersect_sphere(o: np.ndarray, d: np.ndarray, c: np.ndarray, r: float) -> np.ndarray:
    oc = o - c
    a = np.einsum("ij,ij->i", d, d)
    b = 2.0 * d @ oc
    cc = oc @ oc - r * r
    disc = b * b - 4 * a * cc
    ok = disc >= 0
    sq = np.sqrt(np.where(ok, disc, 0.0))
    t = (-b - sq) / (2 * a)
    return np.where(ok & (t > 0), t, np.inf)


def _intersect_cylinder(o: np.ndarray, d: np.ndarray, cyl: Cylinder) -> np.ndarray:
    o_l = cyl.R.T @ (o - cyl.centre)
    d_l = d @ cyl.R
    r, hl = cyl.radius, cyl.length / 2.0
    # Side: x^2 + y^2 = r^2 with |z| <= hl.
    a = d_l[:, 0] ** 2 + d_l[:, 1] ** 2
    b = 2 * (o_l[0] * d_l[:, 0] + o_l[1] * d_l[:, 1])
    cc = o_l[0] ** 2 + o_l[1] ** 2 - r * r
    disc = b * b - 4 * a * cc
    ok = (disc >= 0) & (a > 1e-12)
    sq = np.sqrt(np.where(ok, disc, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        t_side = (-b - sq) / (2 * a)
    z_side = o_l[2] + t_side * d_l[:, 2]
    t_side = np.where(ok & (t_side > 0) & (np.abs(z_side) <= hl), t_side, np.inf)
    # Caps: z = +-hl with x^2 + y^2 <= r^2.
    best = t_side
    for zc in (-hl, hl):
        with np.errstate(divide="ignore", invalid="ignore"):
            t_cap = (zc - o_l[2]) / d_l[:, 2]
        x = o_l[0] + t_cap * d_l[:, 0]
        y = o_l[1] + t_cap * d_l[:, 1]
        t_cap = np.where((t_cap > 0) & (x * x + y * y <= r * r), t_cap, np.inf)
        best = np.minimum(best, t_cap)
    return best


def _tote_shapes(lo: np.ndarray, hi: np.ndarray) -> list[Box]:
    """The tote's floor, four walls and the table around it, as boxes."""
    t = WALL_THICKNESS
    size = hi - lo
    mid = (hi + lo) / 2.0
    wall_h = hi[2] - lo[2]
    grey = (110, 110, 120)
    shapes = [
        Box(
            np.array([mid[0], mid[1], lo[2] - t / 2]),
            np.array([size[0] + 2 * t, size[1] + 2 * t, t]),
            color=grey,
        ),
        Box(
            np.array([lo[0] - t / 2, mid[1], lo[2] + wall_h / 2]),
            np.array([t, size[1] + 2 * t, wall_h]),
            color=grey,
        ),
        Box(
            np.array([hi[0] + t / 2, mid[1], lo[2] + wall_h / 2]),
            np.array([t, size[1] + 2 * t, wall_h]),
            color=grey,
        ),
        Box(
            np.array([mid[0], lo[1] - t / 2, lo[2] + wall_h / 2]), np.array([size[0], t, wall_h]), color=grey
        ),
        Box(
            np.array([mid[0], hi[1] + t / 2, lo[2] + wall_h / 2]), np.array([size[0], t, wall_h]), color=grey
        ),
        Box(np.array([0.0, 0.0, TABLE_Z - 0.01]), np.array([3.0, 3.0, 0.02]), color=(70, 60, 50)),
    ]
    return shapes


def render(
    shapes: list[Shape],
    *,
    width: int = 640,
    height: int = 480,
    camera_height_m: float = 0.9,
    noise_sigma_m: float = 0.0,
    nan_fraction: float = 0.0,
    zero_fraction: float = 0.0,
    seed: int = 0,
    tote_lo: np.ndarray = TOTE_LO,
    tote_hi: np.ndarray = TOTE_HI,
    frame_id: str = "synthetic",
) -> Frame:
    """Ray-cast the items plus the tote into a Frame.

    Missing pixels: NaN (`nan_fraction`) or 0 (`zero_fraction`).
    """
    K, T = default_camera(width, height, camera_height_m)
    vv, uu = np.mgrid[0:height, 0:width]
    d_cam = np.stack([(uu - K[0, 2]) / K[0, 0], (vv - K[1, 2]) / K[1, 1], np.ones_like(uu, float)], -1)
    d_cam = d_cam.reshape(-1, 3)
    d_base = d_cam @ T[:3, :3].T  # z_cam component is 1, so t along it is the depth
    o = T[:3, 3]
    all_shapes: list[Shape] = list(shapes) + _tote_shapes(np.asarray(tote_lo), np.asarray(tote_hi))
    depth = np.full(d_cam.shape[0], np.inf)
    colour_idx = np.full(d_cam.shape[0], -1)
    for i, s in enumerate(all_shapes):
        if isinstance(s, Box):
            t = _intersect_box(o, d_base, np.asarray(s.centre), np.asarray(s.size) / 2.0, np.asarray(s.R))
        elif isinstance(s, Sphere):
            t = _intersect_sphere(o, d_base, np.asarray(s.centre), s.radius)
        else:
            t = _intersect_cylinder(o, d_base, s)
        closer = t < depth
        depth[closer] = t[closer]
        colour_idx[closer] = i
    colours = np.array([s.color for s in all_shapes] + [(0, 0, 0)], dtype=np.float64)
    rgb = colours[colour_idx]  # index -1 -> black background
    # Shade by depth so item tops are brighter than the floor: easier to read in pictures.
    finite = np.isfinite(depth)
    shade = np.ones_like(depth)
    shade[finite] = np.clip(1.3 - 0.4 * depth[finite] / camera_height_m, 0.6, 1.2)
    rgb = np.clip(rgb * shade[:, None], 0, 255).astype(np.uint8).reshape(height, width, 3)
    depth = depth.reshape(height, width)
    depth[~np.isfinite(depth)] = np.nan
    rng = np.random.default_rng(seed)
    if noise_sigma_m > 0:
        depth = depth + rng.normal(0.0, noise_sigma_m, depth.shape)
    if nan_fraction > 0:
        depth[rng.random(depth.shape) < nan_fraction] = np.nan
    if zero_fraction > 0:
        depth[rng.random(depth.shape) < zero_fraction] = 0.0
    return Frame(depth=depth.astype(np.float32), rgb=rgb, K=K, T_base_camera=T, frame_id=frame_id)


def random_scene(seed: int, n_items: int | None = None, margin: float = 0.02) -> list[Shape]:
    """8-15 non-overlapping random items (boxes, cylinders, spheres) in the tote, from a seed."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(8, 16)) if n_items is None else n_items
    shapes: list[Shape] = []
    placed: list[tuple[float, float, float]] = []  # x, y, footprint radius
    palette = [(200, 120, 60), (60, 160, 200), (90, 200, 90), (210, 200, 70), (180, 80, 160), (230, 230, 230)]
    attempts = 0
    while len(shapes) < n and attempts < 2000:
        attempts += 1
        kind = rng.choice(["box", "box", "cyl_stand", "cyl_lying", "sphere"])
        colour = palette[int(rng.integers(len(palette)))]
        if kind == "box":
            sx, sy, sz = rng.uniform(0.03, 0.12), rng.uniform(0.03, 0.09), rng.uniform(0.02, 0.10)
            r = 0.5 * np.hypot(sx, sy)
        elif kind == "cyl_stand":
            rad, length = rng.uniform(0.02, 0.045), rng.uniform(0.04, 0.14)
            r = rad
        elif kind == "cyl_lying":
            rad, length = rng.uniform(0.015, 0.035), rng.uniform(0.06, 0.15)
            r = 0.5 * np.hypot(length, 2 * rad)
        else:
            rad = rng.uniform(0.02, 0.045)
            r = rad
        x = rng.uniform(TOTE_LO[0] + r + margin, TOTE_HI[0] - r - margin)
        y = rng.uniform(TOTE_LO[1] + r + margin, TOTE_HI[1] - r - margin)
        if any(np.hypot(x - px, y - py) < r + pr + margin for px, py, pr in placed):
            continue
        yaw = rng.uniform(0, np.pi)
        if kind == "box":
            shapes.append(box_on_floor(x, y, sx, sy, sz, yaw, color=colour))
        elif kind == "cyl_stand":
            shapes.append(standing_cylinder(x, y, rad, length, color=colour))
        elif kind == "cyl_lying":
            shapes.append(lying_cylinder(x, y, rad, length, yaw, color=colour))
        else:
            shapes.append(sphere_on_floor(x, y, rad, color=colour))
        placed.append((x, y, r))
    return shapes
