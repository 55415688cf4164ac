"""Protective stops: a person entering the zone halts the arm within 100 ms of robot time."""

from __future__ import annotations

import numpy as np
import pybullet as p

from arm.interfaces import Grasp, Reason
from grasping.types import grasp_frame, matrix_to_quat
from sim.safety import SafetyZone

DOWN = matrix_to_quat(grasp_frame(np.array([0.0, 0.0, -1.0])))


def _carton(cell) -> tuple[int, np.ndarray]:
    b = cell.tote_bounds
    c = (b.lo + b.hi) / 2
    body = cell.add_primitive("box", (0.06, 0.04, 0.03), (c[0], c[1], b.lo[2] + 0.031), mass=0.3)
    cell.settle(0.3)
    top = np.array([c[0], c[1], p.getAABB(body, physicsClientId=cell.client_id)[1][2]])
    return body, top


def _q(cell) -> np.ndarray:
    return cell.arm.q()


def test_person_entering_halts_the_arm_within_100_ms_and_it_holds_until_they_leave(sim_cell):
    cell = sim_cell
    body, top = _carton(cell)
    zone = SafetyZone()
    cell.arm.set_safety_zone(zone)
    t0 = cell.arm.robot_time
    t_in = t0 + 0.4  # mid-way through the move to the pre-grasp pose
    zone.enter(t_in, t_in + 2.0)
    out = cell.arm.pick(Grasp("suction", top, DOWN))
    assert out.reason is Reason.ESTOP
    ev = cell.arm.stop_events[-1]
    assert ev.cause == "zone" and ev.triggered_at == t_in
    assert 0.0 <= ev.reaction_s <= 0.1
    assert out.details["halted_at"] - out.details["triggered_at"] <= 0.1
    # Held still while the person is inside: no joint moves, motions are refused.
    q_halt = _q(cell)
    cell.arm.idle(0.5)
    assert cell.arm.stopped
    assert cell.arm.home().reason is Reason.ESTOP
    np.testing.assert_allclose(_q(cell), q_halt, atol=1e-9)
    # The person leaves: the stop resets itself and the pick works.
    cell.arm.idle(t_in + 2.0 - cell.arm.robot_time + 0.01)
    assert not cell.arm.stopped
    assert cell.arm.pick(Grasp("suction", top, DOWN)).success


def test_stop_command_halts_at_the_next_sample_and_needs_clearing(sim_cell):
    cell = sim_cell
    _, top = _carton(cell)
    cell.arm.stop()
    out = cell.arm.pick(Grasp("suction", top, DOWN))
    assert out.reason is Reason.ESTOP and out.details["cause"] == "command"
    assert out.details["halted_at"] - out.details["triggered_at"] <= 0.1
    cell.arm.idle(5.0)
    assert cell.arm.stopped  # a commanded stop does not reset itself
    cell.arm.clear_stop()
    assert cell.arm.pick(Grasp("suction", top, DOWN)).success


def test_every_stop_during_a_whole_episode_reacts_in_time(sim_cell):
    """Intrusions at many moments of real picking: each one halts the arm within 100 ms."""
    from sim.oracle import OracleGraspSource

    cell = sim_cell
    for dy in (-0.1, 0.1):
        b = cell.tote_bounds
        c = (b.lo + b.hi) / 2
        cell.add_primitive("box", (0.05, 0.04, 0.03), (c[0], c[1] + dy, b.lo[2] + 0.031), mass=0.3)
    cell.settle(0.3)
    zone = SafetyZone()
    cell.arm.set_safety_zone(zone)
    rng = np.random.default_rng(3)
    oracle = OracleGraspSource(cell)
    for _ in range(6):
        prop = oracle.propose()
        if prop is None:
            break
        t = cell.arm.robot_time + float(rng.uniform(0.05, 2.5))
        zone.enter(t, t + 0.5)
        out = cell.arm.pick(prop[1])
        if out.success:
            cell.arm.place(oracle.placement())
        cell.arm.idle(1.0)  # wait out the intrusion
    assert len(cell.arm.stop_events) >= 3
    assert all(0.0 <= ev.reaction_s <= 0.1 for ev in cell.arm.stop_events)
