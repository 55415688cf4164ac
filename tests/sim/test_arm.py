"""The simulated arm and its grippers, on small real-PyBullet scenes (no mocks)."""

from __future__ import annotations

import numpy as np
import pybullet as p
import pytest

from grasping.types import Grasp, Placement, Reason, grasp_frame, matrix_to_quat, quat_to_matrix
from sim.motion import joint_move_time, plan_joint_move, trapezoid_time
from sim.oracle import OracleGraspSource

DOWN = matrix_to_quat(grasp_frame(np.array([0.0, 0.0, -1.0])))


def _centre(cell) -> np.ndarray:
    b = cell.tote_bounds
    return np.array([(b.lo[0] + b.hi[0]) / 2, (b.lo[1] + b.hi[1]) / 2, b.lo[2]])


def _carton(cell, half=(0.06, 0.04, 0.03), mass=0.3, offset=(0.0, 0.0)) -> int:
    c = _centre(cell)
    body = cell.add_primitive(
        "box", half, (c[0] + offset[0], c[1] + offset[1], c[2] + half[2] + 0.001), mass=mass, name="carton"
    )
    cell.settle(0.3)
    return body


def _top_centre(cell, body: int) -> np.ndarray:
    pos, _ = cell.item_pose(body)
    top = p.getAABB(body, physicsClientId=cell.client_id)[1][2]
    return np.array([pos[0], pos[1], top])


def test_suction_at_carton_top_centre_succeeds_and_carton_ends_in_box(sim_cell):
    cell = sim_cell
    carton = _carton(cell)
    t0 = cell.arm.robot_time
    out = cell.arm.pick(Grasp("suction", _top_centre(cell, carton), DOWN))
    assert out.success, out
    assert out.item_id == carton
    assert out.executed is not None and out.executed.gripper == "suction"
    # The executed grasp is where the cup really sealed: on the top face, within a few mm.
    assert (
        np.linalg.norm(out.executed.position - _top_centre(cell, carton)) < 0.01
        or out.executed.position[2] > 0
    )
    assert out.details["seal_check"] == "ok"
    # The carton really left the tote: it hangs under the cup above the rim.
    assert cell.item_pose(carton)[0][2] > cell.tote_bounds.hi[2]
    placement = OracleGraspSource(cell).placement()
    placed = cell.arm.place(placement)
    assert placed.success, placed
    assert carton in cell.items_in_box()
    assert cell.items_in_tote() == []
    # Robot time is charged from the joint limits: a pick-and-place cycle is seconds, not milliseconds.
    assert 2.0 < cell.arm.robot_time - t0 < 15.0


def test_suction_on_ball_flank_fails_to_seal(sim_cell):
    cell = sim_cell
    c = _centre(cell)
    r = 0.035
    ball = cell.add_primitive("sphere", (r,), (c[0], c[1], c[2] + r + 0.001), mass=0.1, name="ball")
    cell.settle(0.3)
    centre, _ = cell.item_pose(ball)
    normal = np.array([0.0, 1.0, 1.0]) / np.sqrt(2.0)  # 45 degrees down the flank
    grasp = Grasp("suction", centre + r * normal, matrix_to_quat(grasp_frame(-normal)))
    out = cell.arm.pick(grasp)
    assert out.reason is Reason.SEAL_FAILED, out
    assert not out.success
    # The curvature leaves a gap under the 30 mm lip that the cup cannot bridge.
    assert out.details["seal_check"] in ("gap", "normal")
    assert cell.arm.held_item is None
    assert ball in cell.items_in_tote()


def test_suction_top_down_on_a_steep_face_fails_to_seal(sim_cell):
    cell = sim_cell
    c = _centre(cell)
    # A static slab tilted 40 degrees: a top-down cup meets a face 40 degrees off its axis.
    q = p.getQuaternionFromEuler([np.radians(40.0), 0.0, 0.0])
    slab = cell.add_primitive("box", (0.08, 0.08, 0.01), (c[0], c[1], c[2] + 0.07), q, mass=0.0, name="slab")
    top = _top_centre(cell, slab)
    target = np.array([top[0], top[1], 0.0])
    hit = p.rayTest([target[0], target[1], 0.5], [target[0], target[1], 0.0], physicsClientId=cell.client_id)[
        0
    ]
    assert hit[0] == slab
    out = cell.arm.pick(Grasp("suction", np.array(hit[3]), DOWN))
    assert out.reason is Reason.SEAL_FAILED, out
    assert out.details["seal_angle_deg"] > 30.0


def test_parallel_jaw_across_a_bottle_succeeds(sim_cell):
    cell = sim_cell
    c = _centre(cell)
    radius, height = 0.03, 0.2
    bottle = cell.add_primitive(
        "cylinder",
        (radius, height),
        (c[0], c[1], c[2] + height / 2 + 0.001),
        mass=0.5,
        friction=0.5,
        name="bottle",
    )
    cell.settle(0.3)
    top = _top_centre(cell, bottle)
    grasp = Grasp(
        "parallel_jaw",
        top - np.array([0.0, 0.0, 0.04]),
        matrix_to_quat(grasp_frame(np.array([0.0, 0.0, -1.0]), np.array([1.0, 0.0, 0.0]))),
        width=2 * radius,
    )
    out = cell.arm.pick(grasp)
    assert out.success, out
    assert out.item_id == bottle
    # Real finger contacts hold it: the fingers stopped at the bottle's diameter, not closed.
    assert out.details["closed_width_m"] == pytest.approx(2 * radius, abs=0.006)
    assert cell.arm.jaw.is_holding()
    assert cell.item_pose(bottle)[0][2] > cell.tote_bounds.hi[2]
    placed = cell.arm.place(OracleGraspSource(cell).placement())
    assert placed.success, placed
    assert bottle in cell.items_in_box()


def test_a_jaw_grasp_deeper_than_the_fingers_reach_stops_where_the_palm_meets_the_item(sim_cell):
    """A guarded approach: the palm touching the item's top ends the descent and the hand backs off.

    The grasp point lies 8 cm under the top of a 20 cm bottle: the fingers are 5 cm long, so the palm
    lands on the top first. Driven on to the grasp point it pressed the bottle with 262 N (and kept
    pressing through the lift); 10 cm down, the bottle slipped out. Now it is picked and placed, and
    nothing is pressed past the bench's damage limit."""
    from sim.benchmark.record import DAMAGE_IMPACT_N

    cell = sim_cell
    c = _centre(cell)
    radius, height = 0.03, 0.2
    bottle = cell.add_primitive(
        "cylinder", (radius, height), (c[0], c[1], c[2] + height / 2 + 0.001), mass=0.5, friction=0.5
    )
    cell.settle(0.3)
    top = _top_centre(cell, bottle)
    down_x = matrix_to_quat(grasp_frame(np.array([0.0, 0.0, -1.0]), np.array([1.0, 0.0, 0.0])))
    out = cell.arm.pick(Grasp("parallel_jaw", top - np.array([0.0, 0.0, 0.08]), down_x, width=2 * radius))
    assert out.success, out
    assert out.details["palm_stop_n"] > cell.arm.cfg.jaw.palm_stop_force_n
    assert out.details["max_impact_n"] < DAMAGE_IMPACT_N
    # Gripped where the palm stopped it, the clearance above: the fingers' pads 3-4 cm under the top.
    assert 0.025 < top[2] - out.executed.position[2] < 0.04
    placed = cell.arm.place(OracleGraspSource(cell).placement())
    assert placed.success, placed
    assert bottle in cell.items_in_box()


def test_a_fingertip_landing_on_a_neighbour_stops_the_jaw_instead_of_crushing_it(sim_cell):
    """A tall carton stands beside a bottle, under one finger of a jaw grasp on the bottle. Driven on
    to the grasp point, the finger pressed the carton with 265 N and shoved it 7 cm aside. Guarded,
    the approach stops where the fingertip lands, backs off, and grips the bottle there."""
    from sim.benchmark.record import DAMAGE_IMPACT_N

    cell = sim_cell
    c = _centre(cell)
    radius, height = 0.02, 0.2
    bottle = cell.add_primitive(
        "cylinder", (radius, height), (c[0], c[1], c[2] + height / 2 + 0.001), mass=0.4, friction=0.5
    )
    beside = np.array([c[0] + 0.066, c[1], c[2] + 0.085 + 0.001])
    carton = cell.add_primitive("box", (0.04, 0.04, 0.085), tuple(beside), mass=0.5)
    cell.settle(0.3)
    start, _ = cell.item_pose(carton)
    top = _top_centre(cell, bottle)
    down_x = matrix_to_quat(grasp_frame(np.array([0.0, 0.0, -1.0]), np.array([1.0, 0.0, 0.0])))
    out = cell.arm.pick(Grasp("parallel_jaw", top - np.array([0.0, 0.0, 0.04]), down_x, width=2 * radius))
    assert out.success and out.item_id == bottle, out
    assert out.details["tip_stop_n"] > cell.arm.cfg.jaw.tip_stop_force_n
    assert out.details["max_impact_n"] < DAMAGE_IMPACT_N
    assert np.linalg.norm(cell.item_pose(carton)[0] - start) < 0.01


def test_a_fingertip_meeting_the_tote_floor_stops_the_jaw_and_grips_the_flat_item_there(sim_cell):
    """A flat item (16 mm tall) with a jaw grasp planned a little too deep: the fingertips reach the
    tote's floor before the grasp point. That contact ended the pick as a collision with the tote
    (fingers on the tote failed 15 of the 95 failed unasked attempts on reporting seeds 1010-1014;
    the ones looked at were fingertips on the floor). Guarded, the approach stops
    on the floor, backs off `floor_clearance` and grips the item; a side wall is still a collision
    (test_hand_driven_into_the_tote_wall_is_a_collision)."""
    cell = sim_cell
    c = _centre(cell)
    half = (0.05, 0.015, 0.008)
    flat = cell.add_primitive("box", half, (c[0], c[1], c[2] + half[2] + 0.001), mass=0.15, friction=0.8)
    cell.settle(0.3)
    across_y = matrix_to_quat(grasp_frame(np.array([0.0, 0.0, -1.0]), np.array([0.0, 1.0, 0.0])))
    floor_z = cell.tote_bounds.lo[2]
    out = cell.arm.pick(Grasp("parallel_jaw", np.array([c[0], c[1], floor_z]), across_y, width=2 * half[1]))
    assert out.success and out.item_id == flat, out
    assert out.details["floor_stop"] == "tote"
    # Gripped just above where the fingertips met the floor, not at the planned depth.
    assert out.executed.position[2] > floor_z + 0.001
    placed = cell.arm.place(OracleGraspSource(cell).placement())
    assert placed.success, placed
    assert flat in cell.items_in_box()


@pytest.mark.parametrize("gripper", ["suction", "parallel_jaw"])
def test_grasp_in_the_air_above_the_empty_tote_fails_with_no_contact(sim_cell, gripper):
    cell = sim_cell
    point = _centre(cell) + np.array([0.0, 0.0, 0.10])
    out = cell.arm.pick(Grasp(gripper, point, DOWN, width=0.05 if gripper == "parallel_jaw" else 0.0))
    assert out.reason is Reason.NO_CONTACT, out
    assert cell.arm.held_item is None
    assert out.robot_seconds > 0.5  # it did move there and back


def test_jaw_width_beyond_the_opening_is_invalid_and_moves_nothing(sim_cell):
    cell = sim_cell
    q0, t0 = cell.arm.q(), cell.arm.robot_time
    out = cell.arm.pick(Grasp("parallel_jaw", _centre(cell) + [0, 0, 0.05], DOWN, width=0.10))
    assert out.reason is Reason.INVALID
    assert "width" in out.details["why"]
    assert np.allclose(cell.arm.q(), q0) and cell.arm.robot_time == t0


def test_pose_out_of_reach_is_unreachable(sim_cell):
    out = sim_cell.arm.pick(Grasp("suction", np.array([1.6, 0.0, 0.1]), DOWN))
    assert out.reason is Reason.UNREACHABLE


def test_hand_driven_into_the_tote_wall_is_a_collision(sim_cell):
    cell = sim_cell
    b = cell.tote_bounds
    # Fingers closing along x right next to the near wall: the hand's long side meets the wall.
    grasp = Grasp(
        "parallel_jaw",
        np.array([b.lo[0] + 0.015, (b.lo[1] + b.hi[1]) / 2, b.lo[2] + 0.03]),
        matrix_to_quat(grasp_frame(np.array([0.0, 0.0, -1.0]), np.array([1.0, 0.0, 0.0]))),
        width=0.03,
    )
    assert cell.arm.check_grasp(grasp) is Reason.COLLISION
    out = cell.arm.pick(grasp)
    assert out.reason is Reason.COLLISION, out
    assert out.details["with_"] == "tote"
    # The arm backed out: the next motion starts free.
    assert cell.arm.home().success


def test_an_item_fallen_against_the_arms_base_does_not_stop_every_motion(sim_cell):
    # The base is bolted down: an item lying against it is not hit by any motion. Counted as a
    # collision, it made every later pick of a tote fail (reporting seed 1004, stop 31: 10 of them).
    cell = sim_cell
    lo, hi = (np.array(v) for v in p.getAABB(cell.arm.body, -1, physicsClientId=cell.client_id))
    fallen = cell.add_primitive("box", (0.03, 0.03, 0.03), (hi[0] + 0.02, 0.0, 0.031), mass=0.3)
    cell.settle(0.3)
    assert p.getClosestPoints(cell.arm.body, fallen, 0.0, -1, physicsClientId=cell.client_id)  # touching
    carton = _carton(cell)
    out = cell.arm.pick(Grasp("suction", _top_centre(cell, carton), DOWN))
    assert out.success, out


def test_heavy_carton_is_dropped_by_the_suction_cup(sim_cell):
    cell = sim_cell
    carton = _carton(cell, half=(0.08, 0.06, 0.05), mass=3.0)  # 29 N of weight, cup rated 25 N
    out = cell.arm.pick(Grasp("suction", _top_centre(cell, carton), DOWN))
    assert out.reason is Reason.DROPPED, out
    assert out.details["utilisation"] > 1.0
    cell.settle(0.5)
    assert carton in cell.items_in_tote()


def test_a_heavily_loaded_cup_lifts_gently_instead_of_peeling_off(sim_cell):
    """2.2 kg on the 25 N cup: 86% loaded at rest, 108% under the full 2.5 m/s^2 lift. The arm lifts
    with the acceleration that keeps the load under 90% (payload-aware), so the item stays on."""
    from sim.sim_arm import CARRY_UTILISATION

    cell = sim_cell
    carton = _carton(cell, half=(0.08, 0.06, 0.05), mass=2.2)
    out = cell.arm.pick(Grasp("suction", _top_centre(cell, carton), DOWN))
    assert out.success, out
    u0 = out.details["static_utilisation"]
    assert 0.8 < u0 < CARRY_UTILISATION
    assert u0 * (1 + cell.arm.cfg.tool_accel / 9.81) > 1.0  # a full-acceleration lift would drop it
    assert out.details["lift_accel_m_s2"] == pytest.approx(9.81 * (CARRY_UTILISATION / u0 - 1), abs=0.01)
    assert cell.item_pose(carton)[0][2] > cell.tote_bounds.hi[2]


def test_a_load_near_the_cups_limit_is_carried_to_the_box_slowly_not_dropped_on_the_way(sim_cell):
    """2.1 kg on the 25 N cup: 83% loaded at rest, 126% predicted at a quarter of full speed (the
    slowest carry there used to be, which dropped it in transit). The carry slows until the sampled
    load stays under the margin, wrist tilt included, and the item reaches the box."""
    from sim.sim_arm import CARRY_MARGIN, CARRY_UTILISATION

    cell = sim_cell
    carton = _carton(cell, half=(0.08, 0.06, 0.05), mass=2.1)
    arm = cell.arm
    loads: list[float] = []
    arm.observers.append(
        lambda a, ev: (
            loads.append(a.suction.utilisation(np.zeros(3)))
            if ev == "sample" and a.phase == "transit" and a.held_item is not None
            else None
        )
    )
    source = OracleGraspSource(cell)
    grasp = Grasp("suction", _top_centre(cell, carton), DOWN)
    out, placed = arm.pick_and_place(grasp, lambda _o: source.placement())
    assert out.success, out
    assert CARRY_UTILISATION - 0.1 < out.details["static_utilisation"] < CARRY_UTILISATION
    assert placed is not None and placed.success, placed
    assert carton in cell.items_in_box()
    assert loads and max(loads) <= CARRY_MARGIN  # the weight alone, tilted with the wrist
    assert placed.details["phases"]["transit"] > 3.0  # far slower than the 0.8 s of a light item


def test_an_item_no_carry_can_hold_is_set_back_down_where_it_was_not_dropped_on_the_way(sim_cell):
    """2.3 kg on the 25 N cup: 90% loaded at rest, and the wrist's tilt on the way to the box takes
    even the slowest carry past the cup's hold (103% predicted). Carried anyway, it peeled off in
    transit and fell from the carry's height. Now the carry is not started: the item is lowered to
    where it was gripped and let go there, and the failure says why (the cell then tries the jaw)."""
    from sim.benchmark.record import DAMAGE_DROP_M
    from sim.sim_arm import CARRY_BEYOND_GRIP

    cell = sim_cell
    carton = _carton(cell, half=(0.08, 0.06, 0.05), mass=2.3)
    start, _ = cell.item_pose(carton)
    lowest: list[float] = []  # the held carton's lowest point over the tote floor, at every sample
    floor = cell.tote_bounds.lo[2]

    def watch(arm, event):
        if arm.held_item == carton:
            lowest.append(p.getAABB(carton, physicsClientId=cell.client_id)[0][2] - floor)

    cell.arm.observers.append(watch)
    src = OracleGraspSource(cell)
    grasp = Grasp("suction", _top_centre(cell, carton), DOWN)
    out, placed = cell.arm.pick_and_place(grasp, lambda o: src.placement())
    assert out.success, out
    assert placed.reason is Reason.DROPPED and placed.details["why"] == CARRY_BEYOND_GRIP, placed
    assert placed.details["predicted_utilisation"] > 1.0
    assert cell.arm.held_item is None
    assert max(lowest) > 0.1  # it was lifted out of the tote ...
    assert placed.details["set_down_m"] > 0.1  # ... lowered again ...
    assert lowest[-1] < 0.02 < DAMAGE_DROP_M  # ... and let go just over the floor, not from the carry
    cell.settle(0.5)
    end, _ = cell.item_pose(carton)
    assert carton in cell.items_in_tote()
    assert np.linalg.norm(end - start) < 0.01  # back where it was


def test_a_light_item_lifts_at_full_acceleration(sim_cell):
    cell = sim_cell
    carton = _carton(cell, mass=0.2)
    out = cell.arm.pick(Grasp("suction", _top_centre(cell, carton), DOWN))
    assert out.success, out
    assert out.details["lift_accel_m_s2"] == pytest.approx(cell.arm.cfg.tool_accel)


def test_off_centre_suction_on_a_long_carton_is_dropped_but_centred_holds(sim_cell):
    cell = sim_cell
    carton = _carton(cell, half=(0.15, 0.04, 0.03), mass=0.8)
    top = _top_centre(cell, carton)
    off = cell.arm.pick(Grasp("suction", top + np.array([0.12, 0.0, 0.0]), DOWN))
    assert off.reason is Reason.DROPPED, off  # 12 cm lever on 0.8 kg: the lip peels
    cell.settle(0.5)
    centred = cell.arm.pick(Grasp("suction", _top_centre(cell, carton), DOWN))
    assert centred.success, centred


def test_place_with_nothing_held_is_not_holding(sim_cell):
    out = sim_cell.arm.place(Placement(np.array([0.15, 0.55, 0.3]), DOWN))
    assert out.reason is Reason.NOT_HOLDING


def test_protective_stop_refuses_motion_until_cleared(sim_cell):
    cell = sim_cell
    carton = _carton(cell)
    cell.arm.stop()
    out = cell.arm.pick(Grasp("suction", _top_centre(cell, carton), DOWN))
    assert out.reason is Reason.ESTOP
    assert cell.arm.home().reason is Reason.ESTOP
    cell.arm.clear_stop()
    assert cell.arm.pick(Grasp("suction", _top_centre(cell, carton), DOWN)).success


def test_trapezoid_profiles_follow_the_limits():
    assert trapezoid_time(0.0, 1.0, 1.0) == 0.0
    assert trapezoid_time(1.0, 1.0, 1.0) == pytest.approx(2.0)  # exactly reaches v_max: 1 + 1
    assert trapezoid_time(0.25, 1.0, 1.0) == pytest.approx(1.0)  # triangular: 2 * sqrt(0.25)
    assert trapezoid_time(4.0, 1.0, 1.0) == pytest.approx(5.0)  # cruise: 4 / 1 + 1 / 1
    q0 = np.zeros(7)
    q1 = np.array([2.0, 0, 0, 0, 0, 0, 0])
    # Joint 1 alone: 2 rad at 2.175 rad/s and 15 rad/s^2.
    assert joint_move_time(q0, q1) == pytest.approx(2.0 / 2.175 + 2.175 / 15.0)
    assert joint_move_time(q0, q1, speed_scale=0.5) > joint_move_time(q0, q1)
    move = plan_joint_move(q0, q1)
    qs = move.sample(np.linspace(0.0, move.duration, 50))
    assert np.allclose(qs[0], q0) and np.allclose(qs[-1], q1)
    v = np.diff(qs[:, 0]) / (move.duration / 49)
    assert v.max() <= 2.175 * 1.02  # never faster than the velocity limit
    with pytest.raises(ValueError):
        joint_move_time(q0, q1, speed_scale=0.0)
    # A move of a rounding error (1e-13 rad: home() from home) samples finite joints, start to end.
    tiny = plan_joint_move(q0, q0 + 1e-13)
    assert tiny.duration >= 0
    qs = tiny.sample(np.linspace(0.0, tiny.duration, 5))
    assert (
        np.isfinite(qs).all() and np.allclose(qs[0], q0, atol=1e-12) and np.allclose(qs[-1], q0, atol=1e-12)
    )


def test_pick_reports_how_hard_the_arm_pressed_on_the_item(sim_cell):
    cell = sim_cell
    carton = _carton(cell)
    out = cell.arm.pick(Grasp("suction", _top_centre(cell, carton), DOWN))
    assert out.success
    # The cup must press to seal: a real, bounded force (the benchmark's damage limit is 150 N).
    assert 1.0 < out.details["max_impact_n"] < 150.0
    # A grasp that touches nothing exerts nothing.
    cell.arm.place(OracleGraspSource(cell).placement())
    above = _top_centre(cell, _carton(cell, offset=(0.0, 0.1)))
    miss = cell.arm.pick(Grasp("suction", above + np.array([0.0, 0.0, 0.1]), DOWN))
    assert miss.reason is Reason.NO_CONTACT and miss.details["max_impact_n"] == 0.0


def test_a_blown_up_physics_state_is_reset_not_a_crash(sim_cell):
    """PyBullet occasionally returns NaN joint states after hard contact: the arm resets to home."""
    arm = sim_cell.arm
    for j in arm.arm_joints:
        p.resetJointState(arm.body, j, float("nan"), physicsClientId=sim_cell.client_id)
    out = arm.home()
    assert out.reason is Reason.COLLISION and "instability" in out.details["why"]
    assert np.isfinite(arm.q()).all()
    assert arm.home().success


def test_a_move_to_where_the_arm_already_is_keeps_the_joints_finite(sim_cell):
    """The NaN crash of the learned benchmark (procedural episode 15): home() asked for a joint move of
    1e-13 rad, whose time profile sampled NaN joints (0 * inf), which the next move could not time."""
    arm = sim_cell.arm
    q = arm.cfg.home + np.r_[1e-13, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    for j, v in zip(arm.arm_joints, q, strict=True):
        p.resetJointState(arm.body, j, float(v), physicsClientId=sim_cell.client_id)
    t0 = arm.robot_time
    out = arm.home()
    assert out.success, out
    assert np.isfinite(arm.q()).all()
    assert np.isfinite(arm.robot_time) and arm.robot_time - t0 < 1e-3
    # The next real move is timed and executed normally.
    pose = arm.link_pose(arm.jaw_tcp)
    moved = arm.move(pose[0] + np.array([0.0, 0.05, -0.05]), DOWN)
    assert moved.success, moved
    assert np.isfinite(arm.q()).all() and arm.robot_time - t0 > 0.1
    assert arm.home().success and np.allclose(arm.q(), arm.cfg.home, atol=1e-6)


def test_a_non_finite_joint_target_is_refused_not_a_crash(sim_cell):
    arm = sim_cell.arm
    out = arm.move(np.array([np.nan, 0.0, 0.3]), DOWN)
    assert not out.success and out.reason in (Reason.UNREACHABLE, Reason.IK_FAILED, Reason.INVALID)
    assert np.isfinite(arm.q()).all()
    assert arm.home().success


def test_a_board_leaning_on_the_tote_wall_is_lifted_straight_up_not_into_the_wall(sim_cell):
    """Suction along the normal of a board that leans against the wall: the pre-grasp lies back
    along the normal, towards the wall, so a lift towards it dragged the board into the wall
    (a collision of the held item). The lift goes straight up, and the board comes out."""
    cell = sim_cell
    b = cell.tote_bounds
    cx = (b.lo[0] + b.hi[0]) / 2
    cell.add_primitive("box", (0.06, 0.04, 0.04), (cx, b.hi[1] - 0.16, b.lo[2] + 0.041), mass=1.0)
    lean = p.getQuaternionFromEuler([-0.4, 0.0, 0.0])
    board = cell.add_primitive(
        "box", (0.10, 0.13, 0.008), (cx, b.hi[1] - 0.11, b.lo[2] + 0.06), lean, mass=0.2, name="board"
    )
    cell.settle(1.0)
    pos, orn = cell.item_pose(board)
    R = quat_to_matrix(np.asarray(orn))
    n = R[:, 2] if R[2, 2] > 0 else -R[:, 2]
    hi_y = p.getAABB(board, physicsClientId=cell.client_id)[1][1]
    assert (
        20.0 < np.degrees(np.arccos(n[2])) < 50.0 and hi_y > b.hi[1] - 0.005
    )  # the premise: it leans on the wall
    out = cell.arm.pick(Grasp("suction", np.asarray(pos) + 0.008 * n, matrix_to_quat(grasp_frame(-n))))
    assert out.success, out
    assert cell.item_pose(board)[0][2] > b.hi[2]  # out of the tote, under the cup


def test_a_held_item_may_keep_the_overlap_with_a_wall_it_had_when_gripped_but_no_more(sim_cell):
    """A mailer leaning on the tote wall, pressed by the cup, sat 10-11 mm into the wall in the
    physics when it was gripped (procedural tuning seed 17); lifted straight up it never went deeper,
    yet the carry's check (6 mm) called the first sample a collision of the held item, and the bench
    counted it as damage. The check now allows the overlap the item had at the grip, plus the usual
    tolerance, with that fixture only and for that hold only."""
    from sim.sim_arm import HELD_ITEM_TOLERANCE

    cell = sim_cell
    arm = cell.arm
    b = cell.tote_bounds
    cx = (b.lo[0] + b.hi[0]) / 2
    half = (0.05, 0.02, 0.03)
    box = cell.add_primitive("box", half, (cx, b.hi[1] - half[1] + 0.010, b.lo[2] + half[2] + 0.01), mass=0.2)
    orn = cell.item_pose(box)[1]
    at_wall_y = b.hi[1] - half[1]

    def put(overlap: float) -> None:  # the box's +y face `overlap` into the wall, without physics
        pos = (cx, at_wall_y + overlap, b.lo[2] + half[2] + 0.01)
        p.resetBasePositionAndOrientation(box, pos, orn, physicsClientId=cell.client_id)

    def held_hits() -> list:
        return [c for c in arm._kinematic_contacts(fixtures_only=True) if c[0] == -2]

    put(0.010)
    arm._held, arm._held_kind = box, "suction"
    try:
        arm._remember_grasp_transform(arm.tcp_link("suction"))
        assert arm._held_overlap[1][cell.tote_id] == pytest.approx(0.010, abs=0.001)
        assert not held_hits()  # where it was gripped
        put(0.010 + HELD_ITEM_TOLERANCE - 0.002)
        assert not held_hits()  # a little deeper: within the tolerance
        put(0.010 + HELD_ITEM_TOLERANCE + 0.003)
        assert held_hits() and held_hits()[0][2] == "tote"  # pushed further in: a collision
        arm._held_overlap = (box + 1000, arm._held_overlap[1])  # the allowance of another hold
        put(0.010)
        assert held_hits()  # does not carry over
    finally:
        arm._held, arm._held_kind = None, None


def test_a_retreat_whose_straight_path_jumps_between_ik_branches_goes_home_in_seconds(sim_cell):
    # The arm as it was after a failed suction pick in bench procedural 1004, episode 19: solved
    # every centimetre, the straight line up switches IK branch (a joint step of several radians).
    # Slowing that "path" down until it looked within the limits once charged 203 s of robot time.
    q = [1.67257503, -0.16945280, -1.99025412, -2.75017747, -0.44660974, 3.37289155, -2.23772696]
    arm = sim_cell.arm
    arm.suction.set_extended(True)
    arm._set_q(np.array(q))
    t0 = arm.robot_time
    arm.retreat()
    assert arm.robot_time - t0 < 5.0
    assert np.allclose(arm.q(), arm.cfg.home, atol=1e-3)  # the fallback: straight home in joint space


def test_a_line_that_no_slowdown_fits_from_its_moving_start_brakes_first_and_ends(sim_cell, monkeypatch):
    """A straight line taking over a moving start (the lift after its physical part) was slowed
    until its joints fit their limits; when the start itself broke them, each slowdown shrank the
    deceleration that sheds the start speed, and one lift grew to 116 million samples (reporting seed
    1015, stop 34: the bench never finished). Now it brakes along the line and goes on from rest."""
    import inspect

    import sim.sim_arm as sim_arm

    real = sim_arm._over_limits

    def over(samples, h):  # no slower profile fits while the line starts moving
        moving = inspect.currentframe().f_back.f_locals.get("start_speed", 0.0) > 0.0
        return 4.0 if moving else real(samples, h)

    monkeypatch.setattr(sim_arm, "_over_limits", over)
    arm = sim_cell.arm
    link = arm.tcp_link("suction")
    p0, R = arm.link_pose(link)
    t0 = arm.robot_time
    top = p0 + np.array([0.0, 0.0, 0.15])
    arm._kinematic_line(top, R, link, arm.cfg.free_speed, fixtures_only=True, accel=3.6, start_speed=0.35)
    assert np.linalg.norm(arm.link_pose(link)[0] - top) < 0.002
    assert arm.robot_time - t0 < 3.0  # seconds of robot time, not hours
