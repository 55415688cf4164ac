"""The simulated cell: one PyBullet DIRECT client holding the arm, the tote, the outbound box and the camera.

Layout (robot base frame, z up, metres): the Panda's fixed base at the origin; the tote in front of
it (inside 0.35 x 0.5 x 0.1 m, long side across the robot, centre 0.5 m out) so that every corner of
its floor is inside the arm's top-down workspace; the outbound box to the robot's left (inside
0.36 x 0.28 x 0.15 m, centre 0.66 m from the tote centre); the camera 0.95 m above the tote floor,
looking straight down. The floor is a plane at z = 0, the tote and box floors rest on it.

Physics: 240 Hz, more solver iterations than the default (fewer slipping grasps, less jitter in
piles, per FIELD-NOTES), gravity -9.81 m/s^2. Everything that can be random is seeded from the
`seed` given to SimCell: the camera noise directly, the tote contents by the caller's generator.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import pybullet as p

from grasping.types import Bounds
from sim.config_sim_arm import SimArmConfig
from sim.config_sim_camera import SimCameraConfig
from sim.sim_arm import SimArm
from sim.sim_camera import SimCamera

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SceneConfig:
    """Where things are in the cell."""

    tote_center: tuple[float, float] = (0.5, 0.0)  # m, xy of the tote centre in the base frame
    tote_inner: tuple[float, float, float] = (0.35, 0.5, 0.1)  # m, inside length x, width y, depth z
    box_center: tuple[float, float] = (0.15, 0.55)  # m, xy of the outbound box centre
    box_inner: tuple[float, float, float] = (0.36, 0.28, 0.15)  # m, inside size of the outbound box
    wall: float = 0.01  # m, wall and floor thickness of tote and box
    floor_z: float = 0.0  # m, height of the floor the tote and box stand on (arm base on a pedestal above)
    physics_hz: float = 240.0  # Hz, simulation step rate
    solver_iterations: int = 50  # count, constraint solver iterations per step
    fixture_friction: float = 0.5  # unitless, tote/box/floor lateral friction
    # m: totes are filled so items rest at least this far from the walls (measured on the footprint).
    # The Panda's hand cannot reach items lying within about 3-8 cm of a 10 cm wall top-down, so items
    # that roll there are taken out and replaced by the filler. A limitation of the arm, stated here.
    fill_margin: float = 0.06
    arm: SimArmConfig = field(default_factory=SimArmConfig)
    camera: SimCameraConfig = field(default_factory=SimCameraConfig)


def _make_container(
    cid: int,
    center_xy: tuple[float, float],
    z0: float,
    inner: tuple[float, float, float],
    wall: float,
    rgba: list,
) -> int:
    """A static open box (floor + 4 walls) as one compound body; inner floor surface at z = wall."""
    lx, ly, lz = inner
    half_w = wall / 2
    parts = [  # (half extents, centre)
        ([lx / 2 + wall, ly / 2 + wall, half_w], [0, 0, half_w]),
        ([half_w, ly / 2 + wall, lz / 2], [lx / 2 + half_w, 0, wall + lz / 2]),
        ([half_w, ly / 2 + wall, lz / 2], [-lx / 2 - half_w, 0, wall + lz / 2]),
        ([lx / 2, half_w, lz / 2], [0, ly / 2 + half_w, wall + lz / 2]),
        ([lx / 2, half_w, lz / 2], [0, -ly / 2 - half_w, wall + lz / 2]),
    ]
    col = p.createCollisionShapeArray(
        [p.GEOM_BOX] * 5,
        halfExtents=[h for h, _ in parts],
        collisionFramePositions=[c for _, c in parts],
        physicsClientId=cid,
    )
    vis = p.createVisualShapeArray(
        [p.GEOM_BOX] * 5,
        halfExtents=[h for h, _ in parts],
        visualFramePositions=[c for _, c in parts],
        rgbaColors=[rgba] * 5,
        physicsClientId=cid,
    )
    return p.createMultiBody(
        0.0, col, vis, basePosition=[center_xy[0], center_xy[1], z0], physicsClientId=cid
    )


class SimCell:
    """A whole simulated cell. Use as a context manager, or call `close()`."""

    def __init__(self, seed: int = 0, config: SceneConfig | None = None, gui: bool = False) -> None:
        self.cfg = config or SceneConfig()
        self.seed = int(seed)
        c = self.cfg
        if gui and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            # pybullet's GUI client aborts the whole process without a display: refuse cleanly.
            raise RuntimeError("--gui needs a display (DISPLAY is not set); run without --gui")
        self.client_id = p.connect(p.GUI if gui else p.DIRECT)
        if self.client_id < 0:
            raise RuntimeError(
                "could not start a PyBullet client" + (" (no display for --gui?)" if gui else "")
            )
        cid = self.client_id
        p.resetSimulation(physicsClientId=cid)
        p.setGravity(0, 0, -9.81, physicsClientId=cid)
        p.setPhysicsEngineParameter(
            fixedTimeStep=1.0 / c.physics_hz, numSolverIterations=c.solver_iterations, physicsClientId=cid
        )
        plane = p.createCollisionShape(p.GEOM_PLANE, physicsClientId=cid)
        self.floor_id = p.createMultiBody(0.0, plane, basePosition=[0, 0, c.floor_z], physicsClientId=cid)
        self.tote_id = _make_container(
            cid, c.tote_center, c.floor_z, c.tote_inner, c.wall, [0.2, 0.45, 0.75, 1.0]
        )
        self.box_id = _make_container(
            cid, c.box_center, c.floor_z, c.box_inner, c.wall, [0.7, 0.55, 0.35, 1.0]
        )
        for b in (self.floor_id, self.tote_id, self.box_id):
            p.changeDynamics(b, -1, lateralFriction=c.fixture_friction, physicsClientId=cid)
        self.tote_bounds = self._inner_bounds(c.tote_center, c.tote_inner)
        self.box_bounds = self._inner_bounds(c.box_center, c.box_inner)
        fixtures = {self.floor_id: "floor", self.tote_id: "tote", self.box_id: "box"}
        arm_cfg = c.arm if c.arm.physics_hz == c.physics_hz else SimArmConfig(physics_hz=c.physics_hz)
        self.arm = SimArm(cid, fixtures, arm_cfg)
        self.camera = SimCamera(
            cid,
            np.array([c.tote_center[0], c.tote_center[1], c.floor_z]),
            c.camera,
            seed=self.seed,
            clock=lambda: self.arm.robot_time,
        )
        # What "out of the camera's view of the tote" means for the arm (look-ahead, arm/lookahead.py):
        # rays from the camera through a 12 x 12 grid over the outer edges of the tote's rims, down to
        # its floor level: together they fill the pyramid in which the camera sees the tote.
        lo, hi = self.tote_bounds.lo - c.wall, self.tote_bounds.hi + c.wall
        gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 12), np.linspace(lo[1], hi[1], 12))
        eye = self.camera.T_base_camera[:3, 3].copy()
        rim = np.stack([gx.ravel(), gy.ravel(), np.full(gx.size, self.tote_bounds.hi[2])], axis=1)
        floor_z = self.tote_bounds.lo[2]
        self.arm.tote_view = (eye, eye + (rim - eye) * ((eye[2] - floor_z) / (eye[2] - rim[:, 2:3])))
        self.items: dict[int, object] = {}  # body id -> ItemSpec (or a description for test bodies)

    def _inner_bounds(self, center: tuple[float, float], inner: tuple[float, float, float]) -> Bounds:
        z = self.cfg.floor_z + self.cfg.wall
        lo = np.array([center[0] - inner[0] / 2, center[1] - inner[1] / 2, z])
        hi = np.array([center[0] + inner[0] / 2, center[1] + inner[1] / 2, z + inner[2]])
        return Bounds(lo, hi)

    # --- items -----------------------------------------------------------------------------------
    def fill(self, catalog, n: int, rng: np.random.Generator) -> list:
        """Drop n catalog items into the tote (sim.tote.fill_tote); returns the SpawnedItems."""
        from sim.tote import fill_tote

        m = self.cfg.fill_margin
        b = self.tote_bounds
        region = Bounds(b.lo + np.array([m, m, 0.0]), b.hi - np.array([m, m, 0.0]))
        spawned = fill_tote(self.client_id, catalog, n, rng, region)
        for s in spawned:
            self.items[s.body_id] = s.spec
        return spawned

    def add_primitive(
        self,
        shape: str,
        size: tuple[float, ...],
        position: tuple[float, float, float],
        orientation: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 1.0),
        mass: float = 0.2,
        friction: float = 0.6,
        name: str = "",
    ) -> int:
        """Add a box (half extents), cylinder (radius, height) or sphere (radius); returns the body id."""
        cid = self.client_id
        if shape == "box":
            col = p.createCollisionShape(p.GEOM_BOX, halfExtents=list(size), physicsClientId=cid)
            vis = p.createVisualShape(p.GEOM_BOX, halfExtents=list(size), physicsClientId=cid)
        elif shape == "cylinder":
            col = p.createCollisionShape(p.GEOM_CYLINDER, radius=size[0], height=size[1], physicsClientId=cid)
            vis = p.createVisualShape(p.GEOM_CYLINDER, radius=size[0], length=size[1], physicsClientId=cid)
        elif shape == "sphere":
            col = p.createCollisionShape(p.GEOM_SPHERE, radius=size[0], physicsClientId=cid)
            vis = p.createVisualShape(p.GEOM_SPHERE, radius=size[0], physicsClientId=cid)
        else:
            raise ValueError(f"unknown primitive {shape!r}; expected box, cylinder or sphere")
        body = p.createMultiBody(
            mass,
            col,
            vis,
            basePosition=list(position),
            baseOrientation=list(orientation),
            physicsClientId=cid,
        )
        p.changeDynamics(
            body,
            -1,
            lateralFriction=friction,
            rollingFriction=1e-4,
            spinningFriction=1e-3,
            physicsClientId=cid,
        )
        self.items[body] = name or f"{shape}-{body}"
        return body

    def add_item(self, spec, position: tuple[float, float, float] | None = None) -> int:
        """Add one catalog item (ItemSpec) upright at `position` (m, base frame of its URDF; None: in the
        middle of the tote, resting on its floor), let it settle 0.5 s; returns the body id."""
        from sim.tote import spawn_item

        if position is None:
            b = self.tote_bounds
            lift = spec.extents[2] / 2 + 0.003  # m: just above the floor, so it drops onto it
            position = ((b.lo[0] + b.hi[0]) / 2, (b.lo[1] + b.hi[1]) / 2, b.lo[2] + lift)
        body = spawn_item(self.client_id, spec, position, (0.0, 0.0, 0.0, 1.0))
        self.items[body] = spec
        self.settle(0.5)
        return body

    def remove_item(self, body: int) -> None:
        p.removeBody(body, physicsClientId=self.client_id)
        self.items.pop(body, None)

    def settle(self, seconds: float = 0.5) -> None:
        for _ in range(int(seconds * self.cfg.physics_hz)):
            p.stepSimulation(physicsClientId=self.client_id)

    def item_pose(self, body: int) -> tuple[np.ndarray, np.ndarray]:
        pos, orn = p.getBasePositionAndOrientation(body, physicsClientId=self.client_id)
        return np.array(pos), np.array(orn)

    def _centres(self) -> dict[int, np.ndarray]:
        out = {}
        for b in self.items:
            lo, hi = p.getAABB(b, physicsClientId=self.client_id)
            out[b] = (np.array(lo) + np.array(hi)) / 2
        return out

    def items_in(self, bounds: Bounds) -> list[int]:
        """Items whose bounding-box centre lies inside `bounds` (xy footprint, above its floor - 1 cm)."""
        out = []
        for b, c in self._centres().items():
            if (
                bounds.lo[0] <= c[0] <= bounds.hi[0]
                and bounds.lo[1] <= c[1] <= bounds.hi[1]
                and bounds.lo[2] - 0.01 <= c[2]
            ):
                out.append(b)
        return out

    def items_in_tote(self) -> list[int]:
        return self.items_in(self.tote_bounds)

    def items_in_box(self) -> list[int]:
        return self.items_in(self.box_bounds)

    def close(self) -> None:
        if self.client_id >= 0:
            try:
                p.disconnect(physicsClientId=self.client_id)
            except p.error:
                pass
            self.client_id = -1

    def __enter__(self) -> SimCell:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
