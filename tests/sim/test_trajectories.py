"""Time-optimal, jerk-limited trajectories (ruckig): sampled, they respect every joint's limits.

The executed motions of a real pick and place are sampled too: per-phase robot time adds up to the
motion's robot time, and the free-space moves stay within the joint velocity limits.
"""

from __future__ import annotations

import numpy as np
import pybullet as p
import pytest

from grasping.types import Grasp, grasp_frame, matrix_to_quat
from sim.motion import (
    PANDA_MAX_ACCELERATION,
    PANDA_MAX_JERK,
    PANDA_MAX_VELOCITY,
    carry_velocity_scale,
    joint_move_time,
    line_profile,
    plan_joint_move,
    plan_via_move,
)
from sim.oracle import OracleGraspSource

DOWN = matrix_to_quat(grasp_frame(np.array([0.0, 0.0, -1.0])))
DT = 1e-3  # s, sampling step of the limit checks


def _derivatives(qs: np.ndarray, dt: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    v = np.diff(qs, axis=0) / dt
    a = np.diff(v, axis=0) / dt
    j = np.diff(a, axis=0) / dt
    return v, a, j


def _assert_within_limits(
    move, scale: float = 1.0, ends_moving: bool = False, velocity_scale: float | None = None
) -> None:
    # (A move that ends moving is sampled only up to its end: past it the position is held.)
    times = np.arange(0.0, move.duration if ends_moving else move.duration + DT, DT)
    vs = scale if velocity_scale is None else velocity_scale
    # The states ruckig reports (exact derivatives) and finite differences of sampled positions.
    for t in times:
        _, qd, qdd = move.state(t)
        assert (np.abs(qd) <= PANDA_MAX_VELOCITY * vs + 1e-6).all()
        assert (np.abs(qdd) <= PANDA_MAX_ACCELERATION * scale**2 + 1e-6).all()
    v, a, j = _derivatives(move.sample(times), DT)
    assert (np.abs(v) <= PANDA_MAX_VELOCITY * vs * 1.001 + 1e-6).all()
    assert (np.abs(a) <= PANDA_MAX_ACCELERATION * scale**2 * 1.01 + 1e-3).all()
    assert (np.abs(j) <= PANDA_MAX_JERK * scale**3 * 1.01 + 1e-1).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rest_to_rest_moves_respect_every_joint_limit_and_end_where_asked(seed):
    rng = np.random.default_rng(seed)
    q0, q1 = rng.uniform(-1.5, 1.5, 7), rng.uniform(-1.5, 1.5, 7)
    for scale in (1.0, 0.5):
        move = plan_joint_move(q0, q1, scale)
        _assert_within_limits(move, scale)
        np.testing.assert_allclose(move.sample(np.array([0.0]))[0], q0, atol=1e-9)
        np.testing.assert_allclose(move.sample(np.array([move.duration]))[0], q1, atol=1e-9)
        # Jerk limits cost a little time over the jerk-free trapezoid, never less.
        assert move.duration >= joint_move_time(q0, q1, speed_scale=scale) - 1e-9


@pytest.mark.parametrize("scale", [0.5, 0.1])
def test_a_payload_aware_carry_slows_its_accelerations_more_than_its_velocities(scale):
    # A carry slowed for its load: accelerations by scale^2 and jerk by scale^3 as a uniformly
    # slower move, velocities only by carry_velocity_scale (sqrt): every limit holds, the joints do
    # go faster than the uniform move allows, and the move is shorter than the uniform one.
    q0 = np.zeros(7)
    via = np.array([0.8, 0.4, 0.0, -0.3, 0.0, 0.2, 0.0])
    q1 = np.array([1.6, 0.6, 0.0, -0.5, 0.0, 0.3, 0.0])
    vs = carry_velocity_scale(scale)
    assert scale < vs <= 1.0
    carry = plan_via_move([q0, via, q1], scale, velocity_scale=vs)
    uniform = plan_via_move([q0, via, q1], scale)
    _assert_within_limits(carry, scale, velocity_scale=vs)
    assert carry.duration < uniform.duration
    fastest = max(
        float(np.max(np.abs(carry.state(t)[1]) / PANDA_MAX_VELOCITY))
        for t in np.arange(0, carry.duration, DT)
    )
    assert fastest > scale * 1.01
    rest_to_rest = plan_joint_move(q0, q1, scale, vs)
    _assert_within_limits(rest_to_rest, scale, velocity_scale=vs)
    assert rest_to_rest.duration <= plan_joint_move(q0, q1, scale).duration + 1e-9


def test_a_blended_via_point_is_passed_without_stopping_and_saves_time():
    q0 = np.zeros(7)
    via = np.array([0.8, 0.4, 0.0, -0.3, 0.0, 0.2, 0.0])
    q1 = np.array([1.6, 0.6, 0.0, -0.5, 0.0, 0.3, 0.0])
    move = plan_via_move([q0, via, q1])
    _assert_within_limits(move)
    t_via = move.starts[1]
    q_at, qd_at, _ = move.state(t_via)
    np.testing.assert_allclose(q_at, via, atol=1e-9)
    assert np.abs(qd_at).max() > 0.5  # moving through it
    stopped = plan_joint_move(q0, via).duration + plan_joint_move(via, q1).duration
    assert move.duration < stopped


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_searched_via_velocities_are_never_slower_than_the_rule_and_stay_within_limits(seed):
    """The via-velocity search (sim.motion.via_velocities) keeps every joint within its limits,
    passes each via point, arrives at the end velocity asked for, is never slower than the rule it
    starts from, and gives the same move for the same input (a path check samples what runs)."""
    rng = np.random.default_rng(seed)
    points = [rng.uniform(-1.2, 1.2, 7) for _ in range(4)]
    end = rng.uniform(-0.3, 0.3, 7) if seed == 2 else None
    for scale in (1.0, 0.5):
        move = plan_via_move(points, scale, end_velocity=end)
        rule = plan_via_move(points, scale, end_velocity=end, optimise=False)
        _assert_within_limits(move, scale, ends_moving=end is not None)
        assert move.duration <= rule.duration + 1e-9
        for k, q in enumerate(points[1:-1], start=1):
            np.testing.assert_allclose(move.state(move.starts[k])[0], q, atol=1e-9)
        _, qd_end, _ = move.state(move.duration)
        np.testing.assert_allclose(qd_end, np.zeros(7) if end is None else end, atol=1e-6)
        again = plan_via_move([q.copy() for q in points], scale, end_velocity=end)
        assert again.duration == move.duration
    # On a path through three via points the search finds a clearly shorter move than the rule.
    if seed == 0:
        assert plan_via_move(points).duration < 0.97 * plan_via_move(points, optimise=False).duration


def test_a_via_velocity_beyond_the_limit_is_a_clear_error_not_a_crash():
    from sim.motion import RuckigMove

    q0, q1, q2 = np.zeros(7), np.full(7, 0.5), np.ones(7)
    with pytest.raises(ValueError, match="ruckig refused"):
        RuckigMove([(q0, np.zeros(7)), (q1, PANDA_MAX_VELOCITY * 1.0001), (q2, np.zeros(7))])


def test_a_brake_profile_starts_at_its_speed_and_ends_at_rest():
    from sim.motion import brake_fraction, brake_profile

    d, v, a = 0.04, 0.25, 2.5
    duration = brake_profile(d, v, a)
    assert duration == pytest.approx(d / v + v / (2 * a))
    times = np.linspace(0.0, duration, 2001)
    s = brake_fraction(times, d, v, a) * d
    h = times[1] - times[0]
    speed = np.diff(s) / h
    assert speed[0] == pytest.approx(v, rel=1e-3) and speed[-1] < 0.01 * v
    assert s[-1] == pytest.approx(d) and (np.diff(s) >= -1e-12).all()
    assert (np.abs(np.diff(speed)) / h <= a * 1.001 + 1e-9).all()
    with pytest.raises(ValueError, match="too short"):
        brake_profile(0.01, v, a)


def test_line_profile_is_jerk_limited_and_covers_the_path():
    prof = line_profile(0.2, 1.0, 5.0, 100.0)
    times = np.arange(0.0, prof.duration + DT, DT)
    s = prof.fraction(times) * 0.2
    v, a, j = _derivatives(s, DT)
    assert s[0] == 0.0 and s[-1] == pytest.approx(0.2)
    assert v.max() <= 1.0 * 1.001 and np.abs(a).max() <= 5.0 * 1.01 and np.abs(j).max() <= 100.0 * 1.01 + 0.1


def test_robot_time_of_a_pick_and_place_is_the_sum_of_its_phases(sim_cell):
    cell = sim_cell
    b = cell.tote_bounds
    c = (b.lo + b.hi) / 2
    body = cell.add_primitive("box", (0.05, 0.04, 0.03), (c[0], c[1], b.lo[2] + 0.031), mass=0.3)
    cell.settle(0.3)
    top = np.array([c[0], c[1], p.getAABB(body, physicsClientId=cell.client_id)[1][2]])
    qs: list[tuple[str, np.ndarray]] = []
    cell.arm.observers.append(lambda arm, ev: qs.append((arm.phase, arm.q())) if ev == "sample" else None)
    out = cell.arm.pick(Grasp("suction", top, DOWN))
    placed = cell.arm.place(OracleGraspSource(cell).placement())
    assert out.success and placed.success
    for o, names in (
        (out, {"move_to_pick", "approach", "grasp", "lift"}),
        (placed, {"transit", "place", "release"}),  # it backs out in the next motion
    ):
        phases = o.details["phases"]
        assert set(phases) == names
        assert all(v > 0 for v in phases.values())
        assert sum(phases.values()) == pytest.approx(o.robot_seconds, abs=1e-9)
    # The blended free-space moves really pass their via points: no sample stands still between
    # the start of the move to the pick and the start of the physical approach.
    move = np.array([q for ph, q in qs if ph == "move_to_pick"])
    step = np.abs(np.diff(move, axis=0)).max(axis=1)
    assert (step[1:-1] > 1e-6).all()
