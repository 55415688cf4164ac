"""A protective stop that holds (stop category 2), sampled through real PyBullet picks and places.

A stop is triggered part-way through a phase of a real pick or place (approach, lift, transit,
place). The tests sample the joints and the held item's pose at every control sample and every hold
tick: braking stays within the Panda's acceleration limits, nothing moves while stopped, the grip
keeps the item, only `clear_stop` ends the stop, and the motion then finishes.
"""

from __future__ import annotations

import numpy as np
import pybullet as p
import pytest

from grasping.types import Grasp, Reason, grasp_frame, matrix_to_quat
from sim.motion import PANDA_MAX_ACCELERATION
from sim.oracle import OracleGraspSource
from sim.safety import SafetyZone

DOWN = matrix_to_quat(grasp_frame(np.array([0.0, 0.0, -1.0])))
HOLD_TICKS = 8  # hold ticks observed before the test presses clear-stop


def _carton(cell, mass: float = 0.3) -> int:
    b = cell.tote_bounds
    c = (b.lo + b.hi) / 2
    body = cell.add_primitive(
        "box", (0.06, 0.04, 0.03), (c[0], c[1], b.lo[2] + 0.031), mass=mass, name="carton"
    )
    cell.settle(0.3)
    return body


def _bottle(cell) -> int:
    b = cell.tote_bounds
    c = (b.lo + b.hi) / 2
    body = cell.add_primitive(
        "cylinder", (0.03, 0.2), (c[0], c[1], b.lo[2] + 0.101), mass=0.5, friction=0.5, name="bottle"
    )
    cell.settle(0.3)
    return body


def _top(cell, body: int) -> np.ndarray:
    pos, _ = cell.item_pose(body)
    return np.array([pos[0], pos[1], p.getAABB(body, physicsClientId=cell.client_id)[1][2]])


class StopProbe:
    """Observer on the arm: stops it at the n-th control sample of a phase, records, clears after a while."""

    def __init__(self, arm, phase: str, at_sample: int, body: int, clear_after: int = HOLD_TICKS) -> None:
        self.arm, self.phase, self.at_sample, self.body = arm, phase, at_sample, body
        self.clear_after = clear_after
        self.seen = 0
        self.triggered = False
        self.samples: list[tuple[float, np.ndarray]] = []  # (robot time, q) from trigger to the hold
        self.hold: list[tuple[np.ndarray, np.ndarray, int | None, bool]] = []  # q, item pos, held, stopped
        self.resumed = False
        arm.observers.append(self)

    def __call__(self, arm, event: str) -> None:
        if event == "sample":
            if not self.triggered and arm.phase == self.phase:
                self.seen += 1
                if self.seen == self.at_sample:
                    self.triggered = True
                    self.samples.append((arm.robot_time, arm.q()))
                    arm.stop()
            elif self.triggered and not self.hold:
                self.samples.append((arm.robot_time, arm.q()))
        elif event == "hold":
            pos, _ = p.getBasePositionAndOrientation(self.body, physicsClientId=arm.client_id)
            self.hold.append((arm.q(), np.array(pos), arm.held_item, arm.stopped))
            if len(self.hold) == self.clear_after:
                arm.clear_stop()
        elif event == "resume":
            self.resumed = True


def _assert_held_still(probe: StopProbe, item_held: bool, q_tol: float, item_tol: float = 0.002) -> None:
    assert probe.triggered and len(probe.hold) >= HOLD_TICKS, "the stop never held"
    q0, item0 = probe.hold[0][0], probe.hold[0][1]
    for q, item, held, stopped in probe.hold[:HOLD_TICKS]:
        assert stopped
        assert np.max(np.abs(q - q0)) <= q_tol, "the arm moved during a protective stop"
        if item_held:
            assert held == probe.body, "the gripper let go during a protective stop"
            assert np.linalg.norm(item - item0) <= item_tol, "the held item moved during a protective stop"
    assert probe.resumed


def _assert_braked_within_limits(probe: StopProbe, dt: float) -> None:
    """Second differences of the joints sampled at the physics rate stay under the Panda's limits."""
    ts = np.array([t for t, _ in probe.samples])
    qs = np.array([q for _, q in probe.samples])
    assert np.allclose(np.diff(ts), dt, atol=1e-9), "braking must be sampled at the physics rate"
    acc = np.abs(np.diff(qs, 2, axis=0)) / (dt * dt)
    assert (acc <= PANDA_MAX_ACCELERATION * 1.05 + 1e-6).all(), acc.max(axis=0)


def test_stop_during_transit_brakes_within_limits_holds_the_item_and_finishes_the_place(sim_cell):
    cell = sim_cell
    carton = _carton(cell)
    assert cell.arm.pick(Grasp("suction", _top(cell, carton), DOWN)).success
    probe = StopProbe(cell.arm, "transit", at_sample=12, body=carton)
    out = cell.arm.place(OracleGraspSource(cell).placement())
    assert out.success, out
    assert carton in cell.items_in_box()
    _assert_held_still(probe, item_held=True, q_tol=0.0)  # kinematic hold: exactly still
    # Braking is a controlled stop: it takes time (not instantaneous), within the limits.
    stop = out.details["stops"][0]
    assert stop["phase"] == "transit" and stop["cause"] == "command"
    assert stop["speed_at_trigger_rad_s"] > 0.3
    assert 0.02 < stop["stop_to_standstill_s"] < 0.6
    assert out.details["stop_to_standstill_s"] == stop["stop_to_standstill_s"]
    _assert_braked_within_limits(probe, 1.0 / cell.arm.cfg.physics_hz)
    # The hold is charged to its own phase and the phases add up to the motion's robot time.
    phases = out.details["phases"]
    assert phases["stopped"] >= (HOLD_TICKS - 1) * cell.arm.cfg.hold_tick_s - 1e-9
    assert sum(phases.values()) == pytest.approx(out.robot_seconds, abs=1e-9)


@pytest.mark.parametrize(
    ("gripper", "phase", "at_sample"),
    [("suction", "approach", 4), ("suction", "lift", 15), ("parallel_jaw", "lift", 15)],
)
def test_stop_during_approach_or_lift_holds_and_the_pick_resumes(sim_cell, gripper, phase, at_sample):
    cell = sim_cell
    if gripper == "suction":
        carton = _carton(cell)
        grasp = Grasp("suction", _top(cell, carton), DOWN)
    else:  # a bottle across its diameter: real finger contacts hold it
        carton = _bottle(cell)
        grasp = Grasp("parallel_jaw", _top(cell, carton) - np.array([0.0, 0.0, 0.04]), DOWN, width=0.06)
    probe = StopProbe(cell.arm, phase, at_sample=at_sample, body=carton)
    out = cell.arm.pick(grasp)
    assert out.success, out
    assert out.item_id == carton and cell.arm.held_item == carton
    # Contact phases run physics while holding: the motors keep the pose to a fraction of a mrad.
    _assert_held_still(probe, item_held=phase == "lift", q_tol=2e-3)
    stop = out.details["stops"][0]
    assert stop["phase"] == phase and stop["stop_to_standstill_s"] > 0.0
    assert stop["cleared_at"] is not None and stop["cleared_at"] >= stop["halted_at"]
    assert cell.item_pose(carton)[0][2] > cell.tote_bounds.hi[2]  # lifted out after the stop
    assert sum(out.details["phases"].values()) == pytest.approx(out.robot_seconds, abs=1e-9)


def test_stop_while_lowering_into_the_box_keeps_the_item_until_cleared(sim_cell):
    cell = sim_cell
    carton = _carton(cell)
    assert cell.arm.pick(Grasp("suction", _top(cell, carton), DOWN)).success
    probe = StopProbe(cell.arm, "place", at_sample=3, body=carton)
    out = cell.arm.place(OracleGraspSource(cell).placement())
    assert out.success, out
    _assert_held_still(probe, item_held=True, q_tol=0.0)
    assert carton in cell.items_in_box()
    assert out.details["stops"][0]["phase"] == "place"


def test_a_zone_stop_outlasts_the_person_and_only_clear_stop_ends_it(sim_cell):
    """The person leaves, nobody presses clear-stop: the arm keeps holding the item over the tote."""
    cell = sim_cell
    carton = _carton(cell)
    assert cell.arm.pick(Grasp("suction", _top(cell, carton), DOWN)).success
    zone = SafetyZone(operator_reset_s=None)
    cell.arm.set_safety_zone(zone)
    t_in = cell.arm.robot_time + 0.3  # during the transit to the box
    zone.enter(t_in, t_in + 0.5)
    hold: list[tuple[float, np.ndarray, np.ndarray]] = []

    def observer(arm, event):
        if event == "hold":
            pos, _ = p.getBasePositionAndOrientation(carton, physicsClientId=arm.client_id)
            hold.append((arm.robot_time, arm.q(), np.array(pos)))
            if arm.robot_time > t_in + 3.0:  # long after the person left
                assert arm.stopped
                arm.clear_stop()

    cell.arm.observers.append(observer)
    out = cell.arm.place(OracleGraspSource(cell).placement())
    assert out.success and carton in cell.items_in_box()
    assert hold[-1][0] > t_in + 3.0
    assert all(np.array_equal(q, hold[0][1]) for _, q, _ in hold)
    assert all(np.allclose(pos, hold[0][2]) for _, _, pos in hold)
    ev = cell.arm.stop_events[0]
    assert ev.cause == "zone" and 0.0 <= ev.reaction_s <= zone.max_halt_s
    assert ev.cleared_at is not None and ev.cleared_at > t_in + 3.0


def test_stopped_between_motions_every_motion_is_refused_without_moving_until_cleared(sim_cell):
    cell = sim_cell
    carton = _carton(cell)
    assert cell.arm.pick(Grasp("suction", _top(cell, carton), DOWN)).success
    cell.arm.stop()
    q0 = cell.arm.q()
    item0 = cell.item_pose(carton)[0]
    placement = OracleGraspSource(cell).placement()
    for motion in (lambda: cell.arm.place(placement), cell.arm.home):
        assert motion().reason is Reason.ESTOP  # refused, not moved, nothing dropped
    cell.arm.idle(30.0)
    np.testing.assert_array_equal(cell.arm.q(), q0)
    np.testing.assert_allclose(cell.item_pose(carton)[0], item0, atol=1e-9)
    assert cell.arm.held_item == carton and cell.arm.stopped  # time alone never clears it
    cell.arm.clear_stop()
    assert cell.arm.place(placement).success and carton in cell.items_in_box()
