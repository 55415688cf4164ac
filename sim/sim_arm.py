"""The simulated arm: a Franka Panda from pybullet_data with a suction cup added, in PyBullet DIRECT.

Implements `arm.interfaces.Arm`. Failures are `Outcome` reasons, never exceptions.

Tools (see sim/grippers.py): the Panda hand with its two fingers (parallel jaw, TCP
`panda_grasptarget`, 10.5 cm below the hand) and a 30 mm suction cup on a prismatic slide between the
fingers (TCP `suction_tcp`, the extended lip, 20 cm below the hand). The URDF is the stock one with
those two links appended and mesh paths made absolute (`panda_urdf_path`).

How motions are executed, and why it stays honest:
- Every motion is charged robot time from sim/motion.py (joint velocity and acceleration limits,
  tool speeds on straight lines, gripper actuation times); physics-step time is never used as the
  clock, and in the physical phases the number of steps *is* the robot time (1 step = 1/physics_hz).
- Contact phases run real physics with the joints driven by position motors that have the Panda's
  velocity limits and torque limits: the straight-line approach (pre-grasp to grasp), the grip, the
  first `PHYSICAL_LIFT` metres of the lift, and the release plus the item's fall and settling.
- Free-space phases (transit between tote and box, the rest of the lift, the descent to pre-grasp,
  lowering into the box) are executed kinematically: the joints are set along the timed trajectory
  every `transit_check_dt` seconds and the held item is carried at its grasp pose. At every sample the
  arm and the held item are checked for contact with fixtures and other items (-> COLLISION) and
  the grip is checked against the load the motion puts on it: the suction cup's seal utilisation
  from weight, inertial force and the moment of the centre-of-mass offset, the jaw's friction
  (-> DROPPED, after which the item falls with physics). This trades the jitter of a tracked
  trajectory for speed; nothing the gripper could fail at in transit goes unchecked.
- Carrying is payload-aware, as industrial controllers are: joint moves slow down until the sampled
  grip load stays under `CARRY_UTILISATION`, and a suction lift (or the lowering into the box) uses
  the acceleration that keeps the cup's load under it, from the static load read after the seal
  (on a real cell: the vacuum level or a wrist force-torque sensor). `Outcome.details` records the
  static utilisation and the lift acceleration used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pybullet as p
import pybullet_data

from grasping.types import Grasp, Outcome, Placement, Reason, matrix_to_quat, quat_to_matrix
from sim.config_sim_arm import SimArmConfig
from sim.grippers import ARM_COLLISION_GROUP, ParallelJawGripper, SuctionGripper
from sim.motion import PANDA_MAX_VELOCITY as _VMAX
from sim.motion import JointMove, cartesian_move_time, plan_joint_move, trapezoid_fraction, trapezoid_time

log = logging.getLogger(__name__)

SHOULDER = np.array([0.0, 0.0, 0.333])  # m, joint 2 axis in the base frame
FINGER_ITEM_TOLERANCE = 0.008  # m, overlap of a finger with a neighbour item that check_grasp accepts
HAND_ITEM_TOLERANCE = 0.003  # m, same for the other links
FIXTURE_MARGIN = 0.005  # m, clearance from tote/box that check_grasp demands (physical tracking error)
HELD_ITEM_TOLERANCE = 0.006  # m, overlap of a carried item with anything that is not yet a collision
PHYSICAL_LIFT = 0.05  # m, lift simulated with full physics before the kinematic part
CARRY_UTILISATION = 0.9  # unitless, grip load a payload-aware move keeps under (lift and transit)
MIN_LIFT_ACCEL = 0.2  # m/s^2, slowest lift acceleration (a 5 cm lift then takes about 1 s)
# Hand axes expressed in the grasp frame: the Panda fingers close along the hand's y axis while a
# Grasp closes along its x axis, approach (z) is shared.
M_GRASP_HAND = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])

# The cup link: a 30 mm bellows cup (3 cm tall) on a 16 mm stem. Its frame is the lip centre.
# Extended, the lip sits SUCTION_TCP_OFFSET below the hand, 8.4 cm past the fingertips (a long
# suction tool keeps the hand above the tote rim for low items); retracted (slide at 0) the lip
# is flush with the palm and the stem telescopes into the hand.
SUCTION_TCP_OFFSET = 0.20  # m, hand frame origin to the extended cup lip
JAW_TCP_OFFSET = 0.105  # m, hand frame origin to panda_grasptarget (between the finger pads)
_SLIDE_ORIGIN = 0.058  # m, slide origin below the hand (palm surface)
_SUCTION_LINKS = """
  <link name="suction_cup">
    <inertial><origin rpy="0 0 0" xyz="0 0 0"/><mass value="0.08"/>
      <inertia ixx="1e-4" ixy="0" ixz="0" iyy="1e-4" iyz="0" izz="1e-5"/></inertial>
    <visual><origin rpy="0 0 0" xyz="0 0 -0.015"/><geometry><cylinder length="0.03" radius="{r}"/></geometry>
      <material name="cup_blue"><color rgba="0.15 0.3 0.8 1"/></material></visual>
    <visual><origin rpy="0 0 0" xyz="0 0 -{stem_mid}"/><geometry><cylinder length="{stem}" radius="0.008"/>
      </geometry><material name="stem_grey"><color rgba="0.6 0.6 0.6 1"/></material></visual>
    <collision><origin rpy="0 0 0" xyz="0 0 -0.015"/>
      <geometry><cylinder length="0.03" radius="{r}"/></geometry></collision>
    <collision><origin rpy="0 0 0" xyz="0 0 -{stem_mid}"/>
      <geometry><cylinder length="{stem}" radius="0.008"/></geometry></collision>
  </link>
  <joint name="suction_slide" type="prismatic">
    <parent link="panda_hand"/><child link="suction_cup"/>
    <origin rpy="0 0 0" xyz="0 0 {slide0}"/><axis xyz="0 0 1"/>
    <limit effort="100" lower="0.0" upper="{travel}" velocity="0.5"/>
  </joint>
  <link name="suction_tcp">
    <inertial><origin rpy="0 0 0" xyz="0 0 0"/><mass value="0.0"/>
      <inertia ixx="0.1" ixy="0" ixz="0" iyy="0.1" iyz="0" izz="0.1"/></inertial>
  </link>
  <joint name="suction_tcp_joint" type="fixed">
    <parent link="panda_hand"/><child link="suction_tcp"/><origin rpy="0 0 0" xyz="0 0 {tcp}"/>
  </joint>
</robot>
"""


def panda_urdf_path(cup_radius: float = 0.015) -> str:
    """Write (once) the stock Panda URDF plus the suction links, with absolute mesh paths."""
    data = Path(pybullet_data.getDataPath()) / "franka_panda"
    text = (data / "panda.urdf").read_text()
    text = text.replace("package://meshes/", f"{data}/meshes/")
    travel = SUCTION_TCP_OFFSET - _SLIDE_ORIGIN
    stem = travel - 0.03  # from the top of the cup up to the palm when extended
    links = _SUCTION_LINKS.format(
        r=cup_radius,
        stem=stem,
        stem_mid=0.03 + stem / 2,
        slide0=_SLIDE_ORIGIN,
        travel=travel,
        tcp=SUCTION_TCP_OFFSET,
    )
    text = text.replace("</robot>", links)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    out = Path(tempfile.gettempdir()) / f"pickcell-panda-{digest}.urdf"
    if not out.exists():
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, out)  # atomic: parallel processes never read a half-written file
    return str(out)


def _angle_deg(Ra: np.ndarray, Rb: np.ndarray) -> float:
    c = (np.trace(Ra.T @ Rb) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


def _rot_z(theta: float) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


class _Abort(Exception):
    """Internal: a motion ended early with an Outcome reason (never escapes SimArm)."""

    def __init__(self, reason: Reason, **details: object) -> None:
        super().__init__(reason.value)
        self.reason = reason
        self.details = dict(details)


class SimArm:
    """The simulated Panda with a suction cup and a parallel-jaw hand. Implements arm.interfaces.Arm.

    `fixtures` maps body ids of static scene parts to names ("tote", "box", "floor"); every other
    body that is not the arm is an item.
    """

    def __init__(
        self,
        client_id: int,
        fixtures: dict[int, str],
        config: SimArmConfig | None = None,
    ) -> None:
        self.client_id = client_id
        self.cfg = config or SimArmConfig()
        self.fixtures = dict(fixtures)
        cid = client_id
        self.body = p.loadURDF(
            panda_urdf_path(self.cfg.suction.cup_radius),
            basePosition=[0, 0, 0],
            useFixedBase=True,
            flags=p.URDF_USE_INERTIA_FROM_FILE,
            physicsClientId=cid,
        )
        names = {}
        for j in range(p.getNumJoints(self.body, physicsClientId=cid)):
            info = p.getJointInfo(self.body, j, physicsClientId=cid)
            names[info[12].decode()] = j
            names[info[1].decode()] = j
            p.setCollisionFilterGroupMask(self.body, j, ARM_COLLISION_GROUP, 0xFFFF, physicsClientId=cid)
        p.setCollisionFilterGroupMask(self.body, -1, ARM_COLLISION_GROUP, 0xFFFF, physicsClientId=cid)
        for b, name in self.fixtures.items():
            if name == "floor":  # the base is bolted to the floor: that contact is not a collision
                p.setCollisionFilterPair(self.body, b, -1, -1, 0, physicsClientId=cid)
        self.arm_joints = list(range(7))
        self.hand_link = names["panda_hand"]
        self.finger_joints = (names["panda_finger_joint1"], names["panda_finger_joint2"])
        self.jaw_tcp = names["panda_grasptarget"]
        self.cup_link = names["suction_cup"]
        self.suction_tcp = names["suction_tcp"]
        self.slide_joint = names["suction_slide"]
        lims = [p.getJointInfo(self.body, j, physicsClientId=cid)[8:10] for j in self.arm_joints]
        self.q_lo = np.array([lo for lo, _ in lims])
        self.q_hi = np.array([hi for _, hi in lims])
        self.suction = SuctionGripper(cid, self.body, self.cup_link, self.slide_joint, self.cfg.suction)
        self.jaw = ParallelJawGripper(
            cid, self.body, self.finger_joints, self.cfg.jaw, self._step, self.cfg.physics_hz
        )
        self._time = 0.0
        self._stopped = False
        self._stop_cause, self._stop_triggered_at, self._stop_halted = "command", 0.0, True
        self.safety_zone = None  # sim.safety.SafetyZone, checked at every motion sample
        self.stop_events: list = []  # sim.safety.StopEvent per protective stop
        self.max_impact_n = 0.0  # largest arm-on-item contact force in the current pick, newtons
        self._impact_avg = 0.0  # running average of that force over ~20 ms, newtons
        self._held: int | None = None
        self._held_kind: str | None = None
        self._T_tcp_item: tuple | None = None  # held item pose in the carrying TCP frame
        self._set_q(self.cfg.home)
        self.jaw.set_opening(self.cfg.jaw.max_opening, instant=True)
        self.suction.set_extended(False)

    # --- Arm protocol: clock and stops -----------------------------------------------------------
    @property
    def robot_time(self) -> float:
        return self._time

    def stop(self) -> None:
        """Protective stop: the current motion ends with ESTOP at its next sample; motions refuse."""
        if not self._stopped:
            self._stop_cause, self._stop_triggered_at, self._stop_halted = "command", self._time, False
        self._stopped = True

    def clear_stop(self) -> None:
        self._stopped = False

    @property
    def stopped(self) -> bool:
        self._check_stop()
        return self._stopped

    def set_safety_zone(self, zone) -> None:
        """Guard the cell with a `sim.safety.SafetyZone` (a person entering halts the arm)."""
        self.safety_zone = zone

    def _check_stop(self) -> bool:
        """Poll the safety zone at the current robot time; True when the arm must not move."""
        zone = self.safety_zone
        if zone is not None:
            entered = zone.entered_at(self._time)
            if entered is not None and not self._stopped:
                self._stopped = True
                self._stop_cause, self._stop_triggered_at, self._stop_halted = "zone", entered, False
            elif entered is None and self._stopped and self._stop_cause == "zone" and zone.auto_reset:
                self._stopped = False
        if self._stopped and not self._stop_halted:
            # Motions call this before every sample, so this is when the arm stands still.
            from sim.safety import StopEvent

            self._stop_halted = True
            self.stop_events.append(StopEvent(self._stop_cause, self._stop_triggered_at, self._time))
        return self._stopped

    def _estop(self) -> _Abort:
        ev = self.stop_events[-1] if self.stop_events else None
        if ev is None:
            return _Abort(Reason.ESTOP)
        return _Abort(
            Reason.ESTOP,
            cause=ev.cause,
            triggered_at=round(ev.triggered_at, 4),
            halted_at=round(ev.halted_at, 4),
        )

    def idle(self, seconds: float) -> None:
        """Hold still for `seconds` of robot time. Nothing moves, so no physics needs stepping."""
        if seconds < 0:
            raise ValueError(f"idle time must be >= 0, got {seconds}")
        self._time += float(seconds)

    @property
    def held_item(self) -> int | None:
        return self._held

    # --- low level --------------------------------------------------------------------------------
    def q(self) -> np.ndarray:
        return np.array(
            [s[0] for s in p.getJointStates(self.body, self.arm_joints, physicsClientId=self.client_id)]
        )

    def _set_q(self, q: np.ndarray) -> None:
        """Set the joints kinematically and make the motors hold there."""
        for j, v in zip(self.arm_joints, q, strict=True):
            p.resetJointState(self.body, j, float(v), 0.0, physicsClientId=self.client_id)
        self._command(q)

    def _command(self, q: np.ndarray, qd: np.ndarray | None = None) -> None:
        qd = np.zeros(7) if qd is None else qd
        for i, j in enumerate(self.arm_joints):
            p.setJointMotorControl2(
                self.body,
                j,
                p.POSITION_CONTROL,
                targetPosition=float(q[i]),
                targetVelocity=float(qd[i]),
                force=self.cfg.joint_forces[i],
                maxVelocity=float(_VMAX[i]),
                positionGain=0.3,
                velocityGain=1.0,
                physicsClientId=self.client_id,
            )

    def _step(self, n: int = 1) -> None:
        for _ in range(n):
            p.stepSimulation(physicsClientId=self.client_id)
        self._time += n / self.cfg.physics_hz

    def link_pose(self, link: int) -> tuple[np.ndarray, np.ndarray]:
        """(position (3,), rotation (3, 3)) of a link frame in the base frame, current joints."""
        s = p.getLinkState(self.body, link, computeForwardKinematics=True, physicsClientId=self.client_id)
        return np.array(s[4]), quat_to_matrix(np.array(s[5]))

    def tcp_link(self, gripper: str) -> int:
        return self.suction_tcp if gripper == "suction" else self.jaw_tcp

    def fk(self, q: np.ndarray, link: int) -> tuple[np.ndarray, np.ndarray]:
        """Forward kinematics at joints q (restores the current joints afterwards)."""
        q_now = self.q()
        for j, v in zip(self.arm_joints, q, strict=True):
            p.resetJointState(self.body, j, float(v), physicsClientId=self.client_id)
        out = self.link_pose(link)
        for j, v in zip(self.arm_joints, q_now, strict=True):
            p.resetJointState(self.body, j, float(v), physicsClientId=self.client_id)
        return out

    def ik(
        self, pos: np.ndarray, R_hand: np.ndarray, link: int, seed: np.ndarray
    ) -> tuple[np.ndarray | None, dict]:
        """Joint solution for `link` at (pos, R_hand), verified with forward kinematics.

        Returns (q, details); q is None when the solution misses the tolerance or a joint limit.
        """
        cid = self.client_id
        q_now = self.q()
        quat = matrix_to_quat(R_hand)
        q = np.asarray(seed, dtype=np.float64).copy()
        err_p, err_r = np.inf, 180.0
        for _ in range(4):  # re-seeding from the last answer refines pybullet's damped solver
            for j, v in zip(self.arm_joints, q, strict=True):
                p.resetJointState(self.body, j, float(v), physicsClientId=cid)
            sol = p.calculateInverseKinematics(
                self.body,
                link,
                list(pos),
                list(quat),
                maxNumIterations=self.cfg.ik_iterations,
                residualThreshold=1e-5,
                physicsClientId=cid,
            )
            q = np.clip(np.array(sol[:7]), self.q_lo, self.q_hi)
            for j, v in zip(self.arm_joints, q, strict=True):
                p.resetJointState(self.body, j, float(v), physicsClientId=cid)
            pos_fk, R_fk = self.link_pose(link)
            err_p = float(np.linalg.norm(pos_fk - pos))
            err_r = _angle_deg(R_fk, R_hand)
            if err_p < 0.2 * self.cfg.ik_pos_tol and err_r < 0.2 * self.cfg.ik_rot_tol_deg:
                break
        for j, v in zip(self.arm_joints, q_now, strict=True):
            p.resetJointState(self.body, j, float(v), physicsClientId=cid)
        details = {"ik_pos_err_m": err_p, "ik_rot_err_deg": err_r}
        # Written so that a NaN error (a solver blow-up) fails the test instead of passing it.
        if not (err_p <= self.cfg.ik_pos_tol and err_r <= self.cfg.ik_rot_tol_deg):
            return None, details
        return q, details

    def _reachable(self, pos: np.ndarray, R_hand: np.ndarray, link: int) -> bool:
        offset = SUCTION_TCP_OFFSET if link == self.suction_tcp else JAW_TCP_OFFSET
        flange = pos - R_hand[:, 2] * offset
        return float(np.linalg.norm(flange - SHOULDER)) <= self.cfg.reach_radius

    def _solve(self, pos: np.ndarray, R_hand: np.ndarray, link: int, seed: np.ndarray) -> np.ndarray:
        if not self._reachable(pos, R_hand, link):
            raise _Abort(Reason.UNREACHABLE, target=np.round(pos, 4).tolist())
        # pybullet's damped least squares can stall from a poor seed: retry from a canonical
        # elbow-up posture over the target before calling it an IK failure.
        q, d = self.ik(pos, R_hand, link, seed)
        if q is None:
            q, d = self.ik(pos, R_hand, link, self._seed_over(pos))
        if q is None:
            q, d = self.ik(pos, R_hand, link, self.cfg.home)
        if q is None:
            raise _Abort(Reason.IK_FAILED, target=np.round(pos, 4).tolist(), **d)
        return q

    # --- contact checks ------------------------------------------------------------------------------
    def _items(self) -> list[int]:
        cid = self.client_id
        n = p.getNumBodies(physicsClientId=cid)
        ids = [p.getBodyUniqueId(i, physicsClientId=cid) for i in range(n)]
        return [b for b in ids if b != self.body and b not in self.fixtures]

    def _kinematic_contacts(
        self, ignore: Sequence[int] = (), fixtures_only: bool = False, item_tolerance: bool = False
    ) -> list[tuple[int, int, str]]:
        """Contacts (arm link or -2 for the held item, body, name) at the current kinematic state.

        `item_tolerance` (grasp checks): fingers may overlap other items by up to
        FINGER_ITEM_TOLERANCE and the rest of the arm by HAND_ITEM_TOLERANCE (in clutter the fingers
        push neighbours aside), and fixtures count when closer than FIXTURE_MARGIN (the physical
        arm tracks its path imperfectly).
        """
        cid = self.client_id
        found = []
        candidates = list(self.fixtures) + ([] if fixtures_only else self._items())
        others = [b for b in candidates if b not in ignore and b != self._held]
        for b in others:
            is_item = b not in self.fixtures
            margin = FIXTURE_MARGIN if (item_tolerance and not is_item) else 0.0
            for c in p.getClosestPoints(self.body, b, margin, physicsClientId=cid):
                if c[3] == -1 and self.fixtures.get(b) == "floor":
                    continue  # bolted base (getClosestPoints ignores the collision filter pair)
                if is_item and item_tolerance:
                    tol = FINGER_ITEM_TOLERANCE if c[3] in self.finger_joints else HAND_ITEM_TOLERANCE
                    if c[8] > -tol:
                        continue
                found.append((c[3], b, self.fixtures.get(b, "item")))
                break
            if self._held is not None:
                # An item sliding along a wall it leans on overlaps it a little: only a real
                # interpenetration (> HELD_ITEM_TOLERANCE) is a collision.
                for _c in p.getClosestPoints(self._held, b, -HELD_ITEM_TOLERANCE, physicsClientId=cid):
                    found.append((-2, b, self.fixtures.get(b, "item")))
                    break
        return found

    def _carry_item(self, tcp: int) -> None:
        """Put the held item at its grasp pose relative to the carrying TCP (kinematic transport)."""
        if self._held is None or self._T_tcp_item is None:
            return
        s = p.getLinkState(self.body, tcp, computeForwardKinematics=True, physicsClientId=self.client_id)
        pos, orn = p.multiplyTransforms(s[4], s[5], *self._T_tcp_item)
        p.resetBasePositionAndOrientation(self._held, pos, orn, physicsClientId=self.client_id)
        p.resetBaseVelocity(self._held, [0, 0, 0], [0, 0, 0], physicsClientId=self.client_id)

    def _remember_grasp_transform(self, tcp: int) -> None:
        s = p.getLinkState(self.body, tcp, computeForwardKinematics=True, physicsClientId=self.client_id)
        pos_i, orn_i = p.getBasePositionAndOrientation(self._held, physicsClientId=self.client_id)
        inv = p.invertTransform(s[4], s[5])
        self._T_tcp_item = p.multiplyTransforms(inv[0], inv[1], pos_i, orn_i)

    def _grip_ok(self, accel: np.ndarray) -> tuple[bool, float]:
        """Can the grip carry the held item under this acceleration? (ok, utilisation or load ratio)."""
        if self._held is None:
            return True, 0.0
        if self._held_kind == "suction":
            u = self.suction.utilisation(accel)
            return u <= 1.0, u
        info = p.getDynamicsInfo(self._held, -1, physicsClientId=self.client_id)
        return self.jaw.friction_ok(info[0], info[1], accel), 0.0

    # --- kinematic execution -------------------------------------------------------------------------
    def _run_samples(
        self,
        qs: np.ndarray,
        times: np.ndarray,
        tcp: int,
        ignore: Sequence[int] = (),
        fixtures_only: bool = False,
    ) -> None:
        """Walk the joints through `qs` (timed by `times`), carrying and checking; raises _Abort."""
        dt = np.diff(times, prepend=times[0])
        positions: list[np.ndarray] = []
        t_prev = 0.0
        for k, q in enumerate(qs):
            if self._check_stop():
                raise self._estop()
            for j, v in zip(self.arm_joints, q, strict=True):
                p.resetJointState(self.body, j, float(v), physicsClientId=self.client_id)
            self._carry_item(tcp)
            pos, _ = self.link_pose(tcp)
            positions.append(pos)
            if len(positions) >= 3 and dt[k] > 0:
                h = dt[k]
                accel = (positions[-1] - 2 * positions[-2] + positions[-3]) / (h * h)
                ok, u = self._grip_ok(accel)
                if not ok:
                    self._time += times[k] - t_prev
                    t_prev = times[k]
                    self._drop()
                    raise _Abort(Reason.DROPPED, utilisation=round(u, 3), at_s=round(float(times[k]), 3))
            contacts = self._kinematic_contacts(ignore, fixtures_only)
            if contacts:
                link, body, name = contacts[0]
                # Stop at the last contact-free sample (a speed-and-separation monitor stops short).
                q_stop = qs[k - 1] if k > 0 else q
                for j, v in zip(self.arm_joints, q_stop, strict=True):
                    p.resetJointState(self.body, j, float(v), physicsClientId=self.client_id)
                self._carry_item(tcp)
                self._command(q_stop)
                self._time += times[k] - t_prev
                raise _Abort(Reason.COLLISION, link=int(link), body=int(body), with_=name)
            self._time += times[k] - t_prev
            t_prev = times[k]
        self._command(qs[-1])

    def _carry_utilisation(self, qs: np.ndarray, times: np.ndarray, tcp: int) -> float:
        """Worst grip load along a sampled move (dry run, joints restored): suction utilisation,
        or for the jaw the friction demand as a fraction of the friction available."""
        if self._held is None or len(qs) < 3:
            return 0.0
        q_keep = self.q()
        positions = []
        for q in qs:
            for j, v in zip(self.arm_joints, q, strict=True):
                p.resetJointState(self.body, j, float(v), physicsClientId=self.client_id)
            positions.append(self.link_pose(tcp)[0])
        for j, v in zip(self.arm_joints, q_keep, strict=True):
            p.resetJointState(self.body, j, float(v), physicsClientId=self.client_id)
        self._carry_item(tcp)
        P = np.array(positions)
        h = np.diff(times)
        worst = 0.0
        for k in range(2, len(P)):
            if h[k - 1] <= 0:
                continue
            acc = (P[k] - 2 * P[k - 1] + P[k - 2]) / (h[k - 1] * h[k - 1])
            if self._held_kind == "suction":
                worst = max(worst, self.suction.utilisation(acc))
            else:
                info = p.getDynamicsInfo(self._held, -1, physicsClientId=self.client_id)
                mu = self.cfg.jaw.finger_friction * info[1]
                need = info[0] * float(np.linalg.norm(acc - np.array([0.0, 0.0, -9.81])))
                worst = max(worst, need / max(2.0 * mu * self.cfg.jaw.grip_force_n, 1e-9))
        return worst

    def _joint_move(self, q_target: np.ndarray, tcp: int, ignore: Sequence[int] = ()) -> None:
        """Timed joint-space move, executed kinematically. While carrying, the speed is scaled down
        (payload-aware, as industrial controllers do) until the sampled accelerations keep the grip
        load under 90 % of what it can hold; the slower move is what gets charged."""
        if not np.isfinite(self.q()).all():
            # The physics solver blew up (a rare PyBullet instability after hard contact): put the
            # arm back at home kinematically and report the motion as a collision, never crash.
            log.warning("arm joint state is not finite (solver instability); resetting the arm to home")
            self._set_q(self.cfg.home)
            raise _Abort(Reason.COLLISION, why="simulation instability: arm reset to home")
        if not np.isfinite(np.asarray(q_target, dtype=np.float64)).all():
            raise _Abort(Reason.INVALID, why="non-finite joint target")
        q_now = self.q()
        if float(np.max(np.abs(np.asarray(q_target, dtype=np.float64) - q_now))) < 1e-9:
            # Already there. sim.motion's profile of a sub-nanoradian move divides 0 by 0 (its
            # acceleration in path units is infinite) and samples NaN joints: the origin of the
            # "cannot convert float NaN" crash seen after a refused pick followed by home().
            self._command(q_now)
            return
        scales = [self.cfg.joint_speed_scale]
        if self._held is not None:
            scales += [s * self.cfg.joint_speed_scale for s in (0.7, 0.5, 0.35, 0.25)]
        for scale in scales:
            move: JointMove = plan_joint_move(self.q(), q_target, scale)
            n = max(2, int(np.ceil(move.duration / self.cfg.transit_check_dt)) + 1)
            times = np.linspace(0.0, move.duration, n)
            qs = move.sample(times)
            if not np.isfinite(qs).all():
                # Never hand a non-finite joint target to the simulator: fall back to a straight
                # joint-space interpolation over the same (finite) duration.
                log.warning("joint move sampled non-finite joints; using a linear profile instead")
                frac = np.linspace(0.0, 1.0, n)[:, None]
                qs = move.q_start[None, :] + frac * (move.q_end - move.q_start)[None, :]
            if self._held is None or self._carry_utilisation(qs, times, tcp) <= CARRY_UTILISATION:
                break
        self._run_samples(qs, times, tcp, ignore)

    def _line_qs(self, p0: np.ndarray, p1: np.ndarray, R_hand: np.ndarray, link: int, n: int) -> np.ndarray:
        """IK along a straight line, each solution seeded by the previous one (continuity)."""
        qs = []
        seed = self.q()
        for s in np.linspace(0.0, 1.0, n):
            q = self._solve(p0 + s * (p1 - p0), R_hand, link, seed)
            qs.append(q)
            seed = q
        return np.array(qs)

    def _kinematic_line(
        self,
        p1: np.ndarray,
        R_hand: np.ndarray,
        link: int,
        speed: float,
        ignore: Sequence[int] = (),
        fixtures_only: bool = False,
        accel: float | None = None,
    ) -> None:
        p0, _ = self.link_pose(link)
        length = float(np.linalg.norm(p1 - p0))
        if length < 1e-4:
            return
        acc = self.cfg.tool_accel if accel is None else accel
        t_tool = trapezoid_time(length, speed, acc)
        n = max(2, int(np.ceil(t_tool / self.cfg.transit_check_dt)) + 1)
        # Solve IK on the path at n equally spaced fractions of the time profile.
        times = np.linspace(0.0, t_tool, n)
        a_unit = acc / length
        frac = trapezoid_fraction(times, t_tool, speed / length, a_unit)
        qs = []
        seed = self.q()
        for s in frac:
            q = self._solve(p0 + s * (p1 - p0), R_hand, link, seed)
            qs.append(q)
            seed = q
        qs = np.array(qs)
        duration = cartesian_move_time(length, speed, acc, qs[0], qs[-1])
        self._run_samples(qs, times * (duration / t_tool), link, ignore, fixtures_only)

    # --- physical execution ----------------------------------------------------------------------------
    def _physical_line(
        self, p1: np.ndarray, R_hand: np.ndarray, link: int, speed: float, monitor, accel: float | None = None
    ) -> dict:
        """Drive the TCP along a straight line with physics; `monitor()` after each step may stop it.

        Returns the monitor's last answer. `monitor` returns None to continue or a dict to stop.
        `accel` (m/s^2): the tool's acceleration on this line (default `tool_accel`).
        """
        acc = self.cfg.tool_accel if accel is None else accel
        p0, _ = self.link_pose(link)
        length = float(np.linalg.norm(p1 - p0))
        duration = trapezoid_time(length, speed, acc)
        n_steps = max(1, int(np.ceil(duration * self.cfg.physics_hz)))
        n_way = max(2, n_steps // 6 + 1)
        qs = self._line_qs(p0, p1, R_hand, link, n_way)
        duration = max(duration, cartesian_move_time(length, speed, acc, qs[0], qs[-1]))
        n_steps = max(1, int(np.ceil(duration * self.cfg.physics_hz)))
        a_unit = acc / max(length, 1e-6)
        t = np.arange(1, n_steps + 1) / self.cfg.physics_hz
        frac = trapezoid_fraction(t, duration, speed / max(length, 1e-6), a_unit)
        way_s = np.linspace(0.0, 1.0, n_way)
        result: dict = {}
        # A few extra steps let the motors catch up with the end of the path.
        for k in range(n_steps + 12):
            if self._check_stop():
                raise self._estop()
            s = frac[min(k, n_steps - 1)]
            q_target = np.array([np.interp(s, way_s, qs[:, i]) for i in range(7)])
            self._command(q_target)
            self._step(1)
            self._note_impact()
            answer = monitor()
            if answer is not None:
                return answer
        return result

    def _note_impact(self) -> None:
        """Track the largest contact force the arm exerts on items (damage metric), newtons.

        Single-step contact forces are solver impulses / dt and spike; averaging over ~20 ms (an
        exponential window of 5 steps at 240 Hz) gives the sustained force that can crush an item.
        """
        pts = p.getContactPoints(bodyA=self.body, physicsClientId=self.client_id)
        force = sum(c[9] for c in pts if c[2] != self.body and c[2] not in self.fixtures)
        self._impact_avg = 0.8 * self._impact_avg + 0.2 * float(force)
        if self._impact_avg > self.max_impact_n:
            self.max_impact_n = self._impact_avg

    def _arm_contacts(self) -> list[tuple[int, int]]:
        """(arm link, other body) pairs touching after the last physics step."""
        pts = p.getContactPoints(bodyA=self.body, physicsClientId=self.client_id)
        return [(c[3], c[2]) for c in pts if c[2] != self.body]

    # --- tools ---------------------------------------------------------------------------------------
    def _prepare_tool(self, gripper: str, width: float) -> None:
        """Extend/retract the cup and open the fingers; charged as one actuation if anything changes."""
        changed = False
        want_ext = gripper == "suction"
        if self.suction.extended != want_ext:
            self.suction.set_extended(want_ext)
            changed = True
        target = self.cfg.jaw.max_opening if gripper == "suction" else width
        if abs(self.jaw.width() - target) > 1e-3:
            self.jaw.set_opening(target, instant=True)
            changed = True
        if changed:
            self._time += self.cfg.jaw.actuation_s

    def _hand_rotation(self, grasp: Grasp) -> np.ndarray:
        return grasp.R @ M_GRASP_HAND

    def _best_hand_rotation(self, grasp: Grasp, link: int, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Grasp symmetries (jaw: 180 deg about the approach; cup: any angle): pick the cheapest wrist."""
        R = self._hand_rotation(grasp)
        turns = (0.0, np.pi) if grasp.gripper == "parallel_jaw" else (0.0, np.pi / 2, np.pi, -np.pi / 2)
        best: tuple[float, np.ndarray, np.ndarray] | None = None
        seed = self._seed_over(pos)
        last_abort: _Abort | None = None
        for turn in turns:
            Rt = R @ _rot_z(turn)
            try:
                q = self._solve(pos, Rt, link, seed)
            except _Abort as exc:
                last_abort = exc
                continue
            # Prefer a wrist turn whose hand clears the tote walls at the grasp (the cup may turn
            # freely about its axis), then the smallest joint excursion from home.
            q_keep = self.q()
            for j, v in zip(self.arm_joints, q, strict=True):
                p.resetJointState(self.body, j, float(v), physicsClientId=self.client_id)
            hits = self._kinematic_contacts(ignore=self._items(), fixtures_only=True)
            for j, v in zip(self.arm_joints, q_keep, strict=True):
                p.resetJointState(self.body, j, float(v), physicsClientId=self.client_id)
            cost = float(np.max(np.abs(q - self.cfg.home))) + (10.0 if hits else 0.0)
            if best is None or cost < best[0]:
                best = (cost, Rt, q)
        if best is None:
            assert last_abort is not None
            raise last_abort
        return best[1], best[2]

    def _seed_over(self, pos: np.ndarray) -> np.ndarray:
        """An IK seed with the hand pointing down above `pos` (keeps solutions elbow-up)."""
        q = self.cfg.home.copy()
        q[0] = float(np.arctan2(pos[1], pos[0]))
        return q

    # --- Arm protocol: motions -----------------------------------------------------------------------
    def home(self) -> Outcome:
        t0 = self._time
        try:
            if self._check_stop():
                raise self._estop()
            self._joint_move(self.cfg.home, self.tcp_link(self._held_kind or "parallel_jaw"))
        except _Abort as exc:
            return Outcome(False, exc.reason, robot_seconds=self._time - t0, details=exc.details)
        return Outcome(True, Reason.OK, robot_seconds=self._time - t0)

    def move(self, position: np.ndarray, orientation: np.ndarray) -> Outcome:
        """Joint-space move of the jaw TCP (or the carrying tool's TCP) to a pose, base frame."""
        t0 = self._time
        link = self.tcp_link(self._held_kind or "parallel_jaw")
        try:
            if self._check_stop():
                raise self._estop()
            pos = np.asarray(position, dtype=np.float64)
            R_hand = quat_to_matrix(np.asarray(orientation, dtype=np.float64)) @ M_GRASP_HAND
            q = self._solve(pos, R_hand, link, self._seed_over(pos))
            self._joint_move(q, link)
        except _Abort as exc:
            return Outcome(False, exc.reason, robot_seconds=self._time - t0, details=exc.details)
        return Outcome(True, Reason.OK, robot_seconds=self._time - t0)

    def pick(self, grasp: Grasp) -> Outcome:
        """Pre-grasp, straight-line approach, grip, lift, verify. See the module docstring."""
        t0 = self._time
        executed = grasp
        details: dict = {}
        self.max_impact_n = self._impact_avg = 0.0
        try:
            if self._check_stop():
                raise self._estop()
            if self._held is not None:
                raise _Abort(Reason.INVALID, why="already holding an item")
            if grasp.gripper == "parallel_jaw":
                if not 0.0 < grasp.width <= self.cfg.jaw.max_opening:
                    raise _Abort(Reason.INVALID, why=f"jaw width {grasp.width} m outside (0, 0.08]")
                opening = min(grasp.width + self.cfg.jaw.open_margin, self.cfg.jaw.max_opening)
            else:
                opening = self.cfg.jaw.max_opening
                executed = replace(executed, width=0.0)
            link = self.tcp_link(grasp.gripper)
            a = grasp.approach
            target = grasp.position.copy()
            R_hand, q_grasp = self._best_hand_rotation(grasp, link, target)
            pre = target - a * self.cfg.pregrasp_offset
            above = self._above(pre)
            q_above = self._solve(above, R_hand, link, q_grasp)
            self._solve(pre, R_hand, link, q_grasp)  # fail before moving if pre-grasp is infeasible
            self._prepare_tool(grasp.gripper, opening)
            self._joint_move(q_above, link)
            try:
                self._kinematic_line(pre, R_hand, link, self.cfg.lift_speed)
                # The straight approach runs kinematically while it touches nothing, at approach
                # speed, and with physics for its last `physical_approach` metres (or from the
                # first contact): free space needs no contact solver, contact needs nothing else.
                near = target - a * min(self.cfg.physical_approach, self.cfg.pregrasp_offset)
                self._kinematic_line(near, R_hand, link, self.cfg.approach_speed)
            except _Abort as exc:
                # Items in the way: the physical approach starts here and pushes through them as
                # a real arm would. Fixtures in the way: a collision.
                if exc.reason is not Reason.COLLISION or exc.details.get("with_") != "item":
                    raise
            details["approach_from_m"] = round(float(np.linalg.norm(self.link_pose(link)[0] - target)), 4)
            if grasp.gripper == "suction":
                details.update(self._approach_suction(target, a, R_hand, link))
            else:
                details.update(self._approach_jaw(target, R_hand, link))
            # Executed pose: where the TCP really is when the tool actuates.
            pos_now, R_now = self.link_pose(link)
            executed = Grasp(
                grasp.gripper,
                pos_now,
                matrix_to_quat(R_now @ M_GRASP_HAND.T),
                width=opening if grasp.gripper == "parallel_jaw" else 0.0,
            )
            self._grip(grasp.gripper, details)
            self._lift(R_hand, link, above, details)
        except _Abort as exc:
            details.update(exc.details)
            lk = details.get("link")
            if exc.reason is Reason.COLLISION and isinstance(lk, int) and lk >= -2:
                # Name the part that hit (panda_hand, panda_leftfinger, suction_cup...) for failure analysis.
                special = {-2: "held_item", -1: "base"}
                info = None if lk < 0 else p.getJointInfo(self.body, lk, physicsClientId=self.client_id)
                details["link_name"] = special[lk] if info is None else info[12].decode()
            details["max_impact_n"] = round(self.max_impact_n, 2)
            if self._time > t0:  # the arm moved: let go, settle, back out (not for a refused request)
                self._abort_recover()
            return Outcome(
                False, exc.reason, executed=executed, robot_seconds=self._time - t0, details=details
            )
        details["max_impact_n"] = round(self.max_impact_n, 2)
        return Outcome(
            True,
            Reason.OK,
            executed=executed,
            robot_seconds=self._time - t0,
            item_id=self._held,
            details=details,
        )

    def _safe_height(self) -> float:
        """TCP height that clears every fixture rim and every item (but the held one) by the clearance."""
        top = 0.0
        for b in list(self.fixtures) + self._items():
            if self.fixtures.get(b) == "floor" or b == self._held:
                continue
            top = max(top, p.getAABB(b, physicsClientId=self.client_id)[1][2])
        return top + self.cfg.transit_clearance

    def _approach_suction(self, target: np.ndarray, a: np.ndarray, R_hand: np.ndarray, link: int) -> dict:
        """Physical approach until the cup has been pressed `contact_stop_depth` into what it met.

        Arm links other than the cup touching a fixture: COLLISION. Nothing met by the end of the
        overtravel past the grasp point: NO_CONTACT.
        """
        cup = self.cup_link
        first_contact: list[np.ndarray] = []  # TCP position when the cup first touched something

        def monitor():
            contacts = self._arm_contacts()
            for lk, b in contacts:
                if b in self.fixtures and lk != cup:
                    raise _Abort(Reason.COLLISION, link=int(lk), with_=self.fixtures[b])
            touching = [b for lk, b in contacts if lk == cup]
            if touching and not first_contact:
                first_contact.append(self.link_pose(link)[0])
            if first_contact:
                pos, _ = self.link_pose(link)
                if (pos - first_contact[0]) @ a >= self.cfg.suction.contact_stop_depth or not touching:
                    return {"touched": sorted({self.fixtures.get(b, "item") for b in touching})}
            return None

        end = target + a * self.cfg.suction.overtravel
        res = self._physical_line(end, R_hand, link, self.cfg.approach_speed, monitor)
        if not first_contact:
            raise _Abort(Reason.NO_CONTACT, why="suction cup reached the grasp point and touched nothing")
        return res

    def _approach_jaw(self, target: np.ndarray, R_hand: np.ndarray, link: int) -> dict:
        fingers = set(self.finger_joints)

        def monitor():
            for lk, b in self._arm_contacts():
                if b in self.fixtures:
                    raise _Abort(
                        Reason.COLLISION,
                        link=int(lk),
                        with_=self.fixtures[b],
                        finger=lk in fingers,
                    )
            return None

        return self._physical_line(target, R_hand, link, self.cfg.approach_speed, monitor)

    def _grip(self, gripper: str, details: dict) -> None:
        if gripper == "suction":
            ok = self.suction.grip()
            self._time += self.cfg.suction.actuation_s
            seal = self.suction.last_seal
            assert seal is not None
            details.update(
                seal_angle_deg=round(seal.normal_angle_deg, 2),
                rim_gap_m=round(seal.rim_gap_m, 5) if np.isfinite(seal.rim_gap_m) else None,
                seal_check=seal.reason,
            )
            if not ok:
                touched_item = seal.body_id >= 0 and seal.body_id not in self.fixtures
                if not touched_item:
                    raise _Abort(Reason.NO_CONTACT, why=f"no item under the cup ({seal.reason})")
                raise _Abort(Reason.SEAL_FAILED, item=int(seal.body_id))
            if seal.body_id in self.fixtures:
                self.suction.release()
                raise _Abort(Reason.NO_CONTACT, why=f"cup sealed on the {self.fixtures[seal.body_id]}")
            self._held, self._held_kind = seal.body_id, "suction"
            ok, u = self._grip_ok(np.zeros(3))
            details["static_utilisation"] = round(u, 3)
            if not ok:
                self._drop()
                raise _Abort(Reason.DROPPED, why="item heavier than the cup holds", utilisation=round(u, 3))
        else:
            ok = self.jaw.grip()
            details["closed_width_m"] = round(self.jaw.width(), 4)
            if not ok:
                left, right = self.jaw.touching()
                if not (left | right):
                    raise _Abort(Reason.NO_CONTACT, why="fingers closed on nothing")
                raise _Abort(Reason.SLIPPED, why="fingers did not both hold the same item")
            self._held, self._held_kind = self.jaw.held_body, "parallel_jaw"

    def _lift_accel(self) -> float:
        """Tool acceleration (m/s^2) for lifting the item just gripped: payload-aware, like the transit.

        A sealed cup's load scales with (g + a) on a vertical lift, so from the static utilisation u0
        (what a vacuum-level or wrist force-torque reading gives a real cell) the largest acceleration
        that keeps the load under `CARRY_UTILISATION` is g (CARRY_UTILISATION / u0 - 1). A heavily
        loaded cup lifts gently instead of peeling off at full acceleration; floored at
        `MIN_LIFT_ACCEL` so the lift always ends. The jaw (friction checked per sample) lifts at full
        acceleration.
        """
        if self._held_kind != "suction":
            return self.cfg.tool_accel
        _, u0 = self._grip_ok(np.zeros(3))
        if u0 <= 0.0:
            return self.cfg.tool_accel
        a = 9.81 * (CARRY_UTILISATION / u0 - 1.0)
        return float(min(self.cfg.tool_accel, max(MIN_LIFT_ACCEL, a)))

    def _lift(self, R_hand: np.ndarray, link: int, above: np.ndarray, details: dict) -> None:
        pos, _ = self.link_pose(link)
        up = pos + np.array([0.0, 0.0, min(PHYSICAL_LIFT, max(above[2] - pos[2], 0.0))])
        acc = self._lift_accel()
        details["lift_accel_m_s2"] = round(acc, 3)
        lift_acc = np.array([0.0, 0.0, acc])

        def monitor():
            ok, u = self._grip_ok(lift_acc)
            if not ok:
                self._drop()
                raise _Abort(Reason.DROPPED, why="load beyond the grip during lift", utilisation=round(u, 3))
            return None

        self._physical_line(up, R_hand, link, self.cfg.lift_speed, monitor, accel=acc)
        if self._held_kind == "parallel_jaw" and not self.jaw.is_holding():
            self._held = None
            self._held_kind = None
            self.jaw.held_body = None
            raise _Abort(Reason.SLIPPED, why="item not between the fingers after lifting")
        self._remember_grasp_transform(link)
        # Carry the item's lowest point clear of the rims, not just the TCP, and lift straight up: the
        # pre-grasp of a tilted approach lies back along the surface normal, and a line there moves a
        # large held item sideways into the wall it slopes down to (a mailer on a pile near a wall).
        lo_z = p.getAABB(self._held, physicsClientId=self.client_id)[0][2]
        pos, _ = self.link_pose(link)
        above = np.array([pos[0], pos[1], above[2]])
        above[2] = max(above[2], self._safe_height() - self.cfg.transit_clearance + (pos[2] - lo_z) + 0.03)
        # Brushing neighbours on the way out of the pile is normal; only the rims count here.
        self._kinematic_line(above, R_hand, link, self.cfg.lift_speed, fixtures_only=True, accel=acc)

    def _drop(self) -> None:
        """Let go of the held item (seal lost or friction exceeded) and let it fall with physics."""
        if self._held_kind == "suction":
            self.suction.release()
        elif self._held_kind == "parallel_jaw":
            self.jaw.held_body = None
        self._held = None
        self._held_kind = None
        self._T_tcp_item = None

    def _abort_recover(self) -> None:
        """After a failed pick: let go of anything half-held, let the scene settle, back out of the tote.

        A real arm backs off along its path after a protective stop; here the TCP retreats straight
        up to the transit height kinematically, unchecked (it is leaving the contact), and the time is
        charged like any other straight move.
        """
        self.suction.release()
        self._held = None
        self._held_kind = None
        self._T_tcp_item = None
        self.jaw.held_body = None
        self.jaw.set_opening(self.cfg.jaw.max_opening)
        self._step(int(self.cfg.settle_s * self.cfg.physics_hz))
        self.retreat()

    def retreat(self) -> None:
        """Move the TCP straight up to the transit height, without contact checks (backing out)."""
        link = self.tcp_link("suction" if self.suction.extended else "parallel_jaw")
        pos, R = self.link_pose(link)
        top = max(pos[2], self._safe_height())
        if top - pos[2] < 1e-3:
            return
        target = np.array([pos[0], pos[1], top])
        stopped, self._stopped = self._stopped, False
        try:
            qs = self._line_qs(pos, target, R, link, 6)
        except _Abort:
            qs = None
        self._stopped = stopped
        if qs is None:
            log.warning("retreat: no straight path up from %s; going home directly", np.round(pos, 3))
            qs = np.array([self.q(), self.cfg.home])
        duration = cartesian_move_time(
            float(top - pos[2]), self.cfg.lift_speed, self.cfg.tool_accel, qs[0], qs[-1]
        )
        for q in qs:
            for j, v in zip(self.arm_joints, q, strict=True):
                p.resetJointState(self.body, j, float(v), physicsClientId=self.client_id)
        self._command(qs[-1])
        self._time += duration

    def _above(self, pre: np.ndarray) -> np.ndarray:
        """Where a pick starts its descent: over the pre-grasp, at least at the safe height."""
        return np.array([pre[0], pre[1], max(pre[2], self._safe_height())])

    def check_grasp(self, grasp: Grasp, target: int | None = None) -> Reason:
        """Would the arm reach this grasp and its pre-grasp without the hand hitting a fixture?

        Kinematic only (no physics, the scene is unchanged): OK, UNREACHABLE, IK_FAILED, COLLISION
        or INVALID. With `target` (the item to pick) the open hand must also clear every other item
        at the grasp and pre-grasp poses. Used by the oracle to skip grasps bound to fail, and by the
        controller (arm.interfaces.ReachCheck) to skip candidates the arm cannot reach.
        """
        if grasp.gripper == "parallel_jaw" and not 0.0 < grasp.width <= self.cfg.jaw.max_opening:
            return Reason.INVALID
        link = self.tcp_link(grasp.gripper)
        q_keep = self.q()
        opening = (
            min(grasp.width + self.cfg.jaw.open_margin, self.cfg.jaw.max_opening)
            if grasp.gripper == "parallel_jaw"
            else self.cfg.jaw.max_opening
        )
        w_keep, ext_keep = self.jaw.width(), self.suction.extended
        try:
            R_hand, q_grasp = self._best_hand_rotation(grasp, link, grasp.position)
            pre = grasp.position - grasp.approach * self.cfg.pregrasp_offset
            # The same poses `pick` solves before it moves: above the pre-grasp, then the pre-grasp.
            self._solve(self._above(pre), R_hand, link, q_grasp)
            q_pre = self._solve(pre, R_hand, link, q_grasp)
            for f in self.finger_joints:
                p.resetJointState(self.body, f, opening / 2, physicsClientId=self.client_id)
            slide = self.suction.extended_position if grasp.gripper == "suction" else 0.0
            p.resetJointState(self.body, self.slide_joint, slide, physicsClientId=self.client_id)
            for q in (q_grasp, q_pre):
                for j, v in zip(self.arm_joints, q, strict=True):
                    p.resetJointState(self.body, j, float(v), physicsClientId=self.client_id)
                # With a target named, the open hand at the grasp must also clear every other item
                # (on the way down it may push them: the physical approach handles that).
                fixtures_only = target is None or q is q_pre
                ignore = self._items() if fixtures_only else (target,)
                if self._kinematic_contacts(ignore=ignore, fixtures_only=fixtures_only, item_tolerance=True):
                    return Reason.COLLISION
            return Reason.OK
        except _Abort as exc:
            return exc.reason
        finally:
            for j, v in zip(self.arm_joints, q_keep, strict=True):
                p.resetJointState(self.body, j, float(v), physicsClientId=self.client_id)
            for f in self.finger_joints:
                p.resetJointState(self.body, f, w_keep / 2, physicsClientId=self.client_id)
            slide = self.suction.extended_position if ext_keep else 0.0
            p.resetJointState(self.body, self.slide_joint, slide, physicsClientId=self.client_id)

    def place(self, placement: Placement) -> Outcome:
        """Move over the box, lower until the item is `place_drop_height` above what is below, release."""
        t0 = self._time
        details: dict = {}
        if self._held is None:
            return Outcome(False, Reason.NOT_HOLDING, robot_seconds=0.0)
        item = self._held
        kind = self._held_kind or "parallel_jaw"
        link = self.tcp_link(kind)
        try:
            if self._check_stop():
                raise self._estop()
            target = np.asarray(placement.position, dtype=np.float64)
            pos_now, R_now = self.link_pose(link)
            R_req = quat_to_matrix(np.asarray(placement.orientation, dtype=np.float64)) @ M_GRASP_HAND
            above = np.array([target[0], target[1], max(pos_now[2], self._safe_height())])
            # The requested wrist, its 180-degree twin (same for both tools), then the carried one.
            twins = sorted([R_req, R_req @ _rot_z(np.pi)], key=lambda R: _angle_deg(R, R_now))
            options = [*twins, R_now]
            last: _Abort | None = None
            for R_hand in options:
                try:
                    q_above = self._solve(above, R_hand, link, self._seed_over(above))
                    self._solve(target, R_hand, link, q_above)
                    break
                except _Abort as exc:
                    last = exc
            else:
                assert last is not None
                raise last
            self._joint_move(q_above, link)
            try:
                # Lowering into the box decelerates upwards: the same payload-aware limit as the lift.
                self._kinematic_line(target, R_hand, link, self.cfg.lift_speed, accel=self._lift_accel())
            except _Abort as exc:
                if exc.reason is not Reason.COLLISION:
                    raise
                # The item or the hand is about to touch the stack or the box: release here.
                details["released_early"] = exc.details
            if kind == "suction":
                self.suction.release()
                self._time += self.cfg.suction.actuation_s
            else:
                self.jaw.release()  # physical opening
            self._held = None
            self._held_kind = None
            self._T_tcp_item = None
            self._step(int(self.cfg.settle_s * self.cfg.physics_hz))
            self.retreat()  # back out the way it came in
        except _Abort as exc:
            details.update(exc.details)
            if self._held is not None:
                self._drop()
            self._step(int(self.cfg.settle_s * self.cfg.physics_hz))
            return Outcome(False, exc.reason, robot_seconds=self._time - t0, item_id=item, details=details)
        return Outcome(True, Reason.OK, robot_seconds=self._time - t0, item_id=item, details=details)
