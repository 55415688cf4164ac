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


def _assert_within_limits(move, scale: float = 1.0) -> None:
    times = np.arange(0.0, move.duration + DT, DT)
    # The states ruckig reports (exact derivatives) and finite differences of sampled positions.
    for t in times:
        _, qd, qdd = move.state(t)
        assert (np.abs(qd) <= PANDA_MAX_VELOCITY * scale + 1e-6).all()
        assert (np.abs(qdd) <= PANDA_MAX_ACCELERATION * scale**2 + 1e-6).all()
    v, a, j = _derivatives(move.sample(times), DT)
    assert (np.abs(v) <= PANDA_MAX_VELOCITY * scale * 1.001 + 1e-6).all()
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
