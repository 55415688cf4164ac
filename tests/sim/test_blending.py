"""A pick blended into its place (arm.interfaces.PickAndPlace): the transit takes over from the lift
while it still moves, within every joint's limits, and each motion's robot time is its phases' sum.

Planned trajectories are sampled at 1 ms (ruckig's exact states and finite differences); executed
motions are sampled at every control sample of a real PyBullet pick and place.
"""

from __future__ import annotations

import numpy as np
import pybullet as p
import pytest

from grasping.types import Grasp, Reason, grasp_frame, matrix_to_quat
from sim.motion import (
    PANDA_MAX_ACCELERATION,
    PANDA_MAX_JERK,
    PANDA_MAX_VELOCITY,
    line_profile,
    line_reachable_speed,
    plan_stop,
    plan_via_move,
)
from sim.oracle import OracleGraspSource

DOWN = matrix_to_quat(grasp_frame(np.array([0.0, 0.0, -1.0])))
DT = 1e-3  # s, sampling step of the planned-trajectory checks
HOLD_TICKS = 6  # hold ticks observed before the test presses clear-stop


def _assert_within_limits(move, v_tol: float = 1.001) -> None:
    times = np.arange(0.0, move.duration + DT, DT)
    for t in times:
        _, qd, qdd = move.state(t)
        assert (np.abs(qd) <= PANDA_MAX_VELOCITY + 1e-6).all()
        assert (np.abs(qdd) <= PANDA_MAX_ACCELERATION + 1e-6).all()
    qs = move.sample(times)
    v = np.diff(qs, axis=0) / DT
    a = np.diff(v, axis=0) / DT
    j = np.diff(a, axis=0) / DT
    assert (np.abs(v) <= PANDA_MAX_VELOCITY * v_tol + 1e-6).all()
    assert (np.abs(a) <= PANDA_MAX_ACCELERATION * 1.01 + 1e-3).all()
    assert (np.abs(j) <= PANDA_MAX_JERK * 1.01 + 1e-1).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_move_taking_over_from_a_moving_state_starts_there_and_stays_within_limits(seed):
    rng = np.random.default_rng(seed)
    q0, via, q1 = (rng.uniform(-1.2, 1.2, 7) for _ in range(3))
    qd0 = rng.uniform(-1.0, 1.0, 7)
    qdd0 = rng.uniform(-2.0, 2.0, 7)
    move = plan_via_move([q0, via, q1], start_velocity=qd0, start_acceleration=qdd0)
    q, qd, qdd = move.state(0.0)
    np.testing.assert_allclose(q, q0, atol=1e-9)
    np.testing.assert_allclose(qd, qd0, atol=1e-9)  # no jump in velocity at the hand-over
    np.testing.assert_allclose(qdd, qdd0, atol=1e-9)  # ... nor in acceleration (jerk stays bounded)
    _assert_within_limits(move)
    _, qd_end, _ = move.state(move.duration)
    np.testing.assert_allclose(move.sample(np.array([move.duration]))[0], q1, atol=1e-9)
    assert np.abs(qd_end).max() < 1e-9


def test_payload_scaled_limits_below_the_start_velocity_brake_into_them():
    q0, q1 = np.zeros(7), np.full(7, 0.8)
    qd0 = np.full(7, 1.5)
    move = plan_via_move([q0, q1], speed_scale=0.5, start_velocity=qd0)
    times = np.arange(0.0, move.duration + DT, DT)
    later = [move.state(t)[1] for t in times if t > 0.5]
    assert later and all((np.abs(qd) <= PANDA_MAX_VELOCITY * 0.5 + 1e-6).all() for qd in later)


def test_a_stop_from_a_moving_state_is_jerk_limited_and_ends_at_rest():
    qd0 = np.array([1.2, -0.8, 0.5, 1.0, -1.5, 2.0, 2.4])
    move = plan_stop(np.zeros(7), qd0, np.full(7, 1.0))
    _assert_within_limits(move)
    assert np.abs(move.state(move.duration)[1]).max() < 1e-9
    assert 0.0 < move.duration < 1.0


def test_a_line_ending_at_speed_reaches_it_without_overshoot():
    length, v, a, j = 0.2, 1.7, 10.0, 500.0
    end = min(0.6, line_reachable_speed(length, a, j))
    prof = line_profile(length, v, a, j, end)
    times = np.arange(0.0, prof.duration + DT, DT)
    s = prof.fraction(times) * length
    assert (np.diff(s) >= -1e-12).all() and s[-1] == pytest.approx(length)
    v_end = prof.trajectory.at_time(prof.duration)[1][0]
    assert v_end == pytest.approx(end)
    assert prof.duration < line_profile(length, v, a, j).duration  # not braking to rest saves time
    with pytest.raises(ValueError, match="end speed"):
        line_profile(length, v, a, j, end_speed=2.0)


def _carton(cell) -> int:
    b = cell.tote_bounds
    c = (b.lo + b.hi) / 2
    body = cell.add_primitive("box", (0.06, 0.04, 0.03), (c[0], c[1], b.lo[2] + 0.031), mass=0.3)
    cell.settle(0.3)
    return body


def _top(cell, body: int) -> np.ndarray:
    pos, _ = cell.item_pose(body)
    return np.array([pos[0], pos[1], p.getAABB(body, physicsClientId=cell.client_id)[1][2]])


def test_pick_and_place_hands_the_lift_over_moving_and_charges_every_second_to_a_phase(sim_cell):
    cell = sim_cell
    carton = _carton(cell)
    samples: list[tuple[float, str, np.ndarray]] = []
    cell.arm.observers.append(
        lambda arm, ev: samples.append((arm.robot_time, arm.phase, arm.q())) if ev == "sample" else None
    )
    source = OracleGraspSource(cell)
    seen: list[np.ndarray] = []

    def placement_for(out):
        seen.append(cell.arm.q())
        return source.placement()

    out, placed = cell.arm.pick_and_place(Grasp("suction", _top(cell, carton), DOWN), placement_for)
    assert out.success and placed is not None and placed.success
    assert carton in cell.items_in_box()
    for o, names in (
        (out, {"move_to_pick", "approach", "grasp", "lift"}),
        (placed, {"transit", "place", "release"}),  # it backs out in the next motion
    ):
        assert set(o.details["phases"]) == names
        assert sum(o.details["phases"].values()) == pytest.approx(o.robot_seconds, abs=1e-9)
    # Sampled across the hand-over (the last lift samples, the first transit samples): moving, not
    # standing still, and the finite-difference velocity and acceleration within the joint limits.
    k = next(i for i, (_, ph, _) in enumerate(samples) if ph == "transit")
    window = samples[k - 4 : k + 8]
    ts = np.array([t for t, _, _ in window])
    qs = np.array([q for _, _, q in window])
    h = np.diff(ts)
    keep = h > 1e-9  # the transit's first sample is the hand-over state itself (dt 0)
    ts, qs = np.concatenate([ts[:1], ts[1:][keep]]), np.concatenate([qs[:1], qs[1:][keep]])
    v = np.diff(qs, axis=0) / np.diff(ts)[:, None]
    a = np.diff(v, axis=0) / ((ts[2:] - ts[:-2]) / 2)[:, None]
    assert (np.abs(v).max(axis=1) > 0.05).all(), "the arm stood still at the hand-over"
    assert (np.abs(v) <= PANDA_MAX_VELOCITY * 1.01).all()
    assert (np.abs(a) <= PANDA_MAX_ACCELERATION * 1.05).all(), np.abs(a).max(axis=0)
    np.testing.assert_allclose(seen[0], samples[k - 1][2], atol=1e-12)  # no motion between the two


def test_blended_pick_and_place_is_faster_than_the_same_motions_stopping_in_between():
    from sim.scene import SimCell

    times = []
    for blended in (False, True):
        with SimCell(seed=0) as cell:
            carton = _carton(cell)
            grasp = Grasp("suction", _top(cell, carton), DOWN)
            source = OracleGraspSource(cell)
            t0 = cell.arm.robot_time
            if blended:
                out, placed = cell.arm.pick_and_place(grasp, lambda _out, s=source: s.placement())
            else:
                out = cell.arm.pick(grasp)
                placed = cell.arm.place(source.placement())
            assert out.success and placed is not None and placed.success
            assert carton in cell.items_in_box()
            times.append(cell.arm.robot_time - t0)
    assert times[1] < times[0] - 0.05


def test_a_stop_at_the_hand_over_brakes_along_the_transit_holds_the_item_and_finishes(sim_cell):
    cell = sim_cell
    carton = _carton(cell)
    source = OracleGraspSource(cell)
    hold: list[tuple[np.ndarray, np.ndarray, int | None]] = []
    trace: list[tuple[float, np.ndarray]] = []

    def observe(arm, ev):
        if ev == "sample" and arm.stopped and not hold:
            trace.append((arm.robot_time, arm.q()))
        elif ev == "hold":
            pos, _ = p.getBasePositionAndOrientation(carton, physicsClientId=arm.client_id)
            hold.append((arm.q(), np.array(pos), arm.held_item))
            if len(hold) == HOLD_TICKS:
                arm.clear_stop()

    cell.arm.observers.append(observe)

    def placement_for(out):
        cell.arm.stop()  # between the pick's end and the place's start, the arm still moving
        return source.placement()

    out, placed = cell.arm.pick_and_place(Grasp("suction", _top(cell, carton), DOWN), placement_for)
    assert out.success and placed is not None
    assert placed.success, placed  # braked, held, resumed: not refused
    assert carton in cell.items_in_box()
    stop = placed.details["stops"][0]
    assert stop["phase"] == "transit" and stop["speed_at_trigger_rad_s"] > 0.05
    assert stop["stop_to_standstill_s"] > 0.0
    assert len(hold) >= HOLD_TICKS
    for q, item, held in hold[:HOLD_TICKS]:
        np.testing.assert_array_equal(q, hold[0][0])  # kinematic hold: exactly still
        assert held == carton and np.linalg.norm(item - hold[0][1]) <= 0.002
    # Braking is sampled at the physics rate and stays within the acceleration limits.
    ts = np.array([t for t, _ in trace])
    qs = np.array([q for _, q in trace])
    dt = 1.0 / cell.arm.cfg.physics_hz
    assert np.allclose(np.diff(ts), dt, atol=1e-9)
    acc = np.abs(np.diff(qs, 2, axis=0)) / (dt * dt)
    assert (acc <= PANDA_MAX_ACCELERATION * 1.05 + 1e-6).all(), acc.max(axis=0)
    assert sum(placed.details["phases"].values()) == pytest.approx(placed.robot_seconds, abs=1e-9)


def test_an_error_in_placement_for_leaves_the_arm_at_rest_holding_the_item(sim_cell):
    cell = sim_cell
    carton = _carton(cell)

    def placement_for(out):
        raise RuntimeError("no packer")

    with pytest.raises(RuntimeError, match="no packer"):
        cell.arm.pick_and_place(Grasp("suction", _top(cell, carton), DOWN), placement_for)
    assert cell.arm.held_item == carton
    q0 = cell.arm.q()
    assert cell.arm.home().success  # from rest: the home move plans from zero velocity
    assert cell.arm.held_item == carton
    assert not np.allclose(q0, cell.arm.q())
    placed = cell.arm.place(OracleGraspSource(cell).placement())
    assert placed.success and placed.reason is Reason.OK


def _low_lift_run(lift_clearance, obstacle: bool = False):
    """One blended suction pick and place of a carton; (pick, place, lowest TCP z over the tote
    between the grasp and the hand-over, held-item contacts with anything during the carry)."""
    from dataclasses import replace

    from sim.scene import SimCell

    with SimCell(seed=0) as cell:
        cell.arm.cfg = replace(cell.arm.cfg, lift_clearance=lift_clearance)
        carton = _carton(cell)
        if obstacle:
            # A tall post beside the tote, on the way to the box, higher than a low lift ends.
            tb, bb = cell.tote_bounds, cell.box_bounds
            x = (tb.hi[0] + bb.lo[0]) / 2 if bb.lo[0] > tb.hi[0] else (tb.lo[0] + bb.hi[0]) / 2
            y = (tb.lo[1] + tb.hi[1] + bb.lo[1] + bb.hi[1]) / 4
            cell.add_fixture_box("post", (0.03, 0.03, 0.28), (x, y, 0.14))
        source = OracleGraspSource(cell)
        touched: list[int] = []
        lift_end: list[float] = []

        def watch(arm, ev):
            if ev != "sample":
                return
            if arm.phase == "transit" and not lift_end:
                lift_end.append(arm.link_pose(arm.tcp_link("suction"))[0][2])
            held = arm._held
            if held is not None and arm.phase in ("transit",):
                p.performCollisionDetection(physicsClientId=cell.client_id)
                contacts = p.getContactPoints(held, physicsClientId=cell.client_id)
                touched.extend(c[2] for c in contacts if c[2] != arm.body)

        cell.arm.observers.append(watch)
        grasp = Grasp("suction", _top(cell, carton), DOWN)
        out, placed = cell.arm.pick_and_place(grasp, lambda _out, s=source: s.placement())
        assert out.success and placed is not None and placed.success, (out, placed)
        assert carton in cell.items_in_box()
        return out, placed, lift_end[0], touched, cell.arm._safe_height()


def test_a_low_lift_hands_over_below_the_transit_height_and_the_carry_touches_nothing():
    high = _low_lift_run(None)
    low = _low_lift_run(0.03)
    assert low[0].details.get("lift_low") and not high[0].details.get("lift_low")
    assert high[2] >= high[4] - 1e-3  # the old lift ends at the transit height
    assert low[2] < high[2] - 0.03  # the low one well below it
    assert low[3] == [] and high[3] == []  # the held carton touched nothing while carried
    assert low[0].details["phases"]["lift"] < high[0].details["phases"]["lift"] - 0.03
    assert low[0].robot_seconds + low[1].robot_seconds < high[0].robot_seconds + high[1].robot_seconds


@pytest.mark.parametrize("clear_from", [1, 99])
def test_a_carry_from_a_low_lift_that_is_not_clear_rises_first_and_still_places(clear_from):
    """When the carry from the low lift's end is not clear (forced here: the path checks answer
    "not clear" before their `clear_from`-th call), the transit first rises straight to the transit
    height, blended (second check clear), or the arm stops and lifts there (no check clear); the
    carton is placed either way and the held carton touches nothing."""
    from dataclasses import replace

    from sim.scene import SimCell

    with SimCell(seed=0) as cell:
        cell.arm.cfg = replace(cell.arm.cfg, lift_clearance=0.03)
        carton = _carton(cell)
        calls = {"n": 0}
        real = cell.arm._path_clear

        def forced(*a, **k):
            calls["n"] += 1
            return calls["n"] > clear_from and real(*a, **k)

        source = OracleGraspSource(cell)

        def placement_for(_out):
            cell.arm._path_clear = forced  # the carry's checks only (the move to the pick had its own)
            return source.placement()

        z_transit: list[float] = []
        cell.arm.observers.append(
            lambda arm, ev: (
                z_transit.append(arm.link_pose(arm.tcp_link("suction"))[0][2])
                if ev == "sample" and arm.phase == "transit" and arm._held is not None
                else None
            )
        )
        out, placed = cell.arm.pick_and_place(Grasp("suction", _top(cell, carton), DOWN), placement_for)
        assert out.success and out.details.get("lift_low")
        assert placed is not None and placed.success and carton in cell.items_in_box()
        assert calls["n"] == 2  # the planned carry, then the carry that rises first
        # Blended: the place is transit, place, release; stopped: it lifted first.
        assert ("lift" in placed.details["phases"]) == (clear_from == 99)
        # "place" (where a touch releases the item early) begins over the box, not at the rise.
        assert not placed.details.get("released_early")
        safe = cell.arm._safe_height()
        # Rising first: the transit reaches the transit height before it goes anywhere else.
        assert max(z_transit) >= safe - 0.01


def test_a_low_lift_that_ended_at_rest_still_has_its_carry_checked():
    """A lift line too short to reach its hand-over speed ends at rest: place() starts from rest
    below the transit height and must check the carry all the same (reporting bench, stop 25: an
    unchecked carry from there put a held carton into the box's wall)."""
    from dataclasses import replace

    from sim.scene import SimCell

    with SimCell(seed=0) as cell:
        cell.arm.cfg = replace(cell.arm.cfg, lift_clearance=0.03)
        carton = _carton(cell)
        arm = cell.arm
        out = arm._pick(Grasp("suction", _top(cell, carton), DOWN), handover=True)
        assert out.success and out.details.get("lift_low")
        arm._come_to_rest()  # as if the lift had ended at rest
        assert arm._momentum is None
        assert arm.link_pose(arm.tcp_link("suction"))[0][2] < arm._safe_height() - 0.01
        calls = {"n": 0}
        real = arm._path_clear

        def counting(*a, **k):
            calls["n"] += 1
            return real(*a, **k)

        arm._path_clear = counting
        placed = arm.place(OracleGraspSource(cell).placement())
        assert calls["n"] >= 1  # the carry from the low lift was checked
        assert placed.success and carton in cell.items_in_box()


def test_a_tall_item_from_a_low_lift_is_carried_high_enough_to_clear_the_box():
    """The carry's height is the held item's lowest point 3 cm over the highest thing in the cell,
    as the full lift ends: for a tall item that is above the transit height (reporting bench, stop
    25: a 15 cm item carried at the transit height after a low lift hit the box's wall)."""
    from dataclasses import replace

    from sim.scene import SimCell

    with SimCell(seed=0) as cell:
        cell.arm.cfg = replace(cell.arm.cfg, lift_clearance=0.03)
        b = cell.tote_bounds
        c = (b.lo + b.hi) / 2
        tall = cell.add_primitive("box", (0.06, 0.05, 0.15), (c[0], c[1], b.lo[2] + 0.076), mass=0.3)
        cell.settle(0.3)
        source = OracleGraspSource(cell)

        def placement_for(_out):
            # No carry path checks clear (as in the reporting run): the arm stops and lifts first.
            cell.arm._path_clear = lambda *a, **k: False
            return source.placement()

        out, placed = cell.arm.pick_and_place(Grasp("suction", _top(cell, tall), DOWN), placement_for)
        assert out.success and out.details.get("lift_low")
        assert "lift" in placed.details["phases"]  # it stopped and lifted before the transit
        assert placed is not None and placed.reason is Reason.OK, placed
        assert tall in cell.items_in_box()


def _two_picks(blended_exit: bool, then_home: bool = False):
    """Two suction pick-and-places of cartons side by side (and a move home after them); returns
    (the second pick's outcome, the first place's outcome, samples (time, phase, q, TCP position)
    from the first release on, the home outcome or None, the cell's held-item-free contacts)."""
    from dataclasses import replace

    from sim.scene import SimCell

    with SimCell(seed=0) as cell:
        cell.arm.cfg = replace(cell.arm.cfg, blended_exit=blended_exit)
        b = cell.tote_bounds
        c = (b.lo + b.hi) / 2
        cartons = [
            cell.add_primitive("box", (0.06, 0.04, 0.03), (c[0], c[1] + dy, b.lo[2] + 0.031), mass=0.3)
            for dy in (-0.07, 0.07)
        ]
        cell.settle(0.3)
        source = OracleGraspSource(cell)
        samples: list[tuple[float, str, np.ndarray, np.ndarray]] = []
        link = cell.arm.tcp_link("suction")
        out1, placed1 = cell.arm.pick_and_place(
            Grasp("suction", _top(cell, cartons[0]), DOWN), lambda _o, s=source: s.placement()
        )
        assert out1.success and placed1 is not None and placed1.success
        cell.arm.observers.append(
            lambda arm, ev: (
                samples.append((arm.robot_time, arm.phase, arm.q(), arm.link_pose(link)[0]))
                if ev == "sample"
                else None
            )
        )
        samples.append((cell.arm.robot_time, "", cell.arm.q(), cell.arm.link_pose(link)[0]))
        out2, placed2 = cell.arm.pick_and_place(
            Grasp("suction", _top(cell, cartons[1]), DOWN), lambda _o, s=source: s.placement()
        )
        assert out2.success and placed2 is not None and placed2.success
        assert set(cartons) <= set(cell.items_in_box())
        home = cell.arm.home() if then_home else None
        return out2, placed1, samples, home


def test_the_next_pick_backs_out_of_the_box_without_stopping_and_straight_up():
    out, placed, samples, _ = _two_picks(blended_exit=True)
    # The place ends where the cup let go; the next pick's first leg is its retreat.
    assert set(placed.details["phases"]) == {"transit", "place", "release"}
    assert set(out.details["phases"]) == {"retreat", "move_to_pick", "approach", "grasp", "lift"}
    assert sum(out.details["phases"].values()) == pytest.approx(out.robot_seconds, abs=1e-9)
    release = samples[0][3]
    leg = [s for s in samples if s[1] == "retreat"]
    assert leg and leg[-1][3][2] > release[2] + 0.01  # it climbed out
    for _, _, _, pos in leg:  # straight up beside what it let go of
        assert np.linalg.norm(pos[:2] - release[:2]) <= 0.003 + 1e-4
        assert pos[2] >= release[2] - 1e-3
    # Blended: from the release to the physical approach no sample stands still (no stop at the
    # top of the retreat, none over the tote).
    free = np.array([q for _, ph, q, _ in samples if ph in ("retreat", "move_to_pick")])
    step = np.abs(np.diff(free, axis=0)).max(axis=1)
    assert (step[1:-1] > 1e-6).all()


def test_backing_out_blended_takes_less_robot_time_than_retreating_first():
    out_b, placed_b, _, _ = _two_picks(blended_exit=True)
    out_s, placed_s, _, _ = _two_picks(blended_exit=False)
    assert "retreat" in placed_s.details["phases"] and "retreat" not in out_s.details["phases"]
    blended = out_b.details["phases"]["retreat"] + out_b.details["phases"]["move_to_pick"]
    separate = placed_s.details["phases"]["retreat"] + out_s.details["phases"]["move_to_pick"]
    assert blended < separate - 0.05


def test_any_other_motion_after_a_place_backs_out_of_the_box_first():
    _, _, samples, home = _two_picks(blended_exit=True, then_home=True)
    assert home is not None and home.success
    assert "retreat" in home.details["phases"]
    assert sum(home.details["phases"].values()) == pytest.approx(home.robot_seconds, abs=1e-9)


def test_a_ramp_ends_cruising_at_its_speed_by_half_way():
    from sim.motion import ramp_fraction, ramp_profile

    for d, v, a in ((0.05, 0.4, 2.5), (0.05, 0.4, 0.5), (0.2, 0.4, 2.5)):
        duration, cruise = ramp_profile(d, v, a)
        assert cruise == pytest.approx(min(v, np.sqrt(a * d)))
        assert cruise * cruise / (2 * a) <= d / 2 + 1e-12  # cruising from half way at the latest
        times = np.linspace(0.0, duration, int(np.ceil(duration / DT)) + 1)
        s = ramp_fraction(times, d, cruise, a) * d
        assert (np.diff(s) >= -1e-12).all() and s[-1] == pytest.approx(d)
        h = times[1] - times[0]
        speed = np.diff(s) / h
        assert speed.max() <= cruise + 1e-9 and speed[-1] == pytest.approx(cruise, rel=1e-3)
        assert (np.abs(np.diff(speed)) / h <= a * 1.001 + 1e-9).all()
        # Faster than braking to rest over the same line.
        from sim.motion import trapezoid_time

        assert duration < trapezoid_time(d, v, a)


def _lift_run(lift_blend: bool):
    """One blended suction pick and place of a carton: (pick outcome, samples (time, phase, TCP z)
    from the grip to the transit)."""
    from dataclasses import replace

    from sim.scene import SimCell

    with SimCell(seed=0) as cell:
        cell.arm.cfg = replace(cell.arm.cfg, lift_blend=lift_blend)
        carton = _carton(cell)
        source = OracleGraspSource(cell)
        link = cell.arm.tcp_link("suction")
        samples: list[tuple[float, str, float]] = []
        cell.arm.observers.append(
            lambda arm, ev: (
                samples.append((arm.robot_time, arm.phase, arm.link_pose(link)[0][2]))
                if ev == "sample" and arm.phase in ("lift", "transit")
                else None
            )
        )
        out, placed = cell.arm.pick_and_place(
            Grasp("suction", _top(cell, carton), DOWN), lambda _o, s=source: s.placement()
        )
        assert out.success and placed is not None and placed.success and carton in cell.items_in_box()
        return out, samples


def test_the_physical_lift_hands_over_to_the_rest_of_the_lift_moving():
    out, samples = _lift_run(lift_blend=True)
    out_stop, _ = _lift_run(lift_blend=False)
    # The lift never stands still between the physical part and the kinematic rest: sampled every
    # physics step (4.2 ms) and every 20 ms, the TCP rises at every sample until the transit.
    lift = [(t, z) for t, ph, z in samples if ph == "lift"]
    ts, zs = np.array([t for t, _ in lift]), np.array([z for _, z in lift])
    assert len(lift) > 20
    dt = np.diff(ts)
    speed = (np.diff(zs) / np.maximum(dt, 1e-9))[dt > 1e-6]  # (the next line's first sample is its start)
    moving = int(np.argmax(speed > 0.05))  # once the motors have the lift under way
    assert moving < len(speed) // 3 and (speed[moving:] > 0.05).all(), np.round(speed, 3)
    # ... and takes less robot time than braking to rest in between.
    assert out.details["phases"]["lift"] < out_stop.details["phases"]["lift"] - 0.05


def _approach_run(approach_blend: bool, gripper: str = "suction"):
    """One pick from the arm's home, a carton by suction or a bottle by the jaw: (outcome, samples
    (time, phase, TCP position) of the move to the pick and the approach)."""
    from dataclasses import replace

    from sim.scene import SimCell

    with SimCell(seed=0) as cell:
        cell.arm.cfg = replace(cell.arm.cfg, approach_blend=approach_blend)
        if gripper == "suction":
            item = _carton(cell)
        else:  # a bottle across its diameter: real finger contacts hold it
            b = cell.tote_bounds
            c = (b.lo + b.hi) / 2
            item = cell.add_primitive(
                "cylinder", (0.03, 0.2), (c[0], c[1], b.lo[2] + 0.101), mass=0.5, friction=0.5, name="bottle"
            )
            cell.settle(0.3)
        link = cell.arm.tcp_link(gripper)
        samples: list[tuple[float, str, np.ndarray]] = []
        cell.arm.observers.append(
            lambda arm, ev: (
                samples.append((arm.robot_time, arm.phase, arm.link_pose(link)[0]))
                if ev == "sample" and arm.phase in ("move_to_pick", "approach")
                else None
            )
        )
        top = _top(cell, item)
        if gripper == "suction":
            grasp = Grasp("suction", top, DOWN)
        else:
            grasp = Grasp("parallel_jaw", top - np.array([0.0, 0.0, 0.04]), DOWN, width=0.06)
        out = cell.arm.pick(grasp)
        # (The bottle's grip is borderline and may slip in the lift, after what is checked here.)
        assert "approach" in out.details["phases"] and (out.success or gripper != "suction"), out
        return out, samples


@pytest.mark.parametrize("gripper", ["suction", "parallel_jaw"])
def test_the_descent_hands_over_to_the_physical_approach_moving(gripper):
    out, samples = _approach_run(True, gripper)
    out_stop, _ = _approach_run(False, gripper)
    # Around the hand-over (the last 50 ms of the free descent, the first 50 ms of the physical
    # approach) the TCP keeps moving down at no less than half the approach speed: no stop.
    t_hand = next(t for t, ph, _ in samples if ph == "approach")
    near = [(t, x) for t, _, x in samples if t_hand - 0.05 <= t <= t_hand + 0.05]
    ts, zs = np.array([t for t, _ in near]), np.array([x[2] for _, x in near])
    dt = np.diff(ts)
    down = (-np.diff(zs) / np.maximum(dt, 1e-9))[dt > 1e-6]
    assert len(down) >= 10 and (down > 0.5 * 0.25).all(), np.round(down, 3)
    # ... and the two together take less robot time than stopping in between.
    both, both_stop = (
        o.details["phases"]["move_to_pick"] + o.details["phases"]["approach"] for o in (out, out_stop)
    )
    assert both < both_stop - 0.03, (both, both_stop)
