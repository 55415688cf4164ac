"""The simulated arm: a Franka Panda from pybullet_data with a suction cup added, in PyBullet DIRECT.

Implements `arm.interfaces.Arm`. Failures are `Outcome` reasons, never exceptions.

Tools (see sim/grippers.py): the Panda hand with its two fingers (parallel jaw, TCP
`panda_grasptarget`, 10.5 cm below the hand) and a 30 mm suction cup on a prismatic slide between the
fingers (TCP `suction_tcp`, the extended lip, 20 cm below the hand). The URDF is the stock one with
those two links appended and mesh paths made absolute (`panda_urdf_path`).

How motions are executed, and why it stays honest:
- Every motion is charged robot time from sim/motion.py (time-optimal jerk-limited ruckig profiles
  at the joint velocity, acceleration and jerk limits, tool limits on straight lines, gripper
  actuation times); physics-step time is never used as the clock, and in the physical phases the
  number of steps *is* the robot time (1 step = 1/physics_hz). Free-space legs that need no stop
  are one move through blended via points (over the tote -> pre-grasp -> start of the physical
  approach; over the box -> down into it). A place ends where the item was let go: the next
  pick backs out of the box as the first leg of its move to the tote (`blended_exit`), any other
  motion backs out first. Each robot second is charged to a phase
  (`Outcome.details["phases"]`).
- Protective stops hold (stop category 2, sim/safety.py): the motion brakes along its path within
  the limits, holds powered with the item gripped until `clear_stop`, then resumes.
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
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pybullet as p
import pybullet_data

from grasping.types import Grasp, Outcome, Placement, Reason, matrix_to_quat, quat_to_matrix
from sim.config_sim_arm import SimArmConfig
from sim.grippers import ARM_COLLISION_GROUP, ParallelJawGripper, SuctionGripper, suction_utilisation
from sim.motion import PANDA_MAX_ACCELERATION as _AMAX
from sim.motion import PANDA_MAX_VELOCITY as _VMAX
from sim.motion import (
    brake_fraction,
    brake_profile,
    carry_velocity_scale,
    cartesian_move_time,
    joint_move_time,
    line_profile,
    line_reachable_speed,
    plan_joint_move,
    plan_stop,
    plan_via_move,
    ramp_fraction,
    ramp_profile,
    trapezoid_fraction,
    trapezoid_time,
)

log = logging.getLogger(__name__)


def _over_limits(samples: np.ndarray, h: float) -> float:
    """How far joint samples taken every h s exceed the joint limits: the factor f by which a uniformly
    slower profile (v / f, a / f^2) fits them (<= 1: within every joint's velocity and acceleration)."""
    v_ratio = float(np.max(np.abs(np.diff(samples, axis=0)) / h / _VMAX))
    a_ratio = float(np.max(np.abs(np.diff(samples, 2, axis=0)) / (h * h) / _AMAX))
    return max(v_ratio, float(np.sqrt(a_ratio)))


SHOULDER = np.array([0.0, 0.0, 0.333])  # m, joint 2 axis in the base frame
FINGER_ITEM_TOLERANCE = 0.008  # m, overlap of a finger with a neighbour item that check_grasp accepts
HAND_ITEM_TOLERANCE = 0.003  # m, same for the other links
FIXTURE_MARGIN = 0.005  # m, clearance from tote/box that check_grasp demands (physical tracking error)
FLOOR_NORMAL_Z = 0.9  # cosine: a fixture contact whose normal is this close to up is a floor (< ~26 deg)
HELD_ITEM_TOLERANCE = 0.006  # m, overlap of a carried item with anything that is not yet a collision
# m, how far from the vertical a blended exit from the box (`SimConfig.blended_exit`) may take the TCP
# on its first leg: that leg is the retreat, which goes straight up beside what was just let go of
EXIT_TOLERANCE = 0.003
PHYSICAL_LIFT = 0.05  # m, lift simulated with full physics before the kinematic part
CARRY_UTILISATION = 0.9  # unitless, grip load a payload-aware move keeps under (lift and transit)
CARRY_SCALES = (0.7, 0.5, 0.35, 0.25)  # unitless, speed scales a carrying joint move tries first
MIN_CARRY_SCALE = 0.04  # unitless, slowest carrying joint move (about 20 s for a 0.8 s transit)
HANDOVER_MAX_UTILISATION = 0.5  # unitless, grip load at rest above which the lift ends at rest
CARRY_MARGIN = 0.97  # unitless, grip load a carry may reach when CARRY_UTILISATION cannot be kept
# Outcome detail ("why") of a carry refused because no speed keeps the item held: set back down
CARRY_BEYOND_GRIP = "no carry keeps the item within the grip's hold: set back down"
SET_DOWN_CLEARANCE = 0.005  # m, the TCP stops this far above where it gripped when setting an item down
LONG_LINE_S = 10.0  # s, a slowed straight line taking over a moving start that would last longer brakes first
MIN_LIFT_ACCEL = 0.2  # m/s^2, slowest lift acceleration (a 5 cm lift then takes about 1 s)
# m, the kinematic rest of a lift must be at least this long for the physical part to hand over to
# it moving (`SimArmConfig.lift_blend`): shorter, the two would not blend into anything
LIFT_BLEND_MIN = 0.03
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


def _path_key(points: Sequence[np.ndarray]) -> bytes:
    """The joint positions of a planned path, as one key (the same arrays give the same key)."""
    return np.concatenate([np.asarray(q, dtype=np.float64)[:7] for q in points]).tobytes()


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
        self._stop_lock = threading.Lock()
        self._stop_cleared = threading.Event()  # set by clear_stop: wakes a hold waiting in real time
        self._abandon = threading.Event()  # set on shutdown: a held motion gives up (still holding)
        self._pending_stop: dict | None = None  # a triggered stop not yet at standstill
        self._rest_since: float | None = 0.0  # robot time the arm last came to rest; None while moving
        self._hold_total = 0.0  # robot seconds spent holding in protective stops
        self.safety_zone = None  # sim.safety.SafetyZone, checked at every motion sample
        self.stop_events: list = []  # sim.safety.StopEvent per protective stop
        # Callbacks fn(arm, event) for "sample" (every control sample of a motion), "hold" (every
        # tick of a protective stop) and "resume": what an operator panel or a test observes.
        self.observers: list[Callable[[SimArm, str], None]] = []
        self.phase = ""  # motion phase now executing ("move_to_pick", "approach", ..., "" between motions)
        self.phase_time: dict[str, float] = {}  # robot seconds charged to each phase so far
        self._clear_hooks: list[Callable[[], None]] = []  # notify_when_clear callbacks, next place only
        # The camera's view of the tote as rays: (eye (3,), points on the tote floor (N, 3)), base
        # frame, m; set by the cell (sim/scene.py). None: clear only once the place goes down.
        self.tote_view: tuple[np.ndarray, np.ndarray] | None = None
        self._phase_t0 = self._phase_hold0 = 0.0
        self.max_impact_n = 0.0  # largest arm-on-item contact force in the current pick, newtons
        self._gripped_at: np.ndarray | None = None  # TCP position (base frame, m) of the last grip
        self._impact_avg = 0.0  # running average of that force over ~20 ms, newtons
        self._held: int | None = None
        self._held_kind: str | None = None
        self._T_tcp_item: tuple | None = None  # held item pose in the carrying TCP frame
        # (held item, {fixture: metres it overlapped that fixture when gripped}), see _kinematic_contacts
        self._held_overlap: tuple[int | None, dict[int, float]] = (None, {})
        # A motion still under way for the next one to take over (pick_and_place: the lift's end):
        # ((qd, qdd) of the joints, TCP link), or None at rest. Consumed by the next motion's first
        # sample, or brought to rest (`_come_to_rest`) by any other motion.
        self._momentum: tuple[tuple[np.ndarray, np.ndarray], int] | None = None
        # The TCP link that let go of an item, while the arm still stands where it did
        # (`blended_exit`): the next motion backs out of the box first. None: nothing to back out of.
        self._released_by: int | None = None
        # Paths (`_path_key`) found clear only with the `via_velocity` rule's via velocities: executed so.
        self._rule_paths: set[bytes] = set()
        self._line_end_speed = 0.0  # m/s, the speed the last physical line ended at (0: at rest)
        self._set_q(self.cfg.home)
        self.jaw.set_opening(self.cfg.jaw.max_opening, instant=True)
        self.suction.set_extended(False)

    # --- Arm protocol: clock and stops -----------------------------------------------------------
    # A protective stop is a stop category 2 (see sim/safety.py): the arm brakes along its path
    # within its limits, holds there powered (a gripped item stays gripped) until `clear_stop`, then
    # the interrupted motion resumes. A motion *started* while stopped is refused with ESTOP before
    # anything moves. `stop` and `clear_stop` may come from another thread (the daemon's control
    # socket); the motion thread notices at its next control sample.
    @property
    def robot_time(self) -> float:
        return self._time

    def stop(self) -> None:
        """Protective stop: brake at the next control sample, hold until `clear_stop`; motions refuse."""
        with self._stop_lock:
            if not self._stopped:
                self._pending_stop = {"cause": "command", "triggered_at": self._time}
                self._stop_cleared.clear()
            self._stopped = True

    def clear_stop(self) -> None:
        """End the protective stop (the control socket's `clear-stop`); a held motion then resumes."""
        with self._stop_lock:
            if not self._stopped:
                return
            self._stopped = False
            self._pending_stop = None
            if self.stop_events and self.stop_events[-1].cleared_at is None:
                self.stop_events[-1] = replace(self.stop_events[-1], cleared_at=self._time)
            self._stop_cleared.set()

    @property
    def stopped(self) -> bool:
        if self._check_stop() and self._rest_since is not None:
            self._note_halted(self._rest_since)  # polled between motions: the arm already stands still
        return self._stopped

    def set_safety_zone(self, zone) -> None:
        """Guard the cell with a `sim.safety.SafetyZone` (a person entering halts the arm)."""
        self.safety_zone = zone

    def abandon_hold(self) -> None:
        """Shutdown while stopped (SIGTERM): the held motion ends with ESTOP, still stopped and holding."""
        self._abandon.set()
        self._stop_cleared.set()

    def _check_stop(self) -> bool:
        """Poll the safety zone (and its simulated operator) at the current robot time; True when stopped."""
        zone = self.safety_zone
        if zone is not None:
            entered = zone.entered_at(self._time)
            with self._stop_lock:
                if entered is not None and not self._stopped:
                    self._stopped = True
                    self._pending_stop = {"cause": "zone", "triggered_at": entered}
                    self._stop_cleared.clear()
            last = self.stop_events[-1] if self.stop_events else None
            if (
                self._stopped
                and self._pending_stop is None
                and last is not None
                and last.cause == "zone"
                and last.cleared_at is None
                and zone.reset_due(last.triggered_at, self._time)
            ):
                self.clear_stop()  # the simulated operator presses clear-stop
        return self._stopped

    def _note_halted(self, halted_at: float, braking_from: float | None = None, speed: float = 0.0) -> None:
        """Record the pending stop as a StopEvent once the arm stands still."""
        from sim.safety import StopEvent

        with self._stop_lock:
            pend = self._pending_stop
            if pend is None:
                return
            self._pending_stop = None
        t_trig = float(pend["triggered_at"])
        halted = max(float(halted_at), t_trig)
        start = halted if braking_from is None else max(float(braking_from), t_trig)
        self.stop_events.append(
            StopEvent(pend["cause"], t_trig, halted, start, None, float(speed), self.phase)
        )

    def _estop(self) -> _Abort:
        """The refusal of a motion asked for while stopped (nothing has moved)."""
        if self._pending_stop is not None:
            self._note_halted(self._rest_since if self._rest_since is not None else self._time)
        ev = self.stop_events[-1] if self.stop_events else None
        if ev is None:
            return _Abort(Reason.ESTOP)
        return _Abort(
            Reason.ESTOP,
            cause=ev.cause,
            triggered_at=round(ev.triggered_at, 4),
            halted_at=round(ev.halted_at, 4),
        )

    def _notify(self, event: str) -> None:
        for fn in list(self.observers):
            fn(self, event)

    def _hold(self, q_hold: np.ndarray, tcp: int, physical: bool) -> None:
        """Hold still, powered, until `clear_stop`; the gripper keeps what it holds.

        Kinematic phases hold exactly (joints and the carried item stay put; the grip's static load
        was already fine). Physical phases keep stepping the physics with the motors commanded to
        the held pose until the arm and the item are at rest, then only the clock runs (nothing
        moves). A commanded stop (control socket) is held in real time, waiting on the clear
        event: a person releases it. The hold ends early only by `abandon_hold` (shutdown) or
        after `max_hold_s`, with ESTOP: still stopped, still holding, nothing dropped.
        """
        t_start = self._time
        tick = self.cfg.hold_tick_s
        settling = physical
        while True:
            self._notify("hold")
            if not self._check_stop():
                break
            if self._abandon.is_set() or self._time - t_start >= self.cfg.max_hold_s:
                ev = self.stop_events[-1] if self.stop_events else None
                raise _Abort(
                    Reason.ESTOP, holding=self._held is not None, **({} if ev is None else ev.as_dict())
                )
            if settling:
                self._command(q_hold)
                n = max(1, int(round(tick * self.cfg.physics_hz)))
                for _ in range(n):
                    p.stepSimulation(physicsClientId=self.client_id)
                self._time += n / self.cfg.physics_hz
                self._hold_total += n / self.cfg.physics_hz
                settling = not self._at_rest()
            else:
                self._carry_item(tcp)
                self._time += tick
                self._hold_total += tick
            if self._pending_stop is None and self.stop_events and self.stop_events[-1].cause == "command":
                self._stop_cleared.wait(tick)  # a person presses clear-stop in real time
        self.phase_time["stopped"] = self.phase_time.get("stopped", 0.0) + (self._time - t_start)
        self._notify("resume")

    def _at_rest(self) -> bool:
        """Arm joints and the held item are still (motors settled after a brake)."""
        qd = [s[1] for s in p.getJointStates(self.body, self.arm_joints, physicsClientId=self.client_id)]
        if float(np.max(np.abs(qd))) > 1e-3:
            return False
        if self._held is not None:
            v, w = p.getBaseVelocity(self._held, physicsClientId=self.client_id)
            if float(np.linalg.norm(v)) > 1e-3 or float(np.linalg.norm(w)) > 1e-2:
                return False
        return True

    def _enter_phase(self, name: str) -> None:
        """Charge the robot time since the last phase change to that phase (holds go to "stopped")."""
        if self.phase:
            spent = (self._time - self._phase_t0) - (self._hold_total - self._phase_hold0)
            self.phase_time[self.phase] = self.phase_time.get(self.phase, 0.0) + spent
        self.phase = name
        self._phase_t0, self._phase_hold0 = self._time, self._hold_total
        if name == "place":  # over the box, going down: out of the camera's view of the tote
            self._fire_clear_hooks()

    def _fire_clear_hooks(self) -> None:
        hooks, self._clear_hooks = self._clear_hooks, []
        for fn in hooks:
            fn()

    def _tote_in_view(self) -> bool:
        """Does every ray from the camera to the tote miss the arm and the item it carries?"""
        if self.tote_view is None:
            return False
        eye, points = self.tote_view
        hits = p.rayTestBatch([list(eye)] * len(points), points.tolist(), physicsClientId=self.client_id)
        return not any(h[0] == self.body or (self._held is not None and h[0] == self._held) for h in hits)

    def notify_when_clear(self, fn: Callable[[], None]) -> None:
        """arm.interfaces.ViewClearNotice: call fn once during the next place, as soon as the arm and
        its item are out of the camera's view of the tote: at the first transit sample where no ray
        from the camera to the tote meets them (`tote_view`), at the latest when it starts down into
        the box."""
        self._clear_hooks.append(fn)

    def idle(self, seconds: float) -> None:
        """Hold still for `seconds` of robot time. Nothing moves, so no physics needs stepping."""
        if seconds < 0:
            raise ValueError(f"idle time must be >= 0, got {seconds}")
        self._come_to_rest()
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
                if c[3] == -1:
                    # The bolted base never moves: the floor under it (getClosestPoints ignores the
                    # collision filter pair), or an item that fell against it, is not a collision of
                    # the motion (such an item made every later motion of a tote abort, stop 31).
                    continue
                if is_item and item_tolerance:
                    tol = FINGER_ITEM_TOLERANCE if c[3] in self.finger_joints else HAND_ITEM_TOLERANCE
                    if c[8] > -tol:
                        continue
                found.append((c[3], b, self.fixtures.get(b, "item")))
                break
            if self._held is not None:
                # An item sliding along a wall it leans on overlaps it a little: only a real
                # interpenetration (> HELD_ITEM_TOLERANCE past what it had when gripped) is a collision.
                held, overlap = self._held_overlap
                allowed = HELD_ITEM_TOLERANCE + (overlap.get(b, 0.0) if held == self._held else 0.0)
                for _c in p.getClosestPoints(self._held, b, -allowed, physicsClientId=cid):
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
        # How far the item already overlapped each fixture when it was gripped: a mailer leaning on a
        # tote wall, pressed into it by the cup, sits 10-11 mm into the wall in the physics (procedural
        # tuning seed 17), and lifted straight up it never goes deeper. The carry's collision check
        # allows that much more there, no more (`_kinematic_contacts`).
        overlap = {}
        for b in self.fixtures:
            pts = p.getClosestPoints(self._held, b, 0.0, physicsClientId=self.client_id)
            depth = -min((c[8] for c in pts), default=0.0)
            if depth > 0.0:
                overlap[b] = depth
        self._held_overlap = (self._held, overlap)

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
        checks: bool = True,
        physics: bool = False,
        phases: Sequence[tuple[float, str]] = (),
        in_motion: bool = False,
        ends_moving: bool = False,
        path: Callable[[float], np.ndarray] | None = None,
    ) -> None:
        """Walk the joints through `qs` (timed by `times`), carrying and checking; raises _Abort.

        `in_motion`: the path starts where a motion still under way hands over (a stop at its first
        sample brakes along it rather than holding at once); `ends_moving`: another motion takes
        over at its end, so the arm is not at rest there. `path`: the planned trajectory q(t) the
        samples come from (a ruckig move), braked along exactly instead of a spline through them.

        `phases`: (t, name) enters phase `name` at the first sample after nominal time t.
        `physics`: step the physics along (the arm's motors hold each sample) so that the rest of
        the scene keeps moving while the arm does (a released item settling during the retreat).

        `checks=False` (backing out of a failed pick) skips the grip and contact checks. A
        protective stop at a sample brakes along this path, holds, and after `clear_stop`
        accelerates back onto it and finishes the motion (see `_stop_and_resume`).
        """
        track: list[tuple[float, np.ndarray]] = []  # (robot time, TCP position) of executed samples
        last = [np.asarray(qs[0], dtype=np.float64)]  # the last executed joint sample

        owed = [0.0]  # physics seconds not yet stepped (physics=True)

        def advance(q: np.ndarray, dt: float) -> None:
            self._kinematic_sample(q, dt, tcp, track, last, ignore, fixtures_only, checks)
            if physics:
                self._command(q)
                owed[0] += dt
                n = int(owed[0] * self.cfg.physics_hz + 1e-9)
                for _ in range(n):
                    p.stepSimulation(physicsClientId=self.client_id)
                owed[0] -= n / self.cfg.physics_hz

        qs, times = np.asarray(qs, dtype=np.float64), np.asarray(times, dtype=np.float64)
        if in_motion:
            self._momentum = None  # taken over by this path
        k, t_done, moving = 0, float(times[0]), in_motion
        while k < len(qs):
            if self._check_stop():
                if not moving:  # between motions the arm is at rest: nothing to brake
                    self._note_halted(self._rest_since if self._rest_since is not None else self._time)
                    self._hold(last[0], tcp, physical=False)
                else:
                    # Brake on a smooth path through the samples (a cubic spline: the piecewise-linear
                    # path between 20 ms samples has kinks that finite differences at the 4.2 ms braking
                    # rate would read as huge accelerations), then finish the motion on it at the
                    # nominal sample spacing.
                    from scipy.interpolate import CubicSpline  # only on a stop: a slow import

                    spacing = max(float(np.max(np.diff(times))), 1e-3)
                    t0_, t1_ = float(times[0]), float(times[-1])
                    h_rate = spacing
                    if path is not None:
                        # The plan itself (exact derivatives; a spline through 20 ms samples misreads
                        # the jerk-limited start of a move that takes over from a moving state).
                        def q_of(tau: float, path=path, t0_=t0_, t1_=t1_) -> np.ndarray:
                            return np.asarray(path(min(max(tau, t0_), t1_)), dtype=np.float64)

                        h_rate = 1.0 / self.cfg.physics_hz
                    else:
                        spline = CubicSpline(times, qs, axis=0)

                        def q_of(tau: float, spline=spline, t0_=t0_, t1_=t1_) -> np.ndarray:
                            return np.asarray(spline(min(max(tau, t0_), t1_)), dtype=np.float64)

                    t_done, _ = self._stop_and_resume(q_of, t_done, t1_, h_rate, advance, tcp, False)
                    rest = np.arange(t_done + spacing, t1_ - 1e-9, spacing)
                    times = np.concatenate([rest, [t1_]]) if t1_ > t_done + 1e-9 else np.zeros(0)
                    qs = np.array([q_of(t) for t in times]) if len(times) else np.zeros((0, qs.shape[1]))
                    k = 0
                    continue
            self._rest_since = None
            for t_switch, name in phases:
                if t_done < t_switch <= float(times[k]) and self.phase != name:
                    self._enter_phase(name)
            advance(qs[k], float(times[k]) - t_done)
            t_done = float(times[k])
            moving = True
            k += 1
            if self._clear_hooks and self.phase == "transit" and self._tote_in_view():
                self._fire_clear_hooks()
        self._command(last[0])
        self._rest_since = None if ends_moving else self._time

    def _kinematic_sample(
        self,
        q: np.ndarray,
        dt: float,
        tcp: int,
        track: list[tuple[float, np.ndarray]],
        last: list[np.ndarray],
        ignore: Sequence[int],
        fixtures_only: bool,
        checks: bool,
    ) -> None:
        """Put the arm at q, dt robot seconds after the previous sample; check the grip and contacts."""
        for j, v in zip(self.arm_joints, q, strict=True):
            p.resetJointState(self.body, j, float(v), physicsClientId=self.client_id)
        self._carry_item(tcp)
        pos, _ = self.link_pose(tcp)
        t_new = self._time + dt
        track.append((t_new, pos))
        if checks and len(track) >= 3:
            (t1, p1), (t2, p2), (t3, p3) = track[-3:]
            h1, h2 = t2 - t1, t3 - t2
            if h1 > 0 and h2 > 0:
                accel = 2.0 * ((p3 - p2) / h2 - (p2 - p1) / h1) / (h1 + h2)
                ok, u = self._grip_ok(accel)
                if not ok:
                    self._time = t_new
                    held_kind = self._held_kind
                    self._drop()
                    raise _Abort(
                        Reason.DROPPED,
                        utilisation=round(u, 3),
                        at_s=round(float(t_new), 3),
                        phase=self.phase,  # which motion lost it, for the ledger and the bench
                        gripper=held_kind,
                    )
        if checks:
            contacts = self._kinematic_contacts(ignore, fixtures_only)
            if contacts:
                link, body, name = contacts[0]
                # Stop at the last contact-free sample (a speed-and-separation monitor stops short).
                q_stop = last[0]
                for j, v in zip(self.arm_joints, q_stop, strict=True):
                    p.resetJointState(self.body, j, float(v), physicsClientId=self.client_id)
                self._carry_item(tcp)
                self._command(q_stop)
                self._time = t_new
                self._rest_since = self._time
                raise _Abort(Reason.COLLISION, link=int(link), body=int(body), with_=name)
        self._time = t_new
        last[0] = np.asarray(q, dtype=np.float64)
        self._notify("sample")

    def _stop_and_resume(
        self,
        q_of: Callable[[float], np.ndarray],
        tau: float,
        tau_end: float,
        h: float,
        advance: Callable[[np.ndarray, float], object],
        tcp: int,
        physical: bool,
    ) -> tuple[float, object]:
        """Brake along the path q_of(tau) from nominal time `tau`, hold, resume after clear_stop.

        `advance(q, dt)` executes one control sample (kinematic: with the grip and contact checks;
        physical: a motor command, one physics step and the motion's monitor, whose non-None answer
        ends the motion and is passed back). Returns (nominal time reached at full speed again, the
        monitor's answer or None). Braking and re-acceleration run at the physics rate (4.2 ms) with
        the Panda's acceleration and jerk limits (sim.safety.PathRate).
        """
        from sim.motion import PANDA_MAX_ACCELERATION
        from sim.safety import PathRate

        dt = 1.0 / self.cfg.physics_hz
        rate = PathRate(q_of, tau, tau_end, PANDA_MAX_ACCELERATION, h=h)
        speed, braking_from = rate.speed(), self._time
        q_last = q_of(tau)
        target = 0.0
        rate.a_max = PANDA_MAX_ACCELERATION * self._payload_rate_scale(rate, target, tcp, dt)
        while True:
            if target == 1.0 and self._check_stop():  # stopped again while speeding up
                target, speed, braking_from = 0.0, rate.speed(), self._time
                rate.a_max = PANDA_MAX_ACCELERATION * self._payload_rate_scale(rate, target, tcp, dt)
            if rate.r == target:
                if target == 1.0 or rate.tau >= tau_end:
                    break
                if physical:  # let the motors come to rest on the held pose
                    for _ in range(int(0.3 * self.cfg.physics_hz)):
                        qd = [
                            s_[1]
                            for s_ in p.getJointStates(
                                self.body, self.arm_joints, physicsClientId=self.client_id
                            )
                        ]
                        if float(np.max(np.abs(qd))) < 0.01:
                            break
                        answer = advance(q_last, dt)
                        if answer is not None:
                            self._note_halted(self._time, braking_from, speed)
                            return rate.tau, answer
                self._note_halted(self._time, braking_from, speed)
                self._command(q_last)
                self._hold(q_last, tcp, physical)
                target = 1.0
                rate.a_max = PANDA_MAX_ACCELERATION * self._payload_rate_scale(rate, target, tcp, dt)
                continue
            rate.step(dt, target)
            q_last = q_of(rate.tau)
            answer = advance(q_last, dt)
            if answer is not None:
                if target == 0.0:
                    self._note_halted(self._time, braking_from, speed)
                return rate.tau, answer
        if self._pending_stop is not None:  # the path ended while braking: it ended at rest
            self._note_halted(self._time, braking_from, speed)
            self._command(q_last)
            self._hold(q_last, tcp, physical)
        return rate.tau, None

    def _payload_rate_scale(self, rate, target: float, tcp: int, dt: float) -> float:
        """Fraction of the joint acceleration limits for braking (target 0) or resuming (target 1)
        while carrying: the largest of 1, 1/2, 1/4 ... whose dry-run keeps the grip load under
        CARRY_UTILISATION (payload-aware, like the transit). A heavy item on the cup brakes gently
        rather than being flung off by a stop. 1 when nothing is held."""
        if self._held is None:
            return 1.0
        from sim.motion import PANDA_MAX_ACCELERATION
        from sim.safety import PathRate

        scales = (1.0, 0.5, 0.25, 0.12, 0.06)
        for scale in scales:
            dry = PathRate(rate.q_of_tau, rate.tau, rate.tau_end, PANDA_MAX_ACCELERATION * scale, h=rate.h)
            dry.r, dry.rdot = rate.r, rate.rdot
            # The sample before, at the current rate, so the change of acceleration is seen too.
            q_now = rate.q_of_tau(rate.tau)
            if rate.tau - rate.r * dt >= 0.0:
                q_before = rate.q_of_tau(rate.tau - rate.r * dt)
            else:  # at the start of a path that begins moving: extrapolated back along it
                q_before = 2.0 * q_now - rate.q_of_tau(rate.tau + rate.r * dt)
            qs = [q_before, q_now]
            while dry.r != target and len(qs) < 2000:
                qs.append(rate.q_of_tau(dry.step(dt, target)))
            times = np.arange(len(qs)) * dt
            if self._carry_utilisation(np.array(qs), times, tcp) <= CARRY_UTILISATION:
                return scale
        return scales[-1]

    def _static_utilisation(self) -> float:
        """Grip load of the held item at rest: the cup's utilisation, or the jaw's friction demand
        (weight over the friction its two contacts give) as a fraction of what it holds."""
        if self._held is None:
            return 0.0
        if self._held_kind == "suction":
            return float(self.suction.utilisation(np.zeros(3)))
        mass, hold = self._jaw_hold()
        return float(mass * 9.81 / max(hold, 1e-9))

    def _jaw_hold(self) -> tuple[float, float]:
        """(mass kg, friction force N) of the item in the jaw: its two contacts carry 2 mu F."""
        mass, item_mu = p.getDynamicsInfo(self._held, -1, physicsClientId=self.client_id)[:2]
        return mass, 2.0 * self.cfg.jaw.finger_friction * item_mu * self.cfg.jaw.grip_force_n

    def _carry_utilisation(self, qs: np.ndarray, times: np.ndarray, tcp: int) -> float:
        """Worst grip load along a sampled move (dry run, joints restored): suction utilisation,
        or for the jaw the friction demand as a fraction of the friction available."""
        if self._held is None or len(qs) < 3:
            return 0.0
        q_keep = self.q()
        suction = self._held_kind == "suction"
        if suction:
            # The item rides rigidly in the cup: its centre of mass is fixed in the cup frame, and
            # the cup's orientation at each sample sets how gravity and inertia load the seal (the
            # wrist tilts the cup during a joint-space move; the executed check sees that too).
            lip, R0 = self.suction.cup_pose()
            com, _ = p.getBasePositionAndOrientation(self._held, physicsClientId=self.client_id)
            com_in_cup = R0.T @ (np.asarray(com) - lip)
            mass = p.getDynamicsInfo(self._held, -1, physicsClientId=self.client_id)[0]
        positions, rotations = [], []
        for q in qs:
            for j, v in zip(self.arm_joints, q, strict=True):
                p.resetJointState(self.body, j, float(v), physicsClientId=self.client_id)
            positions.append(self.link_pose(tcp)[0])
            if suction:
                rotations.append(self.suction.cup_pose()[1])
        for j, v in zip(self.arm_joints, q_keep, strict=True):
            p.resetJointState(self.body, j, float(v), physicsClientId=self.client_id)
        self._carry_item(tcp)
        P = np.array(positions)
        h = np.diff(times)
        if not suction:
            mass, hold = self._jaw_hold()
        worst = 0.0
        for k in range(2, len(P)):
            if h[k - 1] <= 0:
                continue
            acc = (P[k] - 2 * P[k - 1] + P[k - 2]) / (h[k - 1] * h[k - 1])
            if suction:
                worst = max(worst, suction_utilisation(self.suction.cfg, mass, com_in_cup, rotations[k], acc))
            else:
                need = mass * float(np.linalg.norm(acc - np.array([0.0, 0.0, -9.81])))
                worst = max(worst, need / max(hold, 1e-9))
        return worst

    def _joint_move(
        self,
        q_target: np.ndarray,
        tcp: int,
        ignore: Sequence[int] = (),
        via: Sequence[np.ndarray] = (),
        phases: Sequence[tuple[int, str]] = (),
        start: tuple[np.ndarray, np.ndarray] | None = None,
        end: np.ndarray | None = None,
        straight_first: bool = False,
    ) -> None:
        """Time-optimal, jerk-limited joint move (ruckig), executed kinematically; through the `via`
        joint positions without stopping (blended). While carrying, the speed is scaled down
        (payload-aware, as industrial controllers do) until the sampled accelerations keep the grip
        load under 90 % of what it can hold; the slower move is what gets charged. `phases`: (i, name)
        enters phase `name` once the move passes via point i. `start`: (qd, qdd) of the motion this
        one takes over from at the current joints (a blend across two motions; default at rest).
        `end`: the joint velocity (rad/s) to arrive at, for a motion that takes over there moving;
        the joints are left moving at it. `straight_first`: the first leg backs out of the box (as
        `_path_clear`'s `exit_leg` checked it)."""
        if not np.isfinite(self.q()).all():
            # The physics solver blew up (a rare PyBullet instability after hard contact): put the
            # arm back at home kinematically and report the motion as a collision, never crash.
            log.warning("arm joint state is not finite (solver instability); resetting the arm to home")
            self._set_q(self.cfg.home)
            raise _Abort(Reason.COLLISION, why="simulation instability: arm reset to home")
        if not np.isfinite(np.asarray(q_target, dtype=np.float64)).all():
            raise _Abort(Reason.INVALID, why="non-finite joint target")
        q_now = self.q()
        if start is None and float(np.max(np.abs(np.asarray(q_target, dtype=np.float64) - q_now))) < 1e-9:
            # Already there. sim.motion's profile of a sub-nanoradian move divides 0 by 0 (its
            # acceleration in path units is infinite) and samples NaN joints: the origin of the
            # "cannot convert float NaN" crash seen after a refused pick followed by home().
            self._command(q_now)
            return
        points = [self.q(), *via, np.asarray(q_target, dtype=np.float64)]
        optimise = self.cfg.via_search and _path_key(points) not in self._rule_paths

        def plan(scale: float, uniform: bool = False):
            # `uniform`: velocities scaled as much as accelerations (see the carry's floor below).
            v_scale = scale if uniform else self._velocity_scale(scale)
            if start is not None or via or end is not None:
                move = plan_via_move(
                    points,
                    scale,
                    start_velocity=None if start is None else start[0],
                    start_acceleration=None if start is None else start[1],
                    optimise=optimise,
                    end_velocity=end,
                    straight_first=straight_first,
                    velocity_scale=v_scale,
                )
            else:
                move = plan_joint_move(self.q(), q_target, scale, v_scale)
            n = max(2, int(np.ceil(move.duration / self.cfg.transit_check_dt)) + 1)
            times = np.linspace(0.0, move.duration, n)
            qs = move.sample(times)
            if not np.isfinite(qs).all():
                # Never hand a non-finite joint target to the simulator: fall back to a straight
                # joint-space interpolation over the same (finite) duration.
                log.warning("joint move sampled non-finite joints; using a linear profile instead")
                frac = np.linspace(0.0, 1.0, n)[:, None]
                qs = move.q_start[None, :] + frac * (move.q_end - move.q_start)[None, :]
            return move, times, qs

        scale = self.cfg.joint_speed_scale
        move, times, qs = plan(scale)
        if self._held is not None:
            u = self._carry_utilisation(qs, times, tcp)
            tried = [(u, scale, move, times, qs)]
            for step in CARRY_SCALES:
                if u <= CARRY_UTILISATION:
                    break
                scale = step * self.cfg.joint_speed_scale
                move, times, qs = plan(scale)
                u = self._carry_utilisation(qs, times, tcp)
                tried.append((u, scale, move, times, qs))
            # A load near the grip's limit still peels at a quarter of the speed (2.1 kg on the 25 N
            # cup, 83% at rest: 126% predicted there, carried anyway and dropped). The inertial part
            # of the load grows with acceleration, i.e. with the square of the speed scale: solve for
            # the scale that brings it under the target and check again. What is left at any speed
            # (the weight, and the wrist tilting the cup on the way) sets a floor: when the target
            # cannot be met, the fastest move within `CARRY_MARGIN` of the limit is taken, else the
            # least loaded one.
            u0 = self._static_utilisation()
            for _ in range(3):
                if u <= CARRY_UTILISATION or scale <= MIN_CARRY_SCALE:
                    break
                ratio = max(CARRY_UTILISATION - u0, 0.0) / max(u - u0, 1e-9)
                new_scale = max(MIN_CARRY_SCALE, 0.9 * scale * float(np.sqrt(ratio)))
                if new_scale >= scale:
                    break
                scale = new_scale
                move, times, qs = plan(scale)
                u_new = self._carry_utilisation(qs, times, tcp)
                tried.append((u_new, scale, move, times, qs))
                if u - u_new < 0.01:  # at the floor: slower gains nothing
                    u = u_new
                    break
                u = u_new
            if u > CARRY_UTILISATION and min(t[0] for t in tried) > CARRY_MARGIN:
                # Nothing within the margin: at the floor the velocities count too (the centripetal
                # part of the load, which a carry's faster cruise keeps, `carry_velocity_scale`), so
                # the uniformly slower move is a candidate as well: at the least loaded scale tried,
                # then at the slowest. (Tuning seed 16: a carton at 97% of the cup at rest was
                # dropped at 100% in transit.)
                least = min(tried, key=lambda t: t[0])[1]
                for sc in sorted({least, min(t[1] for t in tried)}, reverse=True):
                    move, times, qs = plan(sc, uniform=True)
                    tried.append((self._carry_utilisation(qs, times, tcp), sc, move, times, qs))
                    if tried[-1][0] <= CARRY_MARGIN:
                        break
                u, scale, move, times, qs = tried[-1]
            if u > CARRY_UTILISATION:
                within = [t for t in tried if t[0] <= CARRY_UTILISATION] or [
                    t for t in tried if t[0] <= CARRY_MARGIN
                ]
                best = min(within, key=lambda t: t[2].duration) if within else min(tried, key=lambda t: t[0])
                u, scale, move, times, qs = best
            if u > 1.0:
                # Even the least loaded carry would lose the item (the weight and the wrist's tilt
                # alone exceed the grip): do not start it. The caller sets the item back down where
                # it was gripped instead of dropping it from the carry (`place`).
                raise _Abort(
                    Reason.DROPPED,
                    why=CARRY_BEYOND_GRIP,
                    predicted_utilisation=round(u, 3),
                    set_down=True,
                    phase=self.phase,
                    gripper=self._held_kind,
                )
        switches = [(move.starts[i + 1], name) for i, name in phases] if via else []
        self._run_samples(
            qs,
            times,
            tcp,
            ignore,
            phases=switches,
            in_motion=start is not None,
            ends_moving=end is not None,
            path=lambda t, m=move: m.state(t)[0],
        )
        if end is not None:  # the joints go on moving: the next motion takes over from them
            for j, q, v in zip(self.arm_joints, self.q(), end, strict=True):
                p.resetJointState(self.body, j, float(q), float(v), physicsClientId=self.client_id)

    def _carry_scales(self) -> list[float]:
        """The speed scales a carry's path is checked at: full speed and each of `CARRY_SCALES`."""
        return [s_ * self.cfg.joint_speed_scale for s_ in (1.0, *CARRY_SCALES)]

    def _velocity_scale(self, scale: float) -> float:
        """Velocity scale of a joint move at `scale`: a carry slowed below `joint_speed_scale` for its
        load slows its accelerations more than its velocities (`carry_velocity_scale`)."""
        base = self.cfg.joint_speed_scale
        return scale if scale >= base else base * carry_velocity_scale(scale / base)

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
        end_speed: float = 0.0,
        start_speed: float = 0.0,
        limit_joints: bool = True,
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Straight tool line on a jerk-limited time-optimal profile (sim.motion.line_profile), slowed
        uniformly until every joint's sampled velocity and acceleration are within the Panda's limits.
        `start_speed` (m/s): it takes over from a line along it that ends moving (the physical lift);
        when no slower profile from that speed fits the limits, it brakes along the line first and
        goes on from rest. `limit_joints=False`: that brake, which the joints already move into.

        `end_speed` (m/s): arrive moving (at most what the line surely reaches, zero acceleration),
        for a joint move to take over there; returns that hand-over state (qd, qdd) of the joints,
        or None when the line ends at rest."""
        p0, _ = self.link_pose(link)
        length = float(np.linalg.norm(p1 - p0))
        if length < 1e-4:
            return None
        acc = self.cfg.tool_accel if accel is None else accel
        jerk = self.cfg.tool_jerk
        speed0, acc0 = speed, acc
        end = min(end_speed, speed, line_reachable_speed(length, acc, jerk))
        for attempt in range(4):
            prof = line_profile(length, speed, acc, jerk, end, start_speed)
            if attempt > 0 and start_speed > 0.0 and prof.duration > LONG_LINE_S:
                # Slowing this line cannot slow the motion it takes over from: a profile that first
                # sheds `start_speed` at a slowed deceleration grows without bound (116 million
                # samples of one lift, reporting seed 1015, stop 34). Brake along the line at its
                # own acceleration instead, then go on from rest within the limits.
                d = min(0.5 * length, start_speed * start_speed / acc0 + 0.002)
                mid = p0 + (p1 - p0) * (d / length)
                self._kinematic_line(
                    mid,
                    R_hand,
                    link,
                    start_speed,
                    ignore,
                    fixtures_only,
                    acc0,
                    0.0,
                    start_speed,
                    limit_joints=False,
                )
                return self._kinematic_line(p1, R_hand, link, speed0, ignore, fixtures_only, acc0, end_speed)
            n = max(3, int(np.ceil(prof.duration / self.cfg.transit_check_dt)) + 1)
            # Solve IK on the path at n equally spaced times of the profile.
            times = np.linspace(0.0, prof.duration, n)
            qs = []
            seed = self.q()
            for s in prof.fraction(times):
                q = self._solve(p0 + s * (p1 - p0), R_hand, link, seed)
                qs.append(q)
                seed = q
            qs = np.array(qs)
            f = _over_limits(qs, times[1] - times[0])
            if f <= 1.0 or not limit_joints:
                break
            f *= 1.05  # a uniformly slower profile: v / f, a / f^2, j / f^3
            speed, acc, jerk, end = speed / f, acc / f**2, jerk / f**3, end / f
        handover = None
        if end > 0.0:
            # The joints' velocity and acceleration at the end: q(s) along the line, differentiated
            # (IK at 1 and 2 cm before the end) times the tool's end speed (its acceleration is 0).
            d = (p1 - p0) / length
            delta = min(0.01, length / 3)
            q1 = self._solve(p1 - d * delta, R_hand, link, qs[-1])
            q2 = self._solve(p1 - 2 * d * delta, R_hand, link, q1)
            dq_ds = (qs[-1] - q1) / delta
            d2q_ds2 = (qs[-1] - 2 * q1 + q2) / (delta * delta)
            handover = (dq_ds * end, d2q_ds2 * end * end)
        self._run_samples(
            qs,
            times,
            link,
            ignore,
            fixtures_only,
            in_motion=start_speed > 0.0,
            ends_moving=handover is not None,
        )
        return handover

    # --- physical execution ----------------------------------------------------------------------------
    def _physical_line(
        self,
        p1: np.ndarray,
        R_hand: np.ndarray,
        link: int,
        speed: float,
        monitor,
        accel: float | None = None,
        moving_on: bool = False,
        start_speed: float = 0.0,
    ) -> dict:
        """Drive the TCP along a straight line with physics; `monitor()` after each step may stop it.

        Returns the monitor's last answer. `monitor` returns None to continue or a dict to stop.
        `accel` (m/s^2): the tool's acceleration on this line (default `tool_accel`).
        `moving_on`: the line ends moving (`ramp_profile`: cruising, no braking and no steps for the
        motors to catch up) for a kinematic line to take over at that speed; `_line_end_speed` (m/s)
        says at what speed it ended (0: at rest, the usual rest-to-rest trapezoid, also when the
        joints' limits would make the line slower than that). `start_speed` (m/s): it takes over
        from a motion arriving at that speed along it (`brake_profile`: cruise, then brake to rest).
        """
        acc = self.cfg.tool_accel if accel is None else accel
        p0, _ = self.link_pose(link)
        length = float(np.linalg.norm(p1 - p0))
        duration = trapezoid_time(length, speed, acc)
        n_steps = max(1, int(np.ceil(duration * self.cfg.physics_hz)))
        n_way = max(2, n_steps // 6 + 1)
        qs = self._line_qs(p0, p1, R_hand, link, n_way)
        joint_s = joint_move_time(qs[0], qs[-1])  # the joints' own rest-to-rest bound
        cruise = 0.0
        if start_speed > 0.0:
            # Already moving at start_speed (the caller checked the line is long enough to brake).
            duration = brake_profile(length, start_speed, acc)
        elif moving_on and joint_s <= duration + 1e-9:
            duration, cruise = ramp_profile(length, speed, acc)
        else:
            duration = max(duration, joint_s)
        self._line_end_speed = cruise
        n_steps = max(1, int(np.ceil(duration * self.cfg.physics_hz)))
        a_unit = acc / max(length, 1e-6)
        t = np.arange(1, n_steps + 1) / self.cfg.physics_hz

        def fraction(tau):
            if start_speed > 0.0:
                return brake_fraction(np.minimum(tau, duration), length, start_speed, acc)
            if cruise > 0.0:
                return ramp_fraction(np.minimum(tau, duration), length, cruise, acc)
            return trapezoid_fraction(tau, duration, speed / max(length, 1e-6), a_unit)

        frac = fraction(t)
        way_s = np.linspace(0.0, 1.0, n_way)
        result: dict = {}
        hz = self.cfg.physics_hz

        def q_at(s: float) -> np.ndarray:
            return np.array([np.interp(s, way_s, qs[:, i]) for i in range(7)])

        def q_of(tau: float) -> np.ndarray:  # joints at nominal time tau (s) of this line
            return q_at(float(fraction(tau)))

        sent = [self.q()]  # the last joint target commanded

        def advance(q_target: np.ndarray, _dt: float):
            # Taken over moving: the motors also get the path's velocity (feed-forward), or their
            # damping towards zero velocity would brake the arm at the hand-over.
            qd = (q_target - sent[0]) * hz if start_speed > 0.0 else None
            sent[0] = q_target
            self._command(q_target, qd)
            self._step(1)
            self._note_impact()
            self._notify("sample")
            return monitor()

        # A few extra steps let the motors catch up with the end of the path (not when it ends moving).
        k = 0
        while k < n_steps + (0 if cruise > 0.0 else 12):
            if self._check_stop():
                if k == 0 and start_speed == 0.0:  # not moving yet: hold where it stands
                    self._note_halted(self._rest_since if self._rest_since is not None else self._time)
                    self._hold(self.q(), link, physical=True)
                else:
                    # Command k-1 was the plan at nominal time k / hz: brake along the line from there.
                    tau, answer = self._stop_and_resume(
                        q_of, min(k / hz, duration), duration, 0.02, advance, link, True
                    )
                    if answer is not None:
                        return answer
                    k = max(k, int(np.floor(tau * hz + 1e-9)))
                    continue
            self._rest_since = None
            answer = advance(q_at(frac[min(k, n_steps - 1)]), 1.0 / hz)
            if answer is not None:
                self._rest_since = self._time
                return answer
            k += 1
        self._rest_since = None if cruise > 0.0 else self._time
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
    def _prepare_tool(self, gripper: str, width: float) -> float:
        """Extend/retract the cup and open the fingers; returns the actuation time (s) if anything
        changes, 0 otherwise. The caller charges it: the hand's own drives work while the arm moves
        (see `pick`), so only what outlasts the motion is added."""
        changed = False
        want_ext = gripper == "suction"
        if self.suction.extended != want_ext:
            self.suction.set_extended(want_ext)
            changed = True
        target = self.cfg.jaw.max_opening if gripper == "suction" else width
        if abs(self.jaw.width() - target) > 1e-3:
            self.jaw.set_opening(target, instant=True)
            changed = True
        return self.cfg.jaw.actuation_s if changed else 0.0

    def _hand_rotation(self, grasp: Grasp) -> np.ndarray:
        return grasp.R @ M_GRASP_HAND

    def _best_hand_rotation(self, grasp: Grasp, link: int, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Grasp symmetries (jaw: 180 deg about the approach; cup: any angle): pick the cheapest wrist.

        Cheapest: a wrist turn whose hand clears the tote walls at the grasp, then the one the arm
        reaches soonest from where it is (after a place, the wrist the slot's yaw left it at: a
        half turn of joint 7 alone takes over a second), then the smallest excursion from home.
        The cup also gets the turn that leaves joint 7 where it is (its axis is the approach).
        """
        R = self._hand_rotation(grasp)
        seed = self._seed_over(pos)
        q_from = self.q()
        q0: np.ndarray | None = None
        try:
            q0 = self._solve(pos, R, link, seed)
        except _Abort:
            pass
        near_now = self.cfg.wrist_near_current
        if grasp.gripper == "parallel_jaw":
            turns: list[float] = [0.0, np.pi]
        elif not near_now:
            turns = [0.0, np.pi / 2, np.pi, -np.pi / 2]
        else:
            turns = [float(t) for t in np.arange(8) * np.pi / 4]
            if q0 is not None:
                # Joint 7 turns the hand about the approach axis (+1 rad of turn = +1 rad of q7).
                stay = float(np.angle(np.exp(1j * (q_from[6] - q0[6]))))
                turns.insert(0, stay)
        best: tuple[float, np.ndarray, np.ndarray] | None = None
        last_abort: _Abort | None = None
        for turn in turns:
            Rt = R @ _rot_z(turn)
            seed_t = seed
            if q0 is not None:
                seed_t = q0.copy()
                q7 = q0[6] + np.angle(np.exp(1j * turn))
                q7 = q7 - 2 * np.pi if q7 > self.q_hi[6] else q7 + 2 * np.pi if q7 < self.q_lo[6] else q7
                seed_t[6] = float(np.clip(q7, self.q_lo[6], self.q_hi[6]))
            try:
                q = q0 if turn == 0.0 and q0 is not None else self._solve(pos, Rt, link, seed_t)
            except _Abort as exc:
                last_abort = exc
                continue
            q_keep = self.q()
            for j, v in zip(self.arm_joints, q, strict=True):
                p.resetJointState(self.body, j, float(v), physicsClientId=self.client_id)
            # (with check_grasp's margin: the physical arm tracks its path imperfectly)
            hits = self._kinematic_contacts(ignore=self._items(), fixtures_only=True, item_tolerance=near_now)
            for j, v in zip(self.arm_joints, q_keep, strict=True):
                p.resetJointState(self.body, j, float(v), physicsClientId=self.client_id)
            excursion = float(np.max(np.abs(q - self.cfg.home)))
            cost = (10.0 if hits else 0.0) + (
                joint_move_time(q_from, q) + self._near_limit_cost(q) + 0.01 * excursion
                if near_now
                else excursion
            )
            if best is None or cost < best[0]:
                best = (cost, Rt, q)
        if best is None:
            assert last_abort is not None
            raise last_abort
        return best[1], best[2]

    def _path_clear(
        self,
        points: Sequence[np.ndarray],
        upto: int,
        tcp: int,
        start: tuple[np.ndarray, np.ndarray] | None = None,
        scales: Sequence[float] = (1.0,),
        exit_leg: bool = False,
        end: np.ndarray | None = None,
    ) -> bool:
        """`_path_clear_as` the move with searched via velocities (`via_search`), else (a path
        through via points) with the `via_velocity` rule's, which `_joint_move` then executes: how
        fast a via point is passed bends the path between via points, and the rule's slower pass may
        clear what the faster one does not. `end`: the joint velocity it arrives at."""
        search = self.cfg.via_search and len(points) > 2
        if self._path_clear_as(points, upto, tcp, start, scales, exit_leg, search, end):
            return True
        if not search or not self._path_clear_as(points, upto, tcp, start, scales, exit_leg, False, end):
            return False
        self._rule_paths.add(_path_key(points))
        return True

    def _path_clear_as(
        self,
        points: Sequence[np.ndarray],
        upto: int,
        tcp: int,
        start: tuple[np.ndarray, np.ndarray] | None,
        scales: Sequence[float],
        exit_leg: bool,
        optimise: bool,
        end: np.ndarray | None = None,
    ) -> bool:
        """Would the move `plan_via_move(points, optimise=optimise)` keep the arm (and the held item,
        carried) at least `path_margin` clear of every fixture and item until it reaches points[upto]?
        `start`: the (qd, qdd) it takes over from; `scales`: the speed scales it may run at (a
        payload-aware carry slows down, which bends a path that starts moving). Kinematic only,
        sampled as the move is executed; the arm (and the held item) are put back where they were.

        `exit_leg`: the first leg (to points[1]) backs out of the box from a release: there the arm
        may pass as close to what it let go of as the retreat it replaces does, so while the TCP is
        lower than `retreat_clearance` over what lies under it, that leg only must touch nothing,
        keep the TCP within `EXIT_TOLERANCE` of the vertical line through where it starts and
        never lower it; above that height it is checked as the rest."""
        q_keep = self.q()
        cid = self.client_id
        bodies = [b for b in [*self.fixtures, *self._items()] if b != self._held]
        p0 = self.link_pose(tcp)[0]
        z_clear = self._clear_height(p0, fixtures=False) if exit_leg else -np.inf

        def clear(q: np.ndarray, margin: float = self.cfg.path_margin, vertical: bool = False) -> bool:
            for j, v in zip(self.arm_joints, q, strict=True):
                p.resetJointState(self.body, j, float(v), physicsClientId=cid)
            self._carry_item(tcp)
            if vertical:
                pos = self.link_pose(tcp)[0]
                if pos[2] >= z_clear - 1e-4:  # out of what it let go of: as the rest of the path
                    margin = self.cfg.path_margin
                elif np.linalg.norm(pos[:2] - p0[:2]) > EXIT_TOLERANCE or pos[2] < p0[2] - 1e-3:
                    return False
            for b in bodies:
                for c in p.getClosestPoints(self.body, b, margin, physicsClientId=cid):
                    if c[3] == -1 and self.fixtures.get(b) == "floor":
                        continue
                    return False
                if self._held is not None and p.getClosestPoints(self._held, b, margin, physicsClientId=cid):
                    return False
            return True

        try:
            for scale in scales:
                try:
                    move = plan_via_move(
                        points,
                        scale,
                        start_velocity=None if start is None else start[0],
                        start_acceleration=None if start is None else start[1],
                        optimise=optimise,
                        end_velocity=end,
                        straight_first=exit_leg,
                        velocity_scale=self._velocity_scale(scale),
                    )
                except ValueError:
                    return False
                t_end = move.starts[upto] if upto < len(move.starts) else move.duration
                n = max(2, int(np.ceil(t_end / self.cfg.transit_check_dt)) + 1)
                times = np.linspace(0.0, t_end, n)
                t_leg = move.starts[1] if exit_leg and len(move.starts) > 1 else -1.0
                if exit_leg:  # the leg's own samples, every 5 ms, and its end
                    n_leg = max(2, int(np.ceil(t_leg / 0.005)) + 1)
                    times = np.union1d(times, np.linspace(0.0, t_leg, n_leg))
                for t, q in zip(times, move.sample(times), strict=True):
                    ok = clear(q, 0.0, vertical=True) if t <= t_leg + 1e-9 else clear(q)
                    if not ok:
                        return False
            return True
        finally:
            for j, v in zip(self.arm_joints, q_keep, strict=True):
                p.resetJointState(self.body, j, float(v), physicsClientId=cid)
            self._carry_item(tcp)

    def _leave_low(self, q_target: np.ndarray) -> None:
        """Before a plain joint move (home, move): a place leaves the arm backed up only over the
        box; climb straight to the transit height first unless the move's path is clear from here."""
        self._back_out()
        link = self.tcp_link("suction" if self.suction.extended else "parallel_jaw")
        if self._held is None and self.link_pose(link)[0][2] < self._safe_height() - 1e-3:
            if not self._path_clear([self.q(), np.asarray(q_target, dtype=np.float64)], 1, link):
                self.retreat()

    def _back_out(self) -> None:
        """The retreat a place left to the next motion (`blended_exit`), on its own: straight up
        until clear of the box's contents (unchecked, backing out), at rest there. Charged to
        "retreat"; the phase running before goes on after it."""
        if self._released_by is None:
            return
        link, self._released_by = self._released_by, None
        before = self.phase
        self._enter_phase("retreat")
        self.retreat(top=self._clear_height(self.link_pose(link)[0], fixtures=False))
        self._enter_phase(before)

    def _clear_height(self, pos: np.ndarray, fixtures: bool) -> float:
        """Top of what lies under the hand at `pos` (items within 10 cm of the TCP, and with
        `fixtures` the rims of the fixtures under it) plus `retreat_clearance`, at most the transit
        height; the transit height when `retreat_clearance` is not set."""
        if self.cfg.retreat_clearance is None:
            return self._safe_height()
        top = 0.0
        for b in list(self.fixtures) + self._items():
            name = self.fixtures.get(b)
            if name == "floor" or b == self._held or (name is not None and not fixtures):
                continue
            lo, hi = p.getAABB(b, physicsClientId=self.client_id)
            r = 0.0 if name is not None else 0.10
            if np.any(np.asarray(lo[:2]) > pos[:2] + r) or np.any(np.asarray(hi[:2]) < pos[:2] - r):
                continue
            top = max(top, hi[2])
        return min(top + self.cfg.retreat_clearance, self._safe_height())

    def _near_limit_cost(self, *qs: np.ndarray) -> float:
        """1 s for each posture with a joint within 0.25 rad of its limit (the IK clips there, and
        the next pose along the motion may need another arm posture): choose such wrists last."""
        return float(sum(bool(np.any((q < self.q_lo + 0.25) | (q > self.q_hi - 0.25))) for q in qs))

    def _seed_over(self, pos: np.ndarray) -> np.ndarray:
        """An IK seed with the hand pointing down above `pos` (keeps solutions elbow-up)."""
        q = self.cfg.home.copy()
        q[0] = float(np.arctan2(pos[1], pos[0]))
        return q

    def _come_to_rest(self) -> None:
        """Bring a motion left under way (`_momentum`) to rest: a jerk-limited stop along its own
        direction, executed and checked like any motion (a protective stop brakes it the same way).
        Charged to the phase running now, or to "lift" (the only hand-over) between motions."""
        if self._momentum is None:
            return
        (qd, qdd), tcp = self._momentum
        move = plan_stop(self.q(), qd, qdd)
        n = max(3, int(np.ceil(move.duration / self.cfg.transit_check_dt)) + 1)
        times = np.linspace(0.0, move.duration, n)
        own_phase = not self.phase
        if own_phase:
            self._enter_phase("lift")
        try:
            self._run_samples(move.sample(times), times, tcp, fixtures_only=True, in_motion=True)
        except _Abort:
            log.warning("coming to rest after a hand-over failed; the arm stopped where it was")
        finally:
            self._momentum = None
            if own_phase:
                self._enter_phase("")

    # --- Arm protocol: motions -----------------------------------------------------------------------
    def home(self) -> Outcome:
        self._come_to_rest()
        t0, mark = self._time, self._motion_mark()
        try:
            if self._check_stop():
                raise self._estop()
            self._enter_phase("home")
            self._leave_low(self.cfg.home)
            self._joint_move(self.cfg.home, self.tcp_link(self._held_kind or "parallel_jaw"))
        except _Abort as exc:
            return self._motion_outcome(t0, mark, exc)
        return self._motion_outcome(t0, mark, None)

    def _motion_outcome(self, t0: float, mark: tuple[dict[str, float], int], exc: _Abort | None) -> Outcome:
        """The Outcome of a plain motion (home, move): OK, or the abort's reason, with its phases."""
        seconds = self._time - t0
        if exc is None:
            return Outcome(True, Reason.OK, robot_seconds=seconds, details=self._motion_details(mark, {}))
        details = self._motion_details(mark, exc.details)
        return Outcome(False, exc.reason, robot_seconds=seconds, details=details)

    def _motion_mark(self) -> tuple[dict[str, float], int]:
        return dict(self.phase_time), len(self.stop_events)

    def _motion_details(self, mark: tuple[dict[str, float], int], details: dict) -> dict:
        """Close the motion's phase and add its robot time per phase and its protective stops."""
        self._enter_phase("")
        self._clear_hooks = []  # a place that never got over the box does not call them later
        before, n_stops = mark
        phases = {k: v - before.get(k, 0.0) for k, v in self.phase_time.items() if v - before.get(k, 0.0) > 0}
        if phases:
            details["phases"] = phases
        stops = [ev.as_dict() for ev in self.stop_events[n_stops:]]
        if stops:
            details["stops"] = stops
            details["stop_to_standstill_s"] = max(ev["stop_to_standstill_s"] for ev in stops)
        return details

    def move(self, position: np.ndarray, orientation: np.ndarray) -> Outcome:
        """Joint-space move of the jaw TCP (or the carrying tool's TCP) to a pose, base frame."""
        self._come_to_rest()
        t0, mark = self._time, self._motion_mark()
        link = self.tcp_link(self._held_kind or "parallel_jaw")
        try:
            if self._check_stop():
                raise self._estop()
            pos = np.asarray(position, dtype=np.float64)
            R_hand = quat_to_matrix(np.asarray(orientation, dtype=np.float64)) @ M_GRASP_HAND
            q = self._solve(pos, R_hand, link, self._seed_over(pos))
            self._enter_phase("move")
            self._leave_low(q)
            self._joint_move(q, link)
        except _Abort as exc:
            return self._motion_outcome(t0, mark, exc)
        return self._motion_outcome(t0, mark, None)

    def pick(self, grasp: Grasp) -> Outcome:
        """Pre-grasp, straight-line approach, grip, lift, verify. See the module docstring."""
        return self._pick(grasp, handover=False)

    def pick_and_place(
        self, grasp: Grasp, placement_for: Callable[[Outcome], Placement]
    ) -> tuple[Outcome, Outcome | None]:
        """arm.interfaces.PickAndPlace: `pick`, then `place(placement_for(pick outcome))` without
        stopping in between: the lift above the pile ends moving up (`lift_handover_speed`) and the
        transit to the box takes over from that state (a ruckig move from a non-zero velocity and
        acceleration, within every joint's limits, payload-aware as any carry). `placement_for` runs
        at the hand-over (no robot time passes in it). Each motion reports its own phases and robot
        time, as with separate calls. (pick outcome, place outcome, or None when the pick failed.)"""
        out = self._pick(grasp, handover=self.cfg.lift_handover_speed > 0.0)
        if not out.success:
            return out, None
        try:
            placement = placement_for(out)
        except BaseException:
            self._come_to_rest()
            raise
        return out, self.place(placement)

    def _pick(self, grasp: Grasp, handover: bool) -> Outcome:
        self._come_to_rest()
        self._rule_paths.clear()
        t0, mark = self._time, self._motion_mark()
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
            q_pre = self._solve(pre, R_hand, link, q_above)  # fail before moving if pre-grasp is infeasible
            if not self.cfg.pick_shortcut:
                self._back_out()
            self._enter_phase("move_to_pick")
            # The tool takes its shape (cup out or in, fingers to the opening) while the arm moves to
            # the tote, as a real hand's drives do; the move is checked for contacts with the tool
            # already in that shape, and only actuation the move does not cover is added after it.
            actuation = self._prepare_tool(grasp.gripper, opening)
            t_move = self._time
            # The approach runs kinematically while it touches nothing and with physics for its last
            # `physical_approach` metres (or from the first contact): free space needs no contact
            # solver, contact needs nothing else. The free part is one time-optimal move over the
            # tote, down past the pre-grasp and along the approach axis to where the physical part
            # starts, through those points without stopping (blended); it is checked at every sample
            # like the straight lines it replaces.
            near = target - a * min(self.cfg.physical_approach, self.cfg.pregrasp_offset)
            q_near = self._solve(near, R_hand, link, q_pre)
            qd_near = self._approach_handover(near, a, R_hand, link, q_near, target)
            via = [
                q
                for q, here, there in ((q_above, above, pre), (q_pre, pre, near))
                if np.linalg.norm(here - there) > 1e-3
            ]
            # Shortcuts, fastest first, each taken only if its path (until the pre-grasp) is checked
            # clear of everything by `path_margin`: straight to the pre-grasp without the stop over
            # the tote; through the point over the tote from where the arm is (a place that backed up
            # only over the box); else climb straight to the transit height first (as a full retreat).
            pos_now, R_now = self.link_pose(link)
            exit_via = self._exit_via(link, [[q_pre]] if len(via) == 2 else [], via, q_near, qd_near)
            if exit_via is None:
                self._back_out()  # (no-op unless a blended exit was possible in principle)
                pos_now, R_now = self.link_pose(link)
            low = pos_now[2] < self._safe_height() - 1e-3
            exit_leg = exit_via is not None  # the first leg backs straight out of the box
            if exit_via is not None:
                via = exit_via
            elif not self.cfg.pick_shortcut:
                if low:
                    self.retreat()
            elif len(via) == 2 and self._path_clear([self.q(), q_pre, q_near], 1, link, end=qd_near):
                via = [q_pre]
                log.debug("pick path: straight to the pre-grasp")
            elif low and not self._path_clear([self.q(), *via, q_near], 1, link, end=qd_near):
                # Up out of the box (over its rim) without stopping, then on; else straight up first.
                up = np.array([pos_now[0], pos_now[1], self._clear_height(pos_now, fixtures=True)])
                q_up = None
                if up[2] > pos_now[2] + 1e-3:
                    try:
                        q_up = self._solve(up, R_now, link, self.q())
                    except _Abort:
                        q_up = None
                if q_up is not None and self._path_clear(
                    [self.q(), q_up, *via, q_near], 2, link, end=qd_near
                ):
                    via = [q_up, *via]
                    log.debug("pick path: up over the rim, blended")
                else:
                    # Straight up to the transit height (where the retreat goes), without stopping
                    # there when that leg touches nothing and stays vertical and the rest is clear.
                    top = np.array([pos_now[0], pos_now[1], self._safe_height()])
                    try:
                        q_top = self._solve(top, R_now, link, self.q())
                    except _Abort:
                        q_top = None
                    if q_top is not None and self._path_clear(
                        [self.q(), q_top, *via, q_near], 2, link, exit_leg=True, end=qd_near
                    ):
                        via, exit_leg = [q_top, *via], True
                        log.debug("pick path: straight up, blended")
                    else:
                        self.retreat()
                        log.debug("pick path: straight up first")
            approach_from = 0.0  # m/s: the physical approach starts at rest unless the descent ends moving
            try:
                if exit_via is not None:
                    # Its first leg is the retreat from the last release, charged as such.
                    self._enter_phase("retreat")
                self._joint_move(
                    q_near,
                    link,
                    via=via,
                    phases=[(0, "move_to_pick")] if exit_via else (),
                    end=qd_near,
                    straight_first=exit_leg,
                )
                approach_from = self.cfg.approach_speed if qd_near is not None else 0.0
            except _Abort as exc:
                # Items in the way: the physical approach starts here and pushes through them as
                # a real arm would. Fixtures in the way: a collision.
                if exc.reason is not Reason.COLLISION or exc.details.get("with_") != "item":
                    raise
                if self.link_pose(link)[0][2] > above[2] - 0.01:
                    raise  # an item met before the descent over the tote began: not an approach
            finally:
                self._time += max(0.0, actuation - (self._time - t_move))
            self._enter_phase("approach")
            details["approach_from_m"] = round(float(np.linalg.norm(self.link_pose(link)[0] - target)), 4)
            if grasp.gripper == "suction":
                details.update(self._approach_suction(target, a, R_hand, link, approach_from))
            else:
                details.update(self._approach_jaw(target, R_hand, link, approach_from))
            # Executed pose: where the TCP really is when the tool actuates.
            pos_now, R_now = self.link_pose(link)
            executed = Grasp(
                grasp.gripper,
                pos_now,
                matrix_to_quat(R_now @ M_GRASP_HAND.T),
                width=opening if grasp.gripper == "parallel_jaw" else 0.0,
            )
            self._enter_phase("grasp")
            self._grip(grasp.gripper, details)
            self._gripped_at = self.link_pose(link)[0].copy()  # where to set it down if it cannot be carried
            self._enter_phase("lift")
            # A heavy load is carried slowly (`_joint_move`), and a slow carry taking over from a
            # moving lift brakes hard at the hand-over, where a cup near its limit lets go: such a
            # lift ends at rest instead.
            moving_on = handover and self._static_utilisation() < HANDOVER_MAX_UTILISATION
            end_state = self._lift(
                R_hand, link, above, details, self.cfg.lift_handover_speed if moving_on else 0.0
            )
            if end_state is not None:
                self._momentum = (end_state, link)
        except _Abort as exc:
            details.update(exc.details)
            lk = details.get("link")
            if exc.reason is Reason.COLLISION and isinstance(lk, int) and lk >= -2:
                # Name the part that hit (panda_hand, panda_leftfinger, suction_cup...) for failure analysis.
                special = {-2: "held_item", -1: "base"}
                info = None if lk < 0 else p.getJointInfo(self.body, lk, physicsClientId=self.client_id)
                details["link_name"] = special[lk] if info is None else info[12].decode()
            details["max_impact_n"] = round(self.max_impact_n, 2)
            # The arm moved and failed: let go, settle, back out. Not for a refused request (nothing
            # moved), and never for a protective stop: a held item stays held, the arm stays put.
            if self._time > t0 and exc.reason is not Reason.ESTOP:
                self._enter_phase("recover")
                try:
                    self._abort_recover()
                except _Abort as rec:  # stopped and abandoned while backing out
                    details["recover"] = rec.reason.value
            return Outcome(
                False,
                exc.reason,
                executed=executed,
                robot_seconds=self._time - t0,
                item_id=self._held,
                details=self._motion_details(mark, details),
            )
        details["max_impact_n"] = round(self.max_impact_n, 2)
        return Outcome(
            True,
            Reason.OK,
            executed=executed,
            robot_seconds=self._time - t0,
            item_id=self._held,
            details=self._motion_details(mark, details),
        )

    def _exit_via(
        self,
        link: int,
        shortcuts: list[list[np.ndarray]],
        via: list[np.ndarray],
        q_near: np.ndarray,
        qd_near: np.ndarray | None = None,
    ) -> list[np.ndarray] | None:
        """Via points for a move to a pick that backs out of the box from the last release without
        stopping (`blended_exit`): straight up to where the place's retreat would end, then each of
        `shortcuts` (straight to the pre-grasp), then `via` (over the tote), the first whose path is
        checked clear (`_path_clear`'s `exit_leg`) with the tool in the shape the pick needs (it
        changes while the arm moves). None: nothing to back out of, or no such path (the caller
        backs out on its own first)."""
        if self._released_by is None:
            return None
        pos, R = self.link_pose(link)
        top = np.array([pos[0], pos[1], self._clear_height(pos, fixtures=False)])
        if top[2] - pos[2] < 1e-3:
            self._released_by = None  # already clear: nothing to back out of
            return None
        try:
            q_top = self._solve(top, R, link, self.q())
        except _Abort:
            return None
        for rest in [*shortcuts, via]:
            if self._path_clear([self.q(), q_top, *rest, q_near], 2, link, exit_leg=True, end=qd_near):
                self._released_by = None
                log.debug("pick path: out of the box and on, blended (%d via points after it)", len(rest))
                return [q_top, *rest]
        return None

    def _safe_height(self) -> float:
        """TCP height that clears every fixture rim and every item (but the held one) by the clearance."""
        top = 0.0
        for b in list(self.fixtures) + self._items():
            if self.fixtures.get(b) == "floor" or b == self._held:
                continue
            top = max(top, p.getAABB(b, physicsClientId=self.client_id)[1][2])
        return top + self.cfg.transit_clearance

    def _approach_handover(
        self,
        near: np.ndarray,
        a: np.ndarray,
        R_hand: np.ndarray,
        link: int,
        q_near: np.ndarray,
        target: np.ndarray,
    ) -> np.ndarray | None:
        """The joint velocity (rad/s) the free descent arrives at `near` with (`approach_blend`): the
        TCP moving at `approach_speed` along the approach axis `a`, with the joints on the path the
        physical approach's IK takes from there (a 5 mm finite difference of it). None (arrive at
        rest): blending off, an approach too short to brake in, or no IK there."""
        if not self.cfg.approach_blend:
            return None
        v, acc = self.cfg.approach_speed, self.cfg.tool_accel
        length = float(np.linalg.norm(target - near))
        if length < v * v / (2.0 * acc) + 1e-3:
            return None
        h = min(0.005, length / 2.0)
        try:
            q_h = self._solve(near + a * h, R_hand, link, q_near)
        except _Abort:
            return None
        qd = (q_h - q_near) / h * v
        if not np.isfinite(qd).all() or np.any(np.abs(qd) > 0.5 * _VMAX):
            return None  # a wrist flip between the two IK solutions, not a motion
        return qd

    def _approach_suction(
        self, target: np.ndarray, a: np.ndarray, R_hand: np.ndarray, link: int, start_speed: float = 0.0
    ) -> dict:
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
        res = self._physical_line(
            end, R_hand, link, self.cfg.approach_speed, monitor, start_speed=start_speed
        )
        if not first_contact:
            raise _Abort(Reason.NO_CONTACT, why="suction cup reached the grasp point and touched nothing")
        return res

    def _approach_jaw(
        self, target: np.ndarray, R_hand: np.ndarray, link: int, start_speed: float = 0.0
    ) -> dict:
        """Physical approach to the grasp point, guarded: it ends early where the hand presses on an item.

        Fingers may push items aside in a pile (as a real hand's do); a fixture touched: COLLISION.
        The palm pressing on an item (`JawConfig.palm_stop_force_n`) means the fingers are as deep as
        they go there; a fingertip pressing down on one (`tip_stop_force_n`, the force's vertical
        part) means it landed on top of it. Either way the hand stops, backs off `palm_clearance` and
        grips at that depth. Driving on to the planned depth pressed items with 110-290 N (the
        bench's damage limit is 150 N), and the palm kept pressing through the lift, on items taller
        than the fingers' reach.
        """
        fingers = set(self.finger_joints)
        cid = self.client_id
        jaw = self.cfg.jaw

        def monitor():
            palm = tip = 0.0
            floor = None
            for c in p.getContactPoints(bodyA=self.body, physicsClientId=cid):
                b, lk = c[2], c[3]
                if b == self.body:
                    continue
                if b in self.fixtures:
                    # A fingertip resting on a floor (the contact's normal points up at the finger) is
                    # as deep as the fingers go there: a guarded move stops on it, as a real hand's
                    # force sensing does. Anything else touching a fixture (a side wall, the palm) is a
                    # collision. Fingers touching the tote failed 15 of the 95 unasked attempts that
                    # failed on reporting seeds 1010-1014; those looked at were fingertips on the floor
                    # at 0 N (flat items), and on test tuning seeds 18-19 this removed all 6 of them.
                    if lk in fingers and float(c[7][2]) > FLOOR_NORMAL_Z:
                        floor = self.fixtures[b]
                        continue
                    raise _Abort(Reason.COLLISION, link=int(lk), with_=self.fixtures[b], finger=lk in fingers)
                if lk == self.hand_link:
                    palm += c[9]
                elif lk in fingers:
                    tip += c[9] * max(float(c[7][2]), 0.0)  # the normal on the item points up at the finger
            if palm > jaw.palm_stop_force_n:
                return {"palm_stop_n": round(float(palm), 1)}
            if tip > jaw.tip_stop_force_n:
                return {"tip_stop_n": round(float(tip), 1)}
            if floor is not None:
                return {"floor_stop": floor}
            return None

        start, _ = self.link_pose(link)
        res = self._physical_line(
            target, R_hand, link, self.cfg.approach_speed, monitor, start_speed=start_speed
        )
        if "palm_stop_n" in res or "tip_stop_n" in res or "floor_stop" in res:
            # Off the item (or the floor) along the way it came, as a guarded move backs off its
            # contact; the contact then ends and the fingers close around what lies between them.
            pos, _ = self.link_pose(link)
            way = start - pos
            clearance = jaw.floor_clearance if "floor_stop" in res else jaw.palm_clearance
            back = pos + way / max(float(np.linalg.norm(way)), 1e-9) * clearance
            self._physical_line(back, R_hand, link, self.cfg.approach_speed, lambda: None)
        return res

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
                # What the wrist's force-torque sensor reads before the vacuum lets go: the weight
                # and where its centre lies from the cup (arm.items uses it for the next try).
                reading = self.suction.load_reading()
                self._drop()
                raise _Abort(
                    Reason.DROPPED, why="item heavier than the cup holds", utilisation=round(u, 3), **reading
                )
        else:
            ok = self.jaw.grip()
            details["closed_width_m"] = round(self.jaw.width(), 4)
            if not ok:
                left, right = self.jaw.touching()
                if not (left | right):
                    raise _Abort(Reason.NO_CONTACT, why="fingers closed on nothing")
                raise _Abort(Reason.SLIPPED, why="fingers did not both hold the same item")
            self._held, self._held_kind = self.jaw.held_body, "parallel_jaw"

    def _lift_accel(self, cap: float | None = None) -> float:
        """Tool acceleration (m/s^2) for lifting the item just gripped: payload-aware, like the transit.

        A sealed cup's load scales with (g + a) on a vertical lift, so from the static utilisation u0
        (what a vacuum-level or wrist force-torque reading gives a real cell) the largest acceleration
        that keeps the load under `CARRY_UTILISATION` is g (CARRY_UTILISATION / u0 - 1). A heavily
        loaded cup lifts gently instead of peeling off at full acceleration; floored at
        `MIN_LIFT_ACCEL` so the lift always ends. The jaw likewise: its two friction contacts carry
        2 mu F, so the load m (g + a) stays under `CARRY_UTILISATION` of that (its friction is also
        checked at every sample).
        """
        cap = self.cfg.tool_accel if cap is None else cap
        if self._held is None:
            return cap
        if self._held_kind == "suction":
            _, u0 = self._grip_ok(np.zeros(3))
            if u0 <= 0.0:
                return cap
            a = 9.81 * (CARRY_UTILISATION / u0 - 1.0)
        else:
            mass, hold = self._jaw_hold()
            if mass <= 0.0:
                return cap
            a = CARRY_UTILISATION * hold / mass - 9.81
        return float(min(cap, max(MIN_LIFT_ACCEL, a)))

    def _lift(
        self, R_hand: np.ndarray, link: int, above: np.ndarray, details: dict, end_speed: float = 0.0
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Physical lift out of the pile, then a straight line to the transit height, ending at rest
        or at `end_speed` (m/s) for the transit to take over (returns the joints' (qd, qdd) then)."""
        pos, _ = self.link_pose(link)
        up = pos + np.array([0.0, 0.0, min(PHYSICAL_LIFT, max(above[2] - pos[2], 0.0))])
        # The physical part: the cup's load limit as before; the jaw's grip is the simulated
        # friction itself here, at the contact lines' acceleration.
        acc = self._lift_accel() if self._held_kind == "suction" else self.cfg.tool_accel
        details["lift_accel_m_s2"] = round(acc, 3)
        lift_acc = np.array([0.0, 0.0, acc])

        def monitor():
            ok, u = self._grip_ok(lift_acc)
            if not ok:
                self._drop()
                raise _Abort(Reason.DROPPED, why="load beyond the grip during lift", utilisation=round(u, 3))
            return None

        # The physical part ends moving and the kinematic line takes over at its speed (no stop
        # between the two) when what is left above it is long enough for any line from there.
        moving_on = self.cfg.lift_blend and above[2] - up[2] > LIFT_BLEND_MIN
        self._physical_line(up, R_hand, link, self.cfg.lift_speed, monitor, accel=acc, moving_on=moving_on)
        v0 = self._line_end_speed
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
        if end_speed > 0.0 and self.cfg.lift_clearance is not None:
            # Low lift: only until the item clears what lies under it; the transit climbs the rest
            # while it turns (place() checks that carry and otherwise rises straight up first).
            under = self._clear_height(pos, fixtures=True) - (self.cfg.retreat_clearance or 0.0)
            low = under + self.cfg.lift_clearance + (pos[2] - lo_z)
            if pos[2] + 0.01 < low < above[2]:
                above[2] = low
                details["lift_low"] = True
        if v0 > 0.0:
            # Room to come to rest from the physical part's speed at the line's (payload-aware)
            # acceleration, were the line to end at rest.
            a_line = self._lift_accel(self.cfg.free_accel)
            above[2] = max(above[2], pos[2] + v0 * v0 / a_line + 0.01)
        return self._lift_line(above, R_hand, link, end_speed, start_speed=v0)

    def _lift_line(
        self, top: np.ndarray, R_hand: np.ndarray, link: int, end_speed: float = 0.0, start_speed: float = 0.0
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Straight up to `top` with the item, payload-aware, ending at rest or at `end_speed`, from
        rest or from `start_speed` (taking over from the physical lift)."""
        # Brushing neighbours on the way out of the pile is normal; only the rims count here.
        return self._kinematic_line(
            top,
            R_hand,
            link,
            self.cfg.free_speed,
            fixtures_only=True,
            accel=self._lift_accel(self.cfg.free_accel),
            end_speed=end_speed,
            start_speed=start_speed,
        )

    def _carry_from_low_lift(
        self,
        via: list[np.ndarray],
        q_target: np.ndarray,
        link: int,
        handover: tuple[np.ndarray, np.ndarray] | None,
        R_now: np.ndarray,
        up: np.ndarray,
    ) -> tuple[list[np.ndarray], tuple[np.ndarray, np.ndarray] | None]:
        """The carry after a low lift (`lift_clearance`): (via points, hand-over state) of a path
        checked clear with the item, at every speed the carry may run at. The transit as planned if
        that is clear; else through `up` (straight above, at the carry's height), blended; else
        the arm stops and lifts straight there first (charged to the lift), and the transit starts
        from rest. `handover` None: the lift ended at rest (a line too short to reach its hand-over
        speed), checked the same way from rest."""
        # The carry's fixed speed steps; a heavier load's slower carry (`_joint_move`) is not checked
        # here, only sample by sample as it runs (a slower blend stays nearer the via polyline).
        scales = self._carry_scales()
        if self._path_clear([self.q(), *via, q_target], len(via), link, handover, scales):
            return via, handover
        try:
            q_up = self._solve(up, R_now, link, self.q())
        except _Abort:
            q_up = None
        if q_up is not None and self._path_clear(
            [self.q(), q_up, *via, q_target], 1 + len(via), link, handover, scales
        ):
            log.debug("carry: up to the carry height first, blended")
            return [q_up, *via], handover
        log.debug("carry: stop, lift to the carry height, then the transit")
        self._come_to_rest()
        self._enter_phase("lift")
        self._lift_line(up, R_now, link)
        return via, None

    def _set_down(self, link: int) -> float:
        """Lower the held item straight down to where it was gripped and let go of it there: what a
        cell does with an item it lifted but cannot carry, instead of dropping it from the carry's
        height. Stops early where the item meets something. Returns how far it lowered, metres."""
        pos, R = self.link_pose(link)
        item = self._held
        stop_z = pos[2] if self._gripped_at is None else self._gripped_at[2] + SET_DOWN_CLEARANCE
        lowered = 0.0
        if item is not None and pos[2] - stop_z > 1e-3:

            def monitor():
                for c in p.getContactPoints(bodyA=item, physicsClientId=self.client_id):
                    if c[2] != self.body:
                        return {"touched": int(c[2])}
                return None

            # At the lift's payload-aware acceleration: braking at the bottom loads the grip as
            # the start of a lift does.
            down = np.array([pos[0], pos[1], stop_z])
            self._physical_line(down, R, link, self.cfg.lift_speed, monitor, accel=self._lift_accel())
            lowered = float(pos[2] - self.link_pose(link)[0][2])
        self._release(self._held_kind or "parallel_jaw")
        return round(lowered, 4)

    def _release(self, kind: str) -> None:
        """Let go of the held item on purpose (placed, or set down): the cup's blow-off, or the
        fingers opening with physics."""
        self._enter_phase("release")
        if kind == "suction":
            self.suction.release()
            self._time += self.cfg.suction.actuation_s
        else:
            self.jaw.release()  # physical opening
        self._held = None
        self._held_kind = None
        self._T_tcp_item = None

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

    def retreat(self, with_physics: bool = False, top: float | None = None) -> None:
        """Move the TCP straight up to the transit height (or to `top`), without contact checks
        (backing out).

        `with_physics`: keep stepping the physics along the way (a released item falls and settles
        while the arm leaves). A protective stop during the retreat brakes and holds like any other
        motion.
        """
        link = self.tcp_link("suction" if self.suction.extended else "parallel_jaw")
        pos, R = self.link_pose(link)
        top = max(pos[2], self._safe_height() if top is None else top)
        if top - pos[2] < 1e-3:
            return
        target = np.array([pos[0], pos[1], top])
        try:
            # IK every centimetre: interpolating between a few solutions bends the joint path at
            # each one, which the sampled acceleration check below would read as a limit.
            qs = self._line_qs(pos, target, R, link, max(6, int(np.ceil((top - pos[2]) / 0.01)) + 1))
        except _Abort:
            qs = None
        if qs is not None and float(np.abs(np.diff(qs, axis=0)).max()) > self.cfg.line_max_joint_step:
            # IK switched branches on the way up (a 1 cm step of the tool needing a large joint
            # step): no continuous straight path. Slowing down uniformly never makes a jump
            # feasible; a retreat once ran 203 s of robot time that way (bench procedural 1004).
            log.warning("retreat: the straight path up from %s jumps between IK branches", np.round(pos, 3))
            qs = None
        if qs is None:
            log.warning("retreat: no straight path up from %s; going home directly", np.round(pos, 3))
            qs = np.array([self.q(), self.cfg.home])
        length = float(top - pos[2])
        speed, acc, jerk = self.cfg.free_speed, self.cfg.free_accel, self.cfg.tool_jerk
        way = np.linspace(0.0, 1.0, len(qs))
        for _ in range(4):
            prof = line_profile(length, speed, acc, jerk)
            # Never faster than the joints allow between the two ends (the profile is stretched).
            duration = max(prof.duration, cartesian_move_time(length, speed, acc, qs[0], qs[-1]))
            n = max(3, int(np.ceil(duration / self.cfg.transit_check_dt)) + 1)
            times = np.linspace(0.0, duration, n)
            frac = prof.fraction(times * (prof.duration / duration))
            samples = np.array([[np.interp(f, way, qs[:, i]) for i in range(7)] for f in frac])
            # ... and, sampled, within every joint's velocity and acceleration limit (as
            # `_kinematic_line`): a uniformly slower profile until it is.
            f = _over_limits(samples, times[1] - times[0])
            if f <= 1.0:
                break
            f *= 1.05
            speed, acc, jerk = speed / f, acc / f**2, jerk / f**3
        self._run_samples(samples, times, link, checks=False, physics=with_physics)

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
        t0, mark = self._time, self._motion_mark()
        details: dict = {}
        if self._held is None:
            self._come_to_rest()
            return Outcome(False, Reason.NOT_HOLDING, robot_seconds=0.0)
        item = self._held
        kind = self._held_kind or "parallel_jaw"
        link = self.tcp_link(kind)
        # Taking over from the lift of pick_and_place: the transit starts from its velocity. A stop
        # that came meanwhile is then not a refusal: the first sample brakes along the transit.
        handover = self._momentum[0] if self._momentum is not None and self._momentum[1] == link else None
        if handover is None:
            self._come_to_rest()
        try:
            if handover is None and self._check_stop():
                raise self._estop()
            target = np.asarray(placement.position, dtype=np.float64)
            pos_now, R_now = self.link_pose(link)
            R_req = quat_to_matrix(np.asarray(placement.orientation, dtype=np.float64)) @ M_GRASP_HAND
            # The carry's height: the transit height, and the held item's lowest point 3 cm over the
            # highest thing in the cell (as the full lift ends). After a full lift the TCP is there
            # already; after a low lift (`lift_clearance`) the carry climbs to it.
            below = pos_now[2] - p.getAABB(item, physicsClientId=self.client_id)[0][2]
            carry_z = self._safe_height()
            if self.cfg.lift_clearance is not None:
                carry_z = max(carry_z, carry_z - self.cfg.transit_clearance + below + 0.03)
            above = np.array([target[0], target[1], max(pos_now[2], carry_z)])
            # The requested wrist or its 180-degree twin (same for both tools; the item turns about
            # the placement's pivot, so the TCP goes to the pivot's other side), whichever the arm
            # reaches sooner from its joints now (the base turns about 1.3 rad between tote and box,
            # and joint 7 with it); the carried wrist only if neither is reachable.
            pivot = target if placement.pivot is None else np.asarray(placement.pivot, dtype=np.float64)
            target_twin = target.copy()
            target_twin[:2] = 2.0 * pivot[:2] - target[:2]
            q_now = self.q()
            best: tuple[float, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
            last: _Abort | None = None
            for R_hand, tgt in ((R_req, target), (R_req @ _rot_z(np.pi), target_twin)):
                abv = np.array([tgt[0], tgt[1], above[2]])
                try:
                    q_above = self._solve(abv, R_hand, link, self._seed_over(abv))
                    q_target = self._solve(tgt, R_hand, link, q_above)
                except _Abort as exc:
                    last = exc
                    continue
                # The whole carry (over the box, then down into it: a wrist at its limit over the
                # box can need another arm posture at the release, and a swing between the two), and
                # a wrist well inside its limits.
                cost = (
                    joint_move_time(q_now, q_above)
                    + joint_move_time(q_above, q_target)
                    + self._near_limit_cost(q_above, q_target)
                    + 0.01 * float(np.max(np.abs(q_above - self.cfg.home)))
                    if self.cfg.wrist_near_current
                    else _angle_deg(R_hand, R_now)  # the twin nearest the carried wrist
                )
                if best is None or cost < best[0]:
                    best = (cost, R_hand, tgt, q_above, q_target)
            if best is None:
                R_hand = R_now
                abv = np.array([target[0], target[1], above[2]])
                try:
                    q_above = self._solve(abv, R_hand, link, self._seed_over(abv))
                    q_target = self._solve(target, R_hand, link, q_above)
                except _Abort:
                    assert last is not None
                    raise last from None
            else:
                _, R_hand, target, q_above, q_target = best
            # Shortcut: straight to a point `place_approach` over the release (not up to the transit
            # height over the box first), when that path is checked clear of everything, the item
            # included, at every speed the carry may run at.
            via = [q_above]
            # The item's lowest point over the box's rim and what lies under and around the slot.
            pp_z = self._clear_height(target, fixtures=True) + max(below, 0.0)
            if self.cfg.place_approach is not None:
                pp_z = max(pp_z, target[2] + self.cfg.place_approach)
            if self.cfg.place_approach is not None and above[2] > pp_z + 0.01:
                pp = np.array([target[0], target[1], pp_z])
                try:
                    q_pp = self._solve(pp, R_hand, link, q_target)
                except _Abort:
                    q_pp = None
                scales = self._carry_scales()
                if q_pp is not None and self._path_clear(
                    [self.q(), q_pp, q_target], 1, link, handover, scales
                ):
                    via = [q_pp]
                log.debug("place path: %s", "over the release" if via[0] is not q_above else "transit height")
            if self.cfg.lift_clearance is not None and pos_now[2] < carry_z - 1e-3:  # after a low lift
                up = np.array([pos_now[0], pos_now[1], carry_z])
                via, handover = self._carry_from_low_lift(via, q_target, link, handover, R_now, up)
            self._enter_phase("transit")
            try:
                # One time-optimal move to the box and down into it, passing the point above the
                # drop without stopping (blended); "place" from there. Payload-aware like any carry.
                # "place" from the last via point (over the box), not from a rise before it.
                self._joint_move(q_target, link, via=via, phases=[(len(via) - 1, "place")], start=handover)
            except _Abort as exc:
                if exc.reason is not Reason.COLLISION or self.phase != "place":
                    raise
                # The item or the hand is about to touch the stack or the box: release here.
                details["released_early"] = exc.details
            self._release(kind)
            # Back out the way it came in while the item settles in the box (physics runs along).
            # What settling is left when the arm is clear is stepped without charging the arm: it
            # is free to go on, and the next motions happen over the tote.
            if self.cfg.blended_exit:
                # The arm holds where it let go while the item settles (not charged: the arm could
                # go on meanwhile, as after the retreat below), and leaves the box as the first leg
                # of its next motion (`_exit_via`, `_back_out`).
                self._command(self.q())
                for _ in range(int(round(self.cfg.settle_s * self.cfg.physics_hz))):
                    p.stepSimulation(physicsClientId=self.client_id)
                self._released_by = link
            else:
                self._enter_phase("retreat")
                t_r = self._time
                top = self._clear_height(self.link_pose(link)[0], fixtures=False)
                self.retreat(with_physics=True, top=top)
                rest = int(round((self.cfg.settle_s - (self._time - t_r)) * self.cfg.physics_hz))
                for _ in range(max(rest, 0)):
                    p.stepSimulation(physicsClientId=self.client_id)
        except _Abort as exc:
            details.update(exc.details)
            self._come_to_rest()  # failed before the transit took over from the lift
            if exc.reason is Reason.ESTOP:
                # Stopped and abandoned (shutdown) or refused: the item stays held where the arm is.
                return self._place_outcome(exc.reason, t0, item, mark, details)
            self._enter_phase("recover")
            if self._held is not None and exc.details.get("set_down"):
                try:
                    details["set_down_m"] = self._set_down(link)
                except _Abort as rec:
                    # Stopped and abandoned (shutdown) on the way down: the item stays held there,
                    # as after any stop while carrying.
                    details["recover"] = rec.reason.value
                    return self._place_outcome(exc.reason, t0, item, mark, details)
            if self._held is not None:
                self._drop()
            self._step(int(self.cfg.settle_s * self.cfg.physics_hz))
            return self._place_outcome(exc.reason, t0, item, mark, details)
        return self._place_outcome(Reason.OK, t0, item, mark, details)

    def _place_outcome(
        self, reason: Reason, t0: float, item: int, mark: tuple[dict[str, float], int], details: dict
    ) -> Outcome:
        """The Outcome of a place that started at robot time `t0` carrying `item`."""
        return Outcome(
            reason is Reason.OK,
            reason,
            robot_seconds=self._time - t0,
            item_id=item,
            details=self._motion_details(mark, details),
        )
