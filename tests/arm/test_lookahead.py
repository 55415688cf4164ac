"""Sensing and planning while the arm places (arm/lookahead.py), through the real controller and arm.

The plan made while the arm placed is used when the tote did not change under it (its planning
time then mostly hidden), and discarded when the place moved an item under it.
"""

from __future__ import annotations

import pybullet as p
import pytest
from cellrig import ScriptedPlanner, add_carton, count_captures


def _two_cartons(st) -> tuple[int, int]:
    a = add_carton(st, dy=-0.07)
    b = add_carton(st, dy=0.07)
    st.controller.planner = ScriptedPlanner(st.controller.planner)
    return a, b


def test_the_plan_made_while_placing_is_used_and_its_planning_is_hidden(stack_factory):
    st = stack_factory()
    a, b = _two_cartons(st)
    rep = st.controller.run_tote("t0")
    assert rep.status == "cleared" and {a, b} <= set(st.cell.items_in_box())
    assert rep.lookahead_used >= 1 and rep.lookahead_discarded == 0
    # The first plan was made before any motion (exposed); a plan made during a place is not.
    assert rep.plan_exposed_ms[0] == rep.plan_latency_ms[0]
    assert sum(rep.plan_exposed_ms) < sum(rep.plan_latency_ms)


def test_the_plan_made_while_placing_is_discarded_when_the_place_moved_an_item_under_it(stack_factory):
    st = stack_factory()
    a, b = _two_cartons(st)
    arm = st.cell.arm
    moved = []

    def disturb(_arm, event):
        # After the look (the arm is over the box, lowering the item into it), the place disturbs
        # the tote: the carton still there is shoved 4 cm sideways (as a falling item or a dragged
        # cable would).
        if event == "sample" and _arm.phase == "place" and not moved:
            other = b if b in st.cell.items_in_tote() else a
            pos, orn = p.getBasePositionAndOrientation(other, physicsClientId=st.cell.client_id)
            p.resetBasePositionAndOrientation(
                other, (pos[0] + 0.04, pos[1], pos[2]), orn, physicsClientId=st.cell.client_id
            )
            moved.append(other)

    arm.observers.append(disturb)
    rep = st.controller.run_tote("t0")
    assert moved, "the place never lowered its item"
    # Same scene as the test above, where the plan was used: here the check saw the change.
    assert rep.lookahead_discarded >= 1
    # The cell planned again on a fresh frame and still cleared the tote.
    assert rep.status == "cleared" and {a, b} <= set(st.cell.items_in_box())


def test_the_plan_made_while_placing_is_discarded_when_the_model_was_swapped_meanwhile(stack_factory):
    st = stack_factory()
    a, b = _two_cartons(st)
    old = st.controller.planner
    swapped = []

    def swap_after_first_attempt(att, plan):
        # A hot-swap lands after the first place, when the look-ahead plan was made by the old planner.
        if not swapped:
            st.controller.planner = ScriptedPlanner(old)
            swapped.append(st.controller.planner)

    st.controller.on_attempt = swap_after_first_attempt
    rep = st.controller.run_tote("t0")
    # Same scene as the first test, where nothing was discarded: here the swap voided the plan.
    assert swapped and rep.lookahead_discarded >= 1
    assert rep.status == "cleared" and {a, b} <= set(st.cell.items_in_box())


@pytest.mark.parametrize("capture_s, in_release", [(0.1, True), (1.0, False), (None, False)])
def test_the_look_while_placing_is_behind_motion_and_its_check_only_inside_a_release_it_fits_in(
    stack_factory, capture_s, in_release
):
    """The look is taken while the arm carries; the check of its plan while the gripper lets go,
    when one capture (`capture_s`; the simulated camera's is 0.1 s) fits in the release (the cup
    takes 0.15 s, the fingers 0.25 s), else the arm waits for it (and when the time is unknown)."""
    st = stack_factory()
    _two_cartons(st)
    ahead = st.controller.lookahead
    assert ahead.capture_s == st.cell.camera.capture_s == 0.1  # the camera says what a capture takes
    ahead.capture_s = capture_s
    checks = []
    take = ahead.take

    def counting_take():
        checks.append(ahead.check_in_release)
        return take()

    ahead.take = counting_take
    captures = count_captures(st)
    rep = st.controller.run_tote("t0")
    assert rep.status == "cleared" and rep.lookahead_used >= 1
    assert checks and all(c is in_release for c in checks)
    # One look per place (two places), each taken while the arm moved, and each check of a plan made
    # on one: in the release, or a capture the arm waits for.
    assert rep.captures_behind_motion == 2 + (len(checks) if in_release else 0)
    assert rep.captures_exposed + rep.captures_behind_motion + rep.captures_while_waiting == captures["n"]
    assert rep.captures_exposed >= 1 + (0 if in_release else len(checks))
