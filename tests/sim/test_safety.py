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


def test_person_entering_halts_the_arm_within_100_ms_and_it_holds_until_clear_stop(sim_cell):
    cell = sim_cell
    body, top = _carton(cell)
    zone = SafetyZone(operator_reset_s=1.0)  # the operator presses clear-stop 1 s after the zone empties
    cell.arm.set_safety_zone(zone)
    t0 = cell.arm.robot_time
    t_in = t0 + 0.4  # mid-way through the move to the pre-grasp pose
    zone.enter(t_in, t_in + 2.0)
    q_hold: list[np.ndarray] = []
    cell.arm.observers.append(lambda arm, ev: q_hold.append(arm.q()) if ev == "hold" else None)
    out = cell.arm.pick(Grasp("suction", top, DOWN))
    assert out.success, out  # held, then resumed: the stop is not a failed pick
    ev = cell.arm.stop_events[-1]
    assert ev.cause == "zone" and ev.triggered_at == t_in
    assert 0.0 <= ev.reaction_s <= 0.1
    assert ev.halted_at > ev.braking_from  # braked, not an instantaneous halt
    # Held still while the person was inside and until the operator's clear-stop, not before.
    assert len(q_hold) > 10 and all(np.array_equal(q, q_hold[0]) for q in q_hold)
    assert ev.cleared_at is not None and ev.cleared_at >= t_in + 2.0 + zone.operator_reset_s
    assert out.details["stops"][0]["held_s"] >= 2.0


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


def test_every_stop_during_a_whole_episode_reacts_in_time_and_never_drops(sim_cell):
    """Intrusions at many moments of real picking: each one starts braking within 100 ms, comes to
    rest within the braking the limits allow, and no pick or place fails because of it."""
    from sim.oracle import OracleGraspSource

    cell = sim_cell
    for dy in (-0.11, 0.0, 0.11):
        b = cell.tote_bounds
        c = (b.lo + b.hi) / 2
        cell.add_primitive("box", (0.05, 0.04, 0.03), (c[0], c[1] + dy, b.lo[2] + 0.031), mass=0.3)
    cell.settle(0.3)
    zone = SafetyZone(operator_reset_s=0.5)
    cell.arm.set_safety_zone(zone)
    rng = np.random.default_rng(3)
    oracle = OracleGraspSource(cell)
    outcomes = []
    for _ in range(6):
        prop = oracle.propose()
        if prop is None:
            break
        t = cell.arm.robot_time + float(rng.uniform(0.05, 1.5))
        zone.enter(t, t + 0.5)
        out = cell.arm.pick(prop[1])
        outcomes.append(out.reason)
        if out.success:
            t = cell.arm.robot_time + float(rng.uniform(0.05, 1.0))
            zone.enter(t, t + 0.5)
            placed = cell.arm.place(oracle.placement())
            outcomes.append(placed.reason)
        cell.arm.idle(2.0)  # wait out the intrusion and the operator's reset
    assert len(cell.arm.stop_events) >= 4
    assert Reason.ESTOP not in outcomes and Reason.DROPPED not in outcomes
    assert all(0.0 <= ev.reaction_s <= 0.1 for ev in cell.arm.stop_events)
    assert all(ev.stop_to_standstill_s <= 0.6 for ev in cell.arm.stop_events)
