"""The two tools on the simulated Panda: a suction cup and the parallel-jaw hand.

Both are links of the one arm body that sim/sim_arm.py loads (see `panda_urdf_path` there), so their
contacts are real PyBullet contacts. The physics of *holding* differs:

Suction (`SuctionGripper`)
    A 30 mm cup on a stem that slides out between the fingers, 8.4 cm past the fingertips for
    suction picks (so the hand stays above the tote rim when the cup reaches low items), and
    retracts flush with the palm for jaw picks (the layout of commercial combined suction/finger
    grippers). A seal is decided from the surface under the lip, sampled with rays
    around the rim and at the centre: every ray must hit the same body, the surface normals must be
    within `max_normal_angle_deg` of the cup axis, and every rim point must be within `max_rim_gap`
    of the lip plane (a bellows cup conforms a couple of millimetres, no more). Only then is the item
    attached with a fixed constraint. Load: the cup must resist the axial force m*(g + a_axial) and
    the tilting moment of the weight and inertial forces acting at the centre of mass, offset from the
    cup; `payload` returns the utilisation axial/F_rating + moment/M_rating, and the arm drops the item
    when it exceeds 1 (checked at grip, during the physical lift and at every sample of transport).
    When the seal holds but the load is too much at grip, the cup reports what a wrist force-torque
    sensor reads at that moment (`load_reading`): the weight, where the centre of mass lies from the
    cup (torque / force), and how far from it this cup could grip that weight (`cup_max_lever`).

Parallel jaw (`ParallelJawGripper`)
    The Panda's two fingers, coupled by a JOINT_GEAR constraint (PyBullet ignores URDF <mimic>),
    closed by position motors with a force limit (the grip force) so friction at real contact points
    holds the item. Holding = both fingers touch the same item. While the hand carries an item
    kinematically above the rims (see SimArm), friction is checked analytically instead:
    2 * mu * F_grip must exceed m * |g + a|.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pybullet as p

from grasping.types import GripperKind, quat_to_matrix
from sim.config_sim_arm import JawConfig, SuctionConfig

log = logging.getLogger(__name__)

GRAVITY = np.array([0.0, 0.0, -9.81])  # m/s^2
ARM_COLLISION_GROUP = 0x8  # collision-filter bit of the arm's links: rays mask it out
RAY_MASK = 0xFFFF ^ ARM_COLLISION_GROUP  # rays that see everything but the arm


@dataclass(frozen=True)
class SealResult:
    """What the rim rays found under the cup."""

    sealed: bool
    body_id: int  # body under the cup centre (-1: nothing)
    normal_angle_deg: float  # worst angle between a surface normal and the cup axis
    rim_gap_m: float  # worst distance of a rim point from the lip plane
    reason: str  # "ok" | "no_surface" | "mixed_bodies" | "normal" | "gap"


def seal_check(
    client_id: int,
    lip_center: np.ndarray,
    approach: np.ndarray,
    cfg: SuctionConfig,
    ray_mask: int = RAY_MASK,
) -> SealResult:
    """Sample the surface under a cup lip at `lip_center` looking along `approach` (unit, into the item).

    Rays start 2 cm behind the lip (outside the item) and look 2.5 cm + max gap ahead, so a surface
    that the lip touches is found even when the lip stopped a little short of or past it.
    """
    a = np.asarray(approach, dtype=np.float64)
    a = a / np.linalg.norm(a)
    helper = np.array([1.0, 0.0, 0.0]) if abs(a[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    u = np.cross(a, helper)
    u /= np.linalg.norm(u)
    v = np.cross(a, u)
    angles = np.linspace(0.0, 2 * np.pi, cfg.rim_rays, endpoint=False)
    offsets = [np.zeros(3)] + [cfg.cup_radius * (np.cos(t) * u + np.sin(t) * v) for t in angles]
    back, ahead = 0.02, 0.025 + cfg.max_rim_gap
    starts = [lip_center + o - a * back for o in offsets]
    ends = [lip_center + o + a * ahead for o in offsets]
    hits = p.rayTestBatch(starts, ends, collisionFilterMask=ray_mask, physicsClientId=client_id)
    bodies = [h[0] for h in hits]
    if any(b < 0 for b in bodies):
        return SealResult(False, bodies[0], 90.0, np.inf, "no_surface")
    if len(set(bodies)) > 1:
        return SealResult(False, bodies[0], 90.0, np.inf, "mixed_bodies")
    normals = np.array([h[4] for h in hits])
    cosines = np.clip(-(normals @ a), -1.0, 1.0)
    worst_angle = float(np.degrees(np.arccos(cosines.min())))
    # Distance of each hit along the approach from the lip plane through the centre hit: a flat
    # surface square to the cup gives equal depths; the spread is the gap the lip cannot bridge.
    depths = np.array([(np.asarray(h[3]) - lip_center) @ a for h in hits])
    gap = float(depths.max() - depths.min())
    if worst_angle > cfg.max_normal_angle_deg:
        return SealResult(False, bodies[0], worst_angle, gap, "normal")
    if gap > cfg.max_rim_gap:
        return SealResult(False, bodies[0], worst_angle, gap, "gap")
    return SealResult(True, bodies[0], worst_angle, gap, "ok")


def suction_utilisation(
    cfg: SuctionConfig,
    mass_kg: float,
    com_in_cup: np.ndarray,
    cup_R: np.ndarray,
    accel: np.ndarray | None = None,
) -> float:
    """Load on the cup as a fraction of its rating (> 1 means the seal lets go).

    `com_in_cup`: item centre of mass in the cup frame (z along the approach, into the item).
    `cup_R`: cup frame rotation in the base frame. `accel`: acceleration of the item (base frame).
    The effective force is m * (a - g): weight plus inertial load.
    """
    acc = np.zeros(3) if accel is None else np.asarray(accel, dtype=np.float64)
    f_base = mass_kg * (acc - GRAVITY)  # force the cup must exert on the item, base frame
    f_cup = cup_R.T @ f_base
    # The cup frame's z points into the item; holding it up means pulling it along -z (towards the
    # arm), which the vacuum must supply. Pushing it along +z (compression) costs no vacuum.
    axial = max(-float(f_cup[2]), 0.0)
    moment = float(np.linalg.norm(np.cross(np.asarray(com_in_cup, dtype=np.float64), f_cup)[:2]))
    return axial / cfg.vacuum_rating_n + moment / cfg.moment_rating_nm


def cup_max_lever(cfg: SuctionConfig, load_n: float) -> float:
    """Largest horizontal offset (metres) of a static load `load_n` (newtons) from a vertical cup
    that keeps the utilisation axial/F_rating + moment/M_rating <= 1; 0 when the weight alone is
    over the rating."""
    if load_n <= 0.0:
        return float("inf")
    spare = 1.0 - load_n / cfg.vacuum_rating_n
    return max(spare, 0.0) * cfg.moment_rating_nm / load_n


class SuctionGripper:
    """Suction cup on a slide. Implements arm.interfaces.Gripper."""

    kind: GripperKind = "suction"

    def __init__(
        self,
        client_id: int,
        arm_id: int,
        cup_link: int,
        slide_joint: int,
        config: SuctionConfig,
    ) -> None:
        self.client_id = client_id
        self.arm_id = arm_id
        self.cup_link = cup_link
        self.slide_joint = slide_joint
        self.cfg = config
        self.held_body: int | None = None
        self.constraint_id: int | None = None
        self.last_seal: SealResult | None = None
        info = p.getJointInfo(arm_id, slide_joint, physicsClientId=client_id)
        self.extended_position = float(info[9])  # upper limit of the slide
        self.extended = False

    # --- slide ---------------------------------------------------------------------------------
    def set_extended(self, extended: bool) -> None:
        """Move the slide; the motor then holds it (an actuator, not a physics experiment)."""
        q = self.extended_position if extended else 0.0
        p.resetJointState(self.arm_id, self.slide_joint, q, physicsClientId=self.client_id)
        p.setJointMotorControl2(
            self.arm_id,
            self.slide_joint,
            p.POSITION_CONTROL,
            targetPosition=q,
            force=500.0,
            physicsClientId=self.client_id,
        )
        self.extended = extended

    def cup_pose(self) -> tuple[np.ndarray, np.ndarray]:
        """(lip centre (3,), rotation (3, 3)) of the cup in the base frame; z = approach axis."""
        s = p.getLinkState(
            self.arm_id, self.cup_link, computeForwardKinematics=True, physicsClientId=self.client_id
        )
        return np.array(s[4]), quat_to_matrix(np.array(s[5]))

    # --- Gripper protocol ------------------------------------------------------------------------
    def grip(self) -> bool:
        """Vacuum on: seal if the surface under the lip allows it, then hold with a fixed constraint."""
        if self.held_body is not None:
            return True
        lip, R = self.cup_pose()
        self.last_seal = seal_check(self.client_id, lip, R[:, 2], self.cfg)
        if not self.last_seal.sealed:
            return False
        body = self.last_seal.body_id
        # Attach at the current relative pose so the item does not jump.
        pos_i, orn_i = p.getBasePositionAndOrientation(body, physicsClientId=self.client_id)
        s = p.getLinkState(self.arm_id, self.cup_link, physicsClientId=self.client_id)
        inv_pos, inv_orn = p.invertTransform(s[4], s[5])
        rel_pos, rel_orn = p.multiplyTransforms(inv_pos, inv_orn, pos_i, orn_i)
        # The link frame of cup_link is its URDF link frame; constraints use the inertial frame,
        # which our URDF puts at the link origin (see panda_urdf_path), so the two agree.
        self.constraint_id = p.createConstraint(
            self.arm_id,
            self.cup_link,
            body,
            -1,
            p.JOINT_FIXED,
            [0, 0, 0],
            parentFramePosition=rel_pos,
            childFramePosition=[0, 0, 0],
            parentFrameOrientation=rel_orn,
            childFrameOrientation=[0, 0, 0, 1],
            physicsClientId=self.client_id,
        )
        p.changeConstraint(self.constraint_id, maxForce=500.0, physicsClientId=self.client_id)
        self.held_body = body
        return True

    def release(self) -> None:
        if self.constraint_id is not None:
            p.removeConstraint(self.constraint_id, physicsClientId=self.client_id)
        self.constraint_id = None
        self.held_body = None

    def is_holding(self) -> bool:
        return self.held_body is not None

    def utilisation(self, accel: np.ndarray | None = None) -> float:
        """Load fraction of the held item right now (0 when nothing is held)."""
        if self.held_body is None:
            return 0.0
        lip, R = self.cup_pose()
        com, _ = p.getBasePositionAndOrientation(self.held_body, physicsClientId=self.client_id)
        mass = p.getDynamicsInfo(self.held_body, -1, physicsClientId=self.client_id)[0]
        com_in_cup = R.T @ (np.asarray(com) - lip)
        return suction_utilisation(self.cfg, mass, com_in_cup, R, accel)

    def load_reading(self) -> dict[str, object]:
        """What a wrist force-torque sensor says of the held item at rest: `load_n` (its weight,
        newtons), `com_offset_m` (the centre of mass's horizontal offset from the cup's lip centre,
        base frame x and y, metres: torque / force) and `max_lever_m` (`cup_max_lever` for that
        weight: a seal within this of the centre of mass holds it). Empty when nothing is held."""
        if self.held_body is None:
            return {}
        lip, _ = self.cup_pose()
        com, _ = p.getBasePositionAndOrientation(self.held_body, physicsClientId=self.client_id)
        mass = p.getDynamicsInfo(self.held_body, -1, physicsClientId=self.client_id)[0]
        load = float(mass * -GRAVITY[2])
        off = np.asarray(com, dtype=np.float64)[:2] - lip[:2]
        return {
            "load_n": round(load, 3),
            "com_offset_m": [round(float(v), 4) for v in off],
            "max_lever_m": round(cup_max_lever(self.cfg, load), 4),
        }


class ParallelJawGripper:
    """The Panda's two fingers. Implements arm.interfaces.Gripper.

    `step` advances the physics by one step (the arm owns the clock), so that closing and opening
    happen with real contacts.
    """

    kind: GripperKind = "parallel_jaw"

    def __init__(
        self,
        client_id: int,
        arm_id: int,
        finger_joints: tuple[int, int],
        config: JawConfig,
        step: Callable[[int], None],
        physics_hz: float,
    ) -> None:
        self.client_id = client_id
        self.arm_id = arm_id
        self.finger_joints = finger_joints
        self.cfg = config
        self._step = step
        self.physics_hz = physics_hz
        self.held_body: int | None = None
        for j in finger_joints:
            p.changeDynamics(arm_id, j, lateralFriction=config.finger_friction, physicsClientId=client_id)
        # Couple the fingers (PyBullet ignores <mimic>), as bullet3's panda grasp example does.
        c = p.createConstraint(
            arm_id,
            finger_joints[0],
            arm_id,
            finger_joints[1],
            jointType=p.JOINT_GEAR,
            jointAxis=[1, 0, 0],
            parentFramePosition=[0, 0, 0],
            childFramePosition=[0, 0, 0],
            physicsClientId=client_id,
        )
        p.changeConstraint(c, gearRatio=-1, erp=0.1, maxForce=50, physicsClientId=client_id)

    def width(self) -> float:
        """Current opening between the fingers (m)."""
        return float(
            sum(
                p.getJointState(self.arm_id, j, physicsClientId=self.client_id)[0] for j in self.finger_joints
            )
        )

    def set_opening(self, width: float, instant: bool = False) -> None:
        """Command an opening (m). `instant` resets the joints (used only when nothing is near)."""
        half = float(np.clip(width, 0.0, self.cfg.max_opening)) / 2.0
        for j in self.finger_joints:
            if instant:
                p.resetJointState(self.arm_id, j, half, physicsClientId=self.client_id)
            p.setJointMotorControl2(
                self.arm_id,
                j,
                p.POSITION_CONTROL,
                targetPosition=half,
                force=self.cfg.grip_force_n,
                maxVelocity=0.2,
                physicsClientId=self.client_id,
            )

    def touching(self) -> tuple[set[int], set[int]]:
        """Bodies each finger touches (from the last physics step's contacts)."""
        out = []
        for j in self.finger_joints:
            pts = p.getContactPoints(bodyA=self.arm_id, linkIndexA=j, physicsClientId=self.client_id)
            out.append({c[2] for c in pts if c[2] != self.arm_id})
        return out[0], out[1]

    def held_candidate(self) -> int | None:
        """The body both fingers touch, if any."""
        left, right = self.touching()
        common = sorted(left & right)
        return common[0] if common else None

    # --- Gripper protocol ------------------------------------------------------------------------
    def grip(self) -> bool:
        """Close with the set force for the actuation time, with physics; True if an item is held."""
        for j in self.finger_joints:
            p.setJointMotorControl2(
                self.arm_id,
                j,
                p.POSITION_CONTROL,
                targetPosition=0.0,
                force=self.cfg.grip_force_n,
                maxVelocity=0.2,
                physicsClientId=self.client_id,
            )
        self._step(int(round(self.cfg.actuation_s * self.physics_hz)))
        self.held_body = self.held_candidate()
        if self.width() < self.cfg.min_held_width:
            self.held_body = None
        return self.held_body is not None

    def release(self) -> None:
        """Open by `release_gap` beyond the current width (not fully: fingers near box walls)."""
        self.set_opening(min(self.width() + self.cfg.release_gap, self.cfg.max_opening))
        self._step(int(round(self.cfg.actuation_s * self.physics_hz)))
        self.held_body = None

    def is_holding(self) -> bool:
        if self.held_body is None:
            return False
        left, right = self.touching()
        return self.held_body in left and self.held_body in right

    def friction_ok(self, mass_kg: float, item_friction: float, accel: np.ndarray | None = None) -> bool:
        """Can two Coulomb contacts at the grip force carry m * |a - g|?

        PyBullet combines friction coefficients by multiplying them, so mu = finger * item.
        """
        acc = np.zeros(3) if accel is None else np.asarray(accel, dtype=np.float64)
        load = mass_kg * float(np.linalg.norm(acc - GRAVITY))
        mu = self.cfg.finger_friction * item_friction
        return 2.0 * mu * self.cfg.grip_force_n >= load
