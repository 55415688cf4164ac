"""Configuration of the simulated arm and its two tools (lerobot style: config here, device in sim_arm.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class SuctionConfig:
    """A 30 mm bellows cup on a slide between the Panda's fingers (see sim/sim_arm.py)."""

    cup_radius: float = 0.015  # m, lip radius (30 mm cup)
    max_normal_angle_deg: float = 18.0  # deg, largest angle between surface normal and -approach that seals
    max_rim_gap: float = 0.0025  # m, largest gap between the lip plane and the surface around the rim
    rim_rays: int = 12  # count, rays sampled on the rim (plus one at the centre) for the seal check
    vacuum_rating_n: float = 25.0  # N, holding force of the sealed cup (49 N theoretical at -70 kPa, SF 2)
    moment_rating_nm: float = 0.25  # N*m, tilting moment the cup lip resists before it peels
    actuation_s: float = 0.15  # s, vacuum build-up / blow-off time
    overtravel: float = 0.012  # m, how far past the grasp point the approach continues to find contact
    contact_stop_depth: float = 0.003  # m, cup compression after first contact before the approach stops


@dataclass(frozen=True)
class JawConfig:
    """The Panda hand: two fingers coupled by a gear constraint."""

    max_opening: float = 0.08  # m, total finger opening
    open_margin: float = 0.015  # m, extra opening over the requested width before approach
    grip_force_n: float = 30.0  # N, finger motor force (Panda: 70 N continuous; lower avoids penetration)
    finger_friction: float = 1.0  # unitless, lateral friction coefficient of the finger pads
    actuation_s: float = 0.25  # s, time for the fingers to close or open
    min_held_width: float = 0.002  # m, fingers closer than this hold nothing
    release_gap: float = 0.02  # m, extra opening on release (not fully open: fingers near box walls)
    # The approach is a guarded move: the palm pressing on an item with more than this ends it (the
    # fingers are as deep as they go; pushing on would crush the item under the palm), newtons
    palm_stop_force_n: float = 5.0
    # ... and a fingertip pressing down on an item (the vertical part of its contact force) with more
    # than this: it landed on top of the item. Higher than the palm's: a finger sliding down a
    # sloped side while it pushes items aside in a pile is normal, newtons
    tip_stop_force_n: float = 20.0
    palm_clearance: float = 0.005  # m, the hand backs off this far after the palm or a tip pressed
    # A fingertip meeting the tote's floor ends the approach too (a flat item: the planned depth
    # reached the floor); the hand backs off this far, metres, and grips just above it
    floor_clearance: float = 0.002


@dataclass(frozen=True)
class SimArmConfig:
    """Simulated Panda: limits, speeds, tolerances."""

    home_joints: tuple[float, ...] = (0.0, -0.6, 0.0, -2.3, 0.0, 1.75, 0.785)  # rad, home posture (7)
    pregrasp_offset: float = 0.10  # m, pre-grasp distance back along the approach axis
    physical_approach: float = 0.04  # m, last part of the approach simulated with physics (see sim_arm)
    lift_height: float = 0.15  # m, straight-up lift after gripping
    transit_clearance: float = 0.12  # m, TCP height above tote/box rims while carrying, plus item size
    place_drop_height: float = 0.02  # m, gap left between the held item and the box floor or stack
    # After a release the TCP backs straight up only until it is this far above the box's rim and
    # contents (not to the transit height): the next move to a pick leaves from there on a path
    # checked clear of every fixture and item by `path_margin` (else it climbs to the transit
    # height first, as before). None: always back up to the transit height.
    retreat_clearance: float | None = 0.04  # m
    # After a release the arm stays where it let go while the item settles, and the next motion
    # backs out of the box as its first leg: a pick (same tool) climbs straight up to where the
    # retreat above would end and goes on to the tote without stopping there (blended), if that
    # leg is checked to stay within `EXIT_TOLERANCE` of the vertical without touching anything and
    # the rest of the path clear by `path_margin`; else, and before any other motion, the retreat
    # runs on its own first, as with False (the place then backs out itself).
    blended_exit: bool = True
    path_margin: float = 0.01  # m, clearance a shortcut path must keep from fixtures and items
    # The grasp's wrist turn (jaw: 180 deg twins; cup: any turn) the arm reaches soonest from its
    # joints now (after a place: the slot's wrist); False: the smallest excursion from home.
    wrist_near_current: bool = True
    # The move to a pick goes straight to the pre-grasp (no stop over the tote) when that path is
    # checked clear by `path_margin`; False: always through the point over the tote at the transit
    # height (from the transit height: a low retreat is finished first).
    pick_shortcut: bool = True
    place_approach: float | None = None  # m, a place's shortcut ends this far over the release
    approach_speed: float = 0.25  # m/s, tool speed on the straight approach
    lift_speed: float = 0.4  # m/s, tool speed on lift, lower and retreat
    tool_accel: float = 2.5  # m/s^2, tool acceleration on straight contact lines (approach, physical lift)
    # Free-space lines (the lift above the pile, the retreat) run at the Panda's published Cartesian
    # speed, most of its acceleration and a fraction of its jerk; every line is then slowed until
    # its sampled joint velocities and accelerations are within the joint limits, and a carried
    # item lowers the acceleration further (payload-aware, `SimArm._lift_accel`).
    free_speed: float = 1.7  # m/s, tool speed on free-space lines (Panda Cartesian limit: 1.7)
    free_accel: float = 10.0  # m/s^2, tool acceleration on free-space lines (Panda Cartesian limit: 13)
    tool_jerk: float = 500.0  # m/s^3, tool jerk on every kinematic line (Panda Cartesian limit: 6500)
    # pick_and_place: the lift above the pile ends at this upward tool speed (at most what the line
    # reaches) and the transit to the box takes over from it without a stop; 0 = stop in between.
    lift_handover_speed: float = 0.6  # m/s
    # The physical part of the lift (the first PHYSICAL_LIFT metres, with physics) ends cruising at
    # up to `lift_speed` instead of braking to rest, and the kinematic rest of the lift takes over
    # at that speed: no stop between the two. False: it brakes, the motors settle, the rest starts
    # from rest.
    lift_blend: bool = True
    # Blended moves pass their via points at velocities searched to make the move short
    # (sim.motion.via_velocities), with the plain rule's where only those clear the path; False:
    # always the rule (stop the joints that turn back, half speed for the others).
    via_search: bool = True
    # The free descent to where the physical approach starts arrives moving at `approach_speed`
    # along the approach axis and the physical approach takes over cruising (then brakes at its
    # end): no stop between the two. False: the descent ends at rest and the approach starts from it.
    approach_blend: bool = True
    # pick_and_place: the lift above the pile ends once the held item's lowest point is this far
    # over what lies under it in the tote (rims and items near it, as `retreat_clearance`), not at
    # the transit height, and the transit climbs the rest while the base turns, if that carry is
    # checked clear by `path_margin` (the item included, at every payload speed scale); else the
    # transit first rises straight to the transit height as part of the same blended move, or the
    # arm stops and lifts there (the old way). None: the lift always ends at the transit height.
    # On since stop 26: on the reporting bench (seed 1000, procedural) 0.03 m first gave 3 held-item
    # collisions in 127 attempts where the lift to the transit height gave none; the fault (a tall
    # item's carry height) was fixed, and on tuning seeds 0-3 and 7 (about 400 attempts) it damaged
    # no more than the full lift (docs/benchmarks.md, cycle time). It cuts the lift by 0.12-0.17 s.
    lift_clearance: float | None = 0.03  # m
    joint_speed_scale: float = 1.0  # unitless (0, 1], fraction of the Panda's velocity limits
    ik_pos_tol: float = 0.005  # m, accepted IK position error (checked with forward kinematics)
    ik_rot_tol_deg: float = 3.0  # deg, accepted IK orientation error
    ik_iterations: int = 100  # count, iterations of pybullet's IK solver
    reach_radius: float = 0.855  # m, Panda reach from the shoulder (joint 2) to the flange
    joint_forces: tuple[float, ...] = (87.0, 87.0, 87.0, 87.0, 12.0, 12.0, 12.0)  # N*m, motor limits
    physics_hz: float = 240.0  # Hz, simulation step rate
    settle_s: float = 0.3  # s, physics time after a release for the item to come to rest
    transit_check_dt: float = 0.02  # s, sampling interval of the kinematic transit (payload checks)
    # A straight retreat solved by IK every centimetre: a bigger joint step between two solutions is
    # a switch of IK branch, not a path (rad; normal steps are a few hundredths).
    line_max_joint_step: float = 0.3
    hold_tick_s: float = 0.05  # s, robot time between checks while a protective stop holds the arm
    max_hold_s: float = 3600.0  # s, a held motion gives up (ESTOP, still holding) after this long
    suction: SuctionConfig = field(default_factory=SuctionConfig)
    jaw: JawConfig = field(default_factory=JawConfig)

    def __post_init__(self) -> None:
        if len(self.home_joints) != 7 or len(self.joint_forces) != 7:
            raise ValueError("home_joints and joint_forces need 7 values")
        if not 0 < self.joint_speed_scale <= 1:
            raise ValueError("joint_speed_scale must be in (0, 1]")

    @property
    def home(self) -> np.ndarray:
        return np.array(self.home_joints, dtype=np.float64)
